/* Text and number codecs of the API: a growable buffer, JSON strings,
 * shortest round-trip printing of float32/float64, JSON arrays to vectors,
 * UTF-8 validation, timestamps and the request digest. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api/internal.h"

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

/* Shortest "%.*g" that reads back exactly: %g drops trailing zeros, so the
 * first precision that round-trips gives the shortest digits. */
static int fmt_num(char *out, size_t len, double v, int f32)
{
    int n = 0;
    if (f32) {
        float f = (float)v;
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

void rfc3339(int64_t ms, char out[32])
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* 64-bit multiply-xorshift over 8-byte words (FNV would be a byte at a time). */
uint64_t digest64(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 0x9E3779B97F4A7C15u ^ n;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDu;
        h ^= h >> 32;
    }
    for (; i < n; i++)
        h = (h ^ s[i]) * 0x100000001B3u;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53u;
    h ^= h >> 33;
    return h;
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
        snprintf(msg, msglen, "element %zu is not a finite %s", i, dtype == OPTIM_F64 ? "float64" : "float32");
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
