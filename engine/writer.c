/* The writer: the one thread that changes the database. Request threads
 * queue jobs; the writer takes the jobs queued so far, up to a budget of
 * bytes (take_group), applies them in arrival order inside one transaction
 * (so steps of one session are applied one at a time, in order), each in a
 * savepoint of its own, commits once for the whole group, and only then
 * completes the jobs, whose replies are therefore always durable. Sessions
 * stay in a bounded in-memory cache so a step costs no read of its state. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/util.h"
#include "engine/engineInt.h"

#define BUCKETS 4096

typedef engine_step_req sreq;
#define REQ(x) ((engine_req *)(x))
/* sess.touched of a session loaded during the group (see lookup). */
#define TOUCH_LOADED (-1)
/* Bytes of state one group writes, about, before the jobs after it wait for
 * the next group: a small step queued behind a 40 MB one commits on its own
 * rather than with it. A job larger than this alone (a heavy job) makes a
 * group of its own with the small ones beside it, and after such a group the
 * next one takes no heavy job while small ones wait, so a small step waits
 * for at most one heavy commit. */
#define GROUP_BYTES ((size_t)32 << 20)

/* A saved reply starts with lr and grad_norm (doubles) and contributors (a
 * uint32, padded), then holds the params. */
#define REPLY_HEAD 24
/* How often, in microseconds, the writer asks whether the clients of the
 * contributions waiting in rounds are still there. */
#define PROBE_US 200000

/* A job is queued, running in a group, parked in a round, waiting for its
 * group's outcome (releasing) or done. */
enum { JS_QUEUED, JS_PARKED, JS_RELEASING, JS_DONE };

/* A worker round in progress: the weighted sum of its contributions (in
 * double, so the mean does not depend on arrival order beyond rounding) and
 * the jobs waiting for it, one per contribution, in arrival order (a retry
 * takes the place of the job it retries). Lives in memory only, as API.md
 * allows. */
typedef struct wround {
    sess *s;
    double *sum; /* n elements */
    double wsum;
    uint32_t count;             /* contributions, each one job on waiters */
    double loss_sum, loss_w;    /* of the contributions that gave a loss */
    uint64_t deadline_us;       /* mono_us of the timeout */
    unsigned char *skip;        /* the tensors every contribution skips (one flag each), or NULL */
    double *lr;                 /* the lr every contribution sets (n_lr, malloc'd), or NULL */
    size_t n_lr;
    sreq *waiters, *last;       /* last: where the next contribution goes */
    struct wround *next, *prev; /* writer.rounds */
} wround;

struct engine {
    store *st;
    engine_stats *m;
    engine_codec codec; /* of the sessions it loads */
    optd_err (*fault)(void *ctx, engine_fault_point p, const char *name);
    void *fault_ctx;
    uint64_t idem_window, history_steps;
    size_t max_session_bytes; /* forks and PATCHes past it are refused */
    wround rounds;            /* sentinel of the rounds in progress */
    atomic_int healthy;       /* the last transaction committed */
    atomic_uint parked;       /* jobs waiting in rounds */
    atomic_ullong withdrawn;  /* jobs taken out of rounds, their clients gone */
    unsigned max_parked;      /* 0: no cap; set before the first submit */
    uint64_t probe_at;        /* mono_us of the next look for hung-up contributors */
    engine_req *release;      /* jobs to complete once the group's outcome is known */
    int part;                 /* the part of the group in progress (a job, or an expired round) */
    int part_dirty;           /* the part changed a cached session (touch) */
    int guarded;              /* the part runs in a savepoint */
    /* The group's leading plain steps run without savepoints (begin_part):
     * set when a group begins, cleared at its first part that could not be
     * run a second time. */
    int optimistic;
    int redo;             /* a part without a savepoint failed after writing: run the group again */
    uint64_t part_writes; /* store_tx_writes when the part began */
    uint64_t pass_steps[OPTIM_KIND_COUNT]; /* steps this run of the group applied, by optimizer */
    int kept;                 /* a part of the group has succeeded: the transaction holds work to keep */
    size_t cache_bytes, cached;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    engine_req *head, *tail;     /* queue, guarded by mu */
    int stopping;                /* guarded by mu */
    int last_heavy;              /* the last group held a heavy job (writer thread only) */
    _Atomic uint64_t heavy_done; /* groups with a heavy job finished */
    sess *bucket[BUCKETS];
    sess lru; /* sentinel: lru.lru_next is the most recently used */
    /* The cached sessions whose shape is committed, for request threads
     * (engine_session_shape): a step needs its session's dtype and size to
     * decode its body, and asking the store for them cost the request
     * thread a read transaction, a sixth of its time on a small step. A
     * session joins after a commit that touched it and leaves when the
     * cache drops it, which every change of a name's shape (create over it,
     * PUT state, delete) does first, so an entry is never stale. */
    pthread_mutex_t known_mu;
    sess *known[BUCKETS]; /* guarded by known_mu, with each entry's known_next */
};

/* The test's injected failure at point p, or OPTD_OK. */
static optd_err injected(engine *w, engine_fault_point p, const char *name)
{
    return w->fault ? w->fault(w->fault_ctx, p, name) : OPTD_OK;
}

static unsigned hash(const char *s)
{
    unsigned h = 2166136261u;
    while (*s)
        h = (h ^ (unsigned char)*s++) * 16777619u;
    return h % BUCKETS;
}

static void lru_unlink(sess *s)
{
    s->lru_prev->lru_next = s->lru_next;
    s->lru_next->lru_prev = s->lru_prev;
}

static void lru_front(engine *w, sess *s)
{
    s->lru_next = w->lru.lru_next;
    s->lru_prev = &w->lru;
    w->lru.lru_next->lru_prev = s;
    w->lru.lru_next = s;
}

static sess *cache_find(const engine *w, const char *name)
{
    for (sess *s = w->bucket[hash(name)]; s; s = s->hnext)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
}

static sess *cache_get(engine *w, const char *name)
{
    sess *s = cache_find(w, name);
    if (s) {
        lru_unlink(s);
        lru_front(w, s);
    }
    return s;
}

static void cache_put(engine *w, sess *s)
{
    unsigned h = hash(s->name);
    s->hnext = w->bucket[h];
    w->bucket[h] = s;
    lru_front(w, s);
    w->cached += s->blob_len;
}

static void round_fail(engine *w, sess *s, optd_err rc, const char *msg);
static optd_err step_lr_set(engine *w, sess *s, const double *lr, size_t n, int check_only, char *msg, size_t msglen);

/* s's shape is committed: request threads may read it. */
static void known_add(engine *w, sess *s)
{
    if (s->known)
        return;
    unsigned h = hash(s->name);
    pthread_mutex_lock(&w->known_mu);
    s->known_next = w->known[h];
    w->known[h] = s;
    s->known = true;
    pthread_mutex_unlock(&w->known_mu);
}

static void known_remove(engine *w, sess *s)
{
    if (!s->known)
        return;
    pthread_mutex_lock(&w->known_mu);
    sess **pp = &w->known[hash(s->name)];
    while (*pp != s)
        pp = &(*pp)->known_next;
    *pp = s->known_next;
    s->known = false;
    pthread_mutex_unlock(&w->known_mu);
}

optd_err engine_session_shape(engine *w, const char *name, optim_dtype *dtype, size_t *n)
{
    optd_err rc = OPTD_E_NOT_FOUND;
    pthread_mutex_lock(&w->known_mu);
    for (const sess *s = w->known[hash(name)]; s; s = s->known_next) {
        if (strcmp(s->name, name) == 0) {
            *dtype = s->dtype;
            *n = s->n;
            rc = OPTD_OK;
            break;
        }
    }
    pthread_mutex_unlock(&w->known_mu);
    return rc;
}

/* Forgets s (its worker round, if any, fails with 503: retry is safe). */
static void cache_drop(engine *w, sess *s)
{
    known_remove(w, s);
    if (s->rnd)
        round_fail(w, s, OPTD_E_UNAVAILABLE, "the session's round was abandoned; retry the contribution");
    sess **pp = &w->bucket[hash(s->name)];
    while (*pp != s)
        pp = &(*pp)->hnext;
    *pp = s->hnext;
    lru_unlink(s);
    w->cached -= s->blob_len + engine_idem_bytes(s->keys);
    engine_sess_free(s);
}

/* Evicts least recently used sessions past the budget (never one touched by
 * the group in progress). */
static void cache_trim(engine *w)
{
    sess *s = w->lru.lru_prev;
    while (w->cached > w->cache_bytes && s != &w->lru) {
        sess *prev = s->lru_prev;
        if (!s->touched && !s->rnd)
            cache_drop(w, s);
        s = prev;
    }
}

/* The cached session named name, loading it when absent. */
static optd_err lookup(engine *w, const char *name, sess **out)
{
    store_session row = {0};
    void *blob = NULL;
    size_t len = 0;
    *out = cache_get(w, name);
    if (*out)
        return OPTD_OK;
    optd_err rc = store_session_load(w->st, name, &row, &blob, &len);
    if (rc == OPTD_OK)
        rc = engine_sess_from_store(&w->codec, &row, blob, len, out);
    if (rc == OPTD_OK) {
        cache_put(w, *out);
        /* Read inside the group's transaction, so it may hold writes the
         * group has yet to commit: forgotten if the group fails. */
        (*out)->touched = TOUCH_LOADED;
    } else {
        store_session_clear(&row);
        free(blob);
    }
    return rc;
}

/* s changed in memory in the part of the group in progress. */
static void touch(engine *w, sess *s, int64_t ms)
{
    s->touched = w->part;
    w->part_dirty = 1;
    s->updated_ms = ms;
}

/* Runs j's completion now. */
static void complete(engine_req *j)
{
    j->state_ = JS_DONE;
    j->cb(j, j->data);
}

/* Completes j after the group's commit (or failure). */
static void release_later(engine *w, engine_req *j)
{
    j->state_ = JS_RELEASING;
    j->next_done_ = w->release;
    w->release = j;
}

static void round_free(engine *w, sess *s)
{
    wround *r = s->rnd;
    /* Not a walk of r->waiters: round_fail has completed them already, and a
     * completed job may be freed by its request thread at any moment. */
    atomic_fetch_sub(&w->parked, r->count);
    r->prev->next = r->next;
    r->next->prev = r->prev;
    free(r->sum);
    free(r->skip);
    free(r->lr);
    free(r);
    s->rnd = NULL;
}

/* Fails every job waiting on s's round at once (nothing of it was written). */
static void round_fail(engine *w, sess *s, optd_err rc, const char *msg)
{
    for (sreq *j = s->rnd->waiters, *next; j; j = next) {
        next = j->next_waiter_;
        j->rc = rc;
        snprintf(j->msg, sizeof j->msg, "%s", msg);
        complete(REQ(j));
    }
    round_free(w, s);
}

static optd_err copy_out(sreq *j, const void *p, size_t len)
{
    j->out_params = malloc(len ? len : 1);
    if (!j->out_params)
        return OPTD_E_NOMEM;
    memcpy(j->out_params, p, len);
    j->out_len = len;
    return OPTD_OK;
}

/* What one applied step reports. lrs: a shaped session's, one per group
 * (owned; the caller frees), else NULL. */
typedef struct applied {
    uint64_t step;
    double lr, grad_norm;
    double *lrs;
    size_t n_lrs;
    bool key_saved; /* apply_step recorded the job's key (or had none to keep) */
} applied;

/* torch.nn.utils.clip_grad_norm_ over the gradients given (a shaped
 * session's tensors not in skip): the norm comes first, so this is the one
 * extra pass over the gradient, which is scaled in place when over the
 * limit. Returns the norm, or -1 when s does not clip. */
static double clip(const sess *s, void *grad, const unsigned char *skip)
{
    if (!s->tr.clip)
        return -1;
    const size_t es = optim_elem_size(s->dtype);
    unsigned char *g = grad;
    double sq = 0;
    if (!s->shape) {
        sq = optim_sq_norm(s->dtype, s->n, grad);
    } else {
        for (size_t t = 0; t < s->shape->n_tensors; t++)
            if (!skip || !skip[t])
                sq += optim_sq_norm(s->dtype, s->shape->tensors[t].n, g + s->shape->tensors[t].off * es);
    }
    double norm = sqrt(sq), coef = s->tr.max_grad_norm / (norm + 1e-6);
    if (coef >= 1)
        return norm;
    if (!s->shape) {
        optim_scale(s->dtype, s->n, grad, coef);
    } else {
        for (size_t t = 0; t < s->shape->n_tensors; t++)
            if (!skip || !skip[t])
                optim_scale(s->dtype, s->shape->tensors[t].n, g + s->shape->tensors[t].off * es, coef);
    }
    return norm;
}

/* Writes the step s just took, its history row h and its key k (none when
 * NULL): into its log while the log has room (the state stays where the
 * store has it), else the whole state, which ends the log. */
static optd_err store_step(engine *w, sess *s, const void *grad, const unsigned char *skip, const double *lrs,
                           const store_history *h, const store_key *k)
{
    uint32_t slots = engine_sess_log_slots(s);
    optd_err rc;
    if (slots && s->logged < slots) {
        store_part parts[3];
        engine_sess_log_parts(s, grad, skip, lrs, parts);
        rc = store_session_log(w->st, s->id, s->st.step, s->updated_ms, s->st.step - s->logged - 1, s->logged,
                               parts, 3, h, w->history_steps, k);
        if (rc == OPTD_OK)
            s->logged++;
        return rc;
    }
    rc = store_session_step(w->st, s->id, s->st.step, s->updated_ms, s->blob, s->blob_len, h, w->history_steps, k);
    if (rc == OPTD_OK)
        s->logged = 0;
    return rc;
}

static unsigned char *reply_make(const sess *s, const applied *a, uint32_t contributors, size_t *len);

/* Applies one optimizer step with grad (n elements of the session's dtype,
 * scaled in place when clipping) and records it: state (or its log), row,
 * history and the key of keyed (the job whose key goes with the step, or
 * NULL; out->key_saved says it went), all inside the group's transaction.
 * A shaped session's tensors step with their group's hyperparameters and
 * their own step and scalar (torch's per-parameter state["step"]); skipped
 * ones do not change. */
static optd_err apply_step(engine *w, sess *s, void *grad, const unsigned char *skip, uint32_t contributors,
                           bool has_loss, double loss, const sreq *keyed, applied *out)
{
    optim_stats stats;
    double lr1 = engine_training_lr(&s->tr, s->hp.lr, s->st.step), *lrs = &lr1;
    out->lrs = NULL;
    out->n_lrs = 0;
    out->key_saved = false;
    if (s->shape) {
        /* The schedule's factor multiplies each group's own lr. */
        size_t G = s->shape->n_groups;
        if (!(out->lrs = malloc(G * sizeof *out->lrs)))
            return OPTD_E_NOMEM;
        out->n_lrs = G;
        for (size_t g = 0; g < G; g++)
            out->lrs[g] = engine_training_lr(&s->tr, s->shape->groups[g].hp.lr, s->st.step);
        lrs = out->lrs;
    }
    double grad_norm = clip(s, grad, skip);
    engine_sess_apply(s, grad, skip, lrs, &stats);
    if (!stats.finite)
        return OPTD_E_NON_FINITE; /* the caller drops s: its state is spoilt */
    if (grad_norm < 0)
        grad_norm = sqrt(stats.grad_sq);
    engine_sess_pack(s);
    touch(w, s, optd_now_ms());
    out->step = s->st.step;
    out->lr = lrs[0];
    out->grad_norm = grad_norm;
    store_history h = {s->st.step,           s->updated_ms, lrs[0],   grad_norm, sqrt(stats.update_sq),
                       sqrt(stats.param_sq), contributors,  has_loss, loss};
    /* A keyed job's key and saved reply go in with the step's own writes
     * (the session row's one rewrite takes the key's entry too); a window
     * of 0 keeps no key, so there is nothing to make. */
    store_key key = {0}, *k = NULL;
    unsigned char *reply = NULL;
    if (keyed && keyed->idem_key && w->idem_window) {
        if (!(reply = reply_make(s, out, contributors, &key.reply_len)))
            return OPTD_E_NOMEM;
        key = (store_key){keyed->idem_key, keyed->digest, reply, key.reply_len, w->idem_window};
        k = &key;
    }
    optd_err rc = store_step(w, s, grad, skip, lrs, &h, k);
    free(reply);
    out->key_saved = keyed && rc == OPTD_OK;
    if (rc == OPTD_OK)
        rc = injected(w, ENGINE_FAULT_STEP, s->name);
    if (rc == OPTD_OK)
        w->pass_steps[s->info->kind]++; /* counted once the group commits */
    return rc;
}

/* A step whose result overflowed the dtype is refused: s's memory holds the
 * spoilt result, so forget it; the next use reloads the state this group's
 * transaction holds, as if the step had never run. */
static optd_err overflowed(engine *w, sess *s, char *msg, size_t msglen)
{
    snprintf(msg, msglen, "the step would make params or optimizer state non-finite in %s; nothing changed",
             engine_dtype_name(s->dtype));
    cache_drop(w, s);
    return OPTD_E_NON_FINITE;
}

/* The bytes of a shaped session's lrs in a saved reply. */
static size_t lr_bytes(const sess *s) { return s->shape ? s->shape->n_groups * sizeof(double) : 0; }

/* The length of the reply s saves for a keyed step (see reply_make). */
static size_t reply_len(const sess *s)
{
    return REPLY_HEAD + lr_bytes(s) + (engine_sess_log_slots(s) ? 0 : s->n * optim_elem_size(s->dtype));
}

/* Keys of steps <= this are forgotten: the window is the last idem_window
 * steps of the session. */
static uint64_t idem_floor(const engine *w, const sess *s)
{
    return s->st.step > w->idem_window ? s->st.step - w->idem_window : 0;
}

/* The record of key for s, if the window holds it: OPTD_OK (*out filled),
 * OPTD_E_NOT_FOUND, or the store's error. s's key map is loaded the first
 * time; it counts in the cache. */
static optd_err idem_find(engine *w, sess *s, const char *key, store_idem *out)
{
    uint64_t floor = idem_floor(w, s), steps[8];
    size_t len = reply_len(s);
    optd_err rc;
    if (!s->keys) {
        rc = engine_idem_load(w->st, s->id, floor, &s->keys);
        if (rc)
            return rc;
        w->cached += engine_idem_bytes(s->keys);
    }
    size_t n = engine_idem_candidates(s->keys, key, floor, steps, sizeof steps / sizeof steps[0]);
    for (size_t i = 0; i < n; i++) {
        rc = store_idem_get(w->st, s->id, key, steps[i], len, w->idem_window, out);
        if (rc != OPTD_E_NOT_FOUND)
            return rc;
    }
    return OPTD_E_NOT_FOUND;
}

/* Adds key at step to s's map, once the store holds it. A map that cannot
 * take it goes, to be loaded again from the store: it must never miss a
 * key the store has, or a retry would be applied twice. */
static void idem_remember(engine *w, sess *s, const char *key, uint64_t step)
{
    if (!s->keys)
        return;
    size_t before = engine_idem_bytes(s->keys);
    if (engine_idem_add(s->keys, key, step, idem_floor(w, s)) != OPTD_OK) {
        engine_idem_free(s->keys);
        s->keys = NULL;
    }
    w->cached += engine_idem_bytes(s->keys);
    w->cached -= before;
}

/* The reply s saves for a keyed step (reply_len bytes, malloc'd): its
 * numbers (a shaped session's lr per group after the head), then the
 * params, as a replay needs. A session that logs its steps saves no
 * params: saving them would write as much again as its step does, and a
 * retry of its latest step, the one a client whose reply was lost sends,
 * takes the params the session has (see run_step); an older key's replay
 * is then one whose params are no longer kept. NULL: out of memory. */
static unsigned char *reply_make(const sess *s, const applied *a, uint32_t contributors, size_t *len)
{
    size_t lrb = a->n_lrs * sizeof(double);
    *len = reply_len(s);
    unsigned char *reply = malloc(*len);
    if (!reply)
        return NULL;
    memcpy(reply, &a->lr, 8);
    memcpy(reply + 8, &a->grad_norm, 8);
    memcpy(reply + 16, &contributors, 4);
    memset(reply + 20, 0, 4);
    if (lrb)
        memcpy(reply + REPLY_HEAD, a->lrs, lrb);
    memcpy(reply + REPLY_HEAD + lrb, s->st.params, *len - REPLY_HEAD - lrb);
    return reply;
}

/* Fills j's reply from an applied step and remembers its key (saving it
 * first, unless it went with the step). */
static optd_err finish_step(engine *w, sess *s, sreq *j, const applied *a, uint32_t contributors)
{
    size_t lrb = a->n_lrs * sizeof(double);
    optd_err rc = OPTD_OK;
    j->step = a->step;
    j->lr = a->lr;
    j->grad_norm = a->grad_norm;
    j->contributors = contributors;
    j->has_meta = true;
    if (a->n_lrs) {
        if (!(j->lrs = malloc(lrb)))
            return OPTD_E_NOMEM;
        memcpy(j->lrs, a->lrs, lrb);
        j->n_lrs = a->n_lrs;
    }
    if (j->idem_key && !a->key_saved && w->idem_window) {
        size_t len;
        unsigned char *reply = reply_make(s, a, contributors, &len);
        if (!reply)
            return OPTD_E_NOMEM;
        rc = store_idem_put(w->st, s->id, j->idem_key, a->step, j->digest, reply, len, w->idem_window);
        free(reply);
    }
    if (rc == OPTD_OK && j->idem_key)
        idem_remember(w, s, j->idem_key, a->step);
    if (rc == OPTD_OK && j->want_params)
        rc = copy_out(j, s->st.params, s->n * optim_elem_size(s->dtype));
    return rc;
}

/* Applies s's round with the weighted mean of its contributions; every
 * waiter gets the same reply once the group commits. */
static optd_err round_apply(engine *w, sess *s)
{
    wround *r = s->rnd;
    size_t es = optim_elem_size(s->dtype);
    void *mean = malloc(s->n * es + 1);
    applied a = {0};
    char lr_msg[256] = "";
    optd_err rc = OPTD_E_NOMEM;
    if (mean && r->n_lr && (rc = step_lr_set(w, s, r->lr, r->n_lr, 0, lr_msg, sizeof lr_msg)) != OPTD_OK) {
        free(mean); /* validated when the round opened, so hardly ever: the round fails */
        mean = NULL;
    }
    if (mean) {
        for (size_t i = 0; i < s->n; i++) {
            double v = r->sum[i] / r->wsum;
            if (s->dtype == OPTIM_F64)
                ((double *)mean)[i] = v;
            else
                ((float *)mean)[i] = (float)v;
        }
        rc = apply_step(w, s, mean, r->skip, r->count, r->loss_w > 0, r->loss_w > 0 ? r->loss_sum / r->loss_w : 0, NULL,
                        &a);
        free(mean);
    }
    uint32_t count = r->count;
    char msg[256] = "";
    for (sreq *j = r->waiters; j; j = j->next_waiter_) {
        if (lr_msg[0])
            snprintf(j->msg, sizeof j->msg, "%s", lr_msg);
        j->rc = rc ? rc : finish_step(w, s, j, &a, count);
        if (j->rc && !rc)
            rc = j->rc;
    }
    for (sreq *j = r->waiters, *next; j; j = next) {
        next = j->next_waiter_;
        if (rc && !j->rc) {
            /* Another waiter's reply failed, so the part that applied the
             * round rolls back: no waiter may report it applied. */
            j->rc = rc;
            free(j->out_params);
            j->out_params = NULL;
            free(j->lrs);
            j->lrs = NULL;
            j->n_lrs = 0;
        }
        release_later(w, REQ(j));
    }
    free(a.lrs);
    round_free(w, s);
    if (rc == OPTD_E_NON_FINITE) {
        overflowed(w, s, msg, sizeof msg);
        for (engine_req *j = w->release; j; j = j->next_done_)
            if (j->rc == OPTD_E_NON_FINITE)
                snprintf(j->msg, sizeof j->msg, "%s", msg);
    }
    /* Any failure rolls the part back, a refusal too: the round's lr,
     * written before the step ran, must not stay when the waiters are
     * told nothing changed. */
    return rc;
}

/* Adds j's contribution to r's sums. */
static void round_add(wround *r, const sess *s, const sreq *j)
{
    for (size_t i = 0; i < s->n; i++)
        r->sum[i] += j->weight * (s->dtype == OPTIM_F64 ? ((double *)j->grad)[i] : ((float *)j->grad)[i]);
    r->wsum += j->weight;
    r->count++;
    if (j->has_loss) { /* the round's loss is weighted like its gradient */
        r->loss_sum += j->weight * j->loss;
        r->loss_w += j->weight;
    }
}

/* Sums r's waiting contributions again, in arrival order, after one left
 * or was replaced (a subtraction would not undo an addition exactly). Every
 * waiter is parked, so its request thread still lends it its gradient. */
static void round_resum(wround *r)
{
    const sess *s = r->s;
    memset(r->sum, 0, (s->n ? s->n : 1) * sizeof(double));
    r->wsum = r->loss_sum = r->loss_w = 0;
    r->count = 0;
    r->last = NULL;
    for (sreq *j = r->waiters; j; j = j->next_waiter_) {
        round_add(r, s, j);
        r->last = j;
    }
}

/* Puts j on r's waiters, last, until the round is applied or fails. */
static void park(engine *w, wround *r, sreq *j)
{
    j->state_ = JS_PARKED;
    j->next_waiter_ = NULL;
    if (r->last)
        r->last->next_waiter_ = j;
    else
        r->waiters = j;
    r->last = j;
    atomic_fetch_add(&w->parked, 1);
    if (j->on_park)
        j->on_park(REQ(j), j->data);
}

/* A retry (same Idempotency-Key) of contribution o, still waiting in r:
 * j takes o's place, so the round counts it once and the reply goes to the
 * request that is most likely still read. o is answered at once: its
 * client has probably given up on it, and if not, it learns why. */
static optd_err round_replace(wround *r, sreq **at, sreq *j)
{
    sreq *o = *at;
    if (o->digest != j->digest) {
        snprintf(j->msg, sizeof j->msg, "Idempotency-Key was used with another gradient");
        return OPTD_E_IDEMPOTENCY_MISMATCH;
    }
    j->state_ = JS_PARKED;
    j->next_waiter_ = o->next_waiter_;
    *at = j;
    if (r->last == o)
        r->last = j;
    if (j->on_park)
        j->on_park(REQ(j), j->data);
    round_resum(r); /* the same gradient and weight, but maybe another loss */
    o->rc = OPTD_E_SUPERSEDED;
    snprintf(o->msg, sizeof o->msg,
             "a retry with the same Idempotency-Key took this contribution's place in the "
             "round; the retry gets the round's reply");
    complete(REQ(o)); /* parked stays: j is parked in o's stead */
    return OPTD_OK;
}

/* Withdraws from the rounds in progress the contributions whose clients
 * have hung up, so that they neither hold a connection until the round
 * fills nor count in a round nobody waits for; a retry with the same
 * Idempotency-Key contributes anew. Rounds left empty are dropped (their
 * timeout starts again with the next contribution). Nothing of a round is
 * in the database, so this needs no transaction. */
static void rounds_probe(engine *w)
{
    for (wround *r = w->rounds.next, *next; r != &w->rounds; r = next) {
        int left = 0;
        next = r->next;
        for (sreq **pp = &r->waiters; *pp;) {
            sreq *j = *pp;
            if (!j->client_gone || !j->client_gone(REQ(j), j->data)) {
                pp = &j->next_waiter_;
                continue;
            }
            *pp = j->next_waiter_;
            left++;
            atomic_fetch_sub(&w->parked, 1);
            atomic_fetch_add(&w->withdrawn, 1);
            j->withdrawn = true;
            j->rc = OPTD_E_UNAVAILABLE;
            snprintf(j->msg, sizeof j->msg, "the client hung up; its contribution was withdrawn from the round");
            complete(REQ(j));
        }
        if (!left)
            continue;
        round_resum(r); /* recounts too */
        if (!r->waiters)
            round_free(w, r->s);
    }
}

/* Whether two sets of skipped tensors (NULL: none) of s are the same. */
static int same_skip(const sess *s, const unsigned char *a, const unsigned char *b)
{
    size_t T = s->shape ? s->shape->n_tensors : 1;
    for (size_t t = 0; t < T; t++)
        if ((a && a[t]) != (b && b[t]))
            return 0;
    return 1;
}

/* Adds j's gradient to s's round (making one when none is open) and parks
 * j until the round is applied. *skip (j's skipped tensors, or NULL) is
 * taken by a new round; every contribution of a round skips the same. */
static optd_err round_join(engine *w, sess *s, sreq *j, unsigned char **skip)
{
    wround *r = s->rnd;
    optd_err rc;
    if (r && !same_skip(s, r->skip, *skip)) {
        snprintf(j->msg, sizeof j->msg,
                 "the contributions to a round skip the same tensors (a round averages whole gradients); "
                 "this one's skip differs from the round's first contribution's");
        return OPTD_E_INVALID;
    }
    if (j->idem_key && r) {
        for (sreq **pp = &r->waiters; *pp; pp = &(*pp)->next_waiter_)
            if ((*pp)->idem_key && strcmp((*pp)->idem_key, j->idem_key) == 0)
                return round_replace(r, pp, j);
    }
    if (r && (r->n_lr != j->n_lr || (j->n_lr && memcmp(r->lr, j->lr_set, j->n_lr * sizeof *r->lr) != 0))) {
        snprintf(j->msg, sizeof j->msg,
                 "the contributions to a round set the same lr (the round is one step): this one's Optd-Lr "
                 "differs from the round's first contribution's (%s); send the same header from every worker",
                 r->n_lr ? "which had one" : "which had none");
        return OPTD_E_INVALID;
    }
    if (!r && j->n_lr && (rc = step_lr_set(w, s, j->lr_set, j->n_lr, 1, j->msg, sizeof j->msg)) != OPTD_OK)
        return rc;
    /* Each waiting contribution holds a connection: past the cap, one that
     * would wait is refused rather than let waiting ones crowd out others. */
    if (w->max_parked && atomic_load(&w->parked) >= w->max_parked && (r ? r->count : 0) + 1 < s->tr.workers) {
        snprintf(j->msg, sizeof j->msg,
                 "%u contributions already wait in worker rounds, the most this daemon "
                 "holds (--max-connections); retry later",
                 w->max_parked);
        return OPTD_E_ROUNDS_FULL; /* a refusal: not a storage fault that fails the group */
    }
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r || !(r->sum = calloc(s->n ? s->n : 1, sizeof(double)))) {
            free(r);
            return OPTD_E_NOMEM;
        }
        if (j->n_lr && !(r->lr = malloc(j->n_lr * sizeof *r->lr))) {
            free(r->sum);
            free(r);
            return OPTD_E_NOMEM;
        }
        if (j->n_lr)
            memcpy(r->lr, j->lr_set, j->n_lr * sizeof *r->lr); /* j's is lent only while j waits */
        r->n_lr = j->n_lr;
        r->s = s;
        r->skip = *skip;
        *skip = NULL;
        r->deadline_us = optd_mono_us() + (uint64_t)(s->tr.round_timeout * 1e6);
        r->next = &w->rounds;
        r->prev = w->rounds.prev;
        w->rounds.prev->next = r;
        w->rounds.prev = r;
        s->rnd = r;
    }
    round_add(r, s, j);
    /* The request thread lends the gradient until j completes: the round
     * keeps its own sum, and sums again from the waiters when one leaves. */
    park(w, r, j);
    return r->count >= s->tr.workers ? round_apply(w, s) : OPTD_OK;
}

/* API.md: If-Match makes PATCH, DELETE and PUT .../state conditional as it
 * does a step. OPTD_E_STEP_MISMATCH (j->step the current one) when it names
 * another step than s's; -1 is no condition. */
static optd_err check_if_match(engine_req *j, const sess *s)
{
    if (j->if_match < 0 || (uint64_t)j->if_match == s->st.step)
        return OPTD_OK;
    j->step = s->st.step;
    snprintf(j->msg, sizeof j->msg, "If-Match names step %lld but the session is at step %llu; nothing changed",
             (long long)j->if_match, (unsigned long long)s->st.step);
    return OPTD_E_STEP_MISMATCH;
}

/* j's skipped tensors as one flag per tensor of s (*out malloc'd, the
 * caller frees). OPTD_E_INVALID for a name s has no tensor of, or for the
 * one tensor of an unshaped session. */
static optd_err skip_flags(const sess *s, sreq *j, unsigned char **out)
{
    size_t T = s->shape ? s->shape->n_tensors : 1;
    unsigned char *f = calloc(T, 1);
    if (!f)
        return OPTD_E_NOMEM;
    for (size_t k = 0; k < j->n_skip; k++) {
        const char *name = j->skip[k];
        long t = s->shape ? engine_shape_find(s->shape, name) : strcmp(name, "params") == 0 ? 0 : -1;
        if (t < 0 && s->shape) {
            engine_shape_unknown_msg(s->shape, name, "skip", j->msg, sizeof j->msg);
        } else if (t < 0) {
            snprintf(j->msg, sizeof j->msg,
                     "unknown tensor \"%.64s\" in skip: this session was created without groups, so its one "
                     "tensor is \"params\"",
                     name);
        } else if (!s->shape) {
            snprintf(j->msg, sizeof j->msg,
                     "skipping \"params\", the one tensor of a session created without groups, would step "
                     "nothing: send no step instead (or create the session with groups to skip tensors)");
            t = -1;
        }
        if (t < 0) {
            free(f);
            return OPTD_E_INVALID;
        }
        f[t] = 1;
    }
    *out = f;
    return OPTD_OK;
}

/* The numbers of s's latest step's reply, from its history row: lr,
 * grad_norm and contributors, when the history keeps them (a shaped
 * session's reply has an lr per group, which the row lacks: none then). */
static optd_err latest_meta(engine *w, sess *s, sreq *j)
{
    store_history h;
    if (s->shape || !w->history_steps || s->st.step == 0)
        return OPTD_OK;
    optd_err rc = store_history_get(w->st, s->id, s->st.step, &h);
    if (rc == OPTD_OK && h.contributors <= UINT32_MAX) {
        j->lr = h.lr;
        j->grad_norm = h.grad_norm;
        j->contributors = (uint32_t)h.contributors;
        j->has_meta = true;
    }
    return rc == OPTD_E_NOT_FOUND ? OPTD_OK : rc;
}

static optd_err run_step(engine *w, sreq *j)
{
    sess *s;
    optd_err rc = lookup(w, j->name, &s);
    if (rc)
        return rc;
    if (s->dtype != j->dtype || s->n != j->size) {
        snprintf(j->msg, sizeof j->msg, "the session now has %zu %s elements", s->n, engine_dtype_name(s->dtype));
        return OPTD_E_SIZE_MISMATCH;
    }
    if (j->idem_key) {
        store_idem rec = {0};
        rc = idem_find(w, s, j->idem_key, &rec);
        if (rc == OPTD_OK) {
            j->step = rec.step;
            j->replayed = true;
            if (rec.digest != j->digest) {
                rc = OPTD_E_IDEMPOTENCY_MISMATCH;
                snprintf(j->msg, sizeof j->msg, "Idempotency-Key was used for step %llu with another gradient",
                         (unsigned long long)rec.step);
            } else if (rec.reply && rec.reply_len >= REPLY_HEAD + lr_bytes(s)) {
                size_t lrb = lr_bytes(s);
                memcpy(&j->lr, rec.reply, 8);
                memcpy(&j->grad_norm, (unsigned char *)rec.reply + 8, 8);
                memcpy(&j->contributors, (unsigned char *)rec.reply + 16, 4);
                j->has_meta = true;
                if (lrb) {
                    if (!(j->lrs = malloc(lrb))) {
                        free(rec.reply);
                        return OPTD_E_NOMEM;
                    }
                    memcpy(j->lrs, (unsigned char *)rec.reply + REPLY_HEAD, lrb);
                    j->n_lrs = s->shape->n_groups;
                }
                if (j->want_params && rec.reply_len == REPLY_HEAD + lrb && rec.step == s->st.step) {
                    /* Saved without params (reply_make): the latest
                     * step's are the session's own. */
                    free(rec.reply);
                    return copy_out(j, s->st.params, s->n * optim_elem_size(s->dtype));
                }
                if (j->want_params && rec.reply_len > REPLY_HEAD + lrb) {
                    j->out_len = rec.reply_len - REPLY_HEAD - lrb;
                    memmove(rec.reply, (unsigned char *)rec.reply + REPLY_HEAD + lrb, j->out_len);
                    j->out_params = rec.reply;
                    rec.reply = NULL;
                }
            } else if (!rec.reply && rec.step == s->st.step) {
                /* The ring all sessions share came round to the latest
                 * step's saved reply: its params are the session's own. */
                rc = latest_meta(w, s, j);
                if (rc == OPTD_OK && j->want_params)
                    rc = copy_out(j, s->st.params, s->n * optim_elem_size(s->dtype));
            }
            free(rec.reply);
            return rc;
        }
        if (rc != OPTD_E_NOT_FOUND)
            return rc;
    }
    if (j->if_match >= 0 && (uint64_t)j->if_match != s->st.step) {
        j->step = s->st.step;
        snprintf(j->msg, sizeof j->msg, "If-Match names step %lld but the session is at step %llu",
                 (long long)j->if_match, (unsigned long long)s->st.step);
        return OPTD_E_STEP_MISMATCH;
    }
    unsigned char *skip = NULL;
    if (j->n_skip && (rc = skip_flags(s, j, &skip)) != OPTD_OK)
        return rc;
    if (s->tr.workers > 1 || s->rnd) {
        rc = round_join(w, s, j, &skip);
        free(skip);
        return rc;
    }
    if (j->n_lr && (rc = step_lr_set(w, s, j->lr_set, j->n_lr, 0, j->msg, sizeof j->msg)) != OPTD_OK) {
        free(skip);
        return rc; /* the part rolls back: s, touched, is reloaded as it was */
    }
    applied a;
    rc = apply_step(w, s, j->grad, skip, 1, j->has_loss, j->loss, j, &a);
    free(skip);
    if (rc == OPTD_E_NON_FINITE)
        rc = overflowed(w, s, j->msg, sizeof j->msg);
    else if (rc == OPTD_OK)
        rc = finish_step(w, s, j, &a, 1);
    free(a.lrs);
    return rc;
}

static optd_err insert_new(engine *w, engine_req *j, sess *s, store_session *out)
{
    store_session row;
    engine_sess_row(s, &row);
    optd_err rc = store_session_insert(w->st, &row, s->blob, s->blob_len);
    s->id = row.id;
    if (rc == OPTD_OK)
        rc = injected(w, ENGINE_FAULT_INSERT, s->name);
    if (rc == OPTD_OK) {
        store_session_clear(out);
        rc = engine_sess_row_copy(s, out);
    }
    if (rc)
        return rc;
    /* Only now, with nothing left to fail, does the cache own s: a failure
     * above leaves it to the caller, which frees it. */
    cache_put(w, s);
    touch(w, s, s->updated_ms);
    j->step = s->st.step;
    return OPTD_OK;
}

static optd_err run_create(engine *w, engine_create_req *j)
{
    sess *old;
    optd_err rc = OPTD_OK;
    if (j->type == ENGINE_REQ_PUT_STATE) {
        rc = lookup(w, j->name, &old);
        if (rc == OPTD_OK && (rc = check_if_match(REQ(j), old)) != OPTD_OK)
            return rc;
        if (rc == OPTD_E_NOT_FOUND && j->if_match >= 0) {
            snprintf(j->msg, sizeof j->msg,
                     "no session named '%s' to match If-Match; without If-Match the PUT "
                     "creates it",
                     j->name);
            return rc;
        }
        if (rc == OPTD_OK) {
            j->newsess->created_ms = old->created_ms;
            rc = store_session_delete(w->st, j->name);
            if (old->rnd) {
                /* Its waiters are stragglers now: the 412 names the new step. */
                for (sreq *o = old->rnd->waiters; o; o = o->next_waiter_)
                    o->step = j->newsess->st.step;
                round_fail(w, old, OPTD_E_STEP_MISMATCH, "the session was replaced by a checkpoint");
            }
            cache_drop(w, old);
        } else if (rc == OPTD_E_NOT_FOUND) {
            rc = OPTD_OK;
            j->created = true;
        }
        if (rc)
            return rc;
    } else if (cache_get(w, j->name)) {
        return OPTD_E_ALREADY_EXISTS;
    }
    rc = insert_new(w, REQ(j), j->newsess, &j->row);
    if (rc == OPTD_OK)
        j->newsess = NULL;
    return rc;
}

/* Applies d onto copies of s's settings (*hp, *tr), validating all; s is
 * not changed. */
static optd_err settings_read(const sess *s, const engine_settings *d, optim_hparams *hp, training *tr, char *msg,
                              size_t msglen)
{
    *hp = s->hp;
    *tr = s->tr;
    return engine_settings_apply(s->info, d, hp, tr, msg, msglen);
}

/* settings_read, and for a shaped session its groups' hyperparameters
 * (*ghp, one per group, malloc'd: the caller frees): the items of d apply
 * to every group too (as setting them in every param_group would), then
 * each group's own (groups: one per group, or NULL). */
static optd_err all_settings_read(const sess *s, const engine_settings *d, const engine_settings *groups,
                                  size_t n_groups, optim_hparams *hp, training *tr, optim_hparams **ghp, char *msg,
                                  size_t msglen)
{
    char m[256];
    *ghp = NULL;
    optd_err rc = settings_read(s, d, hp, tr, msg, msglen);
    if (rc)
        return rc;
    if (groups && !s->shape)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "this session has no groups (it was created without \"groups\"): PATCH its "
                         "\"hyperparams\" instead");
    if (!s->shape)
        return OPTD_OK;
    size_t G = s->shape->n_groups;
    if (groups && n_groups != G)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "the session has %zu groups but \"groups\" has %zu entries: give one per group, in "
                         "order, {} for a group that does not change",
                         G, n_groups);
    optim_hparams *g = malloc(G * sizeof *g);
    if (!g)
        return OPTD_E_NOMEM;
    for (size_t k = 0; k < G && !rc; k++) {
        g[k] = s->shape->groups[k].hp;
        rc = engine_group_settings_apply(s->info, d, 1, &g[k], m, sizeof m);
        if (!rc && groups)
            rc = engine_group_settings_apply(s->info, &groups[k], 0, &g[k], m, sizeof m);
        if (!rc)
            rc = engine_group_check(s->info, hp, &g[k], m, sizeof m);
        if (rc)
            snprintf(msg, msglen, "groups[%zu]: %.200s", k, m);
    }
    if (rc)
        free(g);
    else
        *ghp = g;
    return rc;
}

/* The bytes of s's state with the hyperparameters hp and ghp. */
static size_t bytes_with(sess *s, const optim_hparams *hp, const optim_hparams *ghp)
{
    if (!s->shape)
        return engine_sess_state_bytes(s->info, hp, s->dtype, s->n);
    engine_group *g = s->shape->groups;
    size_t G = s->shape->n_groups, bytes;
    /* Swapped in and back (the writer owns s). */
    optim_hparams *old = malloc(G * sizeof *old);
    if (!old)
        return SIZE_MAX;
    for (size_t k = 0; k < G; k++) {
        old[k] = g[k].hp;
        g[k].hp = ghp[k];
    }
    bytes = engine_shape_state_bytes(s->info, hp, s->shape, s->dtype, s->n);
    for (size_t k = 0; k < G; k++)
        g[k].hp = old[k];
    free(old);
    return bytes;
}

/* Whether a group of s would start to use a buffer under ghp. */
static int groups_grow(const sess *s, const optim_hparams *ghp)
{
    for (size_t k = 0; s->shape && k < s->shape->n_groups; k++)
        for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++)
            if (optim_buffer_used(s->info, &ghp[k], i) && !optim_buffer_used(s->info, &s->shape->groups[k].hp, i))
                return 1;
    return 0;
}

/* The 422 of a state past --max-session-bytes, for the session s would be. */
static optd_err check_size_with(sess *s, const optim_hparams *hp, const optim_hparams *ghp, size_t limit, char *msg,
                                size_t msglen)
{
    size_t bytes = bytes_with(s, hp, ghp);
    if (bytes <= limit)
        return OPTD_OK;
    snprintf(msg, msglen,
             "the session's state would take %zu bytes, over the %zu of --max-session-bytes; use fewer elements, "
             "float32 or fewer buffers",
             bytes, limit);
    return OPTD_E_SESSION_TOO_LARGE;
}

/* Applies settings read by all_settings_read onto s (re-laying its state
 * when the buffers it uses change). */
static optd_err apply_settings(sess *s, const optim_hparams *hpp, const training *trp, const optim_hparams *ghp,
                               char *msg, size_t msglen)
{
    optim_hparams hp = *hpp;
    training tr = *trp;
    training old = s->tr;
    s->tr = tr;
    optd_err rc = engine_sess_set_all_hparams(s, &hp, ghp);
    if (rc == OPTD_E_BAD_HYPERPARAM)
        engine_accumulator_msg(msg, msglen, s->dtype);
    if (rc)
        s->tr = old;
    return rc;
}

/* Sets a step's lr (n values, as engine_step_req's lr_set) onto s as the
 * PATCH {"hyperparams":{"lr":x}} (n 1) or {"groups":[{"lr":x},...]} would:
 * the same reading and validation, s's row (its config) rewritten in the
 * transaction in progress. check_only: validates, changes nothing. */
static optd_err step_lr_set(engine *w, sess *s, const double *lr, size_t n, int check_only, char *msg, size_t msglen)
{
    size_t G = s->shape ? s->shape->n_groups : 1;
    if (n > 1 && !s->shape)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "Optd-Lr has %zu numbers but the session has no groups (it was created without "
                         "\"groups\"): give one number",
                         n);
    if (n > 1 && n != G)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "Optd-Lr has %zu numbers but the session has %zu groups: give one per group, in order, or "
                         "one number for every group",
                         n, G);
    engine_hp_item *items = calloc(n, sizeof *items);
    engine_settings d = {0}, *groups = n > 1 ? calloc(n, sizeof *groups) : NULL;
    if (!items || (n > 1 && !groups)) {
        free(items);
        return OPTD_E_NOMEM;
    }
    for (size_t k = 0; k < n; k++) {
        items[k].name = "lr";
        items[k].type = ENGINE_VAL_NUMBER;
        items[k].v[0] = lr[k];
        if (groups) {
            groups[k].items = &items[k];
            groups[k].n_items = 1;
        }
    }
    if (!groups) {
        d.items = items;
        d.n_items = 1;
    }
    optim_hparams hp, *ghp = NULL;
    training tr;
    char m[200];
    optd_err rc = all_settings_read(s, &d, groups, groups ? n : 0, &hp, &tr, &ghp, m, sizeof m);
    if (rc)
        snprintf(msg, msglen, "Optd-Lr: %s (it sets lr as a PATCH of lr would)", m);
    if (!rc && !check_only)
        rc = apply_settings(s, &hp, &tr, ghp, msg, msglen);
    if (!rc && !check_only) {
        store_session row;
        touch(w, s, optd_now_ms()); /* a refused step then drops s: the next use reloads it */
        engine_sess_row(s, &row);
        rc = store_session_update(w->st, &row, NULL, s->blob_len);
    }
    free(ghp);
    free(groups);
    free(items);
    return rc;
}

static optd_err run_fork(engine *w, engine_fork_req *j)
{
    sess *src, *s = NULL;
    optd_err rc = lookup(w, j->from, &src);
    if (rc == OPTD_E_NOT_FOUND) {
        snprintf(j->msg, sizeof j->msg, "no session named '%s' to fork from", j->from);
        return rc;
    }
    if (rc)
        return rc;
    if (cache_get(w, j->name))
        return OPTD_E_ALREADY_EXISTS;
    optim_hparams hp, *ghp = NULL;
    training tr;
    rc = all_settings_read(src, &j->settings, NULL, 0, &hp, &tr, &ghp, j->msg, sizeof j->msg);
    /* The fork's state, with its own hyperparams, must fit before it is copied. */
    if (!rc)
        rc = check_size_with(src, &hp, ghp, w->max_session_bytes, j->msg, sizeof j->msg);
    if (!rc)
        rc = engine_sess_copy(src, j->name, &s);
    if (!rc)
        rc = apply_settings(s, &hp, &tr, ghp, j->msg, sizeof j->msg);
    if (!rc)
        rc = insert_new(w, REQ(j), s, &j->row);
    if (rc)
        engine_sess_free(s);
    free(ghp);
    return rc;
}

/* Which state buffers s uses, one bit each: the blob's layout besides its length. */
static unsigned buffer_set(const sess *s)
{
    unsigned set = 0;
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++)
        if (s->st.buf[i])
            set |= 1u << i;
    return set;
}

static optd_err run_patch(engine *w, engine_patch_req *j)
{
    sess *s;
    optd_err rc = lookup(w, j->name, &s);
    if (rc)
        return rc;
    if ((rc = check_if_match(REQ(j), s)) != OPTD_OK)
        return rc;
    size_t before = s->blob_len;
    unsigned layout = buffer_set(s);
    optim_hparams hp, *ghp = NULL;
    training tr;
    rc = all_settings_read(s, &j->settings, j->groups, j->n_groups, &hp, &tr, &ghp, j->msg, sizeof j->msg);
    /* A PATCH that adds a buffer (amsgrad on) grows the state: it must fit.
     * One that does not grow it is fine even past a lowered limit. */
    if (!rc && bytes_with(s, &hp, ghp) > before)
        rc = check_size_with(s, &hp, ghp, w->max_session_bytes, j->msg, sizeof j->msg);
    /* A group that starts to use a buffer gets it fresh: the blob changes. */
    int regrown = !rc && ghp && groups_grow(s, ghp);
    if (!rc)
        rc = apply_settings(s, &hp, &tr, ghp, j->msg, sizeof j->msg);
    free(ghp);
    if (rc)
        return rc;
    w->cached += s->blob_len - before;
    touch(w, s, optd_now_ms());
    /* The state is rewritten whenever its layout changes, not only its
     * length: rmsprop trading momentum_buffer for grad_avg keeps the length
     * but must not leave the stored blob read with the new buffer names. */
    int relaid = before != s->blob_len || layout != buffer_set(s) || regrown;
    store_session row;
    engine_sess_row(s, &row);
    /* A logged session's log is redone with the settings it is loaded
     * with, so a change of them writes the state and ends the log. */
    rc = store_session_update(w->st, &row, relaid || s->logged ? s->blob : NULL, s->blob_len);
    if (rc == OPTD_OK)
        s->logged = 0;
    /* Fewer workers may complete the round in progress. */
    if (rc == OPTD_OK && s->rnd && s->rnd->count >= s->tr.workers) {
        rc = round_apply(w, s);
        /* The waiters have their 422; the PATCH itself stands (and with it,
         * in this corner, the round's lr, written in the same part). */
        if (rc == OPTD_E_NON_FINITE)
            rc = OPTD_OK;
    }
    if (rc == OPTD_OK) {
        j->step = s->st.step;
        store_session_clear(&j->row);
        rc = engine_sess_row_copy(s, &j->row);
    }
    return rc;
}

static optd_err run_delete(engine *w, engine_req *j)
{
    sess *s = cache_get(w, j->name);
    optd_err rc = OPTD_OK;
    if (j->if_match >= 0 && (rc = lookup(w, j->name, &s)) == OPTD_OK)
        rc = check_if_match(j, s);
    if (rc)
        return rc;
    rc = store_session_delete(w->st, j->name);
    if (rc == OPTD_OK && s) {
        if (s->rnd)
            round_fail(w, s, OPTD_E_NOT_FOUND, "the session was deleted");
        cache_drop(w, s);
    }
    return rc;
}

static optd_err run(engine *w, engine_req *j)
{
    switch (j->type) {
    case ENGINE_REQ_CREATE:
    case ENGINE_REQ_PUT_STATE:
        return run_create(w, (engine_create_req *)j);
    case ENGINE_REQ_FORK:
        return run_fork(w, (engine_fork_req *)j);
    case ENGINE_REQ_PATCH:
        return run_patch(w, (engine_patch_req *)j);
    case ENGINE_REQ_DELETE:
        return run_delete(w, j);
    case ENGINE_REQ_STEP:
        return run_step(w, (sreq *)j);
    }
    return OPTD_E_INTERNAL;
}

/* Whether j could run again from the start of its group if it failed after
 * writing: a plain step of a cached session changes nothing but the
 * transaction and the session's cached copy, which a rollback and a cache
 * drop undo. Not a step of a worker round (contributions wait in memory),
 * nor one whose gradient is clipped (scaled in place: run again, it would
 * be clipped twice), nor one whose session is still to be loaded. */
static int redoable(const engine *w, const engine_req *j)
{
    const sess *s = j && j->type == ENGINE_REQ_STEP ? cache_find(w, j->name) : NULL;
    return s && s->tr.workers <= 1 && !s->rnd && !s->tr.clip;
}

/* A group runs in parts, a job or an expired round each, and a part that
 * fails (a refusal found after writing, a value too big for SQLite, out of
 * memory) fails alone: the group's other parts still commit. begin_part
 * begins j's part (j NULL: a round's).
 *
 * The simple way is a savepoint of the group's transaction per part, but a
 * savepoint's journal copies every page the part changes: a sixth of the
 * writer's time on a small step, and 40 MB, a third of its time, on a
 * 1e7-element one. So a part goes without one when it can be undone
 * otherwise: the first part that succeeds has nothing before it to keep (a
 * failure rolls back the transaction and begins another), and while the
 * group's parts are plain steps (redoable) a failure after writing rolls
 * back the transaction and runs the group again from its start, with
 * savepoints (run_group): a failure costs that once, success nothing. From
 * the first part that is not redoable on, every part after the first kept
 * one has its savepoint. A part that fails having written nothing (most
 * refusals: 404, 412, 422) undoes nothing in the store either way; a keyed
 * step that the store itself refuses (its row not at the step before, which
 * the engine's own checks make rare) has saved its reply in the ring first,
 * and costs its group the run again. */
static optd_err begin_part(engine *w, const engine_req *j)
{
    w->part++;
    w->part_dirty = 0;
    if (w->optimistic && !redoable(w, j))
        w->optimistic = 0;
    w->guarded = w->kept && !w->optimistic;
    w->part_writes = store_tx_writes(w->st);
    return w->guarded ? store_savepoint(w->st) : OPTD_OK;
}

/* Ends the part begun last: keeps its writes when rc is OPTD_OK, else undoes
 * them and forgets the sessions it changed in memory (the next use reloads
 * them as the transaction now holds them), or, when only the whole group
 * can be undone, sets w->redo (see begin_part). Returns OPTD_OK, or
 * OPTD_E_UNAVAILABLE when the group's transaction is lost with it. */
static optd_err end_part(engine *w, optd_err rc)
{
    if (rc == OPTD_OK) {
        w->kept = 1;
        return w->guarded ? store_release(w->st) : OPTD_OK;
    }
    optd_err trc = OPTD_OK;
    if (w->guarded) {
        trc = store_rollback_to(w->st);
    } else if (store_tx_writes(w->st) != w->part_writes) {
        if (w->kept) {
            w->redo = 1;
            return OPTD_OK;
        }
        store_rollback(w->st);
        trc = store_begin(w->st);
    }
    /* Most failed parts are refusals that changed nothing (412, 422). */
    for (sess *s = w->part_dirty ? w->lru.lru_next : &w->lru, *next; s != &w->lru; s = next) {
        next = s->lru_next;
        if (s->touched == w->part)
            cache_drop(w, s);
    }
    return trc;
}

/* Rounds past their timeout: applied with what arrived when at least
 * min_workers contributed, else failed (nothing changes). Each applied
 * round is a part; returns OPTD_E_UNAVAILABLE when the transaction is lost. */
static optd_err run_expired(engine *w, uint64_t now)
{
    optd_err rc = OPTD_OK;
    for (wround *r = w->rounds.next, *next; r != &w->rounds && !rc; r = next) {
        next = r->next;
        if (r->deadline_us > now)
            continue;
        if (r->count >= r->s->tr.min_workers) {
            rc = begin_part(w, NULL);
            if (!rc)
                rc = end_part(w, round_apply(w, r->s)); /* its waiters have their outcome */
        } else {
            round_fail(w, r->s, OPTD_E_ROUND_TIMEOUT, "the round did not gather min_workers contributions in time");
        }
    }
    return rc;
}

static int any_expired(engine *w, uint64_t now)
{
    for (wround *r = w->rounds.next; r != &w->rounds; r = r->next)
        if (r->deadline_us <= now)
            return 1;
    return 0;
}

/* Forgets the results of j, whose part (or group) rolled back. */
static void drop_results(engine_req *j, int fault)
{
    store_session *row = NULL;
    switch (j->type) {
    case ENGINE_REQ_STEP: {
        sreq *sj = (sreq *)j;
        if (fault)
            sj->replayed = false;
        sj->has_meta = false;
        free(sj->out_params);
        sj->out_params = NULL;
        sj->out_len = 0;
        free(sj->lrs);
        sj->lrs = NULL;
        sj->n_lrs = 0;
        break;
    }
    case ENGINE_REQ_CREATE:
    case ENGINE_REQ_PUT_STATE:
        row = &((engine_create_req *)j)->row;
        break;
    case ENGINE_REQ_FORK:
        row = &((engine_fork_req *)j)->row;
        break;
    case ENGINE_REQ_PATCH:
        row = &((engine_patch_req *)j)->row;
        break;
    case ENGINE_REQ_DELETE:
        break;
    }
    if (row)
        store_session_clear(row);
}

/* Whether rc is a storage failure (as opposed to a refusal that wrote
 * nothing): the storage is then not known to work. */
static int is_fault(optd_err rc) { return rc == OPTD_E_UNAVAILABLE || rc == OPTD_E_NOMEM || rc == OPTD_E_INTERNAL; }

/* Undoes the run of group so far (its jobs up to stop, all plain steps:
 * see begin_part) for it to run again: rolls back the transaction, forgets
 * the sessions it touched and the jobs' results, and begins a new
 * transaction, whose outcome it returns. */
static optd_err group_undo(engine *w, engine_req *group, engine_req *stop)
{
    store_rollback(w->st); /* logs the failure's cause */
    for (sess *s = w->lru.lru_next, *next; s != &w->lru; s = next) {
        next = s->lru_next;
        if (s->touched)
            cache_drop(w, s);
    }
    for (engine_req *j = group; j != stop; j = j->next_) {
        drop_results(j, 1);
        j->rc = OPTD_OK;
        j->msg[0] = '\0';
    }
    w->release = NULL;
    w->optimistic = 0;
    atomic_fetch_add(&w->m->group_reruns, 1);
    return store_begin(w->st);
}

/* Applies one group of jobs (and the rounds that timed out) in one
 * transaction, then completes what the group decided. */
static void run_group(engine *w, engine_req *group)
{
    optd_err rc = store_begin(w->st);
    int began = rc == OPTD_OK, fault = !began;
    /* A request that met a storage fault rolls back alone and the group may
     * still commit, but the storage is not healthy: /readyz asks the store. */
    int job_fault;
    engine_req *j, *next;
    w->optimistic = 1;
again:
    job_fault = 0;
    j = group;
    w->release = NULL;
    w->part = 0;
    w->kept = 0;
    w->redo = 0;
    memset(w->pass_steps, 0, sizeof w->pass_steps);
    if (!fault) {
        rc = run_expired(w, optd_mono_us());
        fault = rc != OPTD_OK;
    }
    for (; j && !fault; j = next) {
        next = j->next_;
        j->state_ = JS_QUEUED;
        rc = begin_part(w, j);
        if (rc) {
            fault = 1;
            break; /* j is released with the jobs not run */
        }
        optd_err jrc = run(w, j);
        rc = end_part(w, jrc);
        if (w->redo) {
            rc = group_undo(w, group, next);
            began = rc == OPTD_OK;
            fault = !began;
            goto again;
        }
        job_fault |= is_fault(jrc);
        fault = rc != OPTD_OK;
        if (j->state_ == JS_QUEUED) { /* else parked, or released by its round with its own rc */
            j->rc = jrc;
            release_later(w, j);
        }
    }
    for (; j; j = next) { /* not run: the group failed before them */
        next = j->next_;
        release_later(w, j);
    }
    if (!fault) {
        uint64_t t0 = optd_mono_us();
        rc = injected(w, ENGINE_FAULT_COMMIT, "");
        if (rc)
            store_rollback(w->st);
        else
            rc = store_commit(w->st);
        engine_histogram_observe(&w->m->commit_latency, optd_mono_us() - t0);
        atomic_fetch_add(&w->m->commits, 1);
        fault = rc != OPTD_OK;
        for (size_t k = 0; k < OPTIM_KIND_COUNT && !fault; k++)
            if (w->pass_steps[k])
                atomic_fetch_add(&w->m->steps[k], w->pass_steps[k]);
    } else if (began) {
        store_rollback(w->st);
    }
    /* After a failed transaction nothing of the group happened: forget the
     * cached sessions it changed (they reload from the database) and fail
     * every job, all of which are safe to retry. */
    for (sess *s = w->lru.lru_next; s != &w->lru;) {
        sess *nexts = s->lru_next;
        if (s->touched && fault) {
            cache_drop(w, s);
        } else {
            if (s->touched)
                known_add(w, s); /* committed */
            s->touched = 0;
        }
        s = nexts;
    }
    if (fault)
        atomic_fetch_add(&w->m->commit_failures, 1);
    if (w->last_heavy) /* take_group's verdict on this group */
        atomic_fetch_add(&w->heavy_done, 1);
    uint64_t heavy_done = atomic_load(&w->heavy_done);
    atomic_store(&w->healthy, !fault && !job_fault);
    cache_trim(w);
    atomic_store(&w->m->cached_bytes, w->cached);
    engine_req *list = w->release;
    w->release = NULL;
    for (j = list; j; j = next) {
        next = j->next_done_;
        if (!fault && j->rc == OPTD_E_INTERNAL) {
            /* A part that failed inconsistently (a session row without its
             * state) rolled back alone; as before, its client may retry. */
            j->rc = OPTD_E_UNAVAILABLE;
        }
        if (fault) {
            j->rc = rc == OPTD_E_NOMEM || j->rc == OPTD_E_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
            j->msg[0] = '\0';
        }
        if (fault || j->rc)
            drop_results(j, fault); /* a part rolled back: nothing of it is replied */
        if (j->type == ENGINE_REQ_STEP && j->light_) {
            uint64_t waited = heavy_done - j->heavy_seen_;
            atomic_fetch_add(&w->m->heavy_waits[waited < 3 ? waited : 3], 1);
        }
        complete(j);
    }
}

/* The cached session named name, not moved in the LRU; NULL when absent. */
static const sess *cache_peek(const engine *w, const char *name)
{
    for (const sess *s = w->bucket[hash(name)]; s; s = s->hnext)
        if (strcmp(s->name, name) == 0)
            return s;
    return NULL;
}

/* About the bytes job j writes: its session's state, and a keyed step's
 * saved reply. A session not in the cache counts as large as its size
 * allows. */
static size_t job_bytes(const engine *w, const engine_req *j)
{
    const sess *s;
    size_t vec;
    switch (j->type) {
    case ENGINE_REQ_CREATE:
    case ENGINE_REQ_PUT_STATE: {
        const sess *ns = ((const engine_create_req *)j)->newsess;
        return ns ? ns->blob_len : 0;
    }
    case ENGINE_REQ_FORK:
        s = cache_peek(w, ((const engine_fork_req *)j)->from);
        return s ? s->blob_len : 0;
    case ENGINE_REQ_PATCH:
        s = cache_peek(w, j->name);
        return s ? s->blob_len : 0;
    case ENGINE_REQ_DELETE:
        return 0;
    case ENGINE_REQ_STEP: {
        const sreq *sj = (const sreq *)j;
        s = cache_peek(w, j->name);
        vec = sj->size * optim_elem_size(sj->dtype);
        return (s ? s->blob_len : vec * (1 + OPTIM_MAX_BUFFERS)) + (sj->idem_key ? vec : 0);
    }
    }
    return 0;
}

static const char *fork_from(const engine_req *j) { return ((const engine_fork_req *)j)->from; }

/* A set of session names (of the jobs left for a later group): a bitmap of
 * their hashes, checked exactly against the list of left jobs on a hit. */
typedef struct name_set {
    unsigned char bits[BUCKETS / 8];
} name_set;

static void name_set_add(name_set *ns, const char *name)
{
    unsigned h = hash(name);
    ns->bits[h / 8] |= (unsigned char)(1u << (h % 8));
}

static int is_left(const name_set *ns, const engine_req *left, const char *name)
{
    unsigned h = hash(name);
    if (!(ns->bits[h / 8] & (1u << (h % 8))))
        return 0;
    for (const engine_req *j = left; j; j = j->next_)
        if (strcmp(j->name, name) == 0 || (j->type == ENGINE_REQ_FORK && strcmp(fork_from(j), name) == 0))
            return 1;
    return 0;
}

/* Whether a job of list names a session that j names too (as the session
 * or a fork's source): then they must keep their order. */
static int shares_session(const engine_req *list, const engine_req *j)
{
    for (const engine_req *x = list; x; x = x->next_) {
        if (strcmp(x->name, j->name) == 0 || (j->type == ENGINE_REQ_FORK && strcmp(x->name, fork_from(j)) == 0) ||
            (x->type == ENGINE_REQ_FORK && strcmp(fork_from(x), j->name) == 0))
            return 1;
    }
    return 0;
}

/* Takes the next group off the queue (mu held): in arrival order, the jobs
 * that fit in GROUP_BYTES, and one heavy job unless the last group had one;
 * the rest stay queued, in order, for the next group. A job whose session
 * (or fork source) has a job left behind stays too, so each session's jobs
 * keep their order. When nothing fits, the first job goes alone. */
static engine_req *take_group(engine *w)
{
    name_set left_names = {{0}};
    engine_req *group = NULL, *gtail = NULL, *left = NULL, *ltail = NULL;
    size_t light = 0;
    int heavy = 0;
    for (engine_req *j = w->head, *next; j; j = next) {
        next = j->next_;
        j->next_ = NULL;
        size_t e = job_bytes(w, j);
        j->light_ = e <= GROUP_BYTES;
        int take = !is_left(&left_names, left, j->name) &&
                   !(j->type == ENGINE_REQ_FORK && is_left(&left_names, left, fork_from(j)));
        if (take && e <= GROUP_BYTES)
            take = light + e <= GROUP_BYTES;
        else if (take)
            take = !heavy && !w->last_heavy;
        if (take && e > GROUP_BYTES && !shares_session(group, j)) {
            /* First in its group, where it needs no savepoint (begin_part). */
            j->next_ = group;
            group = j;
            gtail = gtail ? gtail : j;
            heavy = 1;
        } else if (take) {
            *(gtail ? &gtail->next_ : &group) = j;
            gtail = j;
            if (e <= GROUP_BYTES)
                light += e;
            else
                heavy = 1;
        } else {
            *(ltail ? &ltail->next_ : &left) = j;
            ltail = j;
            name_set_add(&left_names, j->name);
            if (j->type == ENGINE_REQ_FORK)
                name_set_add(&left_names, fork_from(j));
        }
    }
    if (!group && left) { /* only heavy jobs wait, after a heavy group */
        group = left;
        left = left->next_;
        group->next_ = NULL;
        heavy = 1;
        if (!left)
            ltail = NULL;
    }
    w->head = left;
    w->tail = ltail;
    w->last_heavy = heavy;
    if (group) {
        size_t bytes = 0;
        for (const engine_req *j = group; j; j = j->next_)
            bytes += job_bytes(w, j);
        engine_stats_group_bytes(w->m, bytes);
    }
    return group;
}

/* The earliest round deadline or probe for hung-up contributors, or 0
 * when no round is open. */
static uint64_t next_deadline(engine *w)
{
    uint64_t dl = 0;
    for (wround *r = w->rounds.next; r != &w->rounds; r = r->next)
        if (!dl || r->deadline_us < dl)
            dl = r->deadline_us;
    if (dl && w->probe_at < dl)
        dl = w->probe_at ? w->probe_at : 1; /* 0 would mean no round */
    return dl;
}

static void *writer_main(void *arg)
{
    engine *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->head && !w->stopping) {
            uint64_t dl = next_deadline(w), now = optd_mono_us();
            if (!dl) {
                pthread_cond_wait(&w->cv, &w->mu);
                continue;
            }
            if (dl <= now)
                break;
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            uint64_t ns = (uint64_t)ts.tv_nsec + (dl - now) * 1000u;
            ts.tv_sec += (time_t)(ns / 1000000000u);
            ts.tv_nsec = (long)(ns % 1000000000u);
            pthread_cond_timedwait(&w->cv, &w->mu, &ts);
        }
        if (!w->head && w->stopping)
            break;
        engine_req *group = take_group(w);
        pthread_mutex_unlock(&w->mu);
        if (group || any_expired(w, optd_mono_us()))
            run_group(w, group);
        if (w->rounds.next != &w->rounds && optd_mono_us() >= w->probe_at) {
            rounds_probe(w);
            w->probe_at = optd_mono_us() + PROBE_US;
        }
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    /* Rounds still open cannot finish now. */
    while (w->rounds.next != &w->rounds)
        round_fail(w, w->rounds.next->s, OPTD_E_UNAVAILABLE, "the server is shutting down; retry");
    return NULL;
}

optd_err engine_start(const engine_options *opt, engine **out)
{
    engine *w = calloc(1, sizeof *w);
    pthread_condattr_t ca;
    if (!w)
        return OPTD_E_NOMEM;
    w->st = opt->st;
    w->m = opt->stats;
    w->codec = opt->codec;
    w->idem_window = opt->idem_window;
    w->history_steps = opt->history_steps;
    w->cache_bytes = opt->cache_bytes;
    w->max_session_bytes = opt->max_session_bytes;
    w->max_parked = opt->max_parked;
    w->fault = opt->fault;
    w->fault_ctx = opt->fault_ctx;
    w->lru.lru_next = w->lru.lru_prev = &w->lru;
    w->rounds.next = w->rounds.prev = &w->rounds;
    atomic_store(&w->healthy, 1);
    pthread_mutex_init(&w->mu, NULL);
    pthread_mutex_init(&w->known_mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&w->thread, NULL, writer_main, w) != 0) {
        pthread_mutex_destroy(&w->known_mu);
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        free(w);
        return OPTD_E_UNAVAILABLE;
    }
    /* Named so that tests and operators can find its CPU time in /proc. */
    (void)pthread_setname_np(w->thread, "optd-writer");
    *out = w;
    return OPTD_OK;
}

int engine_healthy(engine *w) { return atomic_load(&w->healthy); }

unsigned engine_parked(engine *w) { return atomic_load(&w->parked); }

uint64_t engine_withdrawn(engine *w) { return atomic_load(&w->withdrawn); }

optd_err engine_submit(engine *w, engine_req *j)
{
    optd_err rc = OPTD_OK;
    j->next_ = NULL;
    j->heavy_seen_ = atomic_load(&w->heavy_done);
    pthread_mutex_lock(&w->mu);
    if (w->stopping) {
        rc = OPTD_E_UNAVAILABLE;
    } else {
        if (w->tail)
            w->tail->next_ = j;
        else
            w->head = j;
        w->tail = j;
        pthread_cond_signal(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return rc;
}

void engine_stop(engine *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    int joined = w->stopping;
    w->stopping = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    if (!joined)
        pthread_join(w->thread, NULL);
}

void engine_free(engine *w)
{
    if (!w)
        return;
    engine_stop(w);
    while (w->lru.lru_next != &w->lru)
        cache_drop(w, w->lru.lru_next);
    pthread_mutex_destroy(&w->known_mu);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w);
}
