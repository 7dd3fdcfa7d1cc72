/* optim: one step of each torch.optim optimizer on a flat vector, in float32
 * or float64, following PyTorch 1.13's update rules and order of operations.
 * Pure C: no I/O, no allocation, no globals beyond constant tables and the
 * instruction set the kernels run with. One description table per optimizer
 * drives defaults, validation and listing. */
#ifndef OPTD_OPTIM_H
#define OPTD_OPTIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum optim_dtype { OPTIM_F32 = 0, OPTIM_F64 = 1 } optim_dtype;

typedef enum optim_kind {
    OPTIM_SGD,
    OPTIM_MOMENTUM,
    OPTIM_NAG,
    OPTIM_ADAGRAD,
    OPTIM_ADADELTA,
    OPTIM_RMSPROP,
    OPTIM_ADAM,
    OPTIM_ADAMAX,
    OPTIM_ADAMW,
    OPTIM_NADAM,
    OPTIM_KIND_COUNT
} optim_kind;

/* Return codes. */
enum { OPTIM_OK = 0, OPTIM_EINVAL = 1 };

/* Every hyperparameter of every optimizer; each optimizer reads the fields its
 * description lists and ignores the rest. Plain data, copied freely. */
typedef struct optim_hparams {
    double lr;
    double momentum;  /* sgd family, rmsprop */
    double dampening; /* sgd family */
    double weight_decay;
    double lr_decay;                  /* adagrad */
    double initial_accumulator_value; /* adagrad */
    double eps;
    double rho;            /* adadelta */
    double alpha;          /* rmsprop */
    double betas[2];       /* adam family, nadam */
    double momentum_decay; /* nadam */
    bool nesterov;
    bool maximize;
    bool centered; /* rmsprop */
    bool amsgrad;  /* adam, adamw */
} optim_hparams;

typedef enum optim_hp_type {
    OPTIM_HP_NUMBER, /* one double */
    OPTIM_HP_BOOL,   /* one bool */
    OPTIM_HP_PAIR    /* two doubles, e.g. betas */
} optim_hp_type;

/* One hyperparameter: its name, type, where it lives in optim_hparams, its
 * default and its valid range [min, max] (each end open when *_open). A pair
 * applies the range to both elements. Ranges are PyTorch's constructor checks;
 * -INFINITY/INFINITY mean unbounded. Every number must also be finite. */
typedef struct optim_hp_desc {
    const char *name;
    optim_hp_type type;
    size_t offset; /* offsetof(optim_hparams, field) */
    double def[2]; /* default; a bool's is 0 or 1 */
    double min, max;
    bool min_open, max_open;
} optim_hp_desc;

#define OPTIM_MAX_BUFFERS 3

/* The description of one optimizer. All pointers are to static storage. */
typedef struct optim_info {
    optim_kind kind;
    const char *name;       /* "adam" */
    const char *torch_name; /* "torch.optim.Adam" */
    const optim_hp_desc *hps;
    size_t n_hps;
    const char *buffers[OPTIM_MAX_BUFFERS]; /* state buffer names, NULL-padded */
    size_t n_buffers;
    const char *scalar; /* name of a scalar state ("mu_product") or NULL */
} optim_info;

/* The state of one session, as the step reads and writes it. The caller owns
 * every array; each holds n elements of the session's dtype. buf[i] is the
 * i-th of optim_info.buffers, and may be NULL when optim_buffer_used() says
 * the configuration does not use it. */
typedef struct optim_state {
    void *params;
    void *buf[OPTIM_MAX_BUFFERS];
    double scalar; /* e.g. nadam's mu_product; 1 for a fresh session */
    uint64_t step; /* steps applied so far; optim_step increments it */
} optim_state;

/* The table: optim_at(i) for i < OPTIM_KIND_COUNT, in optim_kind order. */
const optim_info *optim_at(size_t i);
/* Lookup by API name ("adam"); NULL when unknown. */
const optim_info *optim_find(const char *name);
/* Lookup of a hyperparameter of an optimizer by name; NULL when unknown. */
const optim_hp_desc *optim_hp_find(const optim_info *info, const char *name);

/* Sets every hyperparameter to the optimizer's default. */
void optim_defaults(const optim_info *info, optim_hparams *out);

/* Reads / writes one element (index 0 or 1 for pairs, 0 otherwise) of a
 * hyperparameter; bools read as 0/1 and are set from v != 0. */
double optim_hp_get(const optim_hparams *hp, const optim_hp_desc *d, int index);
void optim_hp_set(optim_hparams *hp, const optim_hp_desc *d, int index, double v);

/* Checks every hyperparameter of info against its range and the optimizer's
 * cross-field rules (nesterov needs momentum > 0 and dampening 0). On failure
 * returns OPTIM_EINVAL and writes a sentence naming the field and the rule
 * into msg (msglen bytes, always NUL-terminated); returns OPTIM_OK otherwise. */
int optim_validate(const optim_info *info, const optim_hparams *hp, char *msg, size_t msglen);

/* Whether buffer i of info is used by the configuration hp. */
bool optim_buffer_used(const optim_info *info, const optim_hparams *hp, size_t i);

/* Whether buffer i of info can never hold a negative value (exp_avg_sq,
 * max_exp_avg_sq, sum, square_avg, acc_delta, exp_inf): a state with one
 * makes every later step non-finite. */
bool optim_buffer_nonneg(const optim_info *info, size_t i);
/* Whether v is a value info's scalar state can take (mu_product: [0, 1]);
 * true when info has none. */
bool optim_scalar_valid(const optim_info *info, double v);

/* Bytes per element of a dtype (4 or 8). */
size_t optim_elem_size(optim_dtype dtype);

/* Fills the used buffers of a fresh state with their initial values (zeros,
 * or adagrad's initial_accumulator_value), sets scalar to 1 and step to 0.
 * params are left as they are. */
void optim_state_init(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n, optim_state *st);

/* Sums of squares gathered during a step, in double (so they may be
 * infinite for float64 values past 1e154). */
typedef struct optim_stats {
    double grad_sq;   /* of the gradient as given */
    double update_sq; /* of new params - old params */
    double param_sq;  /* of the new params */
    bool finite;      /* whether every new param and buffer element is finite */
} optim_stats;

/* Applies one step with gradient grad (n elements of dtype, not modified) to
 * st, in place, and increments st->step. hp must have passed optim_validate
 * and st's used buffers must be non-NULL. When stats is non-NULL it is
 * filled in the same pass over memory. Cannot fail. */
void optim_step(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n, optim_state *st,
                const void *grad, optim_stats *stats);

/* The sum of squares of n elements of dtype, accumulated in double. */
double optim_sq_norm(optim_dtype dtype, size_t n, const void *x);
/* Multiplies n elements of dtype by scale rounded to dtype (as torch's
 * grad.mul_(clip_coef) in clip_grad_norm_). */
void optim_scale(optim_dtype dtype, size_t n, void *x, double scale);

/* The instruction sets the kernels are compiled for. optim_step and the
 * other kernels use the best one the CPU has (picked at first use); every
 * one gives the same bits, which tests prove by forcing each in turn. */
typedef enum optim_isa {
    OPTIM_ISA_SSE2,    /* x86-64's baseline; the plain build on other CPUs */
    OPTIM_ISA_AVX2,    /* x86-64 only */
    OPTIM_ISA_AVX512F, /* x86-64 only */
    OPTIM_ISA_COUNT
} optim_isa;
/* "sse2", "avx2", "avx512f". */
const char *optim_isa_name(optim_isa isa);
/* Whether isa is compiled in and this CPU (and its OS) can run it. */
bool optim_isa_supported(optim_isa isa);
/* The set in use now. */
optim_isa optim_isa_current(void);
/* For tests and benchmarks: makes later kernel calls use isa. Returns
 * OPTIM_EINVAL (and changes nothing) when isa is not supported here. Not to
 * be called while another thread is inside a kernel it should not see
 * switch. */
int optim_isa_force(optim_isa isa);

#endif
