/* Benchmark of optim_step: ns per element for every optimizer, dtype and size,
 * beside STREAM-like loops that measure this machine's memory bandwidth, so an
 * optimizer's time at 1e7 elements can be set against the time its bytes need.
 * Built with the library's flags (-O3 -fno-math-errno) and linked with its
 * objects. Single-threaded, like optim_step in the daemon.
 *
 * Standalone, it prints tab-separated records (bench/report.py reads them):
 *   stream  <kernel> <bytes/elem> <bytes/ns median> <bytes/ns best>
 *   kernel  <opt> <f32|f64> <n> <ns/elem median> <ns/elem min> <bytes/elem> <iters> <reps>
 *           <ns/elem median with optim_stats>
 *           [<ratio to STREAM bound> <ratio to in-place bound>]   (at n >= 1e7)
 * The bound ratios at 1e7 are medians of per-repetition ratios, each taken
 * against copy/triad/update loops run right after that repetition, so machine
 * noise hits both sides of a ratio alike.
 *
 * With --serve it reads requests from stdin, one per line, and answers each
 * with one line, so another program (bench/torch_kernels.py) can interleave
 * its own measurements with these:
 *   "<opt> <f32|f64> <n> <ms> <stats>"  ->  "<ns/elem> <bytes/elem>"  (one timed
 *        run of ~ms, with optim_stats when stats is 1; a new configuration is
 *        set up, warmed and sized first)
 *   "stream"                    ->  "<copy> <triad> <update>"  (bytes/ns, 1e7)
 *   "floor <opt> <f32|f64> <n>" ->  "<divider ns/elem> <memory ns/elem>": the
 *        configuration's floor (see "The floor" below)
 *   "isa"                       ->  the instruction set optim_step runs with
 *
 * --isa sse2|avx2|avx512f runs optim_step with that instruction set instead
 * of the best one this CPU has (the first record, "isa <name>", says which).
 *
 * Usage: kernels [--opt NAME] [--dtype f32|f64] [--size N] [--ms MS] [--reps R]
 *                [--isa NAME]
 *        kernels --serve [--isa NAME] */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench.h"
#include "optim/optim.h"

#if defined(__x86_64__)
#define KERNEL static __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define KERNEL static __attribute__((noinline))
#endif

#define MAX_N 10000000u    /* largest vector, elements */
#define STREAM_N 10000000u /* STREAM arrays, doubles (80 MB each) */
#define MAX_REPS 64

static void *xalloc(size_t bytes)
{
    void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "kernels: out of memory (%zu bytes)\n", bytes);
        exit(1);
    }
    memset(p, 0, bytes); /* first touch here, not in a timed loop */
    return p;
}

/* STREAM's copy and triad on doubles, and an in-place update (a += s*b): the
 * access pattern of an optimizer, whose every written line was read first and
 * so costs no write-allocate traffic. Bytes are counted STREAM's way (what the
 * code reads and writes), so copy and triad understate the bus traffic by
 * their write-allocates. */
KERNEL void s_copy(double *restrict c, const double *restrict a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        c[i] = a[i];
}
KERNEL void s_triad(double *restrict a, const double *restrict b, const double *restrict c, double s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        a[i] = b[i] + s * c[i];
}
KERNEL void s_update(double *restrict a, const double *restrict b, double s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        a[i] = a[i] + s * b[i];
}

static double *sa, *sb, *sc;

/* One pass of each STREAM loop; out[3] gets copy, triad, update in bytes/ns. */
static void stream_once(double out[3])
{
    static volatile double sv = 1e-12;
    double s = sv, t;
    t = now_ns();
    s_copy(sc, sa, STREAM_N);
    out[0] = 16.0 * STREAM_N / (now_ns() - t);
    t = now_ns();
    s_triad(sa, sb, sc, s, STREAM_N);
    out[1] = 24.0 * STREAM_N / (now_ns() - t);
    t = now_ns();
    s_update(sa, sb, s, STREAM_N);
    out[2] = 24.0 * STREAM_N / (now_ns() - t);
}

static void stream_setup(void)
{
    sa = xalloc(STREAM_N * sizeof(double));
    sb = xalloc(STREAM_N * sizeof(double));
    sc = xalloc(STREAM_N * sizeof(double));
    for (size_t i = 0; i < STREAM_N; i++) {
        sa[i] = 1.0;
        sb[i] = 2.0;
        sc[i] = 0.5;
    }
    double warm[3];
    stream_once(warm);
}

/* ---- The floor -------------------------------------------------------------
 * What no implementation of an optimizer's update can beat on this machine,
 * measured in the same run as the kernels (issue 14's goal 3 asks for 8x
 * torch, which is only possible where torch's time / 8 is above this):
 * - the divider: the square roots and divisions the update does per element,
 *   correctly rounded as torch's results need, alone in a loop on data in L1
 *   (best of 5 runs): a divider or square root unit's throughput caps it
 *   whatever else the loop does;
 * - memory: the update's bytes (bench_cfg.bpe) at the bandwidth of the
 *   in-place update loop s_update over a working set of the optimizer's
 *   size (params, grad and buffers), so L1, L2, L3 or DRAM as n grows.
 * The loops run with the best instruction set of the CPU, whatever --isa
 * forces on optim_step.
 * The per-element square roots and divisions of each optimizer with its
 * default hyperparameters (bench/torch_kernels.py uses torch's defaults),
 * as optim/kernels.inc has them. */
static const struct {
    const char *opt;
    int sqrts, divs;
} div_mix[] = {
    {"sgd", 0, 0},      {"momentum", 0, 0}, {"nag", 0, 0},
    {"adagrad", 1, 1},  /* sqrt_t(sum); d / std */
    {"adadelta", 2, 1}, /* sqrt_t(s + eps), sqrt_t(acc + eps); / std */
    {"rmsprop", 1, 1},  /* sqrt_t(s); d / avg (not centered, no momentum) */
    {"adam", 1, 2},     /* sqrt_t(es); / bc2s; ea / den */
    {"adamax", 0, 1},   /* ea / ei */
    {"adamw", 1, 2},    /* as adam */
    {"nadam", 1, 3},    /* sqrt_t(es); / bc2s; d / den; ea / den */
};
_Static_assert(sizeof div_mix / sizeof div_mix[0] == OPTIM_KIND_COUNT, "a row of div_mix for every optimizer");

/* The divider loops: yN_M does N square roots and M divisions an element. */
#define DIV_LOOPS(T, SQRT, S)                                                                                      \
    KERNEL void S##_s0d1(size_t n, T *restrict y, const T *restrict a, const T *restrict b, T c)                   \
    {                                                                                                              \
        (void)c;                                                                                                   \
        for (size_t i = 0; i < n; i++)                                                                             \
            y[i] = a[i] / b[i];                                                                                    \
    }                                                                                                              \
    KERNEL void S##_s1d1(size_t n, T *restrict y, const T *restrict a, const T *restrict b, T c)                   \
    {                                                                                                              \
        (void)c;                                                                                                   \
        for (size_t i = 0; i < n; i++)                                                                             \
            y[i] = a[i] / SQRT(b[i]);                                                                              \
    }                                                                                                              \
    KERNEL void S##_s2d1(size_t n, T *restrict y, const T *restrict a, const T *restrict b, T c)                   \
    {                                                                                                              \
        (void)c;                                                                                                   \
        for (size_t i = 0; i < n; i++)                                                                             \
            y[i] = SQRT(a[i]) / SQRT(b[i]);                                                                        \
    }                                                                                                              \
    KERNEL void S##_s1d2(size_t n, T *restrict y, const T *restrict a, const T *restrict b, T c)                   \
    {                                                                                                              \
        for (size_t i = 0; i < n; i++)                                                                             \
            y[i] = a[i] / (SQRT(b[i]) / c);                                                                        \
    }                                                                                                              \
    KERNEL void S##_s1d3(size_t n, T *restrict y, const T *restrict a, const T *restrict b, T c)                   \
    {                                                                                                              \
        for (size_t i = 0; i < n; i++) {                                                                           \
            T den = SQRT(b[i]) / c;                                                                                \
            y[i] = a[i] / den + b[i] / den;                                                                        \
        }                                                                                                          \
    }
DIV_LOOPS(float, sqrtf, f32)
DIV_LOOPS(double, sqrt, f64)

typedef void (*div_loop_f32)(size_t, float *restrict, const float *restrict, const float *restrict, float);
typedef void (*div_loop_f64)(size_t, double *restrict, const double *restrict, const double *restrict, double);

#define DIV_N 1024 /* elements: three arrays of doubles fill 24 KiB of L1 */

/* ns per element of the divider loop for sqrts and divs (0 when there is
 * none), best of 5 runs of ~5 ms. */
static double div_floor(optim_dtype dt, int sqrts, int divs)
{
    static const int mix[][2] = {{0, 1}, {1, 1}, {2, 1}, {1, 2}, {1, 3}};
    static const div_loop_f32 l32[] = {f32_s0d1, f32_s1d1, f32_s2d1, f32_s1d2, f32_s1d3};
    static const div_loop_f64 l64[] = {f64_s0d1, f64_s1d1, f64_s2d1, f64_s1d2, f64_s1d3};
    static float y32[DIV_N], a32[DIV_N], b32[DIV_N];
    static double y64[DIV_N], a64[DIV_N], b64[DIV_N];
    static volatile double cv = 1.7;
    int k = 0;
    while (k < 5 && (mix[k][0] != sqrts || mix[k][1] != divs))
        k++;
    if (k == 5)
        return 0;
    for (size_t i = 0; i < DIV_N; i++) {
        a64[i] = 1.0 + (double)(i % 97) / 97.0;
        b64[i] = 1.0 + (double)(i % 89) / 89.0;
        a32[i] = (float)a64[i];
        b32[i] = (float)b64[i];
    }
    double best = 0;
    for (int r = 0; r < 5; r++) {
        long iters = 0;
        double t = now_ns(), dt_ns;
        do {
            for (int j = 0; j < 64; j++, iters++) {
                if (dt == OPTIM_F64)
                    l64[k](DIV_N, y64, a64, b64, cv);
                else
                    l32[k](DIV_N, y32, a32, b32, (float)cv);
            }
            dt_ns = now_ns() - t;
        } while (dt_ns < 5e6);
        double ns = dt_ns / ((double)iters * DIV_N);
        best = r == 0 || ns < best ? ns : best;
    }
    return best;
}

/* Bytes per ns of s_update over a working set of about bytes (two arrays of
 * bytes / 16 doubles, at most the STREAM arrays), best of 3 runs of ~10 ms
 * (the clock read once per 16 passes: a small pass takes ~100 ns); 24 bytes
 * an element, as STREAM counts them. */
static double mem_floor_bw(double bytes)
{
    static volatile double sv = 1e-12;
    size_t m = (size_t)(bytes / 16);
    m = m < 512 ? 512 : m > STREAM_N ? STREAM_N : m;
    double best = 0;
    for (int r = 0; r < 3; r++) {
        long iters = 0;
        double t = now_ns(), dt_ns;
        do {
            for (int j = 0; j < 16; j++, iters++)
                s_update(sa, sb, sv, m);
            dt_ns = now_ns() - t;
        } while (dt_ns < 10e6);
        double bw = 24.0 * (double)m * (double)iters / dt_ns;
        best = bw > best ? bw : best;
    }
    return best;
}

/* The vectors of the configuration being measured, allocated once at the
 * largest size and reused. */
static void *vp, *vg, *vbuf[OPTIM_MAX_BUFFERS];

/* One configuration being measured: its state persists across repetitions. */
typedef struct bench_cfg {
    const optim_info *info;
    optim_hparams hp;
    optim_dtype dt;
    size_t n;
    optim_state st;
    double bpe; /* bytes read and written per element */
    long iters; /* steps per timed run */
} bench_cfg;

/* Fills params and grad with values that keep every optimizer finite and away
 * from subnormals over many thousands of steps. */
static void fill_inputs(optim_dtype dt, size_t n, void *p, void *g)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t h = (uint32_t)i * 2654435761u;
        double gv = ((double)(h >> 16 & 1023) / 1024.0 - 0.5) * 0.1 + 0.001;
        double pv = 0.5 + (double)(h >> 8 & 255) / 256.0;
        if (dt == OPTIM_F64) {
            ((double *)p)[i] = pv;
            ((double *)g)[i] = gv;
        } else {
            ((float *)p)[i] = (float)pv;
            ((float *)g)[i] = (float)gv;
        }
    }
}

/* Sets up, warms (~10 ms, at least two steps so momentum's first-step branch
 * is behind) and sizes a configuration so one timed run lasts ~target_ms. */
static void cfg_setup(bench_cfg *c, const optim_info *info, optim_dtype dt, size_t n, double target_ms)
{
    memset(c, 0, sizeof *c);
    c->info = info;
    c->dt = dt;
    c->n = n;
    optim_defaults(info, &c->hp);
    c->st.params = vp;
    size_t used = 0;
    for (size_t b = 0; b < info->n_buffers; b++)
        if (optim_buffer_used(info, &c->hp, b)) {
            c->st.buf[b] = vbuf[b];
            used++;
        }
    fill_inputs(dt, n, vp, vg);
    optim_state_init(info, &c->hp, dt, n, &c->st);
    /* Reads params, grad and each used buffer; writes params and each buffer. */
    c->bpe = (double)((3 + 2 * used) * optim_elem_size(dt));
    double t0 = now_ns();
    long warm = 0;
    do {
        optim_step(info, &c->hp, dt, n, &c->st, vg, NULL);
        warm++;
    } while (warm < 2 || now_ns() - t0 < 10e6);
    double per = (now_ns() - t0) / (double)warm;
    c->iters = (long)ceil(target_ms * 1e6 / per);
    if (c->iters < 1)
        c->iters = 1;
}

/* One timed run; returns ns per element. With stats, optim_step also gathers
 * the gradient, update and param norms, as the daemon's history needs. */
static double cfg_run(bench_cfg *c, int stats)
{
    optim_stats out;
    double t = now_ns();
    for (long it = 0; it < c->iters; it++)
        optim_step(c->info, &c->hp, c->dt, c->n, &c->st, vg, stats ? &out : NULL);
    double ns = (now_ns() - t) / ((double)c->iters * (double)c->n);
    double mid = c->dt == OPTIM_F64 ? ((double *)vp)[c->n / 2] : ((float *)vp)[c->n / 2];
    if (!isfinite(mid))
        fprintf(stderr, "kernels: %s n=%zu went non-finite\n", c->info->name, c->n);
    return ns;
}

static int parse_dtype(const char *s, optim_dtype *out)
{
    if (!strcmp(s, "f32") || !strcmp(s, "float32"))
        *out = OPTIM_F32;
    else if (!strcmp(s, "f64") || !strcmp(s, "float64"))
        *out = OPTIM_F64;
    else
        return -1;
    return 0;
}

static int serve(void)
{
    bench_cfg c = {0};
    char line[256], name[64], dts[16];
    double nd, ms;
    int stats;
    while (fgets(line, sizeof line, stdin)) {
        optim_dtype dt;
        if (!strncmp(line, "isa", 3)) {
            printf("%s\n", optim_isa_name(optim_isa_current()));
        } else if (!strncmp(line, "stream", 6)) {
            double bw[3];
            stream_once(bw);
            printf("%.4f %.4f %.4f\n", bw[0], bw[1], bw[2]);
        } else if (sscanf(line, "floor %63s %15s %lf", name, dts, &nd) == 3 && optim_find(name) &&
                   parse_dtype(dts, &dt) == 0 && nd >= 1 && nd <= MAX_N) {
            const optim_info *info = optim_find(name);
            optim_hparams hp;
            size_t used = 0, k = 0, es = optim_elem_size(dt);
            optim_defaults(info, &hp);
            for (size_t b = 0; b < info->n_buffers; b++)
                used += optim_buffer_used(info, &hp, b);
            while (k < sizeof div_mix / sizeof div_mix[0] && strcmp(div_mix[k].opt, name))
                k++;
            if (k == sizeof div_mix / sizeof div_mix[0]) {
                printf("error\n"); /* an optimizer this table does not know yet */
            } else {
                double bpe = (double)((3 + 2 * used) * es), set = (double)((2 + used) * es) * nd;
                printf("%.5f %.5f\n", div_floor(dt, div_mix[k].sqrts, div_mix[k].divs), bpe / mem_floor_bw(set));
            }
        } else if (sscanf(line, "%63s %15s %lf %lf %d", name, dts, &nd, &ms, &stats) == 5 && optim_find(name) &&
                   parse_dtype(dts, &dt) == 0 && nd >= 1 && nd <= MAX_N) {
            const optim_info *info = optim_find(name);
            size_t n = (size_t)nd;
            if (c.info != info || c.dt != dt || c.n != n)
                cfg_setup(&c, info, dt, n, ms);
            double ns = cfg_run(&c, stats);
            printf("%.5f %.0f\n", ns, c.bpe);
        } else {
            printf("error\n");
        }
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *only_opt = NULL, *only_dt = NULL, *isa = NULL;
    size_t only_n = 0;
    double target_ms = 50;
    int reps = 5, serve_mode = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--opt") && i + 1 < argc)
            only_opt = argv[++i];
        else if (!strcmp(argv[i], "--dtype") && i + 1 < argc)
            only_dt = argv[++i];
        else if (!strcmp(argv[i], "--size") && i + 1 < argc)
            only_n = (size_t)strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--ms") && i + 1 < argc)
            target_ms = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc)
            isa = argv[++i];
        else if (!strcmp(argv[i], "--serve"))
            serve_mode = 1;
        else {
            fprintf(stderr, "usage: kernels [--opt NAME] [--dtype f32|f64] [--size N] [--ms MS] [--reps R] "
                            "[--isa NAME]\n       kernels --serve [--isa NAME]\n");
            return 2;
        }
    }
    if (isa) {
        int k = 0;
        while (k < OPTIM_ISA_COUNT && strcmp(isa, optim_isa_name((optim_isa)k)))
            k++;
        if (optim_isa_force((optim_isa)k) != OPTIM_OK) {
            fprintf(stderr, "kernels: instruction set \"%s\" is not available here\n", isa);
            return 2;
        }
    }
    if (reps < 1 || reps > MAX_REPS)
        reps = 5;
    if (only_n > MAX_N)
        only_n = MAX_N;

    vp = xalloc(MAX_N * 8);
    vg = xalloc(MAX_N * 8);
    for (int i = 0; i < OPTIM_MAX_BUFFERS; i++)
        vbuf[i] = xalloc(MAX_N * 8);
    stream_setup();
    if (serve_mode)
        return serve();

    printf("isa\t%s\n", optim_isa_name(optim_isa_current()));
    /* Machine bandwidth, 10 passes of each loop. */
    double bw[3][MAX_REPS], best[3] = {0};
    static const char *snames[] = {"copy", "triad", "update"};
    static const double sbytes[] = {16, 24, 24};
    for (int r = 0; r < 10; r++) {
        double one[3];
        stream_once(one);
        for (int k = 0; k < 3; k++) {
            bw[k][r] = one[k];
            best[k] = one[k] > best[k] ? one[k] : best[k];
        }
    }
    for (int k = 0; k < 3; k++)
        printf("stream\t%s\t%.0f\t%.3f\t%.3f\n", snames[k], sbytes[k], median(bw[k], 10), best[k]);
    fflush(stdout);

    static const size_t sizes[] = {1000, 10000, 100000, 1000000, 10000000};
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_info *info = optim_at(k);
        if (only_opt && strcmp(only_opt, info->name))
            continue;
        for (int d = 0; d < 2; d++) {
            optim_dtype dt = d ? OPTIM_F64 : OPTIM_F32;
            const char *dname = d ? "f64" : "f32";
            if (only_dt && strcmp(only_dt, dname))
                continue;
            for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
                size_t n = only_n ? only_n : sizes[s];
                bench_cfg c;
                cfg_setup(&c, info, dt, n, target_ms);
                int big = n >= 10000000u;
                double v[MAX_REPS], vs[MAX_REPS], rs[MAX_REPS], ru[MAX_REPS];
                for (int r = 0; r < reps; r++) {
                    v[r] = cfg_run(&c, 0);
                    vs[r] = cfg_run(&c, 1);
                    if (big) {
                        double one[3];
                        stream_once(one);
                        double stream_bw = one[0] > one[1] ? one[0] : one[1];
                        rs[r] = v[r] / (c.bpe / stream_bw);
                        ru[r] = v[r] / (c.bpe / one[2]);
                    }
                }
                double lo = v[0];
                for (int r = 1; r < reps; r++)
                    lo = v[r] < lo ? v[r] : lo;
                printf("kernel\t%s\t%s\t%zu\t%.4f\t%.4f\t%.0f\t%ld\t%d", info->name, dname, n, median(v, reps), lo,
                       c.bpe, c.iters, reps);
                printf("\t%.4f", median(vs, reps));
                if (big)
                    printf("\t%.3f\t%.3f", median(rs, reps), median(ru, reps));
                printf("\n");
                fflush(stdout);
                if (only_n)
                    break;
            }
        }
    }
    return 0;
}
