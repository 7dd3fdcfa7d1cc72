/* Benchmark of the JSON number printer (http/codec.c's sbuf_vec, as a step's
 * JSON reply prints its params): ns per number for 1,000 float32 and 1,000
 * float64 values of the magnitudes params have (|x| in 1e-4..10, full
 * precision, both signs), the median of many repetitions, and the bytes per
 * number printed. Linked with the daemon's objects.
 *
 * Prints one JSON line:
 *   {"kind": "json_print", "n": 1000, "f32_ns": .., "f64_ns": .., "f32_bytes": .., "f64_bytes": ..}
 *
 * Usage: codec [--reps R] */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench.h"
#include "http/httpInt.h"

#define N 1000
#define MAX_REPS 1001

/* ns per number of printing x (N elements of dtype) as a JSON array, the
 * median over reps; *bytes gets the printed bytes per number. */
static double time_print(const void *x, optim_dtype dtype, int reps, double *bytes)
{
    static double t[MAX_REPS];
    sbuf b = {0};
    for (int r = 0; r < reps; r++) {
        b.len = 0;
        double t0 = now_ns();
        for (int k = 0; k < 10; k++) {
            b.len = 0;
            sbuf_vec(&b, x, N, dtype);
        }
        t[r] = (now_ns() - t0) / (10.0 * N);
    }
    *bytes = (double)b.len / N;
    sbuf_free(&b);
    return median(t, reps);
}

int main(int argc, char **argv)
{
    int reps = 301;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: codec [--reps R]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > MAX_REPS)
        reps = 301;
    static float f[N];
    static double d[N];
    uint64_t s = 88172645463325252u;
    for (int i = 0; i < N; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        double u = (double)(s >> 11) / 9007199254740992.0 - 0.5;
        d[i] = u * 2 * pow(10, (double)(s % 5) - 3);
        f[i] = (float)d[i];
    }
    double bf, bd;
    double tf = time_print(f, OPTIM_F32, reps, &bf);
    double td = time_print(d, OPTIM_F64, reps, &bd);
    printf("{\"kind\": \"json_print\", \"n\": %d, \"reps\": %d, \"f32_ns\": %.2f, \"f64_ns\": %.2f, "
           "\"f32_bytes\": %.2f, \"f64_bytes\": %.2f}\n",
           N, reps, tf, td, bf, bd);
    return 0;
}
