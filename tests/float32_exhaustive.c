/* Every float32 bit pattern (all 2^32) through the JSON printer: each finite
 * value must read back bit for bit under strtof, and no decimal of fewer
 * digits may read back as it (checked on the two decimals of one digit
 * less around the printed one, which are the nearest: decimal_check.h).
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
#include "tests/decimal_check.h"

typedef struct range {
    uint64_t from, to, stride;
    uint64_t checked, failed;
} range;

static void *run(void *arg)
{
    range *r = arg;
    sbuf b = {0};
    for (uint64_t u = r->from; u < r->to; u += r->stride) {
        uint32_t bits = (uint32_t)u;
        float f;
        memcpy(&f, &bits, sizeof f);
        if (isfinite(f))
            r->checked++;
        else
            continue;
        b.len = 0;
        sbuf_num(&b, f, 1);
        float back = strtof(b.p, NULL);
        int bad = memcmp(&back, &f, 4) != 0;
        if (!bad && f != 0) {
            uint64_t d;
            int e, n = decimal_parts(b.p, &d, &e);
            bad = shorter_exists(d, e, n, f, 1);
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
