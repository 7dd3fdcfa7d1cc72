/* optim_step and optim_state_init: the per-dtype kernels of kernels.inc,
 * instantiated for float and double. Loops are built so gcc vectorizes them
 * (kernels.o gets -O3 -fno-math-errno in the Makefile), with an AVX2 clone
 * picked at load time on machines that have it; no -ffast-math, so every
 * result is the IEEE result of the same operations. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "optim.h"

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
#define KERNEL static CLONES
/* Statistics only: their sums may be reassociated (see block_stats). */
#define STATS_KERNEL static CLONES __attribute__((optimize("associative-math", "no-signed-zeros", "no-trapping-math")))

#define T float
#define U uint32_t
#define EXP_MASK 0x7f800000u
#define SFX f32
#define sqrt_t sqrtf
#define abs_t fabsf
#include "kernels.inc"
#undef T
#undef U
#undef EXP_MASK
#undef SFX
#undef sqrt_t
#undef abs_t

#define T double
#define U uint64_t
#define EXP_MASK 0x7ff0000000000000u
#define SFX f64
#define sqrt_t sqrt
#define abs_t fabs
#include "kernels.inc"
#undef T
#undef U
#undef EXP_MASK
#undef SFX
#undef sqrt_t
#undef abs_t

void optim_step(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n, optim_state *st,
                const void *grad, optim_stats *stats)
{
    if (dtype == OPTIM_F64)
        step_f64(info, hp, n, st, grad, stats);
    else
        step_f32(info, hp, n, st, grad, stats);
    st->step++;
}

double optim_sq_norm(optim_dtype dtype, size_t n, const void *x)
{
    return dtype == OPTIM_F64 ? sq_norm_f64(x, n) : sq_norm_f32(x, n);
}

void optim_scale(optim_dtype dtype, size_t n, void *x, double scale)
{
    if (dtype == OPTIM_F64)
        scale_f64(x, n, scale);
    else
        scale_f32(x, n, (float)scale);
}

void optim_state_init(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n, optim_state *st)
{
    /* Only adagrad's sum starts at a value other than zero. */
    double init = info->kind == OPTIM_ADAGRAD ? hp->initial_accumulator_value : 0;
    for (size_t i = 0; i < info->n_buffers; i++) {
        if (!optim_buffer_used(info, hp, i) || !st->buf[i])
            continue;
        if (dtype == OPTIM_F64)
            fill_f64(st->buf[i], n, init);
        else
            fill_f32(st->buf[i], n, (float)init);
    }
    st->scalar = 1;
    st->step = 0;
}
