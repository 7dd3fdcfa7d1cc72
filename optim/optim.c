/* The optimizer description table (names, hyperparameters with defaults and
 * PyTorch's valid ranges, state buffers) and everything derived from it:
 * defaults, validation, lookup. The update kernels live in kernels.c. */
#include "optim.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define NUM(field, d, lo, hi, lo_open, hi_open)                                                                        \
    {                                                                                                                  \
#field, OPTIM_HP_NUMBER, offsetof(optim_hparams, field), {d, 0 }, lo, hi, lo_open, hi_open                     \
    }
#define BOOL(field, d)                                                                                                 \
    {                                                                                                                  \
#field, OPTIM_HP_BOOL, offsetof(optim_hparams, field), {d, 0 }, 0, 1, 0, 0                                     \
    }
#define NONNEG(field, d) NUM(field, d, 0, INFINITY, 0, 0)
#define ANY(field, d) NUM(field, d, -INFINITY, INFINITY, 0, 0)
/* betas: each in [0, 1), as torch's Adam family checks. */
#define BETAS(b1, b2)                                                                                                  \
    {                                                                                                                  \
        "betas", OPTIM_HP_PAIR, offsetof(optim_hparams, betas), {b1, b2}, 0, 1, 0, 1                                   \
    }

/* SGD and its two presets differ only in their defaults. */
#define SGD_HPS(mom_, nest_)                                                                                           \
    {                                                                                                                  \
        NONNEG(lr, 0.01), NONNEG(momentum, mom_), ANY(dampening, 0), BOOL(nesterov, nest_), NONNEG(weight_decay, 0),   \
            BOOL(maximize, 0)                                                                                          \
    }
static const optim_hp_desc sgd_hps[] = SGD_HPS(0, 0);
static const optim_hp_desc momentum_hps[] = SGD_HPS(0.9, 0);
static const optim_hp_desc nag_hps[] = SGD_HPS(0.9, 1);

static const optim_hp_desc adagrad_hps[] = {
    NONNEG(lr, 0.01),   NONNEG(lr_decay, 0), NONNEG(weight_decay, 0), NONNEG(initial_accumulator_value, 0),
    NONNEG(eps, 1e-10), BOOL(maximize, 0),
};
static const optim_hp_desc adadelta_hps[] = {
    NONNEG(lr, 1.0), NUM(rho, 0.9, 0, 1, 0, 0), NONNEG(eps, 1e-6), NONNEG(weight_decay, 0), BOOL(maximize, 0),
};
static const optim_hp_desc rmsprop_hps[] = {
    NONNEG(lr, 0.01),    NONNEG(alpha, 0.99), NONNEG(eps, 1e-8), NONNEG(weight_decay, 0),
    NONNEG(momentum, 0), BOOL(centered, 0),   BOOL(maximize, 0),
};
#define ADAM_HPS(lr_, wd_)                                                                                             \
    {                                                                                                                  \
        NONNEG(lr, lr_), BETAS(0.9, 0.999), NONNEG(eps, 1e-8), NONNEG(weight_decay, wd_), BOOL(amsgrad, 0),            \
            BOOL(maximize, 0)                                                                                          \
    }
static const optim_hp_desc adam_hps[] = ADAM_HPS(0.001, 0);
static const optim_hp_desc adamw_hps[] = ADAM_HPS(0.001, 0.01);
static const optim_hp_desc adamax_hps[] = {
    NONNEG(lr, 0.002), BETAS(0.9, 0.999), NONNEG(eps, 1e-8), NONNEG(weight_decay, 0), BOOL(maximize, 0),
};
static const optim_hp_desc nadam_hps[] = {
    NONNEG(lr, 0.002), BETAS(0.9, 0.999), NONNEG(eps, 1e-8), NONNEG(weight_decay, 0), NONNEG(momentum_decay, 0.004),
    BOOL(maximize, 0),
};

#define N(a) (sizeof(a) / sizeof((a)[0]))
#define NBUF(...) (sizeof((const char *[]){__VA_ARGS__}) / sizeof(const char *))
#define INFO(kind, name, torch, hps, scalar, ...)                                                                      \
    {                                                                                                                  \
        kind, name, torch, hps, N(hps), {__VA_ARGS__}, NBUF(__VA_ARGS__), scalar                                       \
    }

static const optim_info table[OPTIM_KIND_COUNT] = {
    INFO(OPTIM_SGD, "sgd", "torch.optim.SGD", sgd_hps, NULL, "momentum_buffer"),
    INFO(OPTIM_MOMENTUM, "momentum", "torch.optim.SGD", momentum_hps, NULL, "momentum_buffer"),
    INFO(OPTIM_NAG, "nag", "torch.optim.SGD", nag_hps, NULL, "momentum_buffer"),
    INFO(OPTIM_ADAGRAD, "adagrad", "torch.optim.Adagrad", adagrad_hps, NULL, "sum"),
    INFO(OPTIM_ADADELTA, "adadelta", "torch.optim.Adadelta", adadelta_hps, NULL, "square_avg", "acc_delta"),
    INFO(OPTIM_RMSPROP, "rmsprop", "torch.optim.RMSprop", rmsprop_hps, NULL, "square_avg", "momentum_buffer",
         "grad_avg"),
    INFO(OPTIM_ADAM, "adam", "torch.optim.Adam", adam_hps, NULL, "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    INFO(OPTIM_ADAMAX, "adamax", "torch.optim.Adamax", adamax_hps, NULL, "exp_avg", "exp_inf"),
    INFO(OPTIM_ADAMW, "adamw", "torch.optim.AdamW", adamw_hps, NULL, "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    INFO(OPTIM_NADAM, "nadam", "torch.optim.NAdam", nadam_hps, "mu_product", "exp_avg", "exp_avg_sq"),
};

const optim_info *optim_at(size_t i) { return i < OPTIM_KIND_COUNT ? &table[i] : NULL; }

const optim_info *optim_find(const char *name)
{
    for (size_t i = 0; name && i < OPTIM_KIND_COUNT; i++)
        if (strcmp(table[i].name, name) == 0)
            return &table[i];
    return NULL;
}

const optim_hp_desc *optim_hp_find(const optim_info *info, const char *name)
{
    for (size_t i = 0; name && i < info->n_hps; i++)
        if (strcmp(info->hps[i].name, name) == 0)
            return &info->hps[i];
    return NULL;
}

double optim_hp_get(const optim_hparams *hp, const optim_hp_desc *d, int index)
{
    const char *p = (const char *)hp + d->offset;
    if (d->type == OPTIM_HP_BOOL)
        return *(const bool *)p ? 1.0 : 0.0;
    return ((const double *)p)[d->type == OPTIM_HP_PAIR ? index : 0];
}

void optim_hp_set(optim_hparams *hp, const optim_hp_desc *d, int index, double v)
{
    char *p = (char *)hp + d->offset;
    if (d->type == OPTIM_HP_BOOL)
        *(bool *)p = v != 0;
    else
        ((double *)p)[d->type == OPTIM_HP_PAIR ? index : 0] = v;
}

void optim_defaults(const optim_info *info, optim_hparams *out)
{
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < info->n_hps; i++) {
        optim_hp_set(out, &info->hps[i], 0, info->hps[i].def[0]);
        if (info->hps[i].type == OPTIM_HP_PAIR)
            optim_hp_set(out, &info->hps[i], 1, info->hps[i].def[1]);
    }
}

static int in_range(const optim_hp_desc *d, double v)
{
    if (!isfinite(v))
        return 0;
    if (d->min_open ? !(v > d->min) : !(v >= d->min))
        return 0;
    return d->max_open ? v < d->max : v <= d->max;
}

/* Writes "must be in [0, 1)" style text for d's range. */
static void describe_range(const optim_hp_desc *d, char *buf, size_t len)
{
    if (isinf(d->max))
        snprintf(buf, len, "a finite number %s %g", d->min_open ? ">" : ">=", d->min);
    else if (isinf(d->min))
        snprintf(buf, len, "a finite number");
    else
        snprintf(buf, len, "in %c%g, %g%c", d->min_open ? '(' : '[', d->min, d->max, d->max_open ? ')' : ']');
}

int optim_validate(const optim_info *info, const optim_hparams *hp, char *msg, size_t msglen)
{
    char range[64];
    for (size_t i = 0; i < info->n_hps; i++) {
        const optim_hp_desc *d = &info->hps[i];
        if (d->type == OPTIM_HP_BOOL)
            continue;
        for (int k = 0; k < (d->type == OPTIM_HP_PAIR ? 2 : 1); k++) {
            double v = optim_hp_get(hp, d, k);
            if (in_range(d, v))
                continue;
            describe_range(d, range, sizeof range);
            if (d->type == OPTIM_HP_PAIR)
                snprintf(msg, msglen, "%s[%d] = %g is invalid for %s: it must be %s", d->name, k, v, info->name, range);
            else
                snprintf(msg, msglen, "%s = %g is invalid for %s: it must be %s", d->name, v, info->name, range);
            return OPTIM_EINVAL;
        }
    }
    if (optim_hp_find(info, "nesterov") && hp->nesterov && (hp->momentum <= 0 || hp->dampening != 0)) {
        snprintf(msg, msglen, "nesterov requires momentum > 0 and dampening = 0 (got momentum %g, dampening %g)",
                 hp->momentum, hp->dampening);
        return OPTIM_EINVAL;
    }
    if (msglen)
        msg[0] = '\0';
    return OPTIM_OK;
}

bool optim_buffer_used(const optim_info *info, const optim_hparams *hp, size_t i)
{
    if (i >= info->n_buffers)
        return false;
    switch (info->kind) {
    case OPTIM_SGD:
    case OPTIM_MOMENTUM:
    case OPTIM_NAG:
        return hp->momentum != 0;
    case OPTIM_RMSPROP:
        return i == 0 || (i == 1 && hp->momentum > 0) || (i == 2 && hp->centered);
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
        return i < 2 || hp->amsgrad;
    default:
        return true;
    }
}

bool optim_buffer_nonneg(const optim_info *info, size_t i)
{
    /* Sums and running averages of squares, and Adamax's infinity norm: the
     * update divides by their square root (or by them), so a negative value
     * makes every later step NaN. */
    static const char *const nonneg[] = {"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta", "exp_inf"};
    if (i >= info->n_buffers)
        return false;
    for (size_t k = 0; k < sizeof nonneg / sizeof nonneg[0]; k++)
        if (strcmp(info->buffers[i], nonneg[k]) == 0)
            return true;
    return false;
}

bool optim_scalar_valid(const optim_info *info, double v)
{
    /* NAdam's mu_product is a product of momentum factors, each in [0, 1). */
    return !info->scalar || (isfinite(v) && v >= 0 && v <= 1);
}

size_t optim_elem_size(optim_dtype dtype) { return dtype == OPTIM_F64 ? 8 : 4; }
