/* engine: optd's core, the only header of engine/. Sessions in memory (their
 * state blob, made, copied, loaded and re-laid here), the single writer
 * thread that applies requests in arrival order and commits several of them
 * in one transaction (group commit), the session cache, worker rounds, lr
 * schedules and clipping. Everything here is plain data: the engine knows no
 * JSON and no HTTP. A transport fills a request, submits it and encodes the
 * result once the request's callback has run (after its commit). */
#ifndef OPTD_ENGINE_H
#define OPTD_ENGINE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "optim/optim.h"
#include "store/store.h"

/* ---- limits ------------------------------------------------------------ */

#define ENGINE_MAX_ELEMENTS ((size_t)1 << 28)
/* The most bytes of state (params, buffers, scalar) one session holds:
 * SQLite's default SQLITE_MAX_LENGTH, the largest value it stores. */
#define ENGINE_MAX_SESSION_BYTES ((size_t)1000000000)

/* ---- training: lr schedules, clipping, rounds (training.c) -------------- */

typedef enum sched_type {
    SCHED_NONE,
    SCHED_STEP,
    SCHED_MULTISTEP,
    SCHED_EXPONENTIAL,
    SCHED_COSINE,
    SCHED_LINEAR
} sched_type;

#define SCHED_MAX_MILESTONES 64

/* An lr_schedule: torch.optim.lr_scheduler's closed forms. Plain data. */
typedef struct schedule {
    sched_type type;
    double gamma, step_size, T_max, eta_min, start_factor, end_factor, total_iters;
    double milestones[SCHED_MAX_MILESTONES];
    size_t n_milestones;
    uint64_t warmup_steps;
} schedule;

/* What a session carries beyond torch.optim. Plain data. */
typedef struct training {
    schedule sched;
    bool clip;
    double max_grad_norm;
    uint32_t workers;         /* contributions per round; 1: every step applies */
    uint32_t min_workers;     /* contributions a round needs to apply at its timeout */
    bool min_workers_follows; /* true until min_workers is set: it then equals workers */
    double round_timeout;     /* seconds from a round's first contribution */
} training;

/* The session fields beside hyperparams (workers, min_workers, round_timeout). */
#define ENGINE_TRAINING_N_FIELDS 3
extern const char *const engine_training_fields[ENGINE_TRAINING_N_FIELDS];

void engine_training_defaults(training *tr);
/* The lr the next step uses after steps_done steps (API.md "Learning-rate schedules"). */
double engine_training_lr(const training *tr, double lr, uint64_t steps_done);

/* ---- settings: a validated change of a session's configuration --------- */

/* What a member of "hyperparams" held, as the transport decoded it. */
typedef enum engine_val { ENGINE_VAL_BOOL, ENGINE_VAL_NUMBER, ENGINE_VAL_PAIR, ENGINE_VAL_OTHER } engine_val;

/* One hyperparameter given, in the order the client gave them. name is
 * borrowed from optim's description tables (a name some optimizer takes),
 * or NULL for a name no optimizer takes (it is in engine_settings.unknown). */
typedef struct engine_hp_item {
    const char *name;
    engine_val type;
    double v[2];
} engine_hp_item;

/* Which session-level members engine_settings sets. */
enum {
    ENGINE_SET_SCHED = 1,
    ENGINE_SET_CLIP = 2,
    ENGINE_SET_WORKERS = 4,
    ENGINE_SET_MIN_WORKERS = 8,
    ENGINE_SET_ROUND_TIMEOUT = 16,
    ENGINE_SET_MIN_AUTO = 32, /* min_workers follows workers (stored configs) */
};

/* Where a decode error the transport found is reported, so that a request
 * fails with the same first error whatever the session: among the items
 * (before item err_at), or after the hyperparameters were validated. */
enum { ENGINE_ERR_NONE, ENGINE_ERR_ITEMS, ENGINE_ERR_FIELDS };

/* A change of a session's settings, applied onto its current values by
 * engine_settings_apply (in the writer for a PATCH or a fork, since the
 * session may change between decode and apply). Plain data; items is
 * malloc'd, freed by engine_settings_clear. */
typedef struct engine_settings {
    engine_hp_item *items;
    size_t n_items;
    char unknown[128]; /* the name of an item with name NULL */
    unsigned set;      /* ENGINE_SET_* */
    schedule sched;    /* ENGINE_SET_SCHED (type SCHED_NONE: no schedule) */
    bool clip;         /* ENGINE_SET_CLIP: false for none */
    double max_grad_norm;
    uint32_t workers, min_workers;
    double round_timeout;
    int err_phase; /* ENGINE_ERR_*: an error the decoder found */
    size_t err_at;
    optd_err err_rc;
    char err_msg[256];
} engine_settings;

/* Frees d's items; the struct can then be reused. */
void engine_settings_clear(engine_settings *d);
/* Applies d onto *hp and *tr (which hold the defaults or a session's current
 * values) for optimizer info, then validates. Returns OPTD_OK,
 * OPTD_E_BAD_REQUEST (a value of the wrong type), OPTD_E_UNKNOWN_FIELD,
 * OPTD_E_BAD_HYPERPARAM, OPTD_E_INVALID or the decoder's error, with msg. */
optd_err engine_settings_apply(const optim_info *info, const engine_settings *d, optim_hparams *hp, training *tr,
                               char *msg, size_t msglen);
/* Applies the hyperparameter items of d onto *hp, one group's, then
 * validates. A group's own settings (from_session 0) may not hold the
 * session-wide lr_schedule or max_grad_norm (OPTD_E_INVALID); a session's
 * (from_session 1) may, and those are left to engine_settings_apply. Return
 * codes as engine_settings_apply's. */
optd_err engine_group_settings_apply(const optim_info *info, const engine_settings *d, int from_session,
                                     optim_hparams *hp, char *msg, size_t msglen);
/* What a group's hyperparameters may not do beside the session's, to stay
 * exact to torch: differ in Adagrad's initial_accumulator_value (torch
 * takes the constructor's for every group). OPTD_OK or OPTD_E_INVALID. */
optd_err engine_group_check(const optim_info *info, const optim_hparams *session, const optim_hparams *group,
                            char *msg, size_t msglen);

/* ---- tensors and parameter groups (shape.c) ---------------------------- */

#define ENGINE_MAX_TENSORS 4096
#define ENGINE_MAX_GROUPS 4096
#define ENGINE_TENSOR_NAME_MAX 255
#define ENGINE_MAX_DIMS 32

/* One named tensor of a shaped session: elements [off, off + n) of the
 * flat vector. name and dims are owned by the shape. */
typedef struct engine_tensor {
    char *name;
    uint64_t *dims;
    uint32_t ndim; /* 0: a scalar of one element */
    uint32_t group;
    size_t off, n;
} engine_tensor;

/* A parameter group: its full hyperparameters (the session's with the
 * group's own over them, as torch's param_groups) and its tensors
 * [first, first + count), which are consecutive. */
typedef struct engine_group {
    optim_hparams hp;
    size_t first, count;
} engine_group;

/* What a session shaped like a model is made of (API.md "Tensors and
 * parameter groups"): its groups in order, each with its tensors in order,
 * which lay out the flat vector of n elements. Plain data; a session owns
 * its shape. */
typedef struct engine_shape {
    engine_group *groups;
    size_t n_groups, cap_groups;
    engine_tensor *tensors;
    size_t n_tensors, cap_tensors;
    uint32_t *by_name; /* tensor indices in name order (engine_shape_finish) */
    size_t n;          /* elements in all */
} engine_shape;

/* Building a shape: engine_shape_new, then for each group
 * engine_shape_add_group and engine_shape_add_tensor for each of its
 * tensors, then engine_shape_finish, which checks the whole (every group
 * has a tensor, names are unique). Each returns OPTD_OK, OPTD_E_NOMEM or
 * OPTD_E_INVALID with a sentence in msg. engine_shape_free(NULL) does
 * nothing. */
optd_err engine_shape_new(engine_shape **out);
optd_err engine_shape_add_group(engine_shape *sh, const optim_hparams *hp, char *msg, size_t msglen);
optd_err engine_shape_add_tensor(engine_shape *sh, const char *name, const uint64_t *dims, uint32_t ndim, char *msg,
                                 size_t msglen);
optd_err engine_shape_finish(engine_shape *sh, char *msg, size_t msglen);
void engine_shape_free(engine_shape *sh);
optd_err engine_shape_copy(const engine_shape *src, engine_shape **out);
/* Whether s is a tensor name: [A-Za-z0-9._/-]{1,255}. */
int engine_tensor_name_valid(const char *s);
/* The index of the tensor named name, or -1. */
long engine_shape_find(const engine_shape *sh, const char *name);
/* The 422 message for a tensor name sh does not have, used in where. */
void engine_shape_unknown_msg(const engine_shape *sh, const char *name, const char *where, char *msg, size_t msglen);

/* The stored configuration text of a session (store_session.config) is the
 * transport's to format: encode writes hp and tr as text (*out malloc'd,
 * the caller frees), decode reads text back onto hp and tr (the defaults of
 * info on entry). Both return OPTD_OK or an error. */
typedef struct engine_codec {
    optd_err (*encode)(void *ctx, const optim_info *info, const optim_hparams *hp, const training *tr, char **out);
    optd_err (*decode)(void *ctx, const optim_info *info, const char *text, optim_hparams *hp, training *tr);
    void *ctx;
    /* Optional, for shaped sessions (NULL: the codec knows none): the same
     * with the session's shape (NULL for none); decode_shaped sets *shape
     * to a new one (the caller frees) or NULL when the text has none. */
    optd_err (*encode_shaped)(void *ctx, const optim_info *info, const optim_hparams *hp, const training *tr,
                              const engine_shape *shape, char **out);
    optd_err (*decode_shaped)(void *ctx, const optim_info *info, const char *text, optim_hparams *hp, training *tr,
                              engine_shape **shape);
} engine_codec;

/* ---- sessions in memory (session.c) ------------------------------------ */

/* A session in memory: who it is, its decoded configuration and its state.
 * blob holds params, then each used buffer in optim_info order, then (for
 * a shaped session) each tensor's step count (uint64) and, when the
 * optimizer has one, each tensor's scalar state (double), then the scalar
 * state as a double; st points into it. A shaped session uses a buffer
 * when any of its groups does; a group that does not leaves its part as
 * it started. Each fact is held once: the
 * optimizer is info, the size n, the dtype dtype, the step st.step (which
 * optim_step advances). The store's row is derived from them whenever it is
 * needed (engine_sess_row), never kept beside them. */
typedef struct sess {
    int64_t id; /* the store's rowid; 0 until inserted */
    char name[STORE_NAME_MAX + 1];
    char *config; /* owned: the stored configuration text, written through codec */
    int64_t created_ms, updated_ms;
    const optim_info *info;
    optim_hparams hp;
    optim_dtype dtype;
    size_t n;
    unsigned char *blob; /* owned */
    size_t blob_len;
    optim_state st;
    training tr;
    /* Owned; NULL: one group of one tensor named "params" (st.step and
     * st.scalar are its step and scalar). For a shaped session hp holds the
     * session's own hyperparameters (what a group starts from) and each
     * group its full ones; st.step counts applied steps, and each tensor
     * has its own step and scalar at tstate in the blob. */
    engine_shape *shape;
    unsigned char *tstate;
    const engine_codec *codec; /* borrowed */
    /* The engine's own (writer.c): the worker round in progress or NULL,
     * the cache links, and how the current group touched it. */
    struct wround *rnd;
    struct sess *lru_prev, *lru_next, *hnext;
    struct sess *known_next; /* in the engine's index of committed shapes, or not (known) */
    bool known;
    int touched; /* in the current group: 0 untouched, -1 loaded, else the part that last changed it */
    /* Steps the store holds in the session's log past its state blob (see
     * engine_sess_log_slots); 0 when the stored state is the current one. */
    uint32_t logged;
    /* Owned; NULL until a keyed request needs it (writer.c, idem_find). */
    struct engine_idem_map *keys;
} sess;

/* How big a state has to be before its steps are logged rather than
 * rewritten: below it the log's extra rows cost more than they save. */
#define ENGINE_LOG_MIN_STATE ((size_t)1 << 20)
/* The most steps a session's log holds before the state is written again,
 * and its size relative to the state's: the disk a log takes and the work
 * a load redoes stay bounded. */
#define ENGINE_LOG_MAX_SLOTS 16
#define ENGINE_LOG_STATE_RATIO 3

/* How many steps of s the store may log between writes of its whole state,
 * 0 when its steps write the state each time. A logged step writes what
 * redoes it (the gradient as the kernel took it, the lr of each group and
 * the skipped tensors), about a third of Adam's state; every slots + 1-th
 * step writes the state. Logging pays only when that entry is a small part
 * of the state: big states, optimizers with buffers. */
uint32_t engine_sess_log_slots(const sess *s);
/* The parts of the log entry of the step s just took with grad, skip (may
 * be NULL) and lrs (one per group; one for an unshaped session): parts[3]. */
void engine_sess_log_parts(const sess *s, const void *grad, const unsigned char *skip, const double *lrs,
                           store_part parts[3]);
/* One step of s's kernel: grad (n elements, already clipped) with lrs[g]
 * as each group's lr (lrs[0] for an unshaped session), each tensor not in
 * skip (may be NULL) at its own step; increments s->st.step. What a step
 * and the replay of its log entry both run, so they give the same bits. */
void engine_sess_apply(sess *s, const void *grad, const unsigned char *skip, const double *lrs, optim_stats *stats);

/* s's row as the store holds it. Its config is borrowed from s: the row is
 * valid while s is unchanged, and must not be cleared. */
void engine_sess_row(const sess *s, store_session *row);
/* The same row owning a copy of config (the caller clears it); OPTD_E_NOMEM
 * leaves *out zeroed. */
optd_err engine_sess_row_copy(const sess *s, store_session *out);

/* Frees s and everything it owns; engine_sess_free(NULL) does nothing. */
void engine_sess_free(sess *s);
/* Makes a session with fresh state; params (n elements of dtype) are copied
 * from init when non-NULL, else filled with fill. codec is borrowed for the
 * session's life. */
optd_err engine_sess_new(const engine_codec *codec, const char *name, const optim_info *info, const optim_hparams *hp,
                         const training *tr, optim_dtype dtype, size_t n, const void *init, double fill, sess **out);
/* engine_sess_new whose params are *params (a malloc'd vector of n elements
 * of dtype), taken over: the blob grows out of it, so the session is never
 * held twice. *params is NULL after success; on failure it is left. */
optd_err engine_sess_adopt(const engine_codec *codec, const char *name, const optim_info *info, const optim_hparams *hp,
                           const training *tr, optim_dtype dtype, size_t n, void **params, sess **out);
/* A deep copy of src named name (a fork), with a fresh row. */
optd_err engine_sess_copy(const sess *src, const char *name, sess **out);
/* Builds a session from a stored row and its blob (both taken over on
 * success; on failure the caller still owns them). OPTD_E_INTERNAL when
 * they do not agree. */
optd_err engine_sess_from_store(const engine_codec *codec, store_session *row, void *blob, size_t blob_len, sess **out);
/* Reads the committed session name through st's read connection (any
 * thread): OPTD_OK with *out (caller frees), OPTD_E_NOT_FOUND or a store error. */
optd_err engine_sess_read(store *st, const engine_codec *codec, const char *name, sess **out);
/* Changes the hyperparameters, re-laying the blob when the set of used
 * buffers changes (new buffers start as torch would create them). For a
 * shaped session these are the session's own; its groups keep theirs
 * (engine_sess_set_all_hparams changes both). */
optd_err engine_sess_set_hparams(sess *s, const optim_hparams *hp);
/* The bytes of the state blob of n elements of dtype under info and hp
 * (params, the used buffers, the scalar), computed without allocating; n is
 * at most ENGINE_MAX_ELEMENTS, so it cannot overflow. */
size_t engine_sess_state_bytes(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n);
/* OPTD_OK when that state fits in limit bytes, else OPTD_E_SESSION_TOO_LARGE
 * with a msg giving the size and the limit. n must be >= 1. */
optd_err engine_sess_check_size(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n,
                                size_t limit, char *msg, size_t msglen);
/* Copies st.scalar into the blob's last 8 bytes (call after a step). */
void engine_sess_pack(sess *s);
/* Gives s the shape sh (taken on success; its n must be s->n): the blob
 * grows the per-tensor state, and the buffers restart fresh for each
 * group's hyperparameters. For a new session only. OPTD_E_BAD_HYPERPARAM
 * when a group's initial_accumulator_value does not fit the dtype; on
 * failure sh is the caller's still (and after OPTD_E_NOMEM from writing
 * the configuration, s is only fit to be freed). */
optd_err engine_sess_set_shape(sess *s, engine_shape *sh);
/* The bytes of state a session of n elements shaped sh (NULL for none)
 * holds, and the check of engine_sess_check_size for it. */
size_t engine_shape_state_bytes(const optim_info *info, const optim_hparams *hp, const engine_shape *sh,
                                optim_dtype dtype, size_t n);
optd_err engine_shape_check_size(const optim_info *info, const optim_hparams *hp, const engine_shape *sh,
                                 optim_dtype dtype, size_t n, size_t limit, char *msg, size_t msglen);
/* Changes the hyperparameters of s and of its groups (ghp: one per group,
 * or NULL for an unshaped session), as engine_sess_set_hparams. */
optd_err engine_sess_set_all_hparams(sess *s, const optim_hparams *hp, const optim_hparams *ghp);
/* Tensor t's step count and scalar state (t is 0 for an unshaped session). */
uint64_t engine_sess_tensor_step(const sess *s, size_t t);
void engine_sess_set_tensor_step(sess *s, size_t t, uint64_t v);
double engine_sess_tensor_scalar(const sess *s, size_t t);
void engine_sess_set_tensor_scalar(sess *s, size_t t, double v);
/* The bytes of the per-tensor state in the blob (0 when unshaped). */
size_t engine_sess_tstate_bytes(const sess *s);
/* The name of a dtype: "float32" or "float64". */
const char *engine_dtype_name(optim_dtype d);
/* The message of a session whose initial_accumulator_value does not fit its dtype. */
void engine_accumulator_msg(char *msg, size_t msglen, optim_dtype dtype);

/* ---- statistics: counters the engine keeps, read by any thread --------- */

#define ENGINE_LAT_BUCKETS 16
#define ENGINE_GROUP_BYTES_BUCKETS 11
/* Upper bounds of the latency buckets, microseconds (the last is +Inf). */
extern const uint64_t engine_latency_bounds_us[ENGINE_LAT_BUCKETS - 1];
/* Upper bounds of the group-bytes buckets, MiB (the last is +Inf). */
extern const uint64_t engine_group_bounds_mib[ENGINE_GROUP_BYTES_BUCKETS - 1];

typedef struct engine_histogram {
    _Atomic uint64_t bucket[ENGINE_LAT_BUCKETS]; /* counts at or below engine_latency_bounds_us[i] */
    _Atomic uint64_t count;
    _Atomic uint64_t sum_us;
} engine_histogram;

void engine_histogram_observe(engine_histogram *h, uint64_t us);

typedef struct engine_stats {
    _Atomic uint64_t steps[OPTIM_KIND_COUNT];
    engine_histogram commit_latency;
    _Atomic uint64_t commits, commit_failures;
    /* Groups run a second time, a savepoint per request, after a request
     * run without one failed having written (see writer.c, begin_part). */
    _Atomic uint64_t group_reruns;
    /* Steps within the writer's group budget by the commits of heavy groups
     * they waited for, queued to replied: 0, 1, 2, more. */
    _Atomic uint64_t heavy_waits[4];
    /* Bytes of state each group wrote, about (the requests' estimates). */
    _Atomic uint64_t group_bytes_bucket[ENGINE_GROUP_BYTES_BUCKETS];
    _Atomic uint64_t group_bytes_count, group_bytes_sum;
    _Atomic uint64_t cached_bytes; /* session state in the cache after the last group */
} engine_stats;

/* ---- requests ------------------------------------------------------------ */

typedef enum engine_req_type {
    ENGINE_REQ_CREATE,
    ENGINE_REQ_FORK,
    ENGINE_REQ_PUT_STATE,
    ENGINE_REQ_PATCH,
    ENGINE_REQ_DELETE,
    ENGINE_REQ_STEP
} engine_req_type;

typedef struct engine_req engine_req;
struct engine_step_req;
/* Runs on the writer thread once the request's outcome is committed (or failed). */
typedef void (*engine_req_cb)(engine_req *r, void *data);

/* The fields every request starts with, as libuv's UV_REQ_FIELDS. The
 * caller owns the request; it must stay alive until cb has run. if_match is
 * -1 when absent. rc, msg and step are results (step: the session's step
 * after the request, or its current one on OPTD_E_STEP_MISMATCH). The
 * fields ending in _ are the engine's. */
#define ENGINE_REQ_FIELDS                                                                                              \
    engine_req_type type;                                                                                              \
    char name[STORE_NAME_MAX + 1];                                                                                     \
    int64_t if_match;                                                                                                  \
    optd_err rc;                                                                                                       \
    char msg[256];                                                                                                     \
    uint64_t step;                                                                                                     \
    engine_req_cb cb;                                                                                                  \
    void *data;                                                                                                        \
    int state_;                           /* queued, parked in a round, or done */                                     \
    uint64_t heavy_seen_;                 /* heavy groups done when it was queued */                                   \
    bool light_;                          /* within the group budget when last taken */                                \
    struct engine_req *next_;             /* the queue, then the group */                                              \
    struct engine_step_req *next_waiter_; /* the steps of one worker round */                                          \
    struct engine_req *next_done_;        /* the requests to complete after a commit */

struct engine_req {
    ENGINE_REQ_FIELDS
};

/* ENGINE_REQ_CREATE and ENGINE_REQ_PUT_STATE: newsess is taken on success.
 * row: the new session's row (config included; the caller clears it with
 * store_session_clear). created: a PUT made the session (201, not 200). */
typedef struct engine_create_req {
    ENGINE_REQ_FIELDS
    sess *newsess;
    bool created;
    store_session row;
} engine_create_req;
typedef engine_create_req engine_put_state_req;

/* ENGINE_REQ_FORK: a copy of from with settings applied; row as for a create. */
typedef struct engine_fork_req {
    ENGINE_REQ_FIELDS
    char from[STORE_NAME_MAX + 1];
    engine_settings settings; /* borrowed */
    store_session row;
} engine_fork_req;

/* ENGINE_REQ_PATCH: settings applied onto the session's current ones. */
typedef struct engine_patch_req {
    ENGINE_REQ_FIELDS
    engine_settings settings; /* borrowed */
    /* A PATCH's "groups": one settings per group of the session (malloc'd
     * by the caller, who clears and frees them), or NULL. */
    engine_settings *groups;
    size_t n_groups;
    store_session row;
} engine_patch_req;

typedef struct engine_delete_req {
    ENGINE_REQ_FIELDS
} engine_delete_req;

/* ENGINE_REQ_STEP: one gradient (or a contribution to a worker round). */
typedef struct engine_step_req {
    ENGINE_REQ_FIELDS
    void *grad;    /* size elements of dtype (borrowed; the engine may scale it) */
    double weight; /* the contribution's weight in a worker round */
    bool has_loss; /* the client's loss, for the history */
    double loss;
    optim_dtype dtype; /* what grad was decoded for */
    size_t size;
    uint64_t digest;      /* of the gradient bytes and weight */
    const char *idem_key; /* NULL when none (borrowed) */
    bool want_params;     /* copy the new params into out_params */
    /* Tensors without a gradient this step (torch's grad is None), by
     * name (borrowed); an unknown name is OPTD_E_INVALID. */
    const char *const *skip;
    size_t n_skip;
    /* The lr this step sets onto the session (the transport's Optd-Lr;
     * borrowed, finite numbers), as a PATCH of lr would and in the step's
     * transaction, before the step runs with it; nothing of it stays when
     * the step is refused. n_lr 0: none; 1: the session's and every group's;
     * more: one per group of a shaped session (another count is
     * OPTD_E_INVALID). Validated as the lr hyperparameter
     * (OPTD_E_BAD_HYPERPARAM). In a worker round every contribution gives
     * the same (or none), applied when the round applies. */
    const double *lr_set;
    size_t n_lr;
    /* Optional (NULL for none): called with data on the writer thread when
     * the request starts waiting in a worker round, and while it waits to
     * ask whether its client has hung up (then it is withdrawn). */
    void (*on_park)(engine_req *r, void *data);
    bool (*client_gone)(engine_req *r, void *data);
    /* Results. */
    bool replayed;
    void *out_params; /* malloc'd copy, caller frees; NULL for none */
    size_t out_len;
    bool has_meta;         /* lr, grad_norm and contributors are known */
    double lr;             /* the lr the step used (a shaped session's first group's) */
    double *lrs;           /* a shaped session's: one per group (malloc'd, caller frees), else NULL */
    size_t n_lrs;
    double grad_norm;      /* before clipping */
    uint32_t contributors; /* of the round applied */
    bool withdrawn;        /* taken out of its round, its client gone: no reply to send */
} engine_step_req;

/* ---- the engine ----------------------------------------------------------- */

typedef struct engine engine;

/* Where a test may make the engine's writes fail (engine_options.fault). */
typedef enum engine_fault_point {
    ENGINE_FAULT_STEP,   /* after a step's state and history are written */
    ENGINE_FAULT_INSERT, /* after a new session's row is inserted */
    ENGINE_FAULT_COMMIT, /* instead of a group's COMMIT (the group rolls back) */
} engine_fault_point;

typedef struct engine_options {
    store *st;                /* borrowed for the engine's life */
    engine_stats *stats;      /* borrowed; counters the engine adds to */
    engine_codec codec;       /* the stored configuration's format */
    uint64_t idem_window;     /* steps an Idempotency-Key is remembered */
    uint64_t history_steps;   /* history rows kept per session */
    size_t cache_bytes;       /* bytes of session state kept in memory */
    size_t max_session_bytes; /* bounds a fork, and a PATCH that grows a session */
    unsigned max_parked;      /* requests waiting in rounds at most; 0: no cap */
    /* Tests only (NULL in the daemon): called on the writer thread at each
     * point with the session's name ("" for a commit); a return other than
     * OPTD_OK fails the write there, as a storage fault would. */
    optd_err (*fault)(void *ctx, engine_fault_point p, const char *name);
    void *fault_ctx;
} engine_options;

/* Starts the writer thread. Returns OPTD_OK or OPTD_E_NOMEM/OPTD_E_INTERNAL. */
optd_err engine_start(const engine_options *opt, engine **out);
/* Queues r; r->cb runs on the writer thread once r's outcome is committed
 * (or failed). Returns OPTD_E_UNAVAILABLE when the engine is stopping (cb
 * is then not called). */
optd_err engine_submit(engine *e, engine_req *r);
/* Whether the engine's last transaction committed. */
int engine_healthy(engine *e);
/* Any thread: the dtype and element count session name has as committed,
 * when the engine has it in memory; else OPTD_E_NOT_FOUND, which says only
 * "ask the store". A step decoded against it may still meet a session that
 * changed before it runs: the writer checks the shape again (as with a
 * read of the store). */
optd_err engine_session_shape(engine *e, const char *name, optim_dtype *dtype, size_t *n);
/* How many requests wait in worker rounds. */
unsigned engine_parked(engine *e);
/* How many were withdrawn from worker rounds because their clients hung up. */
uint64_t engine_withdrawn(engine *e);
/* Runs the requests already queued and stops the thread; later submits fail
 * with OPTD_E_UNAVAILABLE. */
void engine_stop(engine *e);
/* Frees a stopped engine; engine_free(NULL) does nothing. */
void engine_free(engine *e);

#endif
