/* The HTTP front of optd on libmicrohttpd: per-request state made on the
 * first callback, early refusals (404/405/401/415/413) before the body is
 * read, the body gathered up to --max-body, then one handler per route.
 * Writes become writer jobs: the connection is suspended while the writer
 * applies and commits them, and resumed to send the reply. */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/bigbuf.h"
#include "http/httpInt.h"

struct http_server {
    http_config cfg;
    char *token; /* owned; NULL when auth is off */
    store *st;
    engine *w;
    metrics m;
    struct MHD_Daemon *mhd;
    int listen_fd;
    uint16_t port;
    int host_check;        /* loopback listener without a token: Host must be a loopback name */
    size_t state_body_max; /* the largest checkpoint body (checkpoint_max_bytes) */
    atomic_int stopping;
    atomic_uint active; /* requests between first callback and completion */
    atomic_ullong next_id;
    /* Slow-head watchdog: every open connection, and a thread that cuts those
     * whose request head is overdue. */
    pthread_mutex_t conns_mu;
    struct conn_track *conns; /* guarded by conns_mu */
    unsigned nconns;          /* guarded by conns_mu; parked ones are not counted */
    pthread_t watchdog;
    int watchdog_on;
    pthread_cond_t watchdog_cv; /* signalled to stop, with conns_mu */
    /* Signalled, once stopping, whenever a request completes or parks in a
     * worker round: what http_stop waits for. */
    pthread_mutex_t idle_mu;
    pthread_cond_t idle_cv;
    ops *ops;          /* backups and the cluster-wide listing (ops.c) */
    char instance[24]; /* Optd-Instance: tells this daemon from its peers */
};

/* What the watchdog knows of a connection. A fresh connection and a request
 * whose line has arrived must complete their head within header_timeout;
 * while a request is served, or between keep-alive requests, MHD's own idle
 * timeout applies. A parked connection holds a step waiting in a worker
 * round: it does not count against --max-connections (the writer caps how
 * many wait), so waiting contributors never lock other clients out. */
enum { CONN_FRESH, CONN_HEAD, CONN_BUSY, CONN_IDLE, CONN_PARKED };
typedef struct conn_track {
    int fd;
    int state;         /* guarded by conns_mu */
    uint64_t since_us; /* when state began */
    struct conn_track *prev, *next;
} conn_track;

/* The longest client X-Request-Id kept (longer ones are replaced by ours). */
#define REQUEST_ID_MAX 128

typedef struct req {
    http_server *srv;
    struct MHD_Connection *conn;
    conn_track *track; /* the connection's, NULL if its tracking failed; lives longer than r */
    http_route route;
    char name[STORE_NAME_MAX + 1];
    int name_ok;
    char method[16];
    char path[160];
    uint64_t t0, id;
    int status;
    /* The body, gathered up to max_body; from bigbuf when big. */
    char *body;
    size_t len, cap;
    int big;
    int too_large;
    int binary; /* Content-Type: application/octet-stream */
    wire_type wire_in;  /* its dtype parameter (a step's gradient) */
    wire_type wire_out; /* the binary reply's element type, once resolved */
    /* A write handed to the engine: one request struct per type, all
     * starting with ENGINE_REQ_FIELDS (job.base). */
    union {
        engine_req base;
        engine_step_req step;
        engine_create_req create;
        engine_fork_req fork;
        engine_patch_req patch;
        engine_delete_req del;
    } job;
    char from[STORE_NAME_MAX + 1]; /* a create body's "from": a fork */
    /* The request thread's view of a write or operation handed off (the
     * engine's state_ is its own queue position, never read here): set to
     * WAITING before the connection is suspended, to DONE by the callback
     * just before it resumes the connection. */
    enum { HANDOFF_NONE, HANDOFF_WAITING, HANDOFF_DONE } handoff;
    cJSON *json;   /* the parsed body, when the job borrows from it */
    jbody *jb;     /* a body decoded as it arrives (create, PUT .../state), or NULL */
    st_reader *st; /* a binary checkpoint read as it arrives, or NULL */
    void *grad;    /* decoded gradient, when not the body itself */
    char *skip_buf;          /* Optd-Skip's names, NUL-separated */
    const char **skip_names; /* a step's skipped tensors (into skip_buf or r->json) */
    double *lr_set;          /* Optd-Lr's numbers, or NULL */
    char idem[256];
    int minimal, want_binary;
    int close; /* answer with Connection: close (the framing is not to be trusted) */
    /* An operation handed to ops.c (handoff as for a job). */
    op op;
    int is_op;
    char rid[REQUEST_ID_MAX + 1]; /* X-Request-Id: the client's, else ours */
} req;

/* ---- Routing ---------------------------------------------------------- */

static int method_allowed(http_route route, const char *method)
{
    const char *a = http_routes[route].methods;
    size_t n = strlen(method);
    for (const char *p = a; p && (p = strstr(p, method)); p += n)
        if ((p == a || p[-1] == ' ') && (p[n] == ',' || p[n] == '\0'))
            return 1;
    return 0;
}

/* ---- Replies ---------------------------------------------------------- */

static enum MHD_Result queue(req *r, int status, struct MHD_Response *resp, const char *ctype, const char *etag_step);

/* Queues a reply whose body (malloc'd, len bytes) MHD frees once sent. */
static enum MHD_Result send_body(req *r, int status, const char *ctype, char *body, size_t len, const char *etag_step)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer_with_free_callback(len, body, free);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    return queue(r, status, resp, ctype, etag_step);
}

/* Adds the headers every reply carries and queues resp (and drops our
 * reference to it). */
static enum MHD_Result queue(req *r, int status, struct MHD_Response *resp, const char *ctype, const char *etag_step)
{
    if (ctype)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (etag_step) {
        char etag[32];
        snprintf(etag, sizeof etag, "\"%s\"", etag_step);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
    }
    MHD_add_response_header(resp, "X-Request-Id", r->rid);
    MHD_add_response_header(resp, "Optd-Instance", r->srv->instance);
    if (status == 401)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (status == 405 && r->route < HTTP_R_COUNT && http_routes[r->route].methods)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, http_routes[r->route].methods);
    if (status == 201 && r->name[0]) {
        char loc[200];
        snprintf(loc, sizeof loc, "/v1/sessions/%s", r->name);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, loc);
    }
    if (r->handoff == HANDOFF_DONE && r->job.base.type == ENGINE_REQ_STEP && r->job.step.replayed &&
        r->job.base.rc == OPTD_OK)
        MHD_add_response_header(resp, "Idempotent-Replayed", "true");
    if (atomic_load(&r->srv->stopping) || r->close)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    r->status = status;
    enum MHD_Result ret = MHD_queue_response(r->conn, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* Serves a compiled-in file (no copy: MHD reads the static bytes). */
static enum MHD_Result send_static(req *r, const char *ctype, const unsigned char *data, size_t len)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)data, MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    return queue(r, 200, resp, ctype, NULL);
}

static enum MHD_Result send_json(req *r, int status, sbuf *b, const char *etag_step)
{
    if (b->oom) {
        sbuf_free(b);
        sbuf_puts(b, "{\"error\":{\"code\":\"unavailable\",\"message\":\"out of memory; safe to retry\"}}");
        status = 503;
        if (b->oom)
            return MHD_NO;
    }
    /* A JSON reply ends with a newline, so a shell prompt starts on a line
     * of its own after curl. */
    sbuf_put(b, "\n", 1);
    if (b->oom) {
        sbuf_free(b);
        return MHD_NO;
    }
    char *p = b->p;
    size_t len = b->len;
    memset(b, 0, sizeof *b);
    return send_body(r, status, "application/json", p, len, etag_step);
}

/* An error reply {"error": {"code", "message"[, "step"]}}; msg may be NULL
 * for the table's default sentence. */
static enum MHD_Result send_err(req *r, optd_err e, const char *msg, int64_t step)
{
    sbuf b = {0};
    sbuf_printf(&b, "{\"error\":{\"code\":\"%s\",\"message\":", optd_err_code(e));
    sbuf_json_str(&b, msg && *msg ? msg : optd_err_message(e));
    if (step >= 0)
        sbuf_printf(&b, ",\"step\":%lld", (long long)step);
    sbuf_puts(&b, "}}");
    return send_json(r, optd_err_status(e), &b, NULL);
}

static void step_str(uint64_t step, char out[24]) { snprintf(out, 24, "%llu", (unsigned long long)step); }

/* Adds header name with the number v as the JSON reply prints it. */
static void number_header(struct MHD_Response *resp, const char *name, double v)
{
    sbuf b = {0};
    sbuf_num(&b, v, 0);
    if (!b.oom && b.p)
        MHD_add_response_header(resp, name, b.p);
    sbuf_free(&b);
}

/* A binary step reply carries the scalars of the JSON one in headers
 * (API.md "Binary vectors"): Optd-Lr, Optd-Grad-Norm, Optd-Contributors. */
static void step_meta_headers(struct MHD_Response *resp, const engine_step_req *j)
{
    char n[16];
    if (!j || !j->has_meta)
        return;
    if (j->n_lrs) { /* a shaped session's: one per group, comma-separated */
        sbuf b = {0};
        for (size_t g = 0; g < j->n_lrs; g++) {
            if (g)
                sbuf_put(&b, ",", 1);
            sbuf_num(&b, j->lrs[g], 0);
        }
        if (!b.oom && b.p)
            MHD_add_response_header(resp, "Optd-Lr", b.p);
        sbuf_free(&b);
    } else {
        number_header(resp, "Optd-Lr", j->lr);
    }
    number_header(resp, "Optd-Grad-Norm", j->grad_norm);
    snprintf(n, sizeof n, "%u", j->contributors);
    MHD_add_response_header(resp, "Optd-Contributors", n);
}

static enum MHD_Result send_vec(req *r, void *x, size_t n, optim_dtype dtype, const char *etag,
                                const engine_step_req *meta)
{
    wire_type own = dtype == OPTIM_F64 ? WIRE_F64 : WIRE_F32;
    wire_type w = r->wire_out == WIRE_NATIVE ? own : r->wire_out;
    size_t len = n * wire_size(w);
    char ctype[64] = "application/octet-stream";
    if (w != own) {
        void *y = malloc(len + 1);
        if (!y) {
            free(x);
            return send_err(r, OPTD_E_NOMEM, NULL, -1);
        }
        wire_encode(dtype, x, n, w, y);
        free(x);
        x = y;
        /* Said in the reply too, for a reader that did not keep the request. */
        snprintf(ctype, sizeof ctype, "application/octet-stream; dtype=%s", wire_name(w));
    }
    struct MHD_Response *resp = MHD_create_response_from_buffer_with_free_callback(len, x, free);
    if (!resp) {
        free(x);
        return MHD_NO;
    }
    step_meta_headers(resp, meta);
    return queue(r, 200, resp, ctype, etag);
}

/* ---- Request helpers -------------------------------------------------- */

static const char *header(req *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

static int media_is(const char *v, const char *type)
{
    size_t n = strlen(type);
    while (*v == ' ')
        v++;
    return strncasecmp(v, type, n) == 0 && (v[n] == '\0' || v[n] == ';' || v[n] == ' ');
}

static int accepts_binary(req *r)
{
    const char *a = header(r, MHD_HTTP_HEADER_ACCEPT);
    return a && strstr(a, "application/octet-stream") != NULL;
}

/* Whether the reply is to be a binary vector of a session of dtype, and in
 * which type (r->wire_out): Accept's dtype parameter, else the session's.
 * OPTD_E_UNSUPPORTED_MEDIA_TYPE for a dtype optd does not know, as for a
 * Content-Type; OPTD_E_INVALID for one wider than the session's. */
static optd_err accept_wire(req *r, optim_dtype dtype, int *binary, char *msg, size_t msglen)
{
    wire_type w;
    optd_err rc = wire_accept(header(r, MHD_HTTP_HEADER_ACCEPT), binary, &w, msg, msglen);
    if (rc == OPTD_OK)
        rc = wire_for(w, dtype, "Accept", &r->wire_out, msg, msglen);
    return rc;
}

/* Queues a binary vector reply: n elements of dtype at x (malloc'd, taken)
 * as r->wire_out, converted when that is narrower. */
static enum MHD_Result send_vec(req *r, void *x, size_t n, optim_dtype dtype, const char *etag,
                                const engine_step_req *meta);

/* Constant-time check of "Bearer <token>". */
static int authorized(req *r)
{
    const char *tok = r->srv->token;
    if (!tok)
        return 1;
    const char *h = header(r, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return 0;
    h += 7;
    size_t a = strlen(h), b = strlen(tok);
    unsigned char diff = a != b;
    for (size_t i = 0; i < b; i++)
        diff |= (unsigned char)(h[i < a ? i : 0] ^ tok[i]);
    return diff == 0;
}

/* The sentence a bad_json message ends with when the body may be binary
 * data sent without its Content-Type. */
static const char *binary_hint(req *r)
{
    return !header(r, MHD_HTTP_HEADER_CONTENT_TYPE) && (r->route == HTTP_R_STEP || r->route == HTTP_R_STATE)
               ? "; a binary body needs the header Content-Type: application/octet-stream"
               : "";
}

/* Parses the body as a JSON object into r->json: the streamed body's
 * skeleton when it was decoded as it arrived (r->jb), else the buffer. */
static optd_err parse_json(req *r, char *msg, size_t msglen)
{
    if (r->binary) {
        snprintf(msg, msglen, "this endpoint takes application/json");
        return OPTD_E_UNSUPPORTED_MEDIA_TYPE;
    }
    if (r->jb) {
        optd_err rc = jbody_finish(r->jb, &r->json, msg, msglen);
        if (rc == OPTD_E_BAD_JSON && strlen(msg) + strlen(binary_hint(r)) < msglen)
            strcat(msg, binary_hint(r));
        return rc;
    }
    /* on_request keeps the body NUL-terminated. */
    return json_parse_object(r->body ? r->body : "", r->len, binary_hint(r), &r->json, msg, msglen);
}

/* ---- Writer jobs ------------------------------------------------------ */

/* Moves r's connection in or out of the parked state (see CONN_PARKED). */
static void conn_park(req *r, int parked)
{
    http_server *srv = r->srv;
    conn_track *t = r->track;
    if (!t)
        return;
    pthread_mutex_lock(&srv->conns_mu);
    if (parked && t->state != CONN_PARKED) {
        t->state = CONN_PARKED;
        srv->nconns--;
    } else if (!parked && t->state == CONN_PARKED) {
        t->state = CONN_BUSY;
        srv->nconns++; /* may pass the limit a moment: it is being answered */
    }
    pthread_mutex_unlock(&srv->conns_mu);
}

/* Wakes http_stop to look again at what is still in flight. Before
 * stopping nobody waits, so the request path takes no lock. */
static void idle_signal(http_server *srv)
{
    if (!atomic_load(&srv->stopping))
        return;
    pthread_mutex_lock(&srv->idle_mu);
    pthread_cond_broadcast(&srv->idle_cv);
    pthread_mutex_unlock(&srv->idle_mu);
}

static void job_parked(engine_req *j, void *ctx)
{
    req *r = ctx;
    (void)j;
    conn_park(r, 1);
    idle_signal(r->srv);
}

/* Whether the client of a waiting contribution has closed its connection.
 * A suspended connection is not polled by MHD, so without this a client
 * that hung up would keep its connection until its round filled. From here
 * a client that only shut down its sending side looks the same (the FIN is
 * all there is to see) and is taken as gone too; HTTP clients (curl,
 * browsers, Python's) do not half-close while they wait for a reply. */
static bool client_gone(engine_req *j, void *ctx)
{
    req *r = ctx;
    (void)j;
    if (!r->track)
        return false;
    struct pollfd p = {.fd = r->track->fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

static void job_done(engine_req *j, void *ctx)
{
    req *r = ctx;
    (void)j;
    conn_park(r, 0);
    r->handoff = HANDOFF_DONE;
    MHD_resume_connection(r->conn);
}

static enum MHD_Result submit(req *r)
{
    engine_req *j = &r->job.base;
    j->cb = job_done;
    j->data = r;
    if (j->type == ENGINE_REQ_STEP) {
        r->job.step.on_park = job_parked;
        r->job.step.client_gone = client_gone;
    }
    snprintf(j->name, sizeof j->name, "%s", r->name);
    r->handoff = HANDOFF_WAITING;
    MHD_suspend_connection(r->conn);
    if (engine_submit(r->srv->w, j) != OPTD_OK) {
        j->rc = OPTD_E_UNAVAILABLE;
        snprintf(j->msg, sizeof j->msg, "the server is shutting down; retry");
        r->handoff = HANDOFF_DONE;
        MHD_resume_connection(r->conn);
    }
    return MHD_YES;
}

/* The reply of a write whose result is the session's row. */
static enum MHD_Result send_row(req *r, int status, store_session *row, const char *etag)
{
    sbuf b = {0};
    sess_to_json(&b, row);
    store_session_clear(row);
    return send_json(r, status, &b, etag);
}

static enum MHD_Result finish_job(req *r)
{
    engine_req *base = &r->job.base;
    engine_step_req *j = &r->job.step;
    char etag[24];
    if (base->type == ENGINE_REQ_STEP && j->withdrawn)
        return MHD_NO; /* its client is gone: close the connection */
    if (base->type == ENGINE_REQ_STEP)
        engine_histogram_observe(&r->srv->m.step_latency, optd_mono_us() - r->t0);
    if (base->rc)
        return send_err(r, base->rc, base->msg, base->rc == OPTD_E_STEP_MISMATCH ? (int64_t)base->step : -1);
    step_str(base->step, etag);
    switch (base->type) {
    case ENGINE_REQ_CREATE:
        return send_row(r, 201, &r->job.create.row, "0");
    case ENGINE_REQ_FORK:
        return send_row(r, 201, &r->job.fork.row, etag);
    case ENGINE_REQ_PUT_STATE:
        return send_row(r, r->job.create.created ? 201 : 200, &r->job.create.row, etag);
    case ENGINE_REQ_PATCH:
        return send_row(r, 200, &r->job.patch.row, etag);
    case ENGINE_REQ_DELETE:
        return send_body(r, 204, NULL, strdup(""), 0, NULL);
    case ENGINE_REQ_STEP:
        break;
    }
    /* The replay of a key too old for its params to be kept answers in JSON
     * with its step and no params: an empty octet-stream body would read as
     * a vector of no elements. */
    int params_gone = j->replayed && !j->out_params && !r->minimal;
    if (r->want_binary && !params_gone) {
        char *p = j->out_params && !r->minimal ? j->out_params : strdup("");
        size_t len = j->out_params && !r->minimal ? j->out_len : 0;
        if (p == j->out_params)
            j->out_params = NULL;
        return send_vec(r, p, len / optim_elem_size(j->dtype), j->dtype, etag, j);
    }
    sbuf b = {0};
    sbuf_printf(&b, "{\"step\":%s", etag);
    if (j->has_meta && j->n_lrs) {
        sbuf_puts(&b, ",\"lr\":[");
        for (size_t g = 0; g < j->n_lrs; g++) {
            if (g)
                sbuf_put(&b, ",", 1);
            sbuf_num(&b, j->lrs[g], 0);
        }
        sbuf_puts(&b, "],\"grad_norm\":");
        sbuf_num(&b, j->grad_norm, 0);
        sbuf_printf(&b, ",\"contributors\":%u", j->contributors);
    } else if (j->has_meta) {
        sbuf_puts(&b, ",\"lr\":");
        sbuf_num(&b, j->lr, 0);
        sbuf_puts(&b, ",\"grad_norm\":");
        sbuf_num(&b, j->grad_norm, 0);
        sbuf_printf(&b, ",\"contributors\":%u", j->contributors);
    }
    if (!r->minimal && j->out_params) {
        sbuf_puts(&b, ",\"params\":");
        sbuf_vec(&b, j->out_params, j->out_len / optim_elem_size(j->dtype), j->dtype);
    }
    sbuf_puts(&b, "}");
    return send_json(r, 200, &b, etag);
}

/* ---- Handlers --------------------------------------------------------- */

static enum MHD_Result get_optimizers(req *r)
{
    sbuf b = {0};
    sbuf_puts(&b, "{\"optimizers\":[");
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_info *info = optim_at(k);
        sbuf_printf(&b, "%s{\"name\":\"%s\",\"torch\":\"%s\",\"hyperparams\":[", k ? "," : "", info->name,
                    info->torch_name);
        for (size_t i = 0; i < info->n_hps; i++) {
            const optim_hp_desc *d = &info->hps[i];
            static const char *types[] = {"number", "boolean", "array"};
            sbuf_printf(&b, "%s{\"name\":\"%s\",\"type\":\"%s\",\"default\":", i ? "," : "", d->name, types[d->type]);
            if (d->type == OPTIM_HP_BOOL) {
                sbuf_puts(&b, d->def[0] != 0 ? "true" : "false");
            } else if (d->type == OPTIM_HP_PAIR) {
                sbuf_put(&b, "[", 1);
                sbuf_num(&b, d->def[0], 0);
                sbuf_put(&b, ",", 1);
                sbuf_num(&b, d->def[1], 0);
                sbuf_put(&b, "]", 1);
            } else {
                sbuf_num(&b, d->def[0], 0);
            }
            if (d->type != OPTIM_HP_BOOL) {
                sbuf_puts(&b, ",\"min\":");
                if (isfinite(d->min))
                    sbuf_num(&b, d->min, 0);
                else
                    sbuf_puts(&b, "null");
                sbuf_puts(&b, ",\"max\":");
                if (isfinite(d->max))
                    sbuf_num(&b, d->max, 0);
                else
                    sbuf_puts(&b, "null");
                sbuf_printf(&b, ",\"min_exclusive\":%s,\"max_exclusive\":%s", d->min_open ? "true" : "false",
                            d->max_open ? "true" : "false");
            }
            sbuf_puts(&b, "}");
        }
        /* Beyond torch.optim: every optimizer takes these (http/settings.c). */
        http_training_describe(&b);
        sbuf_puts(&b, "],\"state_buffers\":[");
        for (size_t i = 0; i < info->n_buffers; i++)
            sbuf_printf(&b, "%s\"%s\"", i ? "," : "", info->buffers[i]);
        sbuf_puts(&b, "],\"state_scalars\":[");
        if (info->scalar)
            sbuf_printf(&b, "\"%s\"", info->scalar);
        sbuf_puts(&b, "]}");
    }
    sbuf_puts(&b, "],\"session_fields\":");
    http_session_fields_describe(&b);
    sbuf_puts(&b, "}");
    return send_json(r, 200, &b, NULL);
}

static enum MHD_Result list_cluster(req *r);

static enum MHD_Result list_sessions(req *r)
{
    const char *scope = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "scope");
    if (scope && strcmp(scope, "cluster") == 0)
        return list_cluster(r);
    if (scope && strcmp(scope, "local") != 0)
        return send_err(r, OPTD_E_BAD_REQUEST, "scope must be local (this daemon) or cluster (every --peers shard)",
                        -1);
    const char *limit_s = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "limit");
    const char *after = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "after");
    uint64_t limit = 100;
    if (limit_s && (parse_uint(limit_s, 1000, &limit) || limit < 1))
        return send_err(r, OPTD_E_BAD_REQUEST, "limit must be an integer from 1 to 1000", -1);
    store_session *rows = NULL;
    size_t n = 0;
    int more = 0;
    optd_err rc = store_read_list(r->srv->st, after && *after ? after : NULL, (int)limit, &rows, &n, &more);
    if (rc)
        return send_err(r, rc, NULL, -1);
    sbuf b = {0};
    sbuf_puts(&b, "{\"sessions\":[");
    for (size_t i = 0; i < n; i++) {
        if (i)
            sbuf_put(&b, ",", 1);
        sess_to_json(&b, &rows[i]);
    }
    sbuf_puts(&b, "],\"next\":");
    if (more && n)
        sbuf_json_str(&b, rows[n - 1].name);
    else
        sbuf_puts(&b, "null");
    sbuf_puts(&b, "}");
    for (size_t i = 0; i < n; i++)
        store_session_clear(&rows[i]);
    free(rows);
    return send_json(r, 200, &b, NULL);
}

static enum MHD_Result get_session(req *r)
{
    store_session row = {0};
    optd_err rc = store_read_session(r->srv->st, r->name, &row, NULL, NULL);
    if (rc)
        return send_err(r, rc, NULL, -1);
    char etag[24];
    step_str(row.step, etag);
    sbuf b = {0};
    sess_to_json(&b, &row);
    store_session_clear(&row);
    return send_json(r, 200, &b, etag);
}

/* Reads the committed session named in the path with its state, and its
 * step as the reply's ETag. */
static optd_err read_full(req *r, sess **out, char etag[24])
{
    optd_err rc = engine_sess_read(r->srv->st, &http_config_codec, r->name, out);
    if (rc == OPTD_OK)
        step_str((*out)->st.step, etag);
    return rc;
}

static enum MHD_Result get_params(req *r)
{
    sess *s = NULL;
    char etag[24], msg[256] = "";
    int binary = 0;
    optd_err rc = read_full(r, &s, etag);
    if (rc == OPTD_OK)
        rc = accept_wire(r, s->dtype, &binary, msg, sizeof msg);
    if (rc) {
        engine_sess_free(s);
        return send_err(r, rc, msg, -1);
    }
    enum MHD_Result ret;
    if (binary) {
        /* The params are the head of the blob: hand the blob over. */
        char *p = (char *)s->blob;
        s->blob = NULL;
        ret = send_vec(r, p, s->n, s->dtype, etag, NULL);
    } else {
        sbuf b = {0};
        sbuf_printf(&b, "{\"step\":%s,\"params\":", etag);
        sbuf_vec(&b, s->st.params, s->n, s->dtype);
        sbuf_puts(&b, "}");
        ret = send_json(r, 200, &b, etag);
    }
    engine_sess_free(s);
    return ret;
}

static enum MHD_Result get_history(req *r)
{
    const char *after_s = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "after");
    const char *limit_s = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "limit");
    uint64_t after = 0, limit = 1000;
    if (after_s && parse_uint(after_s, INT64_MAX, &after))
        return send_err(r, OPTD_E_BAD_REQUEST, "after must be a step number", -1);
    if (limit_s && (parse_uint(limit_s, 10000, &limit) || limit < 1))
        return send_err(r, OPTD_E_BAD_REQUEST, "limit must be an integer from 1 to 10000", -1);
    store_session row = {0};
    optd_err rc = store_read_session(r->srv->st, r->name, &row, NULL, NULL);
    if (rc)
        return send_err(r, rc, NULL, -1);
    store_history *h = NULL;
    size_t n = 0;
    int more = 0;
    rc = store_read_history(r->srv->st, row.id, after, (int)limit, r->srv->cfg.history_steps, &h, &n, &more);
    store_session_clear(&row);
    if (rc)
        return send_err(r, rc, NULL, -1);
    sbuf b = {0};
    sbuf_puts(&b, "{\"history\":[");
    for (size_t i = 0; i < n; i++) {
        char t[32];
        rfc3339(h[i].time_ms, 1, t);
        sbuf_printf(&b, "%s{\"step\":%llu,\"time\":\"%s\",\"lr\":", i ? "," : "", (unsigned long long)h[i].step, t);
        sbuf_num(&b, h[i].lr, 0);
        sbuf_puts(&b, ",\"grad_norm\":");
        sbuf_num(&b, h[i].grad_norm, 0);
        sbuf_puts(&b, ",\"update_norm\":");
        sbuf_num(&b, h[i].update_norm, 0);
        sbuf_puts(&b, ",\"param_norm\":");
        sbuf_num(&b, h[i].param_norm, 0);
        sbuf_printf(&b, ",\"contributors\":%llu,\"loss\":", (unsigned long long)h[i].contributors);
        if (h[i].has_loss && isfinite(h[i].loss))
            sbuf_num(&b, h[i].loss, 0);
        else
            sbuf_puts(&b, "null");
        sbuf_puts(&b, "}");
    }
    sbuf_puts(&b, "],\"next\":");
    if (more && n)
        sbuf_printf(&b, "%llu", (unsigned long long)h[n - 1].step);
    else
        sbuf_puts(&b, "null");
    sbuf_puts(&b, "}");
    free(h);
    return send_json(r, 200, &b, NULL);
}

/* A checkpoint sent as it is written: the session's blob is the only copy
 * of its state in memory, whatever its size (API.md Binary checkpoints). */
typedef struct ckpt_stream {
    sess *s;    /* owned */
    int binary; /* safetensors, else JSON */
    sbuf pend;  /* bytes written and not yet sent, from off */
    size_t off;
    int vec;     /* JSON: -1 params, then buffer indices; n_buffers: done */
    size_t elem; /* the next element of that vector */
    int done;    /* everything is in pend */
} ckpt_stream;

#define CKPT_PIECE 8192 /* elements formatted at a time */

/* Writes the next piece of the JSON checkpoint into cs->pend, in exactly
 * the form sess_state_to_json writes at once. */
static void ckpt_more_json(ckpt_stream *cs)
{
    const sess *s = cs->s;
    const optim_info *info = s->info;
    if (cs->vec < -1) {
        sess_head_to_json(&cs->pend, s);
        cs->pend.len--; /* reopen the object */
        sbuf_puts(&cs->pend, ",\"params\":[");
        cs->vec = -1;
        cs->elem = 0;
        return;
    }
    const void *x = cs->vec < 0 ? s->st.params : s->st.buf[cs->vec];
    if (cs->elem < s->n) {
        size_t k = s->n - cs->elem < CKPT_PIECE ? s->n - cs->elem : CKPT_PIECE;
        if (cs->elem)
            sbuf_put(&cs->pend, ",", 1);
        sbuf_vec_items(&cs->pend, (const char *)x + cs->elem * optim_elem_size(s->dtype), 0, k, s->dtype);
        cs->elem += k;
        return;
    }
    sbuf_put(&cs->pend, "]", 1);
    int first = cs->vec < 0;
    int next = cs->vec + 1;
    while (next < (int)info->n_buffers && !s->st.buf[next])
        next++;
    if (first)
        sbuf_puts(&cs->pend, ",\"state\":{");
    if (next < (int)info->n_buffers) {
        sbuf_printf(&cs->pend, "%s\"%s\":[", first ? "" : ",", info->buffers[next]);
        cs->vec = next;
        cs->elem = 0;
        return;
    }
    if (info->scalar && !s->shape) { /* a shaped session's are per tensor */
        int any = 0;
        for (size_t i = 0; i < info->n_buffers; i++)
            any |= s->st.buf[i] != NULL;
        sbuf_printf(&cs->pend, "%s\"%s\":", any ? "," : "", info->scalar);
        sbuf_num(&cs->pend, s->st.scalar, 0);
    }
    sbuf_puts(&cs->pend, "}");
    tensor_state_to_json(&cs->pend, s);
    sbuf_puts(&cs->pend, "}\n");
    cs->done = 1;
}

static ssize_t ckpt_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    ckpt_stream *cs = cls;
    (void)pos;
    if (cs->binary) {
        /* pend holds the header; then the blob itself. */
        size_t hl = cs->pend.len, total = hl + st_data_len(cs->s);
        if (cs->off >= total)
            return MHD_CONTENT_READER_END_OF_STREAM;
        size_t k = 0;
        if (cs->off < hl) {
            k = hl - cs->off < max ? hl - cs->off : max;
            memcpy(buf, cs->pend.p + cs->off, k);
        } else {
            size_t at = cs->off - hl;
            k = total - cs->off < max ? total - cs->off : max;
            memcpy(buf, cs->s->blob + at, k);
        }
        cs->off += k;
        return (ssize_t)k;
    }
    while (cs->pend.len - cs->off < max && !cs->done && !cs->pend.oom) {
        if (cs->off > 0) { /* drop what was sent */
            memmove(cs->pend.p, cs->pend.p + cs->off, cs->pend.len - cs->off);
            cs->pend.len -= cs->off;
            cs->off = 0;
        }
        ckpt_more_json(cs);
    }
    if (cs->pend.oom)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    size_t k = cs->pend.len - cs->off < max ? cs->pend.len - cs->off : max;
    if (k == 0)
        return MHD_CONTENT_READER_END_OF_STREAM;
    memcpy(buf, cs->pend.p + cs->off, k);
    cs->off += k;
    return (ssize_t)k;
}

static void ckpt_free(void *cls)
{
    ckpt_stream *cs = cls;
    engine_sess_free(cs->s);
    sbuf_free(&cs->pend);
    free(cs);
}

static enum MHD_Result get_state(req *r)
{
    sess *s = NULL;
    char etag[24];
    optd_err rc = read_full(r, &s, etag);
    if (rc)
        return send_err(r, rc, NULL, -1);
    ckpt_stream *cs = calloc(1, sizeof *cs);
    if (!cs) {
        engine_sess_free(s);
        return send_err(r, OPTD_E_NOMEM, NULL, -1);
    }
    cs->s = s;
    cs->vec = -2;
    cs->binary = accepts_binary(r);
    if (cs->binary && st_header(s, &cs->pend) != OPTD_OK) {
        ckpt_free(cs);
        return send_err(r, OPTD_E_NOMEM, NULL, -1);
    }
    uint64_t size = cs->binary ? cs->pend.len + st_data_len(s) : MHD_SIZE_UNKNOWN;
    struct MHD_Response *resp = MHD_create_response_from_callback(size, 64 * 1024, ckpt_read, cs, ckpt_free);
    if (!resp) {
        ckpt_free(cs);
        return MHD_NO;
    }
    if (cs->binary) {
        char cd[200];
        snprintf(cd, sizeof cd, "attachment; filename=\"%s.safetensors\"", r->name);
        MHD_add_response_header(resp, "Content-Disposition", cd);
    }
    return queue(r, 200, resp, cs->binary ? "application/octet-stream" : "application/json", etag);
}

/* The fields of a create body (API.md Sessions, Training features), less
 * the session fields of training.c, which every such list adds. */
static const char *const create_fields[] = {"name", "optimizer", "dtype", "hyperparams", "params",
                                            "size", "fill",      "from",  "groups"};
/* The fields a PATCH may carry, besides the session fields. */
static const char *const patch_fields[] = {"hyperparams", "groups"};

/* Checks the top-level members of o against own[0..n) plus the session
 * fields (workers, min_workers, round_timeout). */
static optd_err check_fields(const cJSON *o, const char *where, const char *const *own, size_t n, int hint, char *msg,
                             size_t msglen)
{
    const char *names[16];
    size_t k = 0;
    for (size_t i = 0; i < n && k < 12; i++)
        names[k++] = own[i];
    for (size_t i = 0; i < ENGINE_TRAINING_N_FIELDS; i++)
        names[k++] = engine_training_fields[i];
    return body_fields_known(o, where, names, k, hint, msg, msglen);
}

/* Builds a new session from a create body (POST /v1/sessions or PUT
 * /v1/sessions/{name}). */
/* The session's name: the path's (PUT /v1/sessions/{name}, where the
 * body's must agree) or the body's (POST /v1/sessions), into r->name. */
static optd_err create_name(req *r, const cJSON *name, char *msg, size_t msglen)
{
    if (name && !cJSON_IsString(name))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "name must be a string");
    if (r->route == HTTP_R_SESSION) {
        if (name && strcmp(name->valuestring, r->name) != 0)
            return optd_fail(msg, msglen, OPTD_E_INVALID, "the body's name differs from the path's");
        return OPTD_OK;
    }
    if (!name)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "name is required");
    if (!name_valid(name->valuestring))
        return optd_fail(msg, msglen, OPTD_E_INVALID, "a session name matches [A-Za-z0-9][A-Za-z0-9._-]{0,127}");
    snprintf(r->name, sizeof r->name, "%s", name->valuestring);
    return OPTD_OK;
}

/* A session whose params the body gives (decoded as the body arrived, in
 * the body's dtype): the vector is adopted, not copied. *sh: the shape the
 * params must fill (taken on success), or NULL. */
static optd_err session_from_params(req *r, const cJSON *params, const cJSON *fill, const optim_info *info,
                                    optim_dtype dtype, const optim_hparams *hp, const training *tr,
                                    engine_shape **sh, sess **out, char *msg, size_t msglen)
{
    if (!cJSON_IsArray(params))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "params must be an array of numbers");
    jvec *v = jbody_vec(r->jb, "params", 0);
    size_t n = v ? v->n : 0;
    if (n == 0 || n > ENGINE_MAX_ELEMENTS)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "params must have 1 to %zu elements", ENGINE_MAX_ELEMENTS);
    if (fill)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "fill goes with size, not params");
    if (v->dtype != dtype)
        return OPTD_E_INTERNAL;
    if (*sh && n != (*sh)->n)
        return optd_fail(msg, msglen, OPTD_E_SIZE_MISMATCH,
                         "params has %zu elements but the groups' tensors have %zu in all (the flat vector is the "
                         "tensors in order)",
                         n, (*sh)->n);
    optd_err rc = sess_make(r->name, info, hp, tr, dtype, n, &v->data, 0, sh, r->srv->cfg.max_session_bytes, out, msg,
                            msglen);
    jvec_release(v);
    return rc;
}

/* A session of size elements, all fill (0 by default); with a shape *sh
 * (taken on success) the size is the shape's, and may be left out. */
static optd_err session_from_size(req *r, const cJSON *size, const cJSON *fill, const optim_info *info,
                                  optim_dtype dtype, const optim_hparams *hp, const training *tr, engine_shape **sh,
                                  sess **out, char *msg, size_t msglen)
{
    if (!size && !*sh)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "give params or size");
    if (size && !cJSON_IsNumber(size))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "size must be an integer");
    double n = size ? size->valuedouble : (double)(*sh)->n, f = 0;
    if (n < 1 || n > (double)ENGINE_MAX_ELEMENTS || n != (double)(size_t)n)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "size must be an integer from 1 to %zu", ENGINE_MAX_ELEMENTS);
    if (*sh && n != (double)(*sh)->n)
        return optd_fail(msg, msglen, OPTD_E_SIZE_MISMATCH,
                         "size is %.0f but the groups' tensors have %zu elements in all (size may be left out)", n,
                         (*sh)->n);
    if (fill) {
        if (!cJSON_IsNumber(fill))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "fill must be a number");
        f = fill->valuedouble;
        if (!isfinite(dtype == OPTIM_F32 ? (float)f : f))
            return optd_fail(msg, msglen, OPTD_E_NON_FINITE, "fill is not a finite %s", engine_dtype_name(dtype));
    }
    return sess_make(r->name, info, hp, tr, dtype, (size_t)n, NULL, f, sh, r->srv->cfg.max_session_bytes, out, msg,
                     msglen);
}

/* A create body: a new session into *out, or (with "from") a fork, whose
 * source is named in r->from and *out left NULL. */
static optd_err session_from_body(req *r, sess **out, char *msg, size_t msglen)
{
    const cJSON *o = r->json;
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(o, "params");
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(o, "size");
    const cJSON *fill = cJSON_GetObjectItemCaseSensitive(o, "fill");
    const cJSON *from = cJSON_GetObjectItemCaseSensitive(o, "from");
    const optim_info *info;
    optim_dtype dtype;
    optim_hparams hp;
    training tr;
    optd_err rc;

    rc = check_fields(o, "a create body", create_fields, sizeof create_fields / sizeof *create_fields, HINT_INSIDE, msg,
                      msglen);
    if (!rc)
        rc = create_name(r, cJSON_GetObjectItemCaseSensitive(o, "name"), msg, msglen);
    if (rc)
        return rc;
    if (from) {
        /* A fork: the writer copies the source as it is when the job runs. */
        if (!cJSON_IsString(from))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "from must be a session name");
        if (params || size || fill || cJSON_GetObjectItemCaseSensitive(o, "optimizer") ||
            cJSON_GetObjectItemCaseSensitive(o, "dtype") || cJSON_GetObjectItemCaseSensitive(o, "groups"))
            return optd_fail(msg, msglen, OPTD_E_INVALID,
                             "a fork takes only name, from, hyperparams and session fields (it keeps the source's "
                             "tensors and groups)");
        if (!name_valid(from->valuestring))
            return optd_fail(msg, msglen, OPTD_E_NOT_FOUND, "no session named '%.64s' to fork from", from->valuestring);
        snprintf(r->from, sizeof r->from, "%s", from->valuestring);
        *out = NULL;
        return OPTD_OK;
    }
    rc = sess_config_from_json(o, &info, &dtype, &hp, &tr, msg, msglen);
    if (rc)
        return rc;
    if (params && size)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "give either params or size, not both");
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(o, "groups");
    engine_shape *sh = NULL;
    if (groups && (rc = groups_from_json(groups, info, &hp, &sh, msg, msglen)) != OPTD_OK)
        return rc;
    if (params)
        rc = session_from_params(r, params, fill, info, dtype, &hp, &tr, &sh, out, msg, msglen);
    else
        rc = session_from_size(r, size, fill, info, dtype, &hp, &tr, &sh, out, msg, msglen);
    engine_shape_free(sh); /* NULL once the session took it */
    return rc;
}

/* Reads If-Match into r->job.base.if_match for a conditional PATCH, DELETE or
 * PUT .../state ("*" asks for nothing more than an existing session, which
 * those find anyway). */
static optd_err conditional(req *r, char *msg, size_t msglen)
{
    if (parse_if_match(header(r, MHD_HTTP_HEADER_IF_MATCH), &r->job.base.if_match) == 0)
        return OPTD_OK;
    snprintf(msg, msglen, "If-Match must be a step in quotes, e.g. \"12\" (the ETag of GET /v1/sessions/%s)", r->name);
    return OPTD_E_BAD_REQUEST;
}

static enum MHD_Result create_session(req *r, engine_req_type kind)
{
    char msg[256] = "";
    optd_err rc = kind == ENGINE_REQ_PUT_STATE ? conditional(r, msg, sizeof msg) : OPTD_OK;
    if (rc == OPTD_OK && r->st) {
        rc = st_reader_finish(r->st, &r->job.create.newsess, msg, sizeof msg);
        if (rc)
            return send_err(r, rc, msg, -1);
        r->job.base.type = ENGINE_REQ_PUT_STATE;
        return submit(r);
    }
    if (rc == OPTD_OK)
        rc = parse_json(r, msg, sizeof msg);
    if (rc == OPTD_OK && kind == ENGINE_REQ_PUT_STATE) {
        /* The path names the session: a checkpoint restores under any name
         * (its own "name" member is only a record of where it came from). */
        rc = sess_from_checkpoint(r->name, r->json, r->jb, r->srv->cfg.max_session_bytes, &r->job.create.newsess, msg,
                                  sizeof msg);
    } else if (rc == OPTD_OK) {
        rc = session_from_body(r, &r->job.create.newsess, msg, sizeof msg);
    }
    if (rc == OPTD_OK && kind == ENGINE_REQ_CREATE && r->from[0]) {
        /* A fork: the engine applies the settings onto the source's. */
        kind = ENGINE_REQ_FORK;
        snprintf(r->job.fork.from, sizeof r->job.fork.from, "%s", r->from);
        rc = http_settings_from_json(cJSON_GetObjectItemCaseSensitive(r->json, "hyperparams"), r->json,
                                     &r->job.fork.settings);
    }
    r->job.base.type = kind;
    if (rc)
        return send_err(r, rc, msg, -1);
    return submit(r);
}

static enum MHD_Result patch_session(req *r)
{
    char msg[256] = "";
    optd_err rc = conditional(r, msg, sizeof msg);
    if (rc == OPTD_OK)
        rc = parse_json(r, msg, sizeof msg);
    if (rc)
        return send_err(r, rc, msg, -1);
    rc = check_fields(r->json, "a PATCH body", patch_fields, 2, HINT_INSIDE, msg, sizeof msg);
    if (rc) {
        /* A field of the session that cannot change gets its own sentence. */
        for (size_t k = 0; k < sizeof create_fields / sizeof *create_fields; k++)
            if (cJSON_GetObjectItemCaseSensitive(r->json, create_fields[k]) && strcmp(create_fields[k], "hyperparams") &&
                strcmp(create_fields[k], "groups"))
                snprintf(msg, sizeof msg,
                         "\"%s\" cannot be changed by PATCH (hyperparams, workers, min_workers "
                         "and round_timeout can)",
                         create_fields[k]);
        return send_err(r, rc, msg, -1);
    }
    const cJSON *hp = cJSON_GetObjectItemCaseSensitive(r->json, "hyperparams");
    if (hp && !cJSON_IsObject(hp))
        return send_err(r, OPTD_E_BAD_REQUEST, "hyperparams must be an object", -1);
    r->job.base.type = ENGINE_REQ_PATCH;
    rc = http_settings_from_json(hp, r->json, &r->job.patch.settings);
    if (rc)
        return send_err(r, rc, NULL, -1);
    rc = patch_groups_from_json(cJSON_GetObjectItemCaseSensitive(r->json, "groups"), &r->job.patch.groups,
                                &r->job.patch.n_groups, msg, sizeof msg);
    if (rc)
        return send_err(r, rc, msg, -1);
    return submit(r);
}

/* A step's Optd-Lr (h may be NULL): one number, or one per group separated
 * by commas, finite (*lr malloc'd, the caller frees). Their range is the
 * engine's to check, as a PATCH of lr's. OPTD_E_BAD_REQUEST for a
 * malformed list. */
static optd_err lr_from_header(const char *h, double **lr, size_t *n, char *msg, size_t msglen)
{
    *lr = NULL;
    *n = 0;
    if (!h)
        return OPTD_OK;
    size_t count = 1;
    for (const char *p = h; *p; p++)
        count += *p == ',';
    if (count > ENGINE_MAX_GROUPS)
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "Optd-Lr has %zu numbers, more than any session has groups",
                         count);
    char *copy = strdup(h);
    double *v = malloc(count * sizeof *v);
    optd_err rc = copy && v ? OPTD_OK : OPTD_E_NOMEM;
    size_t k = 0;
    for (char *cur = copy, *p; !rc && (p = http_list_next(&cur)) != NULL;) {
        if (http_parse_number(p, &v[k++]))
            rc = optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                           "Optd-Lr is the step's lr: one finite number (\"0.001\"), or for a session with groups "
                           "one per group separated by commas (\"0.001,0.0005\"); \"%.32s\" is not a number",
                           p);
    }
    free(copy);
    if (rc) {
        free(v);
        return rc;
    }
    *lr = v;
    *n = k;
    return OPTD_OK;
}

/* The step's headers: If-Match, Idempotency-Key, Prefer and Accept. */
static optd_err step_headers(req *r, engine_step_req *j, char *msg, size_t msglen)
{
    if (parse_if_match(header(r, MHD_HTTP_HEADER_IF_MATCH), &j->if_match))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "If-Match must be a step in quotes, e.g. \"12\"");
    const char *key = header(r, "Idempotency-Key");
    if (key) {
        size_t n = strlen(key);
        if (n == 0 || n > 255)
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "Idempotency-Key must be 1 to 255 characters");
        memcpy(r->idem, key, n + 1);
        j->idem_key = r->idem;
    }
    const char *prefer = header(r, "Prefer");
    r->minimal = prefer && strstr(prefer, "return=minimal") != NULL;
    optd_err rc = skip_from_header(header(r, "Optd-Skip"), &r->skip_buf, &r->skip_names, &j->n_skip, msg, msglen);
    if (rc)
        return rc;
    j->skip = r->skip_names;
    if ((rc = lr_from_header(header(r, "Optd-Lr"), &r->lr_set, &j->n_lr, msg, msglen)) != OPTD_OK)
        return rc;
    j->lr_set = r->lr_set;
    return accept_wire(r, j->dtype, &r->want_binary, msg, msglen);
}

/* An application/octet-stream step: the body is the gradient, loss and
 * weight come in the Optd-Loss and Optd-Weight headers. */
static optd_err step_binary(req *r, engine_step_req *j, char *msg, size_t msglen)
{
    wire_type w;
    optd_err rc = wire_for(r->wire_in, j->dtype, "Content-Type", &w, msg, msglen);
    if (rc)
        return rc;
    size_t es = wire_size(w), bytes = j->size * es;
    int narrow = w != (j->dtype == OPTIM_F64 ? WIRE_F64 : WIRE_F32);
    if (r->len != bytes)
        return optd_fail(msg, msglen, OPTD_E_SIZE_MISMATCH,
                         "the body has %zu bytes; the session needs %zu (%zu x %zu of %s)", r->len, bytes, j->size, es,
                         wire_name(w));
    size_t bad;
    if (narrow) {
        /* Widened into the session's dtype (exact), checked in the same pass. */
        r->grad = malloc(j->size * optim_elem_size(j->dtype) + 1);
        if (!r->grad)
            return OPTD_E_NOMEM;
        if (!wire_decode(w, r->body, j->size, j->dtype, r->grad, &bad))
            return optd_fail(msg, msglen, OPTD_E_NON_FINITE,
                             "element %zu of the gradient is not a finite %s (an infinity or NaN: a value out of "
                             "%s's range converts to one; send float32 for such)",
                             bad, wire_name(w), wire_name(w));
        j->grad = r->grad;
    } else {
        if (!vec_finite(r->body, j->size, j->dtype, &bad))
            return optd_fail(msg, msglen, OPTD_E_NON_FINITE, "element %zu of the gradient is not finite", bad);
        j->grad = r->body; /* malloc'd, so aligned for any element type */
    }
    const char *loss = header(r, "Optd-Loss"), *weight = header(r, "Optd-Weight");
    if (loss && http_parse_number(loss, &j->loss))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "Optd-Loss must be a finite number");
    j->has_loss = loss != NULL;
    if (weight && (http_parse_number(weight, &j->weight) || !(j->weight > 0)))
        return optd_fail(msg, msglen, OPTD_E_INVALID, "Optd-Weight must be a finite number > 0");
    return OPTD_OK;
}

/* A JSON step {"grad": [...], "loss": x, "weight": w}: the fast path for
 * that shape, else the streaming decoder (which also words the error). */
static optd_err step_json(req *r, engine_step_req *j, char *msg, size_t msglen)
{
    size_t bytes = j->size * optim_elem_size(j->dtype);
    step_fields f;
    r->grad = malloc(bytes ? bytes : 1);
    if (!r->grad)
        return OPTD_E_NOMEM;
    j->grad = r->grad;
    if (step_body_fast(r->body ? r->body : "", r->len, j->dtype, j->size, r->grad, &f)) {
        j->has_loss = f.has_loss;
        j->loss = f.loss;
        j->weight = f.weight;
        return OPTD_OK;
    }
    /* Any other shape: the same streaming decoder as a create, fed the
     * whole body, reads grad into r->grad; only the rest becomes a tree. */
    jbody *jb = malloc(sizeof *jb);
    if (!jb)
        return OPTD_E_NOMEM;
    jbody_init(jb, JB_GRAD, r->len + 1, SIZE_MAX);
    jbody_set_dtype(jb, j->dtype, r->grad, j->size);
    jbody_feed(jb, r->body ? r->body : "", r->len);
    r->jb = jb; /* freed with r */
    optd_err rc = parse_json(r, msg, msglen);
    if (rc)
        return rc;
    static const char *const step_names[] = {"grad", "loss", "weight", "skip"};
    rc = body_fields_known(r->json, "a step body", step_names, 4, HINT_PATCH, msg, msglen);
    if (rc)
        return rc;
    const cJSON *skip = cJSON_GetObjectItemCaseSensitive(r->json, "skip");
    if (skip && r->skip_names)
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                         "the step names its skipped tensors twice (\"skip\" and Optd-Skip): give one");
    if (skip && (rc = skip_from_json(skip, &r->skip_names, &j->n_skip, msg, msglen)) != OPTD_OK)
        return rc;
    j->skip = r->skip_names;
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(r->json, "grad");
    if (!g)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "grad is required: {\"grad\": [...]} with one number per element");
    if (!cJSON_IsArray(g))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "grad must be an array of numbers");
    jvec *v = jbody_vec(jb, "grad", 0);
    size_t n = v ? v->n : 0;
    if (n != j->size)
        return optd_fail(msg, msglen, OPTD_E_SIZE_MISMATCH, "grad has %zu elements; the session has %zu", n, j->size);
    const cJSON *loss = cJSON_GetObjectItemCaseSensitive(r->json, "loss");
    const cJSON *weight = cJSON_GetObjectItemCaseSensitive(r->json, "weight");
    if (loss && !cJSON_IsNull(loss)) {
        if (!cJSON_IsNumber(loss) || !isfinite(loss->valuedouble))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "loss must be a finite number");
        j->has_loss = true;
        j->loss = loss->valuedouble;
    }
    if (weight) {
        if (!cJSON_IsNumber(weight))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "weight must be a number");
        if (!(weight->valuedouble > 0) || !isfinite(weight->valuedouble))
            return optd_fail(msg, msglen, OPTD_E_INVALID, "weight must be a finite number > 0");
        j->weight = weight->valuedouble;
    }
    return OPTD_OK;
}

static enum MHD_Result post_step(req *r)
{
    char msg[256] = "";
    store_session row = {0};
    engine_step_req *j = &r->job.step;
    j->type = ENGINE_REQ_STEP;
    optd_err rc = engine_session_shape(r->srv->w, r->name, &j->dtype, &j->size);
    if (rc == OPTD_E_NOT_FOUND) { /* not in the engine's memory: the store knows */
        rc = store_read_session(r->srv->st, r->name, &row, NULL, NULL);
        if (rc)
            return send_err(r, rc, NULL, -1);
        j->dtype = (optim_dtype)row.dtype;
        j->size = (size_t)row.size;
        store_session_clear(&row);
    }
    j->weight = 1;
    rc = step_headers(r, j, msg, sizeof msg);
    if (!rc)
        rc = r->binary ? step_binary(r, j, msg, sizeof msg) : step_json(r, j, msg, sizeof msg);
    if (rc)
        return send_err(r, rc, msg, -1);
    /* A retry must be the same request: same gradient and same weight. Only
     * a keyed step is ever compared (a pass over a 1e6 gradient costs 1 ms). */
    if (j->idem_key) {
        j->digest = optd_digest64(j->grad, j->size * optim_elem_size(j->dtype)) ^
                    (optd_digest64(&j->weight, sizeof j->weight) * 31);
        for (size_t k = 0; k < j->n_skip; k++) /* the same gradient with other tensors skipped is another */
            j->digest ^= optd_digest64(j->skip[k], strlen(j->skip[k])) * (37 + 2 * k);
        if (j->n_lr) /* so is the same gradient with another lr */
            j->digest ^= optd_digest64(j->lr_set, j->n_lr * sizeof *j->lr_set) * 41;
    }
    j->want_params = !r->minimal;
    return submit(r);
}

/* ---- Operations off the request threads (ops.c) ----------------------- */

static void op_done(op *o, void *ctx)
{
    req *r = ctx;
    (void)o;
    r->handoff = HANDOFF_DONE;
    MHD_resume_connection(r->conn);
}

static enum MHD_Result submit_op(req *r)
{
    r->is_op = 1;
    r->op.on_done = op_done;
    r->op.done_ctx = r;
    r->handoff = HANDOFF_WAITING;
    MHD_suspend_connection(r->conn);
    optd_err rc = ops_submit(r->srv->ops, &r->op);
    if (rc != OPTD_OK) {
        r->op.rc = rc;
        snprintf(r->op.msg, sizeof r->op.msg, "the server is shutting down or out of threads; retry");
        r->handoff = HANDOFF_DONE;
        MHD_resume_connection(r->conn);
    }
    return MHD_YES;
}

static enum MHD_Result finish_op(req *r)
{
    if (r->op.rc)
        return send_err(r, r->op.rc, r->op.msg, -1);
    return send_json(r, r->op.status, &r->op.out, NULL);
}

/* GET /v1/sessions?scope=cluster: this daemon's page merged with its peers'. */
static enum MHD_Result list_cluster(req *r)
{
    const char *limit_s = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "limit");
    const char *after = MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, "after");
    uint64_t limit = 100;
    if (limit_s && (parse_uint(limit_s, 1000, &limit) || limit < 1))
        return send_err(r, OPTD_E_BAD_REQUEST, "limit must be an integer from 1 to 1000", -1);
    if (after && strlen(after) >= sizeof r->op.after)
        return send_err(r, OPTD_E_BAD_REQUEST, "after is longer than any session name", -1);
    r->op.kind = OP_LIST_CLUSTER;
    r->op.limit = (unsigned)limit;
    snprintf(r->op.after, sizeof r->op.after, "%s", after ? after : "");
    return submit_op(r);
}

/* POST /v1/backups takes no fields: an empty body or {}. */
static enum MHD_Result post_backup(req *r)
{
    char msg[256] = "";
    if (r->len) {
        optd_err rc = parse_json(r, msg, sizeof msg);
        if (rc)
            return send_err(r, rc, msg, -1);
        if (r->json->child) {
            snprintf(msg, sizeof msg, "unknown field '%.64s': POST /v1/backups takes no fields",
                     r->json->child->string);
            return send_err(r, OPTD_E_INVALID, msg, -1);
        }
    }
    r->op.kind = OP_BACKUP;
    return submit_op(r);
}

static enum MHD_Result get_backups(req *r)
{
    char msg[512] = "";
    sbuf b = {0};
    optd_err rc = ops_list_backups(r->srv->ops, &b, msg, sizeof msg);
    if (rc) {
        sbuf_free(&b);
        return send_err(r, rc, msg, -1);
    }
    return send_json(r, 200, &b, NULL);
}

/* ---- The route table: one handler per route ---------------------------- */

static int is_get(const char *method) { return strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0; }

static enum MHD_Result h_none(req *r, const char *method)
{
    (void)method;
    return send_err(r, OPTD_E_NOT_FOUND, "no such path", -1);
}

/* {"status": status}, 200: what the probes answer. */
static enum MHD_Result send_status(req *r, const char *status)
{
    sbuf b = {0};
    sbuf_printf(&b, "{\"status\":\"%s\"}", status);
    return send_json(r, 200, &b, NULL);
}

static enum MHD_Result h_healthz(req *r, const char *method)
{
    (void)method;
    return send_status(r, "ok");
}

static enum MHD_Result h_readyz(req *r, const char *method)
{
    (void)method;
    http_server *srv = r->srv;
    /* The writer's own outcome answers without touching the database;
     * only after a failure does a probe (which takes the write lock)
     * tell whether the fault has cleared. */
    if (atomic_load(&srv->stopping) || (!engine_healthy(srv->w) && !store_writable(srv->st)))
        return send_err(r, OPTD_E_UNAVAILABLE, "the database is not writable", -1);
    return send_status(r, "ready");
}

static enum MHD_Result h_metrics(req *r, const char *method)
{
    (void)method;
    http_server *srv = r->srv;
    uint64_t n = 0;
    sbuf b = {0};
    store_stats ss;
    store_read_count(srv->st, &n);
    store_stats_get(srv->st, &ss);
    metrics_render(&b, &srv->m, n, &ss);
    metrics_render_rounds(&b, engine_parked(srv->w), engine_withdrawn(srv->w));
    if (b.oom)
        return send_err(r, OPTD_E_NOMEM, NULL, -1);
    char *p = b.p;
    return send_body(r, 200, "text/plain; version=0.0.4; charset=utf-8", p, b.len, NULL);
}

static enum MHD_Result h_optimizers(req *r, const char *method)
{
    (void)method;
    return get_optimizers(r);
}

static enum MHD_Result h_root(req *r, const char *method)
{
    (void)method;
    return send_static(r, "text/html; charset=utf-8", asset_dashboard, asset_dashboard_len);
}

static enum MHD_Result h_openapi(req *r, const char *method)
{
    (void)method;
    return send_static(r, "application/json", asset_openapi, asset_openapi_len);
}

static enum MHD_Result h_sessions(req *r, const char *method)
{
    return is_get(method) ? list_sessions(r) : create_session(r, ENGINE_REQ_CREATE);
}

static enum MHD_Result h_backups(req *r, const char *method)
{
    return is_get(method) ? get_backups(r) : post_backup(r);
}

static enum MHD_Result h_session(req *r, const char *method)
{
    if (is_get(method))
        return get_session(r);
    if (strcmp(method, "PUT") == 0)
        return create_session(r, ENGINE_REQ_CREATE);
    if (strcmp(method, "PATCH") == 0)
        return patch_session(r);
    r->job.base.type = ENGINE_REQ_DELETE;
    char msg[256];
    if (conditional(r, msg, sizeof msg))
        return send_err(r, OPTD_E_BAD_REQUEST, msg, -1);
    return submit(r);
}

static enum MHD_Result h_step(req *r, const char *method)
{
    (void)method;
    return post_step(r);
}

static enum MHD_Result h_params(req *r, const char *method)
{
    (void)method;
    return get_params(r);
}

static enum MHD_Result h_history(req *r, const char *method)
{
    (void)method;
    return get_history(r);
}

static enum MHD_Result h_state(req *r, const char *method)
{
    return is_get(method) ? get_state(r) : create_session(r, ENGINE_REQ_PUT_STATE);
}

/* Routes from HTTP_R_SESSION on name a session (route_parse tries them in
 * this order; a fixed path never contains "{name}"). */
const http_route_def http_routes[HTTP_R_COUNT] = {
    [HTTP_R_NONE] = {"unknown", NULL, h_none},
    [HTTP_R_ROOT] = {"/", "GET, HEAD", h_root},
    [HTTP_R_HEALTHZ] = {"/healthz", "GET, HEAD", h_healthz},
    [HTTP_R_READYZ] = {"/readyz", "GET, HEAD", h_readyz},
    [HTTP_R_METRICS] = {"/metrics", "GET, HEAD", h_metrics},
    [HTTP_R_OPTIMIZERS] = {"/v1/optimizers", "GET, HEAD", h_optimizers},
    [HTTP_R_OPENAPI] = {"/v1/openapi.json", "GET, HEAD", h_openapi},
    [HTTP_R_SESSIONS] = {"/v1/sessions", "GET, HEAD, POST", h_sessions},
    [HTTP_R_BACKUPS] = {"/v1/backups", "GET, HEAD, POST", h_backups},
    [HTTP_R_SESSION] = {"/v1/sessions/{name}", "GET, HEAD, PUT, PATCH, DELETE", h_session},
    [HTTP_R_STEP] = {"/v1/sessions/{name}/step", "POST", h_step},
    [HTTP_R_PARAMS] = {"/v1/sessions/{name}/params", "GET, HEAD", h_params},
    [HTTP_R_STATE] = {"/v1/sessions/{name}/state", "GET, HEAD, PUT", h_state},
    [HTTP_R_HISTORY] = {"/v1/sessions/{name}/history", "GET, HEAD", h_history},
};

static enum MHD_Result dispatch(req *r, const char *method)
{
    return http_routes[r->route < HTTP_R_COUNT ? r->route : HTTP_R_NONE].handler(r, method);
}

/* Counts the Content-Length headers that differ from the first, and the
 * Transfer-Encoding headers and those of them that are not just "chunked". */
typedef struct lengths {
    const char *first;
    int conflicts;
    int codings, unchunked;
} lengths;

static enum MHD_Result other_length(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    lengths *l = cls;
    (void)kind;
    if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0 && l->first && strcmp(value, l->first) != 0)
        l->conflicts++;
    if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
        size_t n;
        l->codings++;
        while (*value == ' ' || *value == '\t')
            value++;
        n = strlen(value);
        while (n && (value[n - 1] == ' ' || value[n - 1] == '\t'))
            n--;
        if (n != 7 || strncasecmp(value, "chunked", 7) != 0)
            l->unchunked++;
    }
    return MHD_YES;
}

/* Request framing (RFC 9112 section 6): a body is delimited by one
 * Content-Length or by "Transfer-Encoding: chunked" alone. Anything else
 * could make a proxy in front and optd read different requests out of one
 * stream (request smuggling), or leave optd waiting for a body whose end it
 * cannot find; such a request is refused and, since where the next request
 * starts is unknown, its connection closed (r->close). Returns OPTD_OK or
 * OPTD_E_BAD_REQUEST with the reason in msg. */
static optd_err framing_checks(req *r, const char *version, char *msg, size_t msglen)
{
    lengths l = {header(r, MHD_HTTP_HEADER_CONTENT_LENGTH), 0, 0, 0};
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, other_length, &l);
    if (l.conflicts)
        snprintf(msg, msglen, "the request has conflicting Content-Length headers");
    else if (l.codings && l.first)
        snprintf(msg, msglen, "the request has both Transfer-Encoding and Content-Length; send one");
    else if (l.codings && strcmp(version, MHD_HTTP_VERSION_1_0) == 0)
        snprintf(msg, msglen, "HTTP/1.0 has no Transfer-Encoding; send Content-Length");
    else if (l.codings > 1 || l.unchunked)
        snprintf(msg, msglen,
                 "the only Transfer-Encoding accepted is chunked, once; send Content-Length or "
                 "Transfer-Encoding: chunked");
    else
        return OPTD_OK;
    r->close = 1;
    return OPTD_E_BAD_REQUEST;
}

/* A request head over HTTP_HEAD_MAX is refused before anything of it runs,
 * so that the reply's headers still have room in the connection's pool. */
static optd_err head_check(req *r, char *msg, size_t msglen)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
    if (!ci || ci->header_size <= HTTP_HEAD_MAX)
        return OPTD_OK;
    return optd_fail(msg, msglen, OPTD_E_HEAD_TOO_LARGE,
                     "the request's line and headers take %zu bytes, over the %d this daemon reads; send long "
                     "lists in the body (a JSON step takes \"skip\" there)",
                     ci->header_size, HTTP_HEAD_MAX);
}

/* Whether h, a Host header value, names the loopback interface: localhost,
 * an address of 127.0.0.0/8 or [::1] (or [::ffff:127.x.x.x]), each with an
 * optional :port. A name that merely starts so ("127.0.0.1.evil.example",
 * "localhost.evil.example") is not one. */
static int host_is_loopback(const char *h)
{
    char buf[64];
    const char *port;
    size_t n;
    if (h[0] == '[') {
        struct in6_addr a6;
        const char *end = strchr(h, ']');
        n = end ? (size_t)(end - h - 1) : 0;
        if (!end || n == 0 || n >= sizeof buf)
            return 0;
        memcpy(buf, h + 1, n);
        buf[n] = '\0';
        if (inet_pton(AF_INET6, buf, &a6) != 1 ||
            !(IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127)))
            return 0;
        port = end + 1;
    } else {
        struct in_addr a4;
        n = strcspn(h, ":");
        if (n == 0 || n >= sizeof buf)
            return 0;
        memcpy(buf, h, n);
        buf[n] = '\0';
        port = h + n;
        if (buf[n - 1] == '.') /* the absolute form, "localhost." */
            buf[n - 1] = '\0';
        if (strcasecmp(buf, "localhost") != 0 &&
            !(inet_pton(AF_INET, buf, &a4) == 1 && (ntohl(a4.s_addr) >> 24) == 127))
            return 0;
    }
    if (*port == '\0')
        return 1;
    n = strspn(port + 1, "0123456789");
    return port[0] == ':' && n <= 5 && port[1 + n] == '\0';
}

static enum MHD_Result count_host(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    (void)kind;
    (void)value;
    if (strcasecmp(key, MHD_HTTP_HEADER_HOST) == 0)
        ++*(int *)cls;
    return MHD_YES;
}

/* The Host header (RFC 9112 section 3.2): one on every HTTP/1.1 request.
 * On a loopback listener without a token it must also name the loopback
 * interface: a web page whose own name an attacker has made resolve to
 * 127.0.0.1 (DNS rebinding) would otherwise drive the API from a browser on
 * this machine, and its requests carry that name as their Host. HTTP/1.0
 * requests may lack it (old probes do; browsers always send one). Returns
 * OPTD_OK, OPTD_E_BAD_REQUEST or OPTD_E_FORBIDDEN with the reason in msg. */
static optd_err host_checks(req *r, const char *version, char *msg, size_t msglen)
{
    const char *h = header(r, MHD_HTTP_HEADER_HOST);
    int hosts = 0;
    MHD_get_connection_values(r->conn, MHD_HEADER_KIND, count_host, &hosts);
    if (hosts > 1)
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "the request has %d Host headers; send one", hosts);
    if (!h && strcmp(version, MHD_HTTP_VERSION_1_0) != 0)
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "an HTTP/1.1 request needs a Host header");
    if (h && r->srv->host_check && !host_is_loopback(h))
        return optd_fail(msg, msglen, OPTD_E_FORBIDDEN,
                         "this daemon listens on a loopback address without a token, so it answers "
                         "only requests whose Host is localhost, 127.x.x.x or [::1] (a defence "
                         "against DNS rebinding); configure a token to serve other names");
    return OPTD_OK;
}

/* The largest body r may send: --max-body, except that PUT .../state takes
 * whatever GET .../state writes for the largest session the daemon holds
 * (API.md Steps: a checkpoint round-trips with the default flags). */
static size_t body_limit(const req *r)
{
    if (r->route == HTTP_R_STATE && strcmp(r->method, "PUT") == 0 && r->srv->state_body_max > r->srv->cfg.max_body)
        return r->srv->state_body_max;
    return r->srv->cfg.max_body;
}

/* Creates and PUT .../state decode their JSON bodies as they arrive, so
 * memory follows the vectors' elements, not a tree of their text. */
static optd_err body_setup(req *r, const char *method)
{
    unsigned paths = 0;
    if (r->binary && r->route == HTTP_R_STATE)
        return (r->st = st_reader_new(r->name, r->srv->cfg.max_session_bytes)) ? OPTD_OK : OPTD_E_NOMEM;
    if (r->binary)
        return OPTD_OK;
    if ((r->route == HTTP_R_SESSIONS && strcmp(method, "POST") == 0) ||
        (r->route == HTTP_R_SESSION && strcmp(method, "PUT") == 0))
        paths = JB_PARAMS;
    else if (r->route == HTTP_R_STATE && strcmp(method, "PUT") == 0)
        paths = JB_PARAMS | JB_STATE;
    if (!paths)
        return OPTD_OK;
    if (!(r->jb = malloc(sizeof *r->jb)))
        return OPTD_E_NOMEM;
    jbody_init(r->jb, paths, JB_SKELETON_MAX, r->srv->cfg.max_session_bytes);
    return OPTD_OK;
}

/* The query parameters each route takes (API.md): any other is a 400. */
static const char *const *route_query(http_route route, size_t *n)
{
    static const char *const list[] = {"limit", "after", "scope"};
    *n = route == HTTP_R_SESSIONS ? 3 : route == HTTP_R_HISTORY ? 2 : 0;
    return list;
}

typedef struct query_check {
    const char *const *names;
    size_t n;
    char *msg;
    size_t msglen;
    int bad;
} query_check;

static enum MHD_Result check_query_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    query_check *q = cls;
    (void)kind;
    (void)value;
    for (size_t i = 0; i < q->n; i++)
        if (strcmp(key, q->names[i]) == 0)
            return MHD_YES;
    if (q->n) {
        optd_unknown_name_msg(q->msg, q->msglen, "query parameter", key, "this path's query", q->names, q->n);
    } else {
        snprintf(q->msg, q->msglen, "unknown query parameter \"%.64s\": this path takes none", key);
    }
    q->bad = 1;
    return MHD_NO;
}

/* The checks of API.md's Conventions that need only the request head:
 * unknown query parameters (400) and a Content-Encoding (415: bodies are
 * taken as sent, uncompressed). */
static optd_err convention_checks(req *r, char *msg, size_t msglen)
{
    query_check q = {NULL, 0, msg, msglen, 0};
    q.names = route_query(r->route, &q.n);
    if (r->route != HTTP_R_ROOT) { /* a web page may carry what it likes */
        MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, check_query_arg, &q);
        if (q.bad)
            return OPTD_E_BAD_REQUEST;
    }
    const char *ce = header(r, MHD_HTTP_HEADER_CONTENT_ENCODING);
    if (ce && strcasecmp(ce, "identity") != 0)
        return optd_fail(msg, msglen, OPTD_E_UNSUPPORTED_MEDIA_TYPE,
                         "Content-Encoding %.40s is not supported: send the body uncompressed "
                         "(without Content-Encoding)",
                         ce);
    return OPTD_OK;
}

/* The checks made on the first callback, before any of the body is read.
 * Returns OPTD_OK to go on reading, else the error to answer with. */
static optd_err early_checks(req *r, const char *method, char *msg, size_t msglen)
{
    http_server *srv = r->srv;
    if (atomic_load(&srv->stopping))
        return optd_fail(msg, msglen, OPTD_E_UNAVAILABLE, "the server is shutting down; retry");
    /* Every /v1 request needs the token, even to learn a path is unknown. */
    if (strncmp(r->path, "/v1", 3) == 0 && (r->path[3] == '/' || r->path[3] == '\0') && !authorized(r))
        return optd_fail(msg, msglen, OPTD_E_UNAUTHORIZED,
                         "%s: send the header \"Authorization: Bearer <token>\" with the daemon's token",
                         header(r, MHD_HTTP_HEADER_AUTHORIZATION) ? "the bearer token is wrong"
                                                                  : "this daemon needs a bearer token");
    if (r->route == HTTP_R_NONE)
        return optd_fail(msg, msglen, OPTD_E_NOT_FOUND, "no such path");
    if (!method_allowed(r->route, method))
        return optd_fail(msg, msglen, OPTD_E_METHOD_NOT_ALLOWED, "%s is not allowed here; allowed: %s", method,
                         http_routes[r->route].methods);
    optd_err rc = convention_checks(r, msg, msglen);
    if (rc)
        return rc;
    if (r->route >= HTTP_R_SESSION && !r->name_ok) {
        if (r->route == HTTP_R_SESSION && strcmp(method, "PUT") == 0)
            return optd_fail(msg, msglen, OPTD_E_INVALID, "a session name matches [A-Za-z0-9][A-Za-z0-9._-]{0,127}");
        return optd_fail(msg, msglen, OPTD_E_NOT_FOUND, "no such session");
    }
    const char *cl = header(r, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *te = header(r, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    int has_body = (cl && strtoull(cl, NULL, 10) > 0) || te;
    const char *ct = header(r, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (ct && media_is(ct, "application/octet-stream") && r->route == HTTP_R_STEP) {
        r->binary = 1; /* even when empty: then it is a gradient of the wrong size */
        optd_err rc2 = wire_content_type(ct, &r->wire_in, msg, msglen);
        if (rc2)
            return rc2;
    }
    if (has_body && strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0 && strcmp(method, "DELETE") != 0) {
        if (ct && media_is(ct, "application/octet-stream"))
            r->binary = 1;
        else if (ct && !media_is(ct, "application/json"))
            return optd_fail(msg, msglen, OPTD_E_UNSUPPORTED_MEDIA_TYPE,
                             "Content-Type %.60s is not supported; use application/json%s%s", ct,
                             r->route == HTTP_R_STEP || r->route == HTTP_R_STATE ? " or application/octet-stream" : "",
                             media_is(ct, "application/x-www-form-urlencoded")
                                 ? " (curl's -d sends this type: add -H 'Content-Type: application/json')"
                                 : "");
        if (r->binary && r->route != HTTP_R_STEP && !(r->route == HTTP_R_STATE && strcmp(method, "PUT") == 0))
            return optd_fail(msg, msglen, OPTD_E_UNSUPPORTED_MEDIA_TYPE,
                             "only steps and PUT .../state take application/octet-stream");
        wire_type w = WIRE_NATIVE;
        if (r->binary && r->route == HTTP_R_STATE &&
            (wire_content_type(ct, &w, msg, msglen) != OPTD_OK || w != WIRE_NATIVE))
            return optd_fail(msg, msglen, OPTD_E_UNSUPPORTED_MEDIA_TYPE,
                             "a binary checkpoint is a safetensors file, whose header gives each tensor's dtype: "
                             "send it as application/octet-stream without a dtype parameter");
    }
    if (cl) {
        char *end;
        errno = 0;
        unsigned long long n = strtoull(cl, &end, 10);
        if (errno == ERANGE || n > body_limit(r))
            return optd_fail(msg, msglen, OPTD_E_TOO_LARGE, "the body is over the %zu-byte limit", body_limit(r));
    }
    return OPTD_OK;
}

/* Sets the state of conn's tracking and returns it (NULL when untracked). */
static conn_track *conn_state(http_server *srv, struct MHD_Connection *conn, int state)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    conn_track *t = ci ? ci->socket_context : NULL;
    if (!t)
        return NULL;
    pthread_mutex_lock(&srv->conns_mu);
    if (t->state == CONN_PARKED)
        srv->nconns++; /* counted again (conn_park is the way in and out, this a safety net) */
    t->state = state;
    t->since_us = optd_mono_us();
    pthread_mutex_unlock(&srv->conns_mu);
    return t;
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    http_server *srv = cls;
    conn_track *t = *socket_context;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        t = calloc(1, sizeof *t);
        if (!t || !ci) {
            free(t);
            return;
        }
        t->fd = ci->connect_fd;
        t->since_us = optd_mono_us();
        pthread_mutex_lock(&srv->conns_mu);
        t->next = srv->conns;
        if (srv->conns)
            srv->conns->prev = t;
        srv->conns = t;
        /* Past --max-connections a new connection is closed at once, so it
         * is refused rather than left waiting in the listen queue; MHD's own
         * limit sits a little higher to keep accepting (and closing). */
        if (++srv->nconns > srv->cfg.max_connections) {
            shutdown(t->fd, SHUT_RDWR);
            t->state = CONN_IDLE;
        }
        pthread_mutex_unlock(&srv->conns_mu);
        *socket_context = t;
    } else if (t) {
        pthread_mutex_lock(&srv->conns_mu);
        if (t->prev)
            t->prev->next = t->next;
        else
            srv->conns = t->next;
        if (t->next)
            t->next->prev = t->prev;
        if (t->state != CONN_PARKED)
            srv->nconns--;
        pthread_mutex_unlock(&srv->conns_mu);
        free(t);
        *socket_context = NULL;
    }
}

/* Called by MHD once a request line has arrived: its head is now due. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
    (void)uri;
    conn_state(cls, conn, CONN_HEAD);
    return NULL;
}

/* Shuts down (MHD then closes) connections whose head is overdue: a client
 * trickling one byte a second never trips MHD's idle timeout. */
static void *watchdog_main(void *arg)
{
    http_server *srv = arg;
    uint64_t limit = (uint64_t)srv->cfg.header_timeout * 1000000u;
    pthread_mutex_lock(&srv->conns_mu);
    while (srv->watchdog_on) {
        uint64_t now = optd_mono_us();
        for (conn_track *t = srv->conns; t; t = t->next)
            if ((t->state == CONN_FRESH || t->state == CONN_HEAD) && now - t->since_us > limit) {
                shutdown(t->fd, SHUT_RDWR);
                t->state = CONN_IDLE; /* once is enough */
            }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 250000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&srv->watchdog_cv, &srv->conns_mu, &ts);
    }
    pthread_mutex_unlock(&srv->conns_mu);
    return NULL;
}

/* Keeps the client's X-Request-Id when it is 1 to REQUEST_ID_MAX visible
 * ASCII characters (a tracing system's id goes through unchanged), else
 * makes one. */
static void request_id(req *r)
{
    const char *v = header(r, "X-Request-Id");
    size_t n = v ? strlen(v) : 0;
    int ok = n > 0 && n <= REQUEST_ID_MAX;
    for (size_t i = 0; ok && i < n; i++)
        ok = v[i] > 0x20 && v[i] < 0x7f;
    if (ok)
        memcpy(r->rid, v, n + 1);
    else
        snprintf(r->rid, sizeof r->rid, "%016llx", (unsigned long long)r->id);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    http_server *srv = cls;
    req *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        *con_cls = r;
        atomic_fetch_add(&srv->active, 1);
        r->track = conn_state(srv, conn, CONN_BUSY);
        r->srv = srv;
        r->conn = conn;
        r->t0 = optd_mono_us();
        r->id = atomic_fetch_add(&srv->next_id, 1) + 1;
        request_id(r);
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->path, sizeof r->path, "%s", url);
        r->route = route_parse(url, r->name, &r->name_ok);
        char msg[256] = "";
        optd_err rc = head_check(r, msg, sizeof msg);
        if (rc == OPTD_OK)
            rc = framing_checks(r, version, msg, sizeof msg);
        if (rc == OPTD_OK)
            rc = host_checks(r, version, msg, sizeof msg);
        if (rc == OPTD_OK)
            rc = early_checks(r, method, msg, sizeof msg);
        if (rc == OPTD_OK)
            rc = body_setup(r, method);
        if (rc)
            return send_err(r, rc, msg, -1);
        return MHD_YES;
    }
    if (r->status)
        return MHD_YES; /* answered early; MHD discards what still arrives */
    if (*upload_size) {
        size_t n = *upload_size;
        *upload_size = 0;
        if (r->too_large || r->len + n > body_limit(r)) {
            r->too_large = 1; /* keep draining, never buffer past the limit */
            return MHD_YES;
        }
        if (r->jb || r->st) { /* decoded as it arrives: nothing is buffered */
            if (r->jb)
                jbody_feed(r->jb, upload, n);
            else
                st_reader_feed(r->st, upload, n);
            r->len += n;
            return MHD_YES;
        }
        if (r->len + n + 1 > r->cap) {
            size_t cap = r->cap ? r->cap : 4096;
            while (cap < r->len + n + 1)
                cap *= 2;
            if (cap > body_limit(r) + 1)
                cap = body_limit(r) + 1;
            if (cap >= BIGBUF_MIN) {
                /* A big body: all that Content-Length announces at once,
                 * in memory a request before had touched (bigbuf.h). */
                const char *cl = header(r, MHD_HTTP_HEADER_CONTENT_LENGTH);
                unsigned long long announced = cl ? strtoull(cl, NULL, 10) : 0;
                if (announced < body_limit(r) && announced + 1 > cap)
                    cap = (size_t)announced + 1;
                size_t got;
                char *p = bigbuf_alloc(cap, &got);
                if (!p)
                    return MHD_NO;
                if (r->len)
                    memcpy(p, r->body, r->len);
                if (r->big)
                    bigbuf_free(r->body, r->cap);
                else
                    free(r->body);
                r->body = p;
                r->cap = got;
                r->big = 1;
            } else {
                char *p = realloc(r->body, cap);
                if (!p)
                    return MHD_NO;
                r->body = p;
                r->cap = cap;
            }
        }
        memcpy(r->body + r->len, upload, n);
        r->len += n;
        r->body[r->len] = '\0';
        return MHD_YES;
    }
    if (r->handoff == HANDOFF_DONE)
        return r->is_op ? finish_op(r) : finish_job(r);
    if (r->handoff == HANDOFF_WAITING)
        return MHD_YES;
    if (r->too_large) {
        char msg[96];
        snprintf(msg, sizeof msg, "the body is over the %zu-byte limit", body_limit(r));
        return send_err(r, OPTD_E_TOO_LARGE, msg, -1);
    }
    return dispatch(r, method);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    http_server *srv = cls;
    req *r = *con_cls;
    (void)conn;
    conn_state(srv, conn, CONN_IDLE);
    if (!r)
        return;
    int status = r->status ? r->status : (toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? 200 : 499);
    metrics_count_request(&srv->m, r->route, status);
    if (srv->cfg.log) {
        char line[320];
        snprintf(line, sizeof line, "%s %s %d %.3fms rid=%s", r->method, r->path, status,
                 (double)(optd_mono_us() - r->t0) / 1000.0, r->rid);
        srv->cfg.log(srv->cfg.log_ctx, line);
    }
    switch (r->job.base.type) {
    case ENGINE_REQ_CREATE:
    case ENGINE_REQ_PUT_STATE:
        engine_sess_free(r->job.create.newsess);
        store_session_clear(&r->job.create.row);
        break;
    case ENGINE_REQ_FORK:
        engine_settings_clear(&r->job.fork.settings);
        store_session_clear(&r->job.fork.row);
        break;
    case ENGINE_REQ_PATCH:
        engine_settings_clear(&r->job.patch.settings);
        patch_groups_free(r->job.patch.groups, r->job.patch.n_groups);
        store_session_clear(&r->job.patch.row);
        break;
    case ENGINE_REQ_STEP:
        free(r->job.step.out_params);
        free(r->job.step.lrs);
        break;
    case ENGINE_REQ_DELETE:
        break;
    }
    sbuf_free(&r->op.out);
    cJSON_Delete(r->json);
    jbody_free(r->jb);
    free(r->jb);
    st_reader_free(r->st);
    free(r->grad);
    free(r->skip_buf);
    free(r->skip_names);
    free(r->lr_set);
    if (r->big)
        bigbuf_free(r->body, r->cap);
    else
        free(r->body);
    free(r);
    *con_cls = NULL;
    atomic_fetch_sub(&srv->active, 1);
    idle_signal(srv);
}

static size_t unescape(void *cls, struct MHD_Connection *c, char *s)
{
    (void)cls;
    (void)c;
    return url_unescape(s);
}

/* ---- Lifecycle -------------------------------------------------------- */

/* MHD's accept policy: once stopping, a new connection is closed as soon as
 * it is accepted. This replaces MHD_quiesce_daemon, which on an epoll daemon
 * with its own threads races them for the listening socket's removal and
 * aborts the process when it loses (an open defect of libmicrohttpd 0.9.75,
 * reproduced by tests/crash/shutdown_race_test.py). The socket stays open
 * until MHD_stop_daemon closes it; clients see their connection closed, as
 * they would see it refused. */
static enum MHD_Result accept_policy(void *cls, const struct sockaddr *addr, socklen_t addrlen)
{
    http_server *srv = cls;
    (void)addr;
    (void)addrlen;
    return atomic_load(&srv->stopping) ? MHD_NO : MHD_YES;
}

static int listen_on(const char *host, uint16_t port, int *family, char *err, size_t errlen)
{
    struct addrinfo hints = {0}, *res = NULL;
    char portstr[8];
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    snprintf(portstr, sizeof portstr, "%u", port);
    int gai = getaddrinfo(host, portstr, &hints, &res);
    if (gai) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(gai));
        return -1;
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (fd >= 0)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) || listen(fd, 1024)) {
        snprintf(err, errlen, "cannot listen on %s:%u: %s", host, port, strerror(errno));
        if (fd >= 0)
            close(fd);
        fd = -1;
    }
    *family = res->ai_family;
    freeaddrinfo(res);
    return fd;
}

/* Whether sa, the bound address, is on the loopback interface only. */
static int listens_on_loopback(const struct sockaddr_storage *sa)
{
    if (sa->ss_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    if (sa->ss_family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a6) || (IN6_IS_ADDR_V4MAPPED(a6) && a6->s6_addr[12] == 127);
    }
    return 0;
}

/* Names this daemon (random, so a restart is a new instance) and starts
 * the operations that run off the request threads. */
static optd_err start_ops(http_server *srv, char *err, size_t errlen)
{
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, 0) != (ssize_t)sizeof id)
        id = (uint64_t)optd_now_ms() ^ ((uint64_t)getpid() << 40) ^ optd_mono_us();
    snprintf(srv->instance, sizeof srv->instance, "%016llx", (unsigned long long)id);
    ops_config oc = {srv->st,       srv->cfg.backup_dir, srv->cfg.peers,  srv->token,
                     srv->instance, srv->cfg.log,        srv->cfg.log_ctx};
    return ops_start(&oc, &srv->ops, err, errlen);
}

optd_err http_start(const http_config *cfg, store *st, http_server **out, char *err, size_t errlen)
{
    optd_err rc = OPTD_E_NOMEM;
    int family = AF_INET;
    http_server *srv = calloc(1, sizeof *srv);
    if (!srv)
        goto done;
    srv->cfg = *cfg;
    srv->st = st;
    srv->state_body_max = checkpoint_max_bytes(cfg->max_session_bytes);
    srv->listen_fd = -1;
    pthread_mutex_init(&srv->conns_mu, NULL);
    pthread_cond_init(&srv->watchdog_cv, NULL);
    pthread_mutex_init(&srv->idle_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&srv->idle_cv, &ca);
    pthread_condattr_destroy(&ca);
    if (cfg->token && !(srv->token = strdup(cfg->token)))
        goto done;
    engine_options eo = {
        .st = st,
        .stats = &srv->m.eng,
        .codec = http_config_codec,
        .idem_window = cfg->idempotency_window,
        .history_steps = cfg->history_steps,
        .cache_bytes = cfg->cache_bytes,
        .max_session_bytes = cfg->max_session_bytes,
        .max_parked = cfg->max_connections,
    };
    rc = engine_start(&eo, &srv->w);
    if (rc)
        goto done;
    rc = start_ops(srv, err, errlen);
    if (rc)
        goto done;
    rc = OPTD_E_UNAVAILABLE;
    srv->listen_fd = listen_on(cfg->listen_host, cfg->listen_port, &family, err, errlen);
    if (srv->listen_fd < 0)
        goto done;
    struct sockaddr_storage sa;
    socklen_t salen = sizeof sa;
    getsockname(srv->listen_fd, (struct sockaddr *)&sa, &salen);
    srv->port =
        ntohs(family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port : ((struct sockaddr_in *)&sa)->sin_port);
    srv->host_check = !srv->token && listens_on_loopback(&sa);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_ALLOW_SUSPEND_RESUME;
    if (family == AF_INET6)
        flags |= MHD_USE_IPv6;
    struct MHD_OptionItem opts[] = {
        {MHD_OPTION_LISTEN_SOCKET, srv->listen_fd, NULL},
        /* Served connections, as many parked in worker rounds, and some
         * being refused (closed at once by on_connection). */
        {MHD_OPTION_CONNECTION_LIMIT, 2 * cfg->max_connections + 64, NULL},
        {MHD_OPTION_CONNECTION_TIMEOUT, cfg->connection_timeout, NULL},
        {MHD_OPTION_CONNECTION_MEMORY_LIMIT, HTTP_CONN_MEMORY, NULL},
        {MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, srv},
        {MHD_OPTION_NOTIFY_CONNECTION, (intptr_t)on_connection, srv},
        {MHD_OPTION_URI_LOG_CALLBACK, (intptr_t)on_uri, srv},
        {MHD_OPTION_UNESCAPE_CALLBACK, (intptr_t)unescape, NULL},
        {cfg->threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END, cfg->threads, NULL},
        {MHD_OPTION_END, 0, NULL},
    };
    srv->mhd = MHD_start_daemon(flags, 0, accept_policy, srv, on_request, srv, MHD_OPTION_ARRAY, opts, MHD_OPTION_END);
    if (!srv->mhd) {
        snprintf(err, errlen, "cannot start the HTTP server on %s:%u", cfg->listen_host, cfg->listen_port);
        goto done;
    }
    srv->watchdog_on = 1;
    if (pthread_create(&srv->watchdog, NULL, watchdog_main, srv) != 0) {
        srv->watchdog_on = 0;
        MHD_stop_daemon(srv->mhd);
        snprintf(err, errlen, "cannot start a thread");
        goto done;
    }
    rc = OPTD_OK;
done:
    if (rc && srv) {
        ops_free(srv->ops);
        engine_free(srv->w);
        if (srv->listen_fd >= 0 && !srv->mhd)
            close(srv->listen_fd);
        free(srv->token);
        pthread_mutex_destroy(&srv->conns_mu);
        pthread_cond_destroy(&srv->watchdog_cv);
        pthread_mutex_destroy(&srv->idle_mu);
        pthread_cond_destroy(&srv->idle_cv);
        free(srv);
        srv = NULL;
    }
    *out = srv;
    return rc;
}

uint16_t http_port(const http_server *srv) { return srv->port; }

/* Waits (at most ms milliseconds) until no request is in flight besides,
 * when but_parked, those parked in worker rounds. */
static void wait_idle(http_server *srv, int but_parked, unsigned ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t ns = (uint64_t)ts.tv_nsec + (uint64_t)ms * 1000000u;
    ts.tv_sec += (time_t)(ns / 1000000000u);
    ts.tv_nsec = (long)(ns % 1000000000u);
    pthread_mutex_lock(&srv->idle_mu);
    while (atomic_load(&srv->active) > (but_parked ? engine_parked(srv->w) : 0))
        if (pthread_cond_timedwait(&srv->idle_cv, &srv->idle_mu, &ts) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&srv->idle_mu);
}

void http_stop(http_server *srv)
{
    if (!srv)
        return;
    /* From here accept_policy closes new connections at once and the
     * requests of kept-alive ones are answered 503 with Connection: close. */
    atomic_store(&srv->stopping, 1);
    /* Backups in progress give up (their requests get 503) and listings
     * finish: every operation has resumed its connection after this. */
    ops_stop(srv->ops);
    /* New requests are refused now; the writer keeps running so that the
     * requests in flight (some suspended on it) finish and are answered.
     * Whatever is still queued after that is run by writer_stop, which
     * resumes its connections before MHD closes them. */
    wait_idle(srv, 1, 10000);
    /* Rounds that have not filled cannot fill now: engine_stop fails them
     * with 503, and their replies get a moment to leave. */
    engine_stop(srv->w);
    wait_idle(srv, 0, 2000);
    pthread_mutex_lock(&srv->conns_mu);
    srv->watchdog_on = 0;
    pthread_cond_signal(&srv->watchdog_cv);
    pthread_mutex_unlock(&srv->conns_mu);
    pthread_join(srv->watchdog, NULL);
    MHD_stop_daemon(srv->mhd);
    ops_free(srv->ops);
    engine_free(srv->w);
    free(srv->token);
    pthread_mutex_destroy(&srv->conns_mu);
    pthread_cond_destroy(&srv->watchdog_cv);
    pthread_mutex_destroy(&srv->idle_mu);
    pthread_cond_destroy(&srv->idle_cv);
    free(srv);
}
