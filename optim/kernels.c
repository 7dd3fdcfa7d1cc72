/* optim_step and optim_state_init: the per-dtype kernels of kernels.inc,
 * instantiated for float and double once per instruction set: SSE2 (the
 * x86-64 baseline, or the plain build elsewhere), AVX2 and AVX-512F. The
 * best set this CPU has is picked at first use; optim_isa_force picks
 * another for tests and benchmarks. Loops are built so gcc vectorizes them
 * (kernels.o gets -O3 -fno-math-errno -ffp-contract=off in the Makefile):
 * no -ffast-math and no contraction into FMAs, so every result is the IEEE
 * result of the same operations and every set gives the same bits. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "optim.h"

#define KERNEL static
/* Statistics only: their sums may be reassociated (see block_stats). */
#define STATS_KERNEL static __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math")))

/* One instruction set's entry points. */
typedef struct kernel_set {
    const char *name;
    void (*step)(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n, optim_state *st,
                 const void *grad, optim_stats *stats);
    double (*sq_norm)(optim_dtype dtype, size_t n, const void *x);
    void (*scale)(optim_dtype dtype, size_t n, void *x, double scale);
    void (*fill)(optim_dtype dtype, size_t n, void *x, double v);
} kernel_set;

#define ISA sse2
#include "kernels_isa.inc"
#undef ISA

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2")
#define ISA avx2
#include "kernels_isa.inc"
#undef ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
#define ISA avx512f
#include "kernels_isa.inc"
#undef ISA
#pragma GCC pop_options
#endif
/* clang-format off */
#define SET(isa) {#isa, step_##isa, sq_norm_##isa, scale_##isa, fill_##isa}
#if defined(__x86_64__)
static const kernel_set kernel_sets[OPTIM_ISA_COUNT] = {SET(sse2), SET(avx2), SET(avx512f)};
#else
static const kernel_set kernel_sets[OPTIM_ISA_COUNT] = {SET(sse2), {"avx2", NULL, NULL, NULL, NULL},
                                                         {"avx512f", NULL, NULL, NULL, NULL}};
#endif
#undef SET
/* clang-format on */

/* The set in use; NULL until the first call picks the best one. Every thread
 * picks the same, so a race to store it is harmless. */
static const kernel_set *active;

bool optim_isa_supported(optim_isa isa)
{
    if ((unsigned)isa >= OPTIM_ISA_COUNT || !kernel_sets[isa].step)
        return false;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (isa == OPTIM_ISA_AVX2)
        return __builtin_cpu_supports("avx2");
    if (isa == OPTIM_ISA_AVX512F)
        return __builtin_cpu_supports("avx512f");
#endif
    return true;
}

const char *optim_isa_name(optim_isa isa) { return (unsigned)isa < OPTIM_ISA_COUNT ? kernel_sets[isa].name : "?"; }

static const kernel_set *kernels(void)
{
    const kernel_set *k = __atomic_load_n(&active, __ATOMIC_ACQUIRE);
    if (k)
        return k;
    int best = OPTIM_ISA_SSE2;
    for (int i = OPTIM_ISA_COUNT - 1; i > OPTIM_ISA_SSE2; i--)
        if (optim_isa_supported((optim_isa)i)) {
            best = i;
            break;
        }
    k = &kernel_sets[best];
    __atomic_store_n(&active, k, __ATOMIC_RELEASE);
    return k;
}

optim_isa optim_isa_current(void) { return (optim_isa)(kernels() - kernel_sets); }

int optim_isa_force(optim_isa isa)
{
    if (!optim_isa_supported(isa))
        return OPTIM_EINVAL;
    __atomic_store_n(&active, &kernel_sets[isa], __ATOMIC_RELEASE);
    return OPTIM_OK;
}

void optim_step(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n, optim_state *st,
                const void *grad, optim_stats *stats)
{
    kernels()->step(info, hp, dtype, n, st, grad, stats);
    st->step++;
}

double optim_sq_norm(optim_dtype dtype, size_t n, const void *x) { return kernels()->sq_norm(dtype, n, x); }

void optim_scale(optim_dtype dtype, size_t n, void *x, double scale) { kernels()->scale(dtype, n, x, scale); }

void optim_state_init(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n, optim_state *st)
{
    /* Only adagrad's sum starts at a value other than zero. */
    double init = info->kind == OPTIM_ADAGRAD ? hp->initial_accumulator_value : 0;
    for (size_t i = 0; i < info->n_buffers; i++) {
        if (!optim_buffer_used(info, hp, i) || !st->buf[i])
            continue;
        kernels()->fill(dtype, n, st->buf[i], init);
    }
    st->scalar = 1;
    st->step = 0;
}
