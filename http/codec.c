/* Text and number codecs of the API: a growable buffer, JSON strings,
 * shortest round-trip printing of float32/float64, JSON arrays to vectors,
 * UTF-8 validation, timestamps and the request digest. */
#include <ctype.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "http/httpInt.h"

static int grow(sbuf *b, size_t extra)
{
    if (b->oom)
        return -1;
    if (b->len + extra + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

void sbuf_put(sbuf *b, const char *s, size_t n)
{
    if (grow(b, n))
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void sbuf_puts(sbuf *b, const char *s) { sbuf_put(b, s, strlen(s)); }

void sbuf_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || grow(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void sbuf_json_str(sbuf *b, const char *s)
{
    sbuf_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            sbuf_put(b, e, 2);
        } else if (c < 0x20) {
            sbuf_printf(b, "\\u%04x", c);
        } else {
            sbuf_put(b, s, 1);
        }
    }
    sbuf_put(b, "\"", 1);
}

/* Powers of ten that a double holds exactly. */
static const double pow10_exact[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                       1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Writes digits (m > 0, no trailing zeros) with decimal exponent e10 of its
 * first digit, %g style: plain notation for -5 <= e10 < 17, else d.ddde±x. */
static int put_digits(char *out, int neg, uint64_t m, int ndig, int e10)
{
    char d[24], *p = out;
    for (int i = ndig - 1; i >= 0; i--, m /= 10)
        d[i] = (char)('0' + m % 10);
    if (neg)
        *p++ = '-';
    if (e10 >= -5 && e10 < 17) {
        if (e10 < 0) {
            *p++ = '0';
            *p++ = '.';
            for (int i = -1; i > e10; i--)
                *p++ = '0';
            memcpy(p, d, (size_t)ndig);
            p += ndig;
        } else {
            for (int i = 0; i <= e10; i++)
                *p++ = i < ndig ? d[i] : '0';
            if (ndig > e10 + 1) {
                *p++ = '.';
                memcpy(p, d + e10 + 1, (size_t)(ndig - e10 - 1));
                p += ndig - e10 - 1;
            }
        }
    } else {
        *p++ = d[0];
        if (ndig > 1) {
            *p++ = '.';
            memcpy(p, d + 1, (size_t)(ndig - 1));
            p += ndig - 1;
        }
        p += sprintf(p, "e%d", e10);
    }
    *p = '\0';
    return (int)(p - out);
}

/* The fast path for a float32: for 6..9 significant digits, round x * 10^k
 * to an integer in double and accept the first candidate whose exact value
 * lies strictly within half a float ulp of x (provable from the double
 * error bound, so it reads back as x under any correct parser). Returns 0
 * when the powers involved are not exact in double (very large or small
 * values): the caller then takes the slow path. */
static int fmt_f32_fast(char *out, float f)
{
    double x = fabs((double)f);
    if (x == 0)
        return (int)(strcpy(out, signbit(f) ? "-0" : "0"), signbit(f) ? 2 : 1);
    int e10 = (int)floor(log10(x));
    double half_ulp = ldexp(1.0, ilogb(f) - 24); /* half the spacing of floats at x */
    if (fpclassify(f) == FP_SUBNORMAL)
        return 0;
    for (int p = 6; p <= 9; p++) {
        int k = p - 1 - e10;
        if (k < -22 || k > 22)
            return 0;
        double m = k >= 0 ? nearbyint(x * pow10_exact[k]) : nearbyint(x / pow10_exact[-k]);
        double back = k >= 0 ? m / pow10_exact[k] : m * pow10_exact[-k];
        /* back carries at most half a double ulp of error; keep a margin. */
        if (!(fabs(back - x) < half_ulp * (1 - 1e-9)))
            continue;
        uint64_t mi = (uint64_t)m;
        int ndig = p, e = e10;
        if (mi >= (uint64_t)pow10_exact[p]) { /* rounding carried into a new digit */
            ndig = p + 1;
            e = e10 + 1;
        }
        while (mi % 10 == 0 && ndig > 1) {
            mi /= 10;
            ndig--;
        }
        return put_digits(out, signbit(f) != 0, mi, ndig, e);
    }
    return 0;
}

/* Shortest "%.*g" that reads back exactly: %g drops trailing zeros, so the
 * first precision that round-trips gives the shortest digits. */
static int fmt_num(char *out, size_t len, double v, int f32)
{
    int n = 0;
    if (!isfinite(f32 ? (float)v : v)) /* JSON has no inf or NaN */
        return (int)(memcpy(out, "null", 5), 4);
    if (f32) {
        float f = (float)v;
        if ((n = fmt_f32_fast(out, f)) > 0)
            return n;
        for (int prec = 6; prec <= 9; prec++) {
            n = snprintf(out, len, "%.*g", prec, (double)f);
            if (strtof(out, NULL) == f)
                break;
        }
    } else {
        for (int prec = 15; prec <= 17; prec++) {
            n = snprintf(out, len, "%.*g", prec, v);
            if (strtod(out, NULL) == v)
                break;
        }
    }
    return n;
}

void sbuf_num(sbuf *b, double v, int f32)
{
    char tmp[40];
    int n = fmt_num(tmp, sizeof tmp, v, f32);
    sbuf_put(b, tmp, (size_t)n);
}

void sbuf_vec(sbuf *b, const void *x, size_t n, optim_dtype dtype)
{
    /* Reserve the worst case once, then print in place. */
    if (grow(b, n * 26 + 2))
        return;
    char *p = b->p + b->len;
    *p++ = '[';
    for (size_t i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        double v = dtype == OPTIM_F64 ? ((const double *)x)[i] : ((const float *)x)[i];
        p += fmt_num(p, 26, v, dtype == OPTIM_F32);
    }
    *p++ = ']';
    *p = '\0';
    b->len = (size_t)(p - b->p);
}

void sbuf_vec_items(sbuf *b, const void *x, size_t from, size_t n, optim_dtype dtype)
{
    if (grow(b, n * 26))
        return;
    char *p = b->p + b->len;
    for (size_t i = from; i < from + n; i++) {
        if (i)
            *p++ = ',';
        double v = dtype == OPTIM_F64 ? ((const double *)x)[i] : ((const float *)x)[i];
        p += fmt_num(p, 26, v, dtype == OPTIM_F32);
    }
    *p = '\0';
    b->len = (size_t)(p - b->p);
}

void sbuf_free(sbuf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

bool utf8_valid(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t k;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            k = 1;
            cp = c & 0x1F;
        } else if ((c & 0xF0) == 0xE0) {
            k = 2;
            cp = c & 0x0F;
        } else if ((c & 0xF8) == 0xF0) {
            k = 3;
            cp = c & 0x07;
        } else {
            return false;
        }
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xC0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        /* Overlong forms, surrogates and values past U+10FFFF are invalid. */
        if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) || cp > 0x10FFFF ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += k + 1;
    }
    return true;
}

void rfc3339(int64_t ms, int with_ms, char out[32])
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    if (with_ms)
        snprintf(out + n, 32 - n, ".%03dZ", (int)(ms % 1000));
    else
        snprintf(out + n, 32 - n, "Z");
}

optd_err json_to_vec(const cJSON *arr, void *out, size_t n, optim_dtype dtype, char *msg, size_t msglen)
{
    size_t i = 0;
    for (const cJSON *e = arr->child; e && i < n; e = e->next, i++) {
        if (!cJSON_IsNumber(e)) {
            snprintf(msg, msglen, "element %zu is not a number", i);
            return OPTD_E_BAD_REQUEST;
        }
        double v = e->valuedouble;
        if (dtype == OPTIM_F64) {
            if (!isfinite(v))
                goto nonfinite;
            ((double *)out)[i] = v;
        } else {
            float f = (float)v;
            if (!isfinite(f))
                goto nonfinite;
            ((float *)out)[i] = f;
        }
        continue;
    nonfinite:
        snprintf(msg, msglen, "element %zu is not a finite %s", i, engine_dtype_name(dtype));
        return OPTD_E_NON_FINITE;
    }
    return OPTD_OK;
}

bool vec_finite(const void *x, size_t n, optim_dtype dtype, size_t *bad)
{
    for (size_t i = 0; i < n; i++) {
        double v = dtype == OPTIM_F64 ? ((const double *)x)[i] : ((const float *)x)[i];
        if (!isfinite(v)) {
            *bad = i;
            return false;
        }
    }
    return true;
}

/* Scans one JSON number at s (RFC 8259 grammar) and converts it. Exact: a
 * mantissa of at most 15 digits with a power of ten a double holds exactly
 * takes one correctly rounded operation (Clinger's fast path); a float32 is
 * rounded from that double unless the double sits exactly on a float
 * midpoint, where double rounding could err; everything else goes to
 * strtod/strtof. Returns the end of the number, or NULL if none is there. */
const char *scan_number(const char *s, const char *end, optim_dtype dtype, double *out)
{
    const char *p = s;
    uint64_t mant = 0;
    int digits = 0, exp10 = 0, neg = 0, exp_val = 0, exp_neg = 0;
    if (p < end && *p == '-')
        neg = 1, p++;
    if (p >= end || !isdigit((unsigned char)*p))
        return NULL;
    if (*p == '0') {
        p++;
    } else {
        for (; p < end && isdigit((unsigned char)*p); p++, digits++)
            if (digits < 19)
                mant = mant * 10 + (uint64_t)(*p - '0');
            else
                exp10++;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || !isdigit((unsigned char)*p))
            return NULL;
        for (; p < end && isdigit((unsigned char)*p); p++) {
            if (digits == 0 && *p == '0' && mant == 0) {
                exp10--; /* leading zeros of 0.000x are not significant */
                continue;
            }
            if (digits < 19) {
                mant = mant * 10 + (uint64_t)(*p - '0');
                exp10--;
            }
            digits++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            exp_neg = *p++ == '-';
        if (p >= end || !isdigit((unsigned char)*p))
            return NULL;
        for (; p < end && isdigit((unsigned char)*p); p++)
            if (exp_val < 100000)
                exp_val = exp_val * 10 + (*p - '0');
    }
    exp10 += exp_neg ? -exp_val : exp_val;
    double d;
    if (digits <= 15 && exp10 >= -22 && exp10 <= 22) {
        d = (double)mant;
        d = exp10 >= 0 ? d * pow10_exact[exp10] : d / pow10_exact[-exp10];
        if (neg)
            d = -d;
        if (dtype == OPTIM_F32) {
            uint64_t bits;
            memcpy(&bits, &d, 8);
            if ((bits & 0x1FFFFFFFu) == 0x10000000u || (d != 0 && fabs(d) < FLT_MIN))
                d = strtof(s, NULL); /* a float midpoint or subnormal: round once, from the text */
        }
    } else {
        d = dtype == OPTIM_F32 ? strtof(s, NULL) : strtod(s, NULL);
    }
    *out = d;
    return p;
}

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* Reads a key without escapes; NULL when there is none such. */
static const char *scan_key(const char *p, const char *end, const char **key, size_t *klen)
{
    if (p >= end || *p != '"')
        return NULL;
    const char *k = ++p;
    while (p < end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
        p++;
    if (p >= end || *p != '"')
        return NULL;
    *key = k;
    *klen = (size_t)(p - k);
    return p + 1;
}

int step_body_fast(const char *body, size_t len, optim_dtype dtype, size_t n, void *grad, step_fields *out)
{
    const char *p = body, *end = body + len;
    int seen_grad = 0, seen_loss = 0, seen_weight = 0;
    step_fields f = {0, 0, 1};
    p = skip_ws(p, end);
    if (p >= end || *p++ != '{')
        return 0;
    for (;;) {
        const char *key;
        size_t klen;
        p = skip_ws(p, end);
        if (!(p = scan_key(p, end, &key, &klen)))
            return 0;
        p = skip_ws(p, end);
        if (p >= end || *p++ != ':')
            return 0;
        p = skip_ws(p, end);
        if (klen == 4 && memcmp(key, "grad", 4) == 0 && !seen_grad) {
            seen_grad = 1;
            if (p >= end || *p++ != '[')
                return 0;
            size_t i = 0;
            p = skip_ws(p, end);
            if (p < end && *p == ']') {
                p++;
            } else {
                for (;;) {
                    double v;
                    if (i >= n || !(p = scan_number(p, end, dtype, &v)))
                        return 0;
                    if (dtype == OPTIM_F64) {
                        if (!isfinite(v))
                            return 0;
                        ((double *)grad)[i++] = v;
                    } else {
                        if (!isfinite((float)v))
                            return 0;
                        ((float *)grad)[i++] = (float)v;
                    }
                    p = skip_ws(p, end);
                    if (p < end && *p == ',') {
                        p = skip_ws(p + 1, end);
                        continue;
                    }
                    if (p < end && *p == ']') {
                        p++;
                        break;
                    }
                    return 0;
                }
            }
            if (i != n)
                return 0;
        } else if (klen == 4 && memcmp(key, "loss", 4) == 0 && !seen_loss) {
            seen_loss = 1;
            if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
                p += 4;
            } else {
                if (!(p = scan_number(p, end, OPTIM_F64, &f.loss)) || !isfinite(f.loss))
                    return 0;
                f.has_loss = 1;
            }
        } else if (klen == 6 && memcmp(key, "weight", 6) == 0 && !seen_weight) {
            seen_weight = 1;
            if (!(p = scan_number(p, end, OPTIM_F64, &f.weight)) || !(f.weight > 0) || !isfinite(f.weight))
                return 0;
        } else {
            return 0;
        }
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p++;
            continue;
        }
        if (p < end && *p == '}') {
            p = skip_ws(p + 1, end);
            break;
        }
        return 0;
    }
    if (p != end || !seen_grad)
        return 0;
    *out = f;
    return 1;
}

/* Length of the JSON number at p (RFC 8259 grammar), or 0 when none is there. */
static size_t json_number_len(const char *p, const char *end)
{
    const char *s = p;
    if (p < end && *p == '-')
        p++;
    if (p >= end || !isdigit((unsigned char)*p))
        return 0;
    if (*p == '0')
        p++;
    else
        while (p < end && isdigit((unsigned char)*p))
            p++;
    if (p < end && *p == '.') {
        if (++p >= end || !isdigit((unsigned char)*p))
            return 0;
        while (p < end && isdigit((unsigned char)*p))
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        if (++p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || !isdigit((unsigned char)*p))
            return 0;
        while (p < end && isdigit((unsigned char)*p))
            p++;
    }
    /* A number ends where a structural character or white space begins. */
    if (p < end && !strchr(",]} \t\r\n", *p))
        return 0;
    return (size_t)(p - s);
}

bool json_numbers_strict(const char *s, size_t n)
{
    const char *p = s, *end = s + n;
    while (p < end) {
        if (*p == '"') { /* skip a string, escapes included */
            for (p++; p < end && *p != '"'; p++)
                if (*p == '\\')
                    p++;
            p++;
        } else if (*p == '-' || isdigit((unsigned char)*p)) {
            size_t len = json_number_len(p, end);
            if (!len)
                return false;
            p += len;
        } else {
            p++;
        }
    }
    return true;
}
