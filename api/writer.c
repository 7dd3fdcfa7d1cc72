/* The writer: the one thread that changes the database. Request threads
 * queue jobs; the writer takes every job queued so far, applies them in
 * arrival order inside one transaction (so steps of one session are applied
 * one at a time, in order), commits once for the whole group, and only then
 * completes the jobs, whose replies are therefore always durable. Sessions
 * stay in a bounded in-memory cache so a step costs no read of its state. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/internal.h"

#define BUCKETS 4096
/* Steps whose saved reply is kept for an idempotent replay, per session, in
 * bytes: older keys still block a second application but replay the step
 * number only. */
#define REPLY_BUDGET ((size_t)16 << 20)

struct writer {
    store *st;
    metrics *m;
    uint64_t idem_window;
    size_t cache_bytes, cached;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job *head, *tail; /* queue, guarded by mu */
    int stopping;     /* guarded by mu */
    sess *bucket[BUCKETS];
    sess lru; /* sentinel: lru.lru_next is the most recently used */
};

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

static void lru_front(writer *w, sess *s)
{
    s->lru_next = w->lru.lru_next;
    s->lru_prev = &w->lru;
    w->lru.lru_next->lru_prev = s;
    w->lru.lru_next = s;
}

static sess *cache_get(writer *w, const char *name)
{
    for (sess *s = w->bucket[hash(name)]; s; s = s->hnext) {
        if (strcmp(s->row.name, name) == 0) {
            lru_unlink(s);
            lru_front(w, s);
            return s;
        }
    }
    return NULL;
}

static void cache_put(writer *w, sess *s)
{
    unsigned h = hash(s->row.name);
    s->hnext = w->bucket[h];
    w->bucket[h] = s;
    lru_front(w, s);
    w->cached += s->blob_len;
}

static void cache_drop(writer *w, sess *s)
{
    sess **pp = &w->bucket[hash(s->row.name)];
    while (*pp != s)
        pp = &(*pp)->hnext;
    *pp = s->hnext;
    lru_unlink(s);
    w->cached -= s->blob_len;
    sess_free(s);
}

/* Evicts least recently used sessions past the budget (never one touched by
 * the group in progress). */
static void cache_trim(writer *w)
{
    sess *s = w->lru.lru_prev;
    while (w->cached > w->cache_bytes && s != &w->lru) {
        sess *prev = s->lru_prev;
        if (!s->touched)
            cache_drop(w, s);
        s = prev;
    }
}

/* The cached session named name, loading it when absent. */
static optd_err lookup(writer *w, const char *name, sess **out)
{
    store_session row = {0};
    void *blob = NULL;
    size_t len = 0;
    *out = cache_get(w, name);
    if (*out)
        return OPTD_OK;
    optd_err rc = store_session_load(w->st, name, &row, &blob, &len);
    if (rc == OPTD_OK)
        rc = sess_from_store(&row, blob, len, out);
    if (rc == OPTD_OK) {
        cache_put(w, *out);
    } else {
        store_session_clear(&row);
        free(blob);
    }
    return rc;
}

static void touch(sess *s, int64_t ms)
{
    s->touched = 1;
    s->row.updated_ms = ms;
}

static optd_err run_create(writer *w, job *j)
{
    sess *s = j->newsess, *old;
    optd_err rc = OPTD_OK;
    if (j->kind == JOB_PUT_STATE) {
        rc = lookup(w, j->name, &old);
        if (rc == OPTD_OK) {
            s->row.created_ms = old->row.created_ms;
            rc = store_session_delete(w->st, j->name);
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
    rc = store_session_insert(w->st, &s->row, s->blob, s->blob_len);
    if (rc)
        return rc;
    j->newsess = NULL;
    cache_put(w, s);
    touch(s, s->row.updated_ms);
    sess_to_json(&j->out_json, &s->row);
    return OPTD_OK;
}

static optd_err run_patch(writer *w, job *j)
{
    sess *s;
    optim_hparams hp;
    optd_err rc = lookup(w, j->name, &s);
    if (rc)
        return rc;
    hp = s->hp;
    rc = hparams_from_json(s->info, j->patch, &hp, j->msg, sizeof j->msg);
    if (rc)
        return rc;
    size_t before = s->blob_len;
    rc = sess_set_hparams(s, &hp);
    if (rc)
        return rc;
    w->cached += s->blob_len - before;
    touch(s, now_ms());
    rc = store_session_update(w->st, &s->row, before != s->blob_len ? s->blob : NULL, s->blob_len);
    sess_to_json(&j->out_json, &s->row);
    return rc;
}

static optd_err run_delete(writer *w, job *j)
{
    sess *s = cache_get(w, j->name);
    optd_err rc = store_session_delete(w->st, j->name);
    if (rc == OPTD_OK && s)
        cache_drop(w, s);
    return rc;
}

static optd_err copy_out(job *j, const void *p, size_t len)
{
    j->out_params = malloc(len ? len : 1);
    if (!j->out_params)
        return OPTD_E_NOMEM;
    memcpy(j->out_params, p, len);
    j->out_len = len;
    return OPTD_OK;
}

static optd_err run_step(writer *w, job *j)
{
    sess *s;
    optd_err rc = lookup(w, j->name, &s);
    if (rc)
        return rc;
    size_t vec = s->n * optim_elem_size(s->dtype);
    if (s->dtype != j->dtype || s->n != j->size) {
        snprintf(j->msg, sizeof j->msg, "the session now has %zu %s elements", s->n,
                 s->dtype == OPTIM_F64 ? "float64" : "float32");
        return OPTD_E_SIZE_MISMATCH;
    }
    if (j->idem_key) {
        store_idem rec = {0};
        rc = store_idem_get(w->st, s->row.id, j->idem_key, &rec);
        if (rc == OPTD_OK) {
            j->step = rec.step;
            j->replayed = true;
            if (rec.digest != j->digest) {
                rc = OPTD_E_IDEMPOTENCY_MISMATCH;
                snprintf(j->msg, sizeof j->msg, "Idempotency-Key was used for step %llu with another gradient",
                         (unsigned long long)rec.step);
            } else if (j->want_params && rec.reply) {
                j->out_params = rec.reply;
                j->out_len = rec.reply_len;
                rec.reply = NULL;
            }
            free(rec.reply);
            return rc;
        }
        if (rc != OPTD_E_NOT_FOUND)
            return rc;
    }
    if (j->if_match >= 0 && (uint64_t)j->if_match != s->row.step) {
        j->step = s->row.step;
        snprintf(j->msg, sizeof j->msg, "If-Match names step %lld but the session is at step %llu",
                 (long long)j->if_match, (unsigned long long)s->row.step);
        return OPTD_E_STEP_MISMATCH;
    }
    optim_step(s->info, &s->hp, s->dtype, s->n, &s->st, j->grad);
    sess_pack(s);
    s->row.step = s->st.step;
    touch(s, now_ms());
    j->step = s->row.step;
    rc = store_session_update(w->st, &s->row, s->blob, s->blob_len);
    if (rc == OPTD_OK && j->idem_key) {
        uint64_t keep = vec ? REPLY_BUDGET / vec : w->idem_window;
        if (keep < 1)
            keep = 1;
        rc = store_idem_put(w->st, s->row.id, j->idem_key, s->row.step, j->digest, s->st.params, vec,
                            w->idem_window, keep);
    }
    if (rc == OPTD_OK && j->want_params)
        rc = copy_out(j, s->st.params, vec);
    if (rc == OPTD_OK)
        atomic_fetch_add(&w->m->steps[s->info->kind], 1);
    return rc;
}

static optd_err run(writer *w, job *j)
{
    switch (j->kind) {
    case JOB_CREATE:
    case JOB_PUT_STATE:
        return run_create(w, j);
    case JOB_PATCH:
        return run_patch(w, j);
    case JOB_DELETE:
        return run_delete(w, j);
    case JOB_STEP:
        return run_step(w, j);
    }
    return OPTD_E_INTERNAL;
}

/* Whether rc is a storage failure that poisons the whole transaction (as
 * opposed to a refusal that wrote nothing). */
static int is_fault(optd_err rc) { return rc == OPTD_E_UNAVAILABLE || rc == OPTD_E_NOMEM || rc == OPTD_E_INTERNAL; }

/* Applies one group of jobs in one transaction and completes them. */
static void run_group(writer *w, job *group)
{
    optd_err rc = store_begin(w->st);
    int fault = rc != OPTD_OK;
    for (job *j = group; j && !fault; j = j->next) {
        j->rc = run(w, j);
        fault = is_fault(j->rc);
    }
    if (!fault) {
        uint64_t t0 = mono_us();
        rc = store_commit(w->st);
        histogram_observe(&w->m->commit_latency, mono_us() - t0);
        atomic_fetch_add(&w->m->commits, 1);
        fault = rc != OPTD_OK;
    } else if (rc == OPTD_OK) {
        store_rollback(w->st);
    }
    /* After a failed transaction nothing of the group happened: forget the
     * cached sessions it changed (they reload from the database) and fail
     * every job, all of which are safe to retry. */
    for (sess *s = w->lru.lru_next; s != &w->lru;) {
        sess *next = s->lru_next;
        if (s->touched && fault)
            cache_drop(w, s);
        else
            s->touched = 0;
        s = next;
    }
    if (fault)
        atomic_fetch_add(&w->m->commit_failures, 1);
    cache_trim(w);
    for (job *j = group, *next; j; j = next) {
        next = j->next;
        if (fault) {
            j->rc = rc == OPTD_E_NOMEM || j->rc == OPTD_E_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
            j->replayed = false;
            free(j->out_params);
            j->out_params = NULL;
            sbuf_free(&j->out_json);
        }
        j->on_done(j, j->done_ctx);
    }
}

static void *writer_main(void *arg)
{
    writer *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->head && !w->stopping)
            pthread_cond_wait(&w->cv, &w->mu);
        if (!w->head)
            break;
        job *group = w->head;
        w->head = w->tail = NULL;
        pthread_mutex_unlock(&w->mu);
        run_group(w, group);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

optd_err writer_start(store *st, metrics *m, uint64_t idem_window, size_t cache_bytes, writer **out)
{
    writer *w = calloc(1, sizeof *w);
    if (!w)
        return OPTD_E_NOMEM;
    w->st = st;
    w->m = m;
    w->idem_window = idem_window;
    w->cache_bytes = cache_bytes;
    w->lru.lru_next = w->lru.lru_prev = &w->lru;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    if (pthread_create(&w->thread, NULL, writer_main, w) != 0) {
        pthread_mutex_destroy(&w->mu);
        pthread_cond_destroy(&w->cv);
        free(w);
        return OPTD_E_UNAVAILABLE;
    }
    *out = w;
    return OPTD_OK;
}

optd_err writer_submit(writer *w, job *j)
{
    optd_err rc = OPTD_OK;
    j->next = NULL;
    j->enqueued_us = mono_us();
    pthread_mutex_lock(&w->mu);
    if (w->stopping) {
        rc = OPTD_E_UNAVAILABLE;
    } else {
        if (w->tail)
            w->tail->next = j;
        else
            w->head = j;
        w->tail = j;
        pthread_cond_signal(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return rc;
}

void writer_stop(writer *w)
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

void writer_free(writer *w)
{
    if (!w)
        return;
    writer_stop(w);
    while (w->lru.lru_next != &w->lru)
        cache_drop(w, w->lru.lru_next);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w);
}
