/* Types shared by the files of api/ and nothing else: the growable text
 * buffer and number codec (codec.c), the in-memory session (session.c), the
 * writer thread and its jobs (writer.c) and the metrics (metrics.c). */
#ifndef OPTD_API_INTERNAL_H
#define OPTD_API_INTERNAL_H

#include <cJSON.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "api/api.h"
#include "optim/optim.h"

/* ---- codec.c ---------------------------------------------------------- */

/* A growable byte buffer. After an allocation failure oom is set and further
 * appends do nothing, so a writer checks once at the end. p is malloc'd and
 * NUL-terminated; the owner frees it (or takes it with sbuf_take). */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

void sbuf_put(sbuf *b, const char *s, size_t n);
void sbuf_puts(sbuf *b, const char *s);
void sbuf_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a JSON string literal, quotes included. */
void sbuf_json_str(sbuf *b, const char *s);
/* Appends the shortest decimal that reads back as exactly v (as a float when
 * f32); null when v is not finite (JSON has no inf). */
void sbuf_num(sbuf *b, double v, int f32);
/* Appends a JSON array of n elements of dtype. */
void sbuf_vec(sbuf *b, const void *x, size_t n, optim_dtype dtype);
/* Frees the buffer; safe on a zeroed one. */
void sbuf_free(sbuf *b);

/* Whether every number outside the strings of the JSON text s (n bytes) has
 * RFC 8259's form: cJSON reads whatever strtod reads (01, 1., .5, 0x1p3). */
bool json_numbers_strict(const char *s, size_t n);
/* Whether the n bytes at s are valid UTF-8. */
bool utf8_valid(const char *s, size_t n);
/* Writes ms (Unix milliseconds) as RFC 3339 UTC: "2026-11-24T10:00:00Z", or
 * with_ms "2026-11-24T10:00:00.123Z" (the history's). */
void rfc3339(int64_t ms, int with_ms, char out[32]);
int64_t now_ms(void);
/* A 64-bit digest of n bytes (not cryptographic: tells retries apart). */
uint64_t digest64(const void *p, size_t n);

/* Converts a JSON array of numbers into n elements of dtype at out (n must be
 * the array's length). Returns OPTD_OK, OPTD_E_BAD_REQUEST (an element is not
 * a number) or OPTD_E_NON_FINITE (not finite in dtype); msg says which. */
optd_err json_to_vec(const cJSON *arr, void *out, size_t n, optim_dtype dtype, char *msg, size_t msglen);
/* The fields of a step body besides the gradient. */
typedef struct step_fields {
    int has_loss;
    double loss;
    double weight; /* 1 when absent */
} step_fields;

/* The fast path of the step decoder for the common body {"grad": [...]}
 * with optional "loss" and "weight": reads the n numbers straight into grad
 * (n elements of dtype), exactly as strtod/strtof would. Returns 1 when the
 * body was of that shape and valid, 0 otherwise (the caller then parses it
 * with cJSON, which also words the error). */
int step_body_fast(const char *body, size_t len, optim_dtype dtype, size_t n, void *grad, step_fields *out);
/* Whether n elements of dtype are all finite; *bad gets the first index that is not. */
bool vec_finite(const void *x, size_t n, optim_dtype dtype, size_t *bad);

/* ---- training.c ------------------------------------------------------- */

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
    uint32_t workers;      /* contributions per round; 1: every step applies */
    uint32_t min_workers;  /* 0: the same as workers */
    double round_timeout;  /* seconds from a round's first contribution */
} training;

void training_defaults(training *tr);
uint32_t training_min_workers(const training *tr);
/* The lr the next step uses after steps_done steps (API.md "Learning-rate schedules"). */
double training_lr(const training *tr, double lr, uint64_t steps_done);
/* Handles hyperparameter e when it is lr_schedule or max_grad_norm (sets
 * *handled); OPTD_E_BAD_REQUEST or OPTD_E_BAD_HYPERPARAM with msg otherwise. */
optd_err training_hparam_from_json(const cJSON *e, training *tr, int *handled, char *msg, size_t msglen);
void training_hparams_to_json(sbuf *b, const training *tr);
/* Reads workers, min_workers and round_timeout from object o onto *tr. */
optd_err training_fields_from_json(const cJSON *o, training *tr, char *msg, size_t msglen);
void training_fields_to_json(sbuf *b, const training *tr);

/* ---- session.c -------------------------------------------------------- */

#define API_MAX_ELEMENTS ((size_t)1 << 28)

/* A session in memory: its row, decoded configuration and state. blob holds
 * params, then each used buffer in optim_info order, then the scalar state
 * as a double; st points into it. */
typedef struct sess {
    store_session row;
    const optim_info *info;
    optim_hparams hp;
    optim_dtype dtype;
    size_t n;
    unsigned char *blob; /* owned */
    size_t blob_len;
    optim_state st;
    training tr;
    struct wround *rnd; /* the worker round in progress (writer.c), or NULL */
    /* Writer cache links (writer.c). */
    struct sess *lru_prev, *lru_next, *hnext;
    int touched; /* in the current group: 0 untouched, -1 loaded, else the part (writer.c) that last changed it */
} sess;

/* Frees s and everything it owns; sess_free(NULL) does nothing. */
void sess_free(sess *s);
/* Makes a session with fresh state; params (n elements of dtype) are copied
 * from init when non-NULL, else filled with fill. */
optd_err sess_new(const char *name, const optim_info *info, const optim_hparams *hp, const training *tr,
                  optim_dtype dtype, size_t n, const void *init, double fill, sess **out);
/* A copy of src named name (a fork): params, state, step and settings. */
optd_err sess_copy(const sess *src, const char *name, sess **out);
/* Rebuilds a session from its stored row and state blob (both taken over on
 * success). OPTD_E_INTERNAL when they do not agree. */
optd_err sess_from_store(store_session *row, void *blob, size_t blob_len, sess **out);
/* Changes the hyperparameters, re-laying the blob when the set of used
 * buffers changes (new buffers start as torch would create them). */
optd_err sess_set_hparams(sess *s, const optim_hparams *hp);
/* The bytes of the state blob of n elements of dtype under info and hp
 * (params, the used buffers, the scalar), computed without allocating; n is
 * at most API_MAX_ELEMENTS, so it cannot overflow. */
size_t sess_state_bytes(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n);
/* OPTD_OK when that state fits in limit bytes, else OPTD_E_SESSION_TOO_LARGE
 * with a msg giving the size and the limit. n must be >= 1. */
optd_err sess_check_size(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n,
                         size_t limit, char *msg, size_t msglen);
/* Copies st.scalar into the blob's last 8 bytes (call after a step). */
void sess_pack(sess *s);
/* Writes row.config from hp. */
optd_err sess_write_config(sess *s);

/* Applies the JSON object obj of hyperparameters onto *hp and *tr (which
 * hold the defaults or the current values) for optimizer info, then
 * validates. Returns OPTD_OK, OPTD_E_BAD_REQUEST (wrong JSON type) or
 * OPTD_E_BAD_HYPERPARAM (unknown name or out of range) with msg. */
optd_err hparams_from_json(const optim_info *info, const cJSON *obj, optim_hparams *hp, training *tr, char *msg,
                           size_t msglen);
/* Appends {"lr": ..., ...} with every hyperparameter of info. */
void hparams_to_json(sbuf *b, const optim_info *info, const optim_hparams *hp, const training *tr);

/* Reads what a session is made of from a create body or a checkpoint: its
 * optimizer (required), dtype (float32 by default), hyperparams onto the
 * defaults and the session fields (workers, ...). Returns OPTD_OK,
 * OPTD_E_INVALID, OPTD_E_UNKNOWN_OPTIMIZER, OPTD_E_BAD_REQUEST or
 * OPTD_E_BAD_HYPERPARAM with msg. */
optd_err sess_config_from_json(const cJSON *o, const optim_info **info, optim_dtype *dtype, optim_hparams *hp,
                               training *tr, char *msg, size_t msglen);
/* Appends the session's public JSON object (API.md "GET /v1/sessions/{name}"). */
void sess_to_json(sbuf *b, const store_session *row);
/* Appends the full checkpoint object (GET .../state). */
void sess_state_to_json(sbuf *b, const sess *s);
/* Builds a session from a checkpoint object (PUT .../state) named name. */
optd_err sess_from_checkpoint(const char *name, const cJSON *obj, sess **out, char *msg, size_t msglen);

/* ---- metrics.c -------------------------------------------------------- */

typedef enum api_route {
    R_NONE,
    R_ROOT,
    R_HEALTHZ,
    R_READYZ,
    R_METRICS,
    R_OPTIMIZERS,
    R_OPENAPI,
    R_SESSIONS,
    R_SESSION,
    R_STEP,
    R_PARAMS,
    R_STATE,
    R_HISTORY,
    R_COUNT
} api_route;

#define LAT_BUCKETS 16
#define GROUP_BYTES_BUCKETS 11

typedef struct histogram {
    _Atomic uint64_t bucket[LAT_BUCKETS]; /* counts at or below api_latency_bounds[i] */
    _Atomic uint64_t count;
    _Atomic uint64_t sum_us;
} histogram;

typedef struct metrics {
    _Atomic uint64_t requests[R_COUNT][6][100]; /* [route][status/100][status%100] */
    _Atomic uint64_t steps[OPTIM_KIND_COUNT];
    histogram step_latency;
    histogram commit_latency;
    _Atomic uint64_t commits, commit_failures;
    /* Steps within the writer's group budget by the commits of heavy groups
     * (writer.c) they waited for, queued to replied: 0, 1, 2, more. */
    _Atomic uint64_t heavy_waits[4];
    /* Bytes of state each group wrote, about (writer.c's job estimates). */
    _Atomic uint64_t group_bytes_bucket[GROUP_BYTES_BUCKETS];
    _Atomic uint64_t group_bytes_count, group_bytes_sum;
} metrics;

const char *route_template(api_route r);

/* The files compiled into the daemon (build/gen/assets.c, from api/embed.py). */
extern const unsigned char asset_dashboard[], asset_openapi[];
extern const size_t asset_dashboard_len, asset_openapi_len;

/* ---- route.c ---------------------------------------------------------- */

/* Whether s is a session name: [A-Za-z0-9][A-Za-z0-9._-]{0,127}. */
int name_valid(const char *s);
/* The route of an (unescaped) URL path. For session paths the name segment
 * is copied into name and *name_ok tells whether it is a valid name. */
api_route route_parse(const char *url, char name[STORE_NAME_MAX + 1], int *name_ok);
/* Parses an If-Match value: "N", W/"N" or N into *out; "*" or NULL gives -1.
 * Returns 0, or -1 when the value is malformed. */
int parse_if_match(const char *v, int64_t *out);
/* Percent-decodes s in place and returns its new length; a string with an
 * encoded NUL or a malformed escape is left as it is. */
size_t url_unescape(char *s);
/* Parses a whole string as a finite number; returns 0, or -1 when it is not one. */
int parse_number(const char *v, double *out);
/* Parses a whole string of decimal digits (no sign, space or exponent) no
 * greater than max; returns 0, or -1 when it is not one. */
int parse_uint(const char *v, uint64_t max, uint64_t *out);
void histogram_observe(histogram *h, uint64_t us);
/* Counts one group of the writer that wrote about bytes of state. */
void metrics_group_bytes(metrics *m, uint64_t bytes);
void metrics_count_request(metrics *m, api_route r, int status);
/* Appends the Prometheus text exposition of m (sessions: the current count). */
void metrics_render(sbuf *b, metrics *m, uint64_t sessions);

/* ---- writer.c --------------------------------------------------------- */

typedef enum job_kind { JOB_CREATE, JOB_FORK, JOB_PUT_STATE, JOB_PATCH, JOB_DELETE, JOB_STEP } job_kind;

/* One write request, filled by a request thread, executed by the writer.
 * The request thread owns it; it must stay alive until done is set. */
typedef struct job {
    job_kind kind;
    char name[STORE_NAME_MAX + 1];
    /* Inputs. */
    sess *newsess;          /* CREATE, PUT_STATE: taken by the writer on success */
    cJSON *patch;           /* PATCH, FORK: the body (borrowed) */
    void *grad;             /* STEP: size elements of dtype (borrowed; the writer may scale it) */
    double weight;          /* STEP: the contribution's weight in a worker round */
    bool has_loss;          /* STEP: the client's loss, for the history */
    double loss;
    optim_dtype dtype;      /* STEP: what grad was decoded for */
    size_t size;
    uint64_t digest;        /* STEP: of the gradient bytes */
    const char *idem_key;   /* STEP: NULL when none (borrowed) */
    int64_t if_match;       /* STEP: -1 when absent */
    bool want_params;       /* STEP: copy the new params into out_params */
    /* Results. */
    optd_err rc;
    char msg[256];
    uint64_t step;          /* the step after (or the current one on 412) */
    bool replayed;
    void *out_params;       /* malloc'd copy, caller frees; NULL for none */
    size_t out_len;
    sbuf out_json;          /* CREATE/PUT_STATE/PATCH: the session object */
    bool created;           /* PUT_STATE: 201 rather than 200 */
    bool has_meta;          /* STEP: lr, grad_norm and contributors are known */
    double lr;              /* STEP: the lr the step used */
    double grad_norm;       /* STEP: before clipping */
    uint32_t contributors;  /* STEP: of the round applied */
    char from[STORE_NAME_MAX + 1]; /* FORK: the source session */
    /* Completion. */
    void (*on_done)(struct job *j, void *ctx);
    void *done_ctx;
    int state;              /* writer.c: queued, parked in a round, or done */
    uint64_t heavy_seen;    /* writer.c: heavy groups done when it was queued */
    bool light;             /* writer.c: within the group budget when last taken */
    struct job *next;       /* the queue, then the group */
    struct job *next_waiter; /* the jobs of one worker round */
    struct job *next_done;  /* the jobs to complete after a commit */
} job;

typedef struct writer writer;

/* max_session_bytes bounds the state of a fork, and of a PATCH that grows one. */
optd_err writer_start(store *st, metrics *m, uint64_t idem_window, uint64_t history_steps, size_t cache_bytes,
                      size_t max_session_bytes, writer **out);
/* Queues j; j->on_done runs on the writer thread once j's outcome is committed
 * (or failed). Returns OPTD_E_UNAVAILABLE when the writer is stopping. */
optd_err writer_submit(writer *w, job *j);
/* Whether the writer's last transaction committed. */
int writer_healthy(writer *w);
/* How many jobs wait in worker rounds. */
unsigned writer_parked(writer *w);
/* Runs the jobs already queued and stops the thread; later submits fail
 * with OPTD_E_UNAVAILABLE. */
void writer_stop(writer *w);
/* Frees a stopped writer; writer_free(NULL) does nothing. */
void writer_free(writer *w);

uint64_t mono_us(void);

#endif
