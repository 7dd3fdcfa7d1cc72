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

#include "common/shortest.h"
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

/* "00" "01" .. "99": two digits per division. */
static const char DIGIT_PAIRS[201] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                     "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                     "8081828384858687888990919293949596979899";

/* The number of decimal digits of m (0 < m < 10^19). */
static int digit_count(uint64_t m)
{
    static const uint64_t pow10[20] = {1u,
                                       10u,
                                       100u,
                                       1000u,
                                       10000u,
                                       100000u,
                                       1000000u,
                                       10000000u,
                                       100000000u,
                                       1000000000u,
                                       10000000000u,
                                       100000000000u,
                                       1000000000000u,
                                       10000000000000u,
                                       100000000000000u,
                                       1000000000000000u,
                                       10000000000000000u,
                                       100000000000000000u,
                                       1000000000000000000u,
                                       10000000000000000000u};
    int n = ((64 - __builtin_clzll(m)) * 1233) >> 12; /* floor(log10(2^bits)) */
    return n + (m >= pow10[n]);
}

/* Writes exactly 8 digits of v < 10^8 at d: two independent chains of
 * divisions by constants, which gcc turns into multiplications. */
static inline __attribute__((always_inline)) void write8(char *d, uint32_t v)
{
    uint32_t a = v / 10000, b = v % 10000;
    memcpy(d, DIGIT_PAIRS + 2 * (a / 100), 2);
    memcpy(d + 2, DIGIT_PAIRS + 2 * (a % 100), 2);
    memcpy(d + 4, DIGIT_PAIRS + 2 * (b / 100), 2);
    memcpy(d + 6, DIGIT_PAIRS + 2 * (b % 100), 2);
}

/* Room a number's printer may write at out: its text (at most 25 bytes:
 * "-1.2345678901234567e-308") plus the fixed-size copies that spare it a
 * branch per digit count. Callers reserve it; only the text counts. */
#define NUM_ROOM 48

/* Writes digits m (0 < m < 10^17, no trailing zeros; < 10^9 when f32, which
 * spares it two-fifths of the digit work) times 10^exp10, %g
 * style: plain notation when the first digit's exponent e is in [-5, 17),
 * else d.ddde±x. out has NUM_ROOM bytes; returns the text's length. The
 * digits go to a scratch buffer as 17 with leading zeros, then move in
 * copies of fixed size, so the cost hangs on no digit count. */
static int put_decimal(char *out, int neg, uint64_t m, int exp10, int f32)
{
    char d[40];
    if (f32) { /* m < 10^9: the last 9 of the 17 suffice */
        uint32_t top = (uint32_t)m / 100000000;
        d[8] = (char)('0' + top);
        write8(d + 9, (uint32_t)m - top * 100000000);
    } else {
        uint64_t hi = m / 100000000;
        uint32_t top = (uint32_t)(hi / 100000000);
        d[0] = (char)('0' + top);
        write8(d + 1, (uint32_t)(hi - (uint64_t)top * 100000000));
        write8(d + 9, (uint32_t)(m - hi * 100000000));
    }
    memset(d + 17, '0', sizeof d - 17);
    int ndig = digit_count(m), e = exp10 + ndig - 1;
    const char *s = d + 17 - ndig; /* the ndig digits, then zeros */
    char *p = out;
    *p = '-';
    p += neg;
    if (e >= -5 && e < 17) {
        if (e < 0) { /* 0.000ddd */
            memcpy(p, "0.00000", 8);
            p += 1 - e;
            memcpy(p, s, 17);
            p += ndig;
        } else if (ndig <= e + 1) { /* ddd000 (e + 1 <= 17): the zeros are the scratch's */
            memcpy(p, s, 17);
            p += e + 1;
        } else { /* ddd.ddd */
            memcpy(p, s, 17);
            p[e + 1] = '.';
            memcpy(p + e + 2, s + e + 1, 16);
            p += ndig + 1;
        }
    } else {
        p[0] = s[0];
        p[1] = '.';
        memcpy(p + 2, s + 1, 16);
        p += ndig > 1 ? ndig + 1 : 1;
        *p++ = 'e';
        if (e < 0) {
            *p++ = '-';
            e = -e;
        }
        if (e >= 100) {
            *p++ = (char)('0' + e / 100);
            e %= 100;
            memcpy(p, DIGIT_PAIRS + 2 * e, 2);
            p += 2;
        } else if (e >= 10) {
            memcpy(p, DIGIT_PAIRS + 2 * e, 2);
            p += 2;
        } else {
            *p++ = (char)('0' + e);
        }
    }
    *p = '\0';
    return (int)(p - out);
}

/* "null" for inf and NaN (JSON has neither), "0" or "-0" for a zero; 0 for
 * any other value, which the caller prints. */
static int fmt_special(char *out, double v)
{
    if (!isfinite(v))
        return (int)(memcpy(out, "null", 5), 4);
    if (v != 0)
        return 0;
    return (int)(strcpy(out, signbit(v) ? "-0" : "0"), signbit(v) ? 2 : 1);
}

/* The shortest decimal that reads back as exactly v, as a float32 when f32
 * (v is then one, widened exactly), by Dragonbox through common/shortest.h.
 * out has NUM_ROOM bytes; returns the text's length. */
static int fmt_num(char *out, double v, int f32)
{
    uint64_t m;
    uint32_t m32;
    int e, n = fmt_special(out, v);
    if (n)
        return n;
    if (f32) {
        optd_shortest_f32((float)v, &m32, &e);
        m = m32;
    } else {
        optd_shortest_f64(v, &m, &e);
    }
    return put_decimal(out, signbit(v) != 0, m, e, f32);
}

void sbuf_num(sbuf *b, double v, int f32)
{
    char tmp[NUM_ROOM];
    int n = fmt_num(tmp, f32 ? (float)v : v, f32);
    sbuf_put(b, tmp, (size_t)n);
}

void sbuf_vec(sbuf *b, const void *x, size_t n, optim_dtype dtype)
{
    /* Reserve the worst case once, then print in place. */
    if (grow(b, n * 26 + 2 + NUM_ROOM))
        return;
    char *p = b->p + b->len;
    *p++ = '[';
    for (size_t i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        p += fmt_num(p, dtype == OPTIM_F64 ? ((const double *)x)[i] : ((const float *)x)[i], dtype == OPTIM_F32);
    }
    *p++ = ']';
    *p = '\0';
    b->len = (size_t)(p - b->p);
}

void sbuf_vec_items(sbuf *b, const void *x, size_t from, size_t n, optim_dtype dtype)
{
    if (grow(b, n * 26 + NUM_ROOM))
        return;
    char *p = b->p + b->len;
    for (size_t i = from; i < from + n; i++) {
        if (i)
            *p++ = ',';
        p += fmt_num(p, dtype == OPTIM_F64 ? ((const double *)x)[i] : ((const float *)x)[i], dtype == OPTIM_F32);
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
