/* Checks of printed decimals shared by tests/test_codec.c and
 * tests/float32_exhaustive.c (header only). */
#ifndef OPTD_DECIMAL_CHECK_H
#define OPTD_DECIMAL_CHECK_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Reads a printed decimal into its significant digits (no leading or
 * trailing zeros) and the exponent of the last one; returns their count. */
static inline int decimal_parts(const char *s, uint64_t *digits, int *exp10)
{
    uint64_t d = 0;
    int n = 0, frac = 0, seen_point = 0, e = 0;
    for (; *s && *s != 'e' && *s != 'E'; s++) {
        if (*s == '.') {
            seen_point = 1;
        } else if (*s >= '0' && *s <= '9') {
            frac += seen_point;
            if (n || *s != '0') {
                d = d * 10 + (uint64_t)(*s - '0');
                n++;
            }
        }
    }
    if (*s)
        e = atoi(s + 1);
    e -= frac;
    while (n > 1 && d % 10 == 0) {
        d /= 10;
        e++;
        n--;
    }
    *digits = d;
    *exp10 = e;
    return n;
}

/* Writes "<c>e<e>" at t (48 bytes), without snprintf's cost: the
 * exhaustive check calls it twice for each of 2^32 values. */
static inline void put_sci(char *t, uint64_t c, int e)
{
    char d[24];
    int n = 0;
    do
        d[n++] = (char)('0' + c % 10);
    while (c /= 10);
    while (n)
        *t++ = d[--n];
    *t++ = 'e';
    if (e < 0) {
        *t++ = '-';
        e = -e;
    }
    n = 0;
    do
        d[n++] = (char)('0' + e % 10);
    while (e /= 10);
    while (n)
        *t++ = d[--n];
    *t = '\0';
}

/* Whether a decimal of fewer digits than the printed one (digits * 10^e)
 * reads back as the same value. The two decimals of one digit less around
 * it are the nearest ones; the set that reads back as the value is an
 * interval around it, so if any shorter decimal is in it, one of the two
 * is. */
static inline int shorter_exists(uint64_t digits, int e, int n, double v, int f32)
{
    if (n <= 1)
        return 0;
    char t[48];
    for (uint64_t c = digits / 10; c <= digits / 10 + 1; c++) {
        put_sci(t, c, e + 1);
        if (f32 ? strtof(t, NULL) == (float)v : strtod(t, NULL) == v)
            return 1;
    }
    return 0;
}

#endif
