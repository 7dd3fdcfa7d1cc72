/* Every float32 bit pattern (all 2^32) through the JSON printer: each finite
 * value must read back bit for bit under strtof, and no decimal of fewer
 * digits may read back as it (checked on the two decimals of one digit
 * less around the printed one, which are the nearest: see test_codec.c).
 * Too slow for make test (about ten minutes on two cores); `make
 * floats-exhaustive` runs it. Prints "N passed, N failed".
 *
 * Usage: float32_exhaustive [--threads N] [--stride S]  (S > 1: every S-th
 * pattern, for a quick look) */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

typedef struct range {
    uint64_t from, to, stride;
    uint64_t checked, failed;
} range;

/* Writes "<c>e<e>" at t. */
static void put_sci(char *t, uint64_t c, int e)
{
    char d[24];
    int n = 0;
    do
        d[n++] = (char)('0' + c % 10);
    while (c /= 10);
    while (n)
        *t++ = d[--n];
    sprintf(t, "e%d", e);
}

static void *run(void *arg)
{
    range *r = arg;
    sbuf b = {0};
    char t[48];
    for (uint64_t u = r->from; u < r->to; u += r->stride) {
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, 4);
        if (!isfinite(f))
            continue;
        b.len = 0;
        sbuf_num(&b, f, 1);
        r->checked++;
        float back = strtof(b.p, NULL);
        int bad = memcmp(&back, &f, 4) != 0;
        if (!bad && f != 0) {
            /* digits and the exponent of the last one */
            uint64_t d = 0;
            int n = 0, frac = 0, point = 0, e = 0;
            const char *s = b.p;
            for (; *s && *s != 'e'; s++) {
                if (*s == '.')
                    point = 1;
                else if (*s >= '0' && *s <= '9') {
                    frac += point;
                    if (n || *s != '0') {
                        d = d * 10 + (uint64_t)(*s - '0');
                        n++;
                    }
                }
            }
            e = (*s ? atoi(s + 1) : 0) - frac;
            while (n > 1 && d % 10 == 0) {
                d /= 10;
                e++;
                n--;
            }
            for (uint64_t c = d / 10; n > 1 && c <= d / 10 + 1 && !bad; c++) {
                put_sci(t, c, e + 1);
                float g = strtof(t, NULL);
                bad = fabsf(f) == g;
            }
        }
        if (bad) {
            if (r->failed < 20)
                fprintf(stderr, "0x%08x (%a) printed as %s: %s\n", bits, (double)f, b.p,
                        memcmp(&back, &f, 4) ? "does not read back" : "a shorter decimal reads back");
            r->failed++;
        }
    }
    sbuf_free(&b);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = 2;
    uint64_t stride = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--stride"))
            stride = strtoull(argv[i + 1], NULL, 10);
    }
    if (threads < 1 || threads > 64)
        threads = 2;
    if (stride < 1)
        stride = 1;
    range r[64];
    pthread_t th[64];
    const uint64_t total = (uint64_t)1 << 32, chunk = total / (uint64_t)threads / stride * stride;
    for (int k = 0; k < threads; k++) {
        r[k] = (range){(uint64_t)k * chunk, k == threads - 1 ? total : (uint64_t)(k + 1) * chunk, stride, 0, 0};
        if (pthread_create(&th[k], NULL, run, &r[k])) {
            fprintf(stderr, "float32_exhaustive: cannot start a thread\n");
            return 1;
        }
    }
    uint64_t checked = 0, failed = 0;
    for (int k = 0; k < threads; k++) {
        pthread_join(th[k], NULL);
        checked += r[k].checked;
        failed += r[k].failed;
    }
    printf("float32 printing, %llu finite patterns (stride %llu): exact and shortest\n", (unsigned long long)checked,
           (unsigned long long)stride);
    printf("%llu passed, %llu failed\n", (unsigned long long)(checked - failed), (unsigned long long)failed);
    return failed != 0;
}
