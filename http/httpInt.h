/* What the files of http/ share and nothing else may call: the growable
 * text buffer and number codec (codec.c), the streamed JSON body (jbody.c),
 * strict bodies (strict.c), the JSON forms of settings and sessions
 * (settings.c, checkpoint.c), safetensors, the routes and metrics, and the
 * operations that run on threads of their own (ops.c). */
#ifndef OPTD_HTTP_INT_H
#define OPTD_HTTP_INT_H

#include <cJSON.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "common/names.h"
#include "common/util.h"
#include "engine/engine.h"
#include "http/http.h"
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
/* Reads the JSON number (RFC 8259 grammar) at s, before end, as dtype would
 * round it (exactly as strtod/strtof); the end of the number, or NULL. The
 * byte at the returned end, if any, must not continue a number. */
const char *scan_number(const char *s, const char *end, optim_dtype dtype, double *out);

/* ---- jbody.c ---------------------------------------------------------- */

#define JB_MAX_VECS 8
#define JB_DEPTH 64
#define JB_KEY_MAX 64

/* Which members of a body are vectors: "params", "grad", each member of "state". */
enum { JB_PARAMS = 1, JB_GRAD = 2, JB_STATE = 4 };

/* One vector of a body. data holds n elements of dtype (owned, unless
 * borrowed: the caller's buffer of cap elements, n then counting past it). */
typedef struct jvec {
    char key[JB_KEY_MAX];
    int in_state; /* a member of "state" */
    optim_dtype dtype;
    int raw; /* the dtype was unknown while it arrived: its text is in text */
    int borrowed;
    void *data;
    size_t n, cap;
    sbuf text;
} jvec;

/* A JSON body decoded as it arrives (jbody.c): vectors into typed arrays,
 * the rest kept as text. Plain state: jbody_init, jbody_feed any number of
 * times, jbody_finish, jbody_free. */
typedef struct jbody {
    unsigned paths;
    size_t skel_max;  /* bytes of non-vector text kept at most (413 past it) */
    size_t bytes_max; /* bytes of vectors decoded at most (413 past it) */
    size_t bytes, max_elems, size_hint;
    int dtype_known, dtype_seen;
    optim_dtype dtype;
    void *dest; /* grad: decoded straight into the caller's buffer */
    size_t dest_n;
    sbuf skel; /* the body with each vector left as [] */
    int depth, phase, in_str, esc, capturing;
    char stack[JB_DEPTH];
    char key1[JB_KEY_MAX], key2[JB_KEY_MAX], keyx[JB_KEY_MAX];
    size_t key1_len, key2_len, keyx_len;
    int key1_bad, key2_bad, keyx_bad;
    char *keybuf;
    size_t *keylen;
    int *keybad;
    size_t val_start; /* in skel: where the current member's value began */
    jvec *cur;        /* the vector being read */
    int vstate;
    char num[64]; /* a number cut between two pieces */
    size_t numlen;
    jvec vecs[JB_MAX_VECS];
    size_t nvecs;
    optd_err rc; /* the first error; the rest of the body is ignored */
    char msg[256];
} jbody;

void jbody_init(jbody *jb, unsigned paths, size_t skel_max, size_t bytes_max);
/* Fixes the dtype of the vectors (a step's, known from its session); grad
 * then goes into dest (dest_n elements). Call before the first feed. */
void jbody_set_dtype(jbody *jb, optim_dtype dtype, void *dest, size_t dest_n);
/* Takes the next n bytes of the body. An error is kept for jbody_finish. */
void jbody_feed(jbody *jb, const char *p, size_t n);
/* After the last byte: parses the skeleton into *out (the caller deletes
 * it, even on failure) and decodes the vectors kept as text (in the body's
 * "dtype", float32 by default). Returns OPTD_OK or the error with msg:
 * OPTD_E_BAD_JSON, OPTD_E_BAD_REQUEST (an element is not a number),
 * OPTD_E_NON_FINITE, OPTD_E_INVALID (too many elements), OPTD_E_TOO_LARGE,
 * OPTD_E_NOMEM. */
optd_err jbody_finish(jbody *jb, cJSON **out, char *msg, size_t msglen);
/* The vector of member key ("params"; in_state: of "state"), or NULL. */
jvec *jbody_vec(jbody *jb, const char *key, int in_state);
/* Frees v's data now (the rest of the body is kept). */
void jvec_release(jvec *v);
void jbody_free(jbody *jb);
/* Parses text (len bytes, NUL-terminated) as one JSON object, as RFC 8259
 * and this API require (UTF-8, strict numbers, no NUL in strings); hint is
 * appended to a bad_json message. *out is set even on some failures: the
 * caller deletes it. */
optd_err json_parse_object(const char *text, size_t len, const char *hint, cJSON **out, char *msg, size_t msglen);

/* ---- strict.c --------------------------------------------------------- */

/* OPTD_OK when every member of object o (may be NULL) is one of names;
 * else OPTD_E_UNKNOWN_FIELD with msg naming the first that is not (also in
 * *bad when bad is non-NULL). where names the object ("the body"). */
optd_err fields_known(const cJSON *o, const char *where, const char *const *names, size_t n, const cJSON **bad,
                      char *msg, size_t msglen);
/* Whether name is a hyperparameter of some optimizer (or lr_schedule,
 * max_grad_norm): a client that put it beside "hyperparams" meant inside. */
int hparam_name_anywhere(const char *name);
/* fields_known for a request body, where a hyperparameter given as a field
 * (beside "hyperparams") is told where it goes: inside "hyperparams"
 * (HINT_INSIDE) or in a PATCH (HINT_PATCH). */
enum { HINT_INSIDE, HINT_PATCH };
optd_err body_fields_known(const cJSON *o, const char *where, const char *const *names, size_t n, int hp_hint,
                           char *msg, size_t msglen);

/* ---- settings.c: the JSON forms of a session's settings ---------------- */

/* Reads the members of "hyperparams" (obj, may be NULL) and the session
 * fields of body (may be NULL) into *out (cleared first; the caller clears
 * it with engine_settings_clear), to be applied by engine_settings_apply
 * onto a session's current or default values. An error found here is kept
 * in *out, for the engine to report where it would have met it. Returns
 * OPTD_OK or OPTD_E_NOMEM. */
optd_err http_settings_from_json(const cJSON *obj, const cJSON *body, engine_settings *out);
/* http_settings_from_json of body's "hyperparams" and fields, applied onto
 * *hp and *tr for info (engine_settings_apply's return codes). */
optd_err http_settings_apply_json(const optim_info *info, const cJSON *body, optim_hparams *hp, training *tr, char *msg,
                                  size_t msglen);
/* Appends {"lr": ..., ...} with every hyperparameter of info (and
 * lr_schedule and max_grad_norm from tr; a group's: tr NULL). */
void hparams_to_json(sbuf *b, const optim_info *info, const optim_hparams *hp, const training *tr);
/* Appends the session fields (workers, min_workers, round_timeout). */
void training_fields_to_json(sbuf *b, const training *tr);
/* For GET /v1/optimizers, from the tables that validate: appends the
 * descriptions of lr_schedule and max_grad_norm (each preceded by a comma),
 * and the array of the session fields. */
void http_training_describe(sbuf *b);
void http_session_fields_describe(sbuf *b);
/* The stored configuration's format (store_session.config), for the engine. */
extern const engine_codec http_config_codec;

/* The most bytes of a body's fields other than its vectors (jbody.c). */
#define JB_SKELETON_MAX ((size_t)8 << 20) /* room for the groups of ENGINE_MAX_TENSORS tensors */

/* ---- checkpoint.c: sessions as JSON, checkpoints ---------------------- */

/* A session of n elements for the decoded configuration, within max_bytes
 * of state: its params taken over from *take (see engine_sess_adopt) when
 * take is non-NULL, else all fill; shaped *shape when shape and *shape are
 * non-NULL (taken on success: *shape is then NULL). The one way http/
 * makes a session, so each refusal says the same thing. */
optd_err sess_make(const char *name, const optim_info *info, const optim_hparams *hp, const training *tr,
                   optim_dtype dtype, size_t n, void **take, double fill, engine_shape **shape, size_t max_bytes,
                   sess **out, char *msg, size_t msglen);
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
/* Appends the checkpoint's fields other than params and state, as a whole
 * object (the start of sess_state_to_json, closed). */
void sess_head_to_json(sbuf *b, const sess *s);
/* Appends a vector's elements [from, from + n) of dtype, comma-separated,
 * without brackets (a JSON array written in pieces). */
void sbuf_vec_items(sbuf *b, const void *x, size_t from, size_t n, optim_dtype dtype);

/* ---- safetensors.c ---------------------------------------------------- */

/* Appends the 8-byte length and the header of s's safetensors checkpoint;
 * the file's data that follows is the first st_data_len(s) bytes of s->blob
 * (params, then each used buffer). */
optd_err st_header(const sess *s, sbuf *out);
size_t st_data_len(const sess *s);
/* A safetensors checkpoint read as it arrives, its tensors copied straight
 * into the session it describes (one copy of the state in memory). */
typedef struct st_reader st_reader;
/* max_bytes: --max-session-bytes, checked before the tensors are read. */
st_reader *st_reader_new(const char *name, size_t max_bytes);
void st_reader_feed(st_reader *r, const void *data, size_t n);
/* After the last byte: the session (caller frees) validated like a JSON
 * checkpoint, or the error with msg. */
optd_err st_reader_finish(st_reader *r, sess **out, char *msg, size_t msglen);
void st_reader_free(st_reader *r);
/* Builds a session named name from a checkpoint: obj is its JSON (the
 * skeleton of a streamed body, each vector left as []) and jb holds its
 * vectors (released as they are copied). Validated like a create: sizes,
 * finiteness, each buffer's domain. */
optd_err sess_from_checkpoint(const char *name, const cJSON *obj, jbody *jb, size_t max_bytes, sess **out, char *msg,
                              size_t msglen);
/* The steps of building a session from a checkpoint, shared by the JSON
 * and safetensors forms: ckpt_begin makes a fresh session of n elements
 * from the checkpoint's fields (strictly checked; no vectors read);
 * ckpt_target gives where the vector named key ("params" or a buffer) goes
 * (OPTD_E_UNKNOWN_FIELD or OPTD_E_INVALID when s has no such); ckpt_finish,
 * once the vectors are in (present: ckpt_buffer_bit of each buffer given),
 * checks they are all there and in their domains. */
/* max_bytes: --max-session-bytes (422 too_large past it, before allocating). */
optd_err ckpt_begin(const char *name, const cJSON *obj, size_t n, size_t max_bytes, void **take, sess **out, char *msg,
                    size_t msglen);
optd_err ckpt_target(sess *s, const char *key, void **dst, char *msg, size_t msglen);
unsigned ckpt_buffer_bit(const sess *s, const char *key);
optd_err ckpt_finish(sess *s, unsigned present, char *msg, size_t msglen);
/* The largest body GET .../state can write (JSON or safetensors) for a
 * session of session_bytes bytes of state, with room for a client that
 * re-serializes it with spaces: what PUT .../state must accept. */
size_t checkpoint_max_bytes(size_t session_bytes);

/* ---- metrics.c -------------------------------------------------------- */

typedef enum http_route {
    HTTP_R_NONE,
    HTTP_R_ROOT,
    HTTP_R_HEALTHZ,
    HTTP_R_READYZ,
    HTTP_R_METRICS,
    HTTP_R_OPTIMIZERS,
    HTTP_R_OPENAPI,
    HTTP_R_SESSIONS,
    HTTP_R_BACKUPS, /* before HTTP_R_SESSION: the routes from HTTP_R_SESSION on name a session */
    HTTP_R_SESSION,
    HTTP_R_STEP,
    HTTP_R_PARAMS,
    HTTP_R_STATE,
    HTTP_R_HISTORY,
    HTTP_R_COUNT
} http_route;

typedef struct metrics {
    _Atomic uint64_t requests[HTTP_R_COUNT][6][100]; /* [route][status/100][status%100] */
    engine_histogram step_latency;
    engine_stats eng; /* the engine's counters */
} metrics;

/* The one route table (http.c), indexed by http_route: the path template
 * ("{name}" stands for a session name; also the metrics label), the
 * methods the Allow header lists, and the handler. */
struct req;
typedef struct http_route_def {
    const char *path;
    const char *methods;
    enum MHD_Result (*handler)(struct req *r, const char *method);
} http_route_def;
extern const http_route_def http_routes[HTTP_R_COUNT];

/* The files compiled into the daemon (build/gen/assets.c, from http/embed.py). */
extern const unsigned char asset_dashboard[], asset_openapi[];
extern const size_t asset_dashboard_len, asset_openapi_len;

/* ---- route.c ---------------------------------------------------------- */

/* Whether s is a session name: [A-Za-z0-9][A-Za-z0-9._-]{0,127}. */
int name_valid(const char *s);
/* The route of an (unescaped) URL path. For session paths the name segment
 * is copied into name and *name_ok tells whether it is a valid name. */
http_route route_parse(const char *url, char name[STORE_NAME_MAX + 1], int *name_ok);
/* Parses an If-Match value: "N", W/"N" or N into *out; "*" or NULL gives -1.
 * Returns 0, or -1 when the value is malformed. */
int parse_if_match(const char *v, int64_t *out);
/* Percent-decodes s in place and returns its new length; a string with an
 * encoded NUL or a malformed escape is left as it is. */
size_t url_unescape(char *s);
/* Parses a whole string as a finite number; returns 0, or -1 when it is not one. */
int http_parse_number(const char *v, double *out);
/* The next item of a comma-separated header value held in a writable copy
 * (*cur walks it; start it at the copy): cut out in place, blanks and tabs
 * trimmed, possibly empty. NULL after the last item. */
char *http_list_next(char **cur);
/* Parses a whole string of decimal digits (no sign, space or exponent) no
 * greater than max; returns 0, or -1 when it is not one. */
int parse_uint(const char *v, uint64_t max, uint64_t *out);
void metrics_count_request(metrics *m, http_route r, int status);
/* Appends the Prometheus text exposition of m (sessions: the current count). */
void metrics_render(sbuf *b, metrics *m, uint64_t sessions, const store_stats *ss);
/* Appends the gauge of contributions waiting in worker rounds and the
 * count of those withdrawn because their clients hung up. */
void metrics_render_rounds(sbuf *b, unsigned waiting, uint64_t withdrawn);

/* ---- ops.c ------------------------------------------------------------ */

/* Operations that must not hold a request thread (MHD serves many
 * connections on each): an online backup (seconds for a large database)
 * and the cluster-wide listing (waits for the peers). Each runs on a thread
 * of its own while the request's connection is suspended. */
typedef enum op_kind { OP_BACKUP, OP_LIST_CLUSTER } op_kind;

/* One operation, filled by a request thread, which owns it; it must stay
 * alive until on_done has run. */
typedef struct op {
    op_kind kind;
    /* Inputs (OP_LIST_CLUSTER). */
    char after[1024]; /* "" for the first page */
    unsigned limit;
    /* Results. */
    optd_err rc; /* OPTD_OK: status and out hold the reply */
    char msg[1024];
    int status;
    sbuf out; /* the JSON reply; the owner frees it */
    /* Completion: runs on the op's thread. */
    void (*on_done)(struct op *o, void *ctx);
    void *done_ctx;
} op;

typedef struct ops ops;

/* What ops needs; the strings are copied. */
typedef struct ops_config {
    store *st;              /* borrowed for the life of ops */
    const char *backup_dir; /* NULL or "": backups are off */
    const char *peers;      /* comma-separated base URLs, or NULL */
    const char *token;      /* sent to the peers as a bearer token; may be NULL */
    const char *instance;   /* this daemon's Optd-Instance, to know itself among the peers */
    http_log_fn log;        /* may be NULL */
    void *log_ctx;
} ops_config;

optd_err ops_start(const ops_config *cfg, ops **out, char *err, size_t errlen);
/* Runs o on a thread of its own; o->on_done runs there when it is done.
 * OPTD_E_UNAVAILABLE when stopping or no thread can be made (on_done is
 * then not called). */
optd_err ops_submit(ops *s, op *o);
/* Appends the GET /v1/backups reply. */
optd_err ops_list_backups(ops *s, sbuf *out, char *msg, size_t msglen);
/* Cancels backups in progress and waits until every op has completed.
 * Later submits fail. ops_stop(NULL) does nothing. */
void ops_stop(ops *s);
/* Frees stopped ops; ops_free(NULL) does nothing. */
void ops_free(ops *s);

/* ---- wire.c: narrow binary vectors ------------------------------------ */

/* The element type of a binary vector on the wire (API.md "Binary
 * vectors"): the media type parameter dtype, WIRE_NATIVE when absent (the
 * session's dtype). */
typedef enum wire_type { WIRE_NATIVE, WIRE_BF16, WIRE_F16, WIRE_F32, WIRE_F64 } wire_type;

/* "bfloat16", "float16", "float32", "float64" ("native" for WIRE_NATIVE). */
const char *wire_name(wire_type w);
/* Bytes per element of w (not WIRE_NATIVE). */
size_t wire_size(wire_type w);
/* The dtype parameter of a Content-Type value, and of the
 * application/octet-stream range of an Accept value (*binary: whether it
 * names one; accept may be NULL). OPTD_OK, or OPTD_E_UNSUPPORTED_MEDIA_TYPE
 * with a msg listing the valid values for an unknown or repeated one. */
optd_err wire_content_type(const char *ct, wire_type *out, char *msg, size_t msglen);
optd_err wire_accept(const char *accept, int *binary, wire_type *out, char *msg, size_t msglen);
/* w made concrete for a session of dtype (WIRE_NATIVE: the session's own);
 * OPTD_E_INVALID for a type wider than the session's. header names where
 * w came from, for the message. */
optd_err wire_for(wire_type w, optim_dtype dtype, const char *header, wire_type *out, char *msg, size_t msglen);
/* Converts n elements of w at src into n of dtype at dst, exactly (every
 * value of a narrower type is one of dtype). Returns true when all are
 * finite, else false with *bad the first index that is not. */
bool wire_decode(wire_type w, const void *src, size_t n, optim_dtype dtype, void *dst, size_t *bad);
/* Converts n elements of dtype at src into n of w at dst as torch's
 * Tensor.to() does: round to nearest even (float64 through float32 first,
 * as torch), overflow to infinity. w is not wider than dtype. */
void wire_encode(optim_dtype dtype, const void *src, size_t n, wire_type w, void *dst);

/* ---- groups.c: tensors and parameter groups as JSON --------------------- */

/* Reads "groups" (a create body's, a checkpoint's or the stored
 * configuration's) into a new shape (*out, the caller frees) for optimizer
 * info, each group's hyperparams over base (the session's). Strict, with
 * messages naming the group and tensor: OPTD_E_BAD_REQUEST (wrong JSON
 * types), OPTD_E_UNKNOWN_FIELD, OPTD_E_INVALID, OPTD_E_BAD_HYPERPARAM,
 * OPTD_E_NOMEM. */
optd_err groups_from_json(const cJSON *groups, const optim_info *info, const optim_hparams *base, engine_shape **out,
                          char *msg, size_t msglen);
/* Appends ,"groups":[...]: each group with its full hyperparams and its
 * tensors' names and shapes. */
void groups_to_json(sbuf *b, const optim_info *info, const engine_shape *sh);
/* Appends ,"tensor_state":{"<tensor>": {"step": n[, "mu_product": x]}}
 * for a shaped session (nothing for another). */
void tensor_state_to_json(sbuf *b, const sess *s);
/* Reads a checkpoint's tensor_state (may be NULL) into s, whose step is
 * set: each tensor's step (at most the session's) and scalar. */
optd_err tensor_state_from_json(sess *s, const cJSON *ts, char *msg, size_t msglen);
/* A PATCH's "groups" (may be NULL): *out, one settings per entry (*n),
 * freed with patch_groups_free. */
optd_err patch_groups_from_json(const cJSON *groups, engine_settings **out, size_t *n, char *msg, size_t msglen);
void patch_groups_free(engine_settings *d, size_t n);
/* A step's skipped tensors: from the Optd-Skip header (h may be NULL;
 * *buf holds the names, *names points into it, the caller frees both), or
 * from a JSON step's "skip" (*names points into the tree; the caller frees
 * the array). OPTD_E_BAD_REQUEST with msg for a malformed list. */
optd_err skip_from_header(const char *h, char **buf, const char ***names, size_t *n, char *msg, size_t msglen);
optd_err skip_from_json(const cJSON *skip, const char ***names, size_t *n, char *msg, size_t msglen);

#endif
