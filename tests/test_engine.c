/* Unit tests of engine/: the writer thread against a temporary store, with no
 * sockets and no JSON. A request's callback runs on the writer thread after
 * its commit; the tests wait for it on a condition variable (bounded, so a
 * hang fails the test rather than the suite). To put several requests in one
 * group, a "gate" request's callback holds the writer until the test has
 * queued them all: take_group then finds them queued together. */
#include <dirent.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine/engine.h"
#include "engine/engineInt.h"

/* ---- allocation failures, in the SQLite way ----------------------------------
 * The test binary links with -Wl,--wrap for malloc, calloc, realloc and
 * strdup, which redirects the calls of every object linked into it (engine/,
 * store/, optim/, common/ and this file; not the shared libraries). While
 * armed, the allocation numbered inj_fail_at fails and the ones after it
 * succeed; a scenario runs again for each number until one run hits no
 * failure, so every allocation on its path has failed once. */
void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
char *__real_strdup(const char *s);
static _Atomic long inj_count, inj_fail_at; /* 0: not armed */
static _Atomic int inj_hit;

static int inj_fail(void)
{
    long at = inj_fail_at;
    if (!at || inj_count++ + 1 != at)
        return 0;
    inj_hit = 1;
    return 1;
}
void *__wrap_malloc(size_t n) { return inj_fail() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t k, size_t n) { return inj_fail() ? NULL : __real_calloc(k, n); }
void *__wrap_realloc(void *p, size_t n) { return inj_fail() ? NULL : __real_realloc(p, n); }
char *__wrap_strdup(const char *s) { return inj_fail() ? NULL : __real_strdup(s); }

static void inj_arm(long at)
{
    inj_count = 0;
    inj_hit = 0;
    inj_fail_at = at;
}

#define WAIT_SECONDS 30 /* a bound on any wait: a hang fails, it does not block the suite */

/* ---- a plain configuration codec (the tests use lr and the round fields) */

static optd_err enc(void *ctx, const optim_info *info, const optim_hparams *hp, const training *tr, char **out)
{
    (void)ctx;
    (void)info;
    char buf[160];
    snprintf(buf, sizeof buf, "%a %u %u %d %a", hp->lr, tr->workers, tr->min_workers, tr->min_workers_follows,
             tr->round_timeout);
    *out = strdup(buf);
    return *out ? OPTD_OK : OPTD_E_NOMEM;
}

static optd_err dec(void *ctx, const optim_info *info, const char *text, optim_hparams *hp, training *tr)
{
    (void)ctx;
    (void)info;
    int follows = 0;
    int got = sscanf(text, "%la %u %u %d %la", &hp->lr, &tr->workers, &tr->min_workers, &follows, &tr->round_timeout);
    tr->min_workers_follows = follows != 0;
    return got == 5 ? OPTD_OK : OPTD_E_INTERNAL;
}

static const engine_codec codec = {.encode = enc, .decode = dec};

/* ---- completion --------------------------------------------------------- */

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
} waiter;

static waiter W = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};

static void on_done(engine_req *r, void *data)
{
    (void)r;
    int *flag = data;
    pthread_mutex_lock(&W.mu);
    *flag = 1;
    pthread_cond_broadcast(&W.cv);
    pthread_mutex_unlock(&W.mu);
}

/* Waits until *flag is set; fails the test past WAIT_SECONDS. */
static void wait_flag(int *flag)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += WAIT_SECONDS;
    pthread_mutex_lock(&W.mu);
    int rc = 0;
    while (!*flag && rc == 0)
        rc = pthread_cond_timedwait(&W.cv, &W.mu, &ts);
    int ok = *flag;
    pthread_mutex_unlock(&W.mu);
    assert_true(ok);
}

/* The gate: a request whose callback blocks the writer until opened. */
typedef struct gate {
    engine_delete_req req;
    int entered, open, done;
} gate;

static void gate_cb(engine_req *r, void *data)
{
    (void)r;
    gate *g = data;
    pthread_mutex_lock(&W.mu);
    g->entered = 1;
    pthread_cond_broadcast(&W.cv);
    while (!g->open)
        pthread_cond_wait(&W.cv, &W.mu);
    g->done = 1;
    pthread_cond_broadcast(&W.cv);
    pthread_mutex_unlock(&W.mu);
}

static void gate_close(engine *e, gate *g)
{
    memset(g, 0, sizeof *g);
    g->req.type = ENGINE_REQ_DELETE;
    snprintf(g->req.name, sizeof g->req.name, "no-such-session");
    g->req.if_match = -1;
    g->req.cb = gate_cb;
    g->req.data = g;
    assert_int_equal(engine_submit(e, (engine_req *)&g->req), OPTD_OK);
    wait_flag(&g->entered);
}

static void gate_open(gate *g)
{
    pthread_mutex_lock(&W.mu);
    g->open = 1;
    pthread_cond_broadcast(&W.cv);
    pthread_mutex_unlock(&W.mu);
    wait_flag(&g->done);
}

/* ---- fixture ------------------------------------------------------------ */

typedef struct fixture {
    char dir[64];
    char path[96];
    store *st;
    engine *e;
    engine_stats stats;
    /* Fault injection: fail the write at point fault_point of session fault_name. */
    int fault_point;
    char fault_name[STORE_NAME_MAX + 1];
} fixture;

static optd_err inject(void *ctx, engine_fault_point p, const char *name)
{
    fixture *f = ctx;
    if ((int)p == f->fault_point && strcmp(name, f->fault_name) == 0)
        return OPTD_E_UNAVAILABLE;
    return OPTD_OK;
}

static void start(fixture *f, size_t cache_bytes)
{
    char err[256];
    assert_int_equal(store_open(f->path, NULL, &f->st, err, sizeof err), OPTD_OK);
    engine_options o = {
        .st = f->st,
        .stats = &f->stats,
        .codec = codec,
        .idem_window = 1000,
        .history_steps = 100,
        .cache_bytes = cache_bytes,
        .max_session_bytes = ENGINE_MAX_SESSION_BYTES,
        .fault = inject,
        .fault_ctx = f,
    };
    assert_int_equal(engine_start(&o, &f->e), OPTD_OK);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    strcpy(f->dir, "/tmp/optd-test-engine-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/optd.db", f->dir);
    f->fault_point = -1;
    start(f, (size_t)1 << 30);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    engine_free(f->e);
    store_close(f->st);
    DIR *d = opendir(f->dir);
    struct dirent *de;
    char p[512];
    while (d && (de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
            snprintf(p, sizeof p, "%s/%s", f->dir, de->d_name);
            unlink(p);
        }
    }
    if (d)
        closedir(d);
    rmdir(f->dir);
    free(f);
    return 0;
}

/* ---- helpers -------------------------------------------------------------- */

typedef struct create {
    engine_create_req req;
    int done;
} create;

/* Queues a request of type (a create or a PUT state) making an sgd session
 * of n float32 params, all 1. */
static void make_submit(fixture *f, create *c, engine_req_type type, const char *name, size_t n, const training *trp)
{
    optim_hparams hp;
    training tr;
    const optim_info *info = optim_find("sgd");
    assert_non_null(info);
    optim_defaults(info, &hp);
    hp.lr = 0.5;
    engine_training_defaults(&tr);
    if (trp)
        tr = *trp;
    memset(c, 0, sizeof *c);
    c->req.type = type;
    snprintf(c->req.name, sizeof c->req.name, "%s", name);
    c->req.if_match = -1;
    c->req.cb = on_done;
    c->req.data = &c->done;
    assert_int_equal(engine_sess_new(&codec, name, info, &hp, &tr, OPTIM_F32, n, NULL, 1.0, &c->req.newsess), OPTD_OK);
    assert_int_equal(engine_submit(f->e, (engine_req *)&c->req), OPTD_OK);
}

static void create_submit(fixture *f, create *c, const char *name, size_t n, const training *trp)
{
    make_submit(f, c, ENGINE_REQ_CREATE, name, n, trp);
}

static void create_finish(create *c)
{
    wait_flag(&c->done);
    assert_int_equal(c->req.rc, OPTD_OK);
    store_session_clear(&c->req.row);
}

static void create_one(fixture *f, const char *name, size_t n, const training *tr)
{
    create c;
    create_submit(f, &c, name, n, tr);
    create_finish(&c);
}

typedef struct step {
    engine_step_req req;
    float grad[64];
    int done;
} step;

/* Fills a step of session name with n elements of gradient g; key may be
 * NULL. The caller may set more fields, then queues it (step_queue). */
static void step_fill(step *s, const char *name, size_t n, float g, const char *key)
{
    memset(s, 0, sizeof *s);
    assert_true(n <= 64);
    for (size_t i = 0; i < n; i++)
        s->grad[i] = g;
    s->req.type = ENGINE_REQ_STEP;
    snprintf(s->req.name, sizeof s->req.name, "%s", name);
    s->req.if_match = -1;
    s->req.grad = s->grad;
    s->req.weight = 1;
    s->req.dtype = OPTIM_F32;
    s->req.size = n;
    s->req.idem_key = key;
    s->req.digest = key ? optim_elem_size(OPTIM_F32) * n + (uint64_t)(g * 1000) : 0;
    s->req.want_params = true;
    s->req.cb = on_done;
    s->req.data = &s->done;
}

static void step_queue(fixture *f, step *s)
{
    assert_int_equal(engine_submit(f->e, (engine_req *)&s->req), OPTD_OK);
}

/* Queues a step of session name with n elements of gradient g; key may be NULL. */
static void step_submit(fixture *f, step *s, const char *name, size_t n, float g, const char *key)
{
    step_fill(s, name, n, g, key);
    step_queue(f, s);
}

static void step_clear(step *s)
{
    free(s->req.out_params);
    s->req.out_params = NULL;
}

/* The committed step and first param of session name. */
static void committed(fixture *f, const char *name, uint64_t *step_out, float *p0)
{
    sess *s = NULL;
    assert_int_equal(engine_sess_read(f->st, &codec, name, &s), OPTD_OK);
    *step_out = s->st.step;
    *p0 = ((float *)s->st.params)[0];
    engine_sess_free(s);
}

/* Asserts the committed step and first param of session name. */
static void assert_committed(fixture *f, const char *name, uint64_t want_step, float want_p0)
{
    uint64_t st;
    float p0;
    committed(f, name, &st, &p0);
    assert_int_equal(st, want_step);
    assert_float_equal(p0, want_p0, 0);
}

/* Creates session name of n elements taking rounds of workers (min_workers
 * and round_timeout in seconds as given; 0 leaves the default). */
static void create_round(fixture *f, const char *name, size_t n, uint32_t workers, uint32_t min_workers,
                         double round_timeout)
{
    training tr;
    engine_training_defaults(&tr);
    tr.workers = workers;
    tr.min_workers = min_workers ? min_workers : workers;
    tr.min_workers_follows = min_workers == 0;
    if (round_timeout > 0)
        tr.round_timeout = round_timeout;
    create_one(f, name, n, &tr);
}

/* ---- tests ------------------------------------------------------------------ */

/* Fifty creates and fifty steps queued together commit as one group each. */
static void test_many_sessions_commit_in_one_group(void **state)
{
    fixture *f = *state;
    enum { N = 50 };
    static create c[N];
    static step s[N];
    char name[32];
    gate g;
    gate_close(f->e, &g);
    uint64_t commits = atomic_load(&f->stats.commits);
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "s%d", i);
        create_submit(f, &c[i], name, 4, NULL);
    }
    gate_open(&g);
    for (int i = 0; i < N; i++)
        create_finish(&c[i]);
    /* The gate's group has committed already: one more for the fifty. */
    assert_int_equal(atomic_load(&f->stats.commits) - commits, 1);

    gate_close(f->e, &g);
    commits = atomic_load(&f->stats.commits);
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "s%d", i);
        step_submit(f, &s[i], name, 4, 1.0f, NULL);
    }
    gate_open(&g);
    for (int i = 0; i < N; i++) {
        wait_flag(&s[i].done);
        assert_int_equal(s[i].req.rc, OPTD_OK);
        assert_int_equal(s[i].req.step, 1);
        assert_float_equal(((float *)s[i].req.out_params)[0], 0.5f, 0);
        step_clear(&s[i]);
    }
    assert_int_equal(atomic_load(&f->stats.commits) - commits, 1);
    assert_committed(f, "s49", 1, 0.5f);
}

/* Three workers: the round applies the mean once the third contribution arrives. */
static void test_round_applies_when_it_fills(void **state)
{
    fixture *f = *state;
    create_round(f, "r", 2, 3, 0, 0);
    step a, b, c;
    step_submit(f, &a, "r", 2, 1.0f, NULL);
    step_submit(f, &b, "r", 2, 2.0f, NULL);
    step_submit(f, &c, "r", 2, 3.0f, NULL);
    step *all[] = {&a, &b, &c};
    for (int i = 0; i < 3; i++) {
        wait_flag(&all[i]->done);
        assert_int_equal(all[i]->req.rc, OPTD_OK);
        assert_int_equal(all[i]->req.step, 1);
        assert_int_equal(all[i]->req.contributors, 3);
        /* 1 - 0.5 * mean(1, 2, 3) */
        assert_float_equal(((float *)all[i]->req.out_params)[0], 0.0f, 0);
        step_clear(all[i]);
    }
    assert_int_equal(engine_parked(f->e), 0);
}

/* A round whose step would overflow is refused, and the lr its
 * contributions set (written before the step ran) is not kept either:
 * the waiters are told nothing changed. */
static void test_an_overflowing_round_keeps_nothing_of_its_lr(void **state)
{
    fixture *f = *state;
    create_round(f, "o", 2, 2, 0, 0);
    const double lr = 1e30;
    step a, b;
    step *all[] = {&a, &b};
    for (int i = 0; i < 2; i++) {
        step_fill(all[i], "o", 2, 1e10f, NULL); /* 1 - 1e30 * 1e10 is no float32 */
        all[i]->req.lr_set = &lr;
        all[i]->req.n_lr = 1;
        step_queue(f, all[i]);
    }
    for (int i = 0; i < 2; i++) {
        wait_flag(&all[i]->done);
        assert_int_equal(all[i]->req.rc, OPTD_E_NON_FINITE);
        assert_null(all[i]->req.out_params);
    }
    sess *s = NULL;
    assert_int_equal(engine_sess_read(f->st, &codec, "o", &s), OPTD_OK);
    assert_int_equal(s->st.step, 0);
    assert_float_equal(s->hp.lr, 0.5, 0);
    engine_sess_free(s);
    /* And the next round runs with the session's own lr. */
    step_submit(f, &a, "o", 2, 1.0f, NULL);
    step_submit(f, &b, "o", 2, 1.0f, NULL);
    wait_flag(&a.done);
    wait_flag(&b.done);
    assert_int_equal(a.req.rc, OPTD_OK);
    assert_float_equal(((float *)a.req.out_params)[0], 0.5f, 0);
    step_clear(&a);
    step_clear(&b);
}

/* Past round_timeout a round with min_workers contributions applies them. */
static void test_round_times_out_with_min_workers(void **state)
{
    fixture *f = *state;
    create_round(f, "t", 2, 3, 2, 0.05);
    step a, b;
    step_submit(f, &a, "t", 2, 1.0f, NULL);
    step_submit(f, &b, "t", 2, 3.0f, NULL);
    wait_flag(&a.done);
    wait_flag(&b.done);
    assert_int_equal(a.req.rc, OPTD_OK);
    assert_int_equal(a.req.contributors, 2);
    assert_int_equal(b.req.step, 1);
    assert_float_equal(((float *)b.req.out_params)[0], 0.0f, 0); /* 1 - 0.5 * 2 */
    step_clear(&a);
    step_clear(&b);
}

/* Below min_workers at the timeout the round fails and nothing changes. */
static void test_round_below_min_workers_fails_at_timeout(void **state)
{
    fixture *f = *state;
    create_round(f, "u", 2, 3, 2, 0.05);
    step a;
    step_submit(f, &a, "u", 2, 1.0f, NULL);
    wait_flag(&a.done);
    assert_int_equal(a.req.rc, OPTD_E_ROUND_TIMEOUT);
    assert_null(a.req.out_params);
    assert_committed(f, "u", 0, 1.0f);
}

/* A retry with the same key takes the waiting contribution's place: the
 * first is answered superseded, the round counts the retry once. */
static void test_round_retry_replaces_the_waiting_contribution(void **state)
{
    fixture *f = *state;
    create_round(f, "k", 2, 2, 0, 0);
    step first, retry, other;
    gate g;
    step_submit(f, &first, "k", 2, 2.0f, "key-1");
    gate_close(f->e, &g); /* first is parked once the gate's group runs */
    gate_open(&g);
    assert_int_equal(engine_parked(f->e), 1);
    step_submit(f, &retry, "k", 2, 2.0f, "key-1");
    wait_flag(&first.done);
    assert_int_equal(first.req.rc, OPTD_E_SUPERSEDED);
    assert_int_equal(engine_parked(f->e), 1);
    step_submit(f, &other, "k", 2, 4.0f, "key-2");
    wait_flag(&retry.done);
    wait_flag(&other.done);
    assert_int_equal(retry.req.rc, OPTD_OK);
    assert_int_equal(retry.req.contributors, 2);
    assert_int_equal(other.req.step, 1);
    assert_float_equal(((float *)retry.req.out_params)[0], -0.5f, 0); /* 1 - 0.5 * 3 */
    step_clear(&first);
    step_clear(&retry);
    step_clear(&other);
}

/* The same key and gradient again replays the first reply; nothing applies twice. */
static void test_idempotent_replay_applies_once(void **state)
{
    fixture *f = *state;
    create_one(f, "i", 3, NULL);
    step a, b;
    step_submit(f, &a, "i", 3, 1.0f, "once");
    wait_flag(&a.done);
    assert_int_equal(a.req.rc, OPTD_OK);
    assert_false(a.req.replayed);
    step_submit(f, &b, "i", 3, 1.0f, "once");
    wait_flag(&b.done);
    assert_int_equal(b.req.rc, OPTD_OK);
    assert_true(b.req.replayed);
    assert_int_equal(b.req.step, 1);
    assert_int_equal(b.req.out_len, 3 * sizeof(float));
    assert_memory_equal(a.req.out_params, b.req.out_params, 3 * sizeof(float));
    assert_committed(f, "i", 1, 0.5f);
    step_clear(&a);
    step_clear(&b);
}

/* A write that fails inside a group rolls back its request alone: the other
 * sessions of the group commit, the failed one keeps its state in memory and
 * on disk, and its next step starts from there. */
static void test_failed_write_rolls_back_only_its_request(void **state)
{
    fixture *f = *state;
    create_one(f, "a", 2, NULL);
    create_one(f, "b", 2, NULL);
    create_one(f, "c", 2, NULL);
    f->fault_point = ENGINE_FAULT_STEP;
    snprintf(f->fault_name, sizeof f->fault_name, "b");
    for (int round = 0; round < 2; round++) {
        /* Round 0: b fails first in its group (no savepoint yet); round 1: b
         * fails after a has succeeded (its savepoint rolls back). */
        step sa, sb, sc;
        gate g;
        gate_close(f->e, &g);
        uint64_t commits = atomic_load(&f->stats.commits);
        if (round == 0) {
            step_submit(f, &sb, "b", 2, 1.0f, NULL);
            step_submit(f, &sa, "a", 2, 1.0f, NULL);
        } else {
            step_submit(f, &sa, "a", 2, 1.0f, NULL);
            step_submit(f, &sb, "b", 2, 1.0f, NULL);
        }
        step_submit(f, &sc, "c", 2, 1.0f, NULL);
        gate_open(&g);
        wait_flag(&sa.done);
        wait_flag(&sb.done);
        wait_flag(&sc.done);
        assert_int_equal(atomic_load(&f->stats.commits) - commits, 1);
        assert_int_equal(sa.req.rc, OPTD_OK);
        assert_int_equal(sc.req.rc, OPTD_OK);
        assert_int_equal(sb.req.rc, OPTD_E_UNAVAILABLE);
        assert_null(sb.req.out_params);
        assert_int_equal(sa.req.step, (uint64_t)round + 1);
        step_clear(&sa);
        step_clear(&sb);
        step_clear(&sc);
        uint64_t st;
        float p0;
        committed(f, "b", &st, &p0);
        assert_int_equal(st, 0);
        assert_float_equal(p0, 1.0f, 0);
        committed(f, "c", &st, &p0);
        assert_int_equal(st, (uint64_t)round + 1);
    }
    /* A write failed: the storage is not known to work (/readyz asks the
     * store) until a group commits again. */
    assert_false(engine_healthy(f->e));
    f->fault_point = -1;
    step sb;
    step_submit(f, &sb, "b", 2, 1.0f, NULL);
    wait_flag(&sb.done);
    assert_int_equal(sb.req.rc, OPTD_OK);
    assert_true(engine_healthy(f->e));
    assert_int_equal(sb.req.step, 1);
    assert_float_equal(((float *)sb.req.out_params)[0], 0.5f, 0);
    step_clear(&sb);
}

/* Steps of cached sessions run without savepoints. When one fails having
 * written, the group rolls back and runs again from its first job, each
 * after the first with a savepoint: the others' replies and the database
 * hold one run of them, the step counter counts each once, the group
 * commits once, and a key given in the first run replays afterwards. A
 * refusal that writes nothing (If-Match) runs nothing again. */
static void test_a_step_failing_after_writing_reruns_its_group_once(void **state)
{
    fixture *f = *state;
    const int sgd = optim_find("sgd")->kind;
    create_one(f, "x", 2, NULL);
    create_one(f, "y", 2, NULL);
    create_one(f, "z", 2, NULL);
    f->fault_point = ENGINE_FAULT_STEP;
    snprintf(f->fault_name, sizeof f->fault_name, "z");
    step s[5];
    gate g;
    gate_close(f->e, &g); /* its own group has committed */
    uint64_t commits = atomic_load(&f->stats.commits), reruns = atomic_load(&f->stats.group_reruns),
             steps = atomic_load(&f->stats.steps[sgd]);
    step_submit(f, &s[0], "x", 2, 1.0f, NULL);
    step_submit(f, &s[1], "y", 2, 1.0f, NULL);
    step_submit(f, &s[2], "x", 2, 1.0f, "k");
    step_submit(f, &s[3], "z", 2, 1.0f, NULL);
    step_submit(f, &s[4], "y", 2, 0.5f, NULL);
    gate_open(&g);
    const float want[5] = {0.5f, 0.5f, 0.0f, 1.0f, 0.25f}; /* sgd, lr 0.5, from 1 */
    const uint64_t want_step[5] = {1, 1, 2, 0, 2};
    for (int i = 0; i < 5; i++) {
        wait_flag(&s[i].done);
        if (i == 3) {
            assert_int_equal(s[i].req.rc, OPTD_E_UNAVAILABLE);
            assert_null(s[i].req.out_params);
        } else {
            assert_int_equal(s[i].req.rc, OPTD_OK);
            assert_false(s[i].req.replayed);
            assert_int_equal(s[i].req.step, want_step[i]);
            assert_float_equal(((float *)s[i].req.out_params)[1], want[i], 0);
        }
    }
    assert_int_equal(atomic_load(&f->stats.commits) - commits, 1);
    assert_int_equal(atomic_load(&f->stats.group_reruns) - reruns, 1);
    assert_int_equal(atomic_load(&f->stats.steps[sgd]) - steps, 4);
    assert_committed(f, "x", 2, 0.0f);
    assert_committed(f, "y", 2, 0.25f);
    assert_committed(f, "z", 0, 1.0f);
    float x2 = ((float *)s[2].req.out_params)[0];
    for (int i = 0; i < 5; i++)
        step_clear(&s[i]);

    /* The key of the first run's step 2 of x replays, once. */
    f->fault_point = -1;
    step_submit(f, &s[0], "x", 2, 1.0f, "k");
    wait_flag(&s[0].done);
    assert_int_equal(s[0].req.rc, OPTD_OK);
    assert_true(s[0].req.replayed);
    assert_int_equal(s[0].req.step, 2);
    assert_float_equal(((float *)s[0].req.out_params)[0], x2, 0);
    step_clear(&s[0]);

    /* A refusal found before writing fails alone, with no second run. */
    gate_close(f->e, &g);
    reruns = atomic_load(&f->stats.group_reruns);
    commits = atomic_load(&f->stats.commits);
    step_submit(f, &s[0], "x", 2, 1.0f, NULL);
    step_fill(&s[1], "z", 2, 1.0f, NULL);
    s[1].req.if_match = 5;
    step_queue(f, &s[1]);
    step_submit(f, &s[2], "y", 2, 1.0f, NULL);
    gate_open(&g);
    for (int i = 0; i < 3; i++)
        wait_flag(&s[i].done);
    assert_int_equal(s[0].req.rc, OPTD_OK);
    assert_int_equal(s[1].req.rc, OPTD_E_STEP_MISMATCH);
    assert_int_equal(s[2].req.rc, OPTD_OK);
    assert_int_equal(atomic_load(&f->stats.group_reruns) - reruns, 0);
    assert_int_equal(atomic_load(&f->stats.commits) - commits, 1);
    assert_committed(f, "x", 3, -0.5f);
    assert_committed(f, "z", 0, 1.0f);
    for (int i = 0; i < 3; i++)
        step_clear(&s[i]);
}

/* A failed commit fails the whole group, and every session reloads as it was. */
static void test_failed_commit_fails_the_group_and_changes_nothing(void **state)
{
    fixture *f = *state;
    create_one(f, "x", 2, NULL);
    create_one(f, "y", 2, NULL);
    f->fault_name[0] = '\0';
    step sx, sy;
    gate g;
    gate_close(f->e, &g);
    step_submit(f, &sx, "x", 2, 1.0f, NULL);
    step_submit(f, &sy, "y", 2, 1.0f, NULL);
    f->fault_point = ENGINE_FAULT_COMMIT; /* the gate's own group has committed */
    gate_open(&g);
    wait_flag(&sx.done);
    wait_flag(&sy.done);
    assert_int_equal(sx.req.rc, OPTD_E_UNAVAILABLE);
    assert_int_equal(sy.req.rc, OPTD_E_UNAVAILABLE);
    assert_false(engine_healthy(f->e));
    f->fault_point = -1;
    step_clear(&sx);
    step_clear(&sy);
    step_submit(f, &sx, "x", 2, 1.0f, NULL);
    wait_flag(&sx.done);
    assert_int_equal(sx.req.rc, OPTD_OK);
    assert_int_equal(sx.req.step, 1);
    assert_float_equal(((float *)sx.req.out_params)[0], 0.5f, 0);
    assert_true(engine_healthy(f->e));
    step_clear(&sx);
}

static size_t known_size(fixture *f, const char *name)
{
    optim_dtype dtype = OPTIM_F64;
    size_t n = 0;
    optd_err rc = engine_session_shape(f->e, name, &dtype, &n);
    if (rc == OPTD_E_NOT_FOUND)
        return 0;
    assert_int_equal(rc, OPTD_OK);
    assert_int_equal(dtype, OPTIM_F32);
    return n;
}

/* Request threads read a session's dtype and size from the engine only as
 * committed: known once a commit made or stepped it, never while a change
 * of its shape is uncommitted or after it failed, gone with a delete. */
static void test_the_shape_request_threads_read_is_the_committed_one(void **state)
{
    fixture *f = *state;
    assert_int_equal(known_size(f, "k"), 0);
    create_one(f, "k", 3, NULL);
    assert_int_equal(known_size(f, "k"), 3);
    /* A PUT state that would make it 5 elements, its commit failing. */
    gate g;
    create put;
    gate_close(f->e, &g);
    make_submit(f, &put, ENGINE_REQ_PUT_STATE, "k", 5, NULL);
    f->fault_name[0] = '\0';
    f->fault_point = ENGINE_FAULT_COMMIT;
    gate_open(&g);
    wait_flag(&put.done);
    f->fault_point = -1;
    assert_int_equal(put.req.rc, OPTD_E_UNAVAILABLE);
    engine_sess_free(put.req.newsess);
    assert_int_equal(known_size(f, "k"), 0); /* dropped with the failed group; the store says 3 */
    step st;
    step_submit(f, &st, "k", 3, 1.0f, NULL);
    wait_flag(&st.done);
    assert_int_equal(st.req.rc, OPTD_OK);
    step_clear(&st);
    assert_int_equal(known_size(f, "k"), 3);
    /* The same PUT, committed. */
    make_submit(f, &put, ENGINE_REQ_PUT_STATE, "k", 5, NULL);
    create_finish(&put);
    assert_int_equal(known_size(f, "k"), 5);
    engine_delete_req del;
    memset(&del, 0, sizeof del);
    del.type = ENGINE_REQ_DELETE;
    snprintf(del.name, sizeof del.name, "k");
    del.if_match = -1;
    int done = 0;
    del.cb = on_done;
    del.data = &done;
    assert_int_equal(engine_submit(f->e, (engine_req *)&del), OPTD_OK);
    wait_flag(&done);
    assert_int_equal(del.rc, OPTD_OK);
    assert_int_equal(known_size(f, "k"), 0);
}

/* With a cache of about two sessions, twenty sessions stepped in turn are
 * evicted and reloaded from the store, and every step continues from the
 * committed state. */
static void test_eviction_under_a_byte_budget_keeps_every_step(void **state)
{
    fixture *f = *state;
    engine_free(f->e);
    store_close(f->st);
    /* sgd without momentum: params and the scalar, 64 float32 elements. */
    size_t one = 64 * sizeof(float) + sizeof(double);
    start(f, 2 * one);
    char name[32];
    for (int i = 0; i < 20; i++) {
        snprintf(name, sizeof name, "e%d", i);
        create_one(f, name, 64, NULL);
    }
    for (int k = 1; k <= 3; k++) {
        for (int i = 0; i < 20; i++) {
            step s;
            snprintf(name, sizeof name, "e%d", i);
            step_submit(f, &s, name, 64, 1.0f, NULL);
            wait_flag(&s.done);
            assert_int_equal(s.req.rc, OPTD_OK);
            assert_int_equal(s.req.step, (uint64_t)k);
            assert_float_equal(((float *)s.req.out_params)[63], 1.0f - 0.5f * (float)k, 0);
            step_clear(&s);
        }
    }
    assert_true(atomic_load(&f->stats.cached_bytes) <= 2 * one);
}

/* min_workers follows workers until it is set, then keeps its value; a
 * stored config's marker makes it follow again. No sentinel value. */
static void test_min_workers_follows_workers_until_set(void **state)
{
    (void)state;
    const optim_info *info = optim_find("sgd");
    optim_hparams hp;
    training tr;
    char msg[256];
    optim_defaults(info, &hp);
    engine_training_defaults(&tr);
    assert_int_equal(tr.min_workers, 1);
    engine_settings d = {0};
    d.set = ENGINE_SET_WORKERS;
    d.workers = 4;
    assert_int_equal(engine_settings_apply(info, &d, &hp, &tr, msg, sizeof msg), OPTD_OK);
    assert_int_equal(tr.min_workers, 4);
    assert_true(tr.min_workers_follows);
    d.set = ENGINE_SET_MIN_WORKERS;
    d.min_workers = 2;
    assert_int_equal(engine_settings_apply(info, &d, &hp, &tr, msg, sizeof msg), OPTD_OK);
    d.set = ENGINE_SET_WORKERS;
    d.workers = 8;
    assert_int_equal(engine_settings_apply(info, &d, &hp, &tr, msg, sizeof msg), OPTD_OK);
    assert_int_equal(tr.workers, 8);
    assert_int_equal(tr.min_workers, 2);
    assert_false(tr.min_workers_follows);
    d.set = ENGINE_SET_WORKERS | ENGINE_SET_MIN_WORKERS | ENGINE_SET_MIN_AUTO;
    d.workers = d.min_workers = 3;
    assert_int_equal(engine_settings_apply(info, &d, &hp, &tr, msg, sizeof msg), OPTD_OK);
    d.set = ENGINE_SET_WORKERS;
    d.workers = 5;
    assert_int_equal(engine_settings_apply(info, &d, &hp, &tr, msg, sizeof msg), OPTD_OK);
    assert_int_equal(tr.min_workers, 5);
    d.set = ENGINE_SET_MIN_WORKERS;
    d.min_workers = 6;
    assert_int_equal(engine_settings_apply(info, &d, &hp, &tr, msg, sizeof msg), OPTD_E_INVALID);
    assert_int_equal(tr.min_workers, 5);
}

/* Every allocation on the paths of create, step (with an idempotent retry),
 * a worker round, patch, fork and delete
 * fails once (one run per allocation, as above). Each request then either
 * succeeds or fails with OPTD_E_NOMEM and changes nothing; afterwards the
 * committed sessions are exactly what the successful requests made, the
 * cache agrees with the store (one more step lands on the right step), and
 * nothing leaks (make asan). */
/* Submits r for the session name (no If-Match; the caller has set its type
 * and its own fields) and waits for it: in test_every_allocation_failure_is_clean
 * it either succeeds or fails out of memory. Its rc. */
static optd_err submit_under_faults(fixture *f, engine_req *r, const char *name)
{
    int done = 0;
    snprintf(r->name, sizeof r->name, "%s", name);
    r->if_match = -1;
    r->cb = on_done;
    r->data = &done;
    assert_int_equal(engine_submit(f->e, r), OPTD_OK);
    wait_flag(&done);
    assert_true(r->rc == OPTD_OK || r->rc == OPTD_E_NOMEM);
    return r->rc;
}

static void test_every_allocation_failure_is_clean(void **state)
{
    (void)state;
    long runs = 0;
    for (long at = 1; at < 5000; at++, runs++) {
        void *fs = NULL;
        assert_int_equal(setup(&fs), 0);
        fixture *f = fs;
        create_one(f, "a", 4, NULL);
        create_round(f, "r", 4, 2, 0, 0.5);
        inj_arm(at);

        /* create b */
        int b_made = 0, c_made = 0, steps = 0;
        {
            create c;
            memset(&c, 0, sizeof c);
            optim_hparams hp;
            training tr;
            const optim_info *info = optim_find("sgd");
            optim_defaults(info, &hp);
            hp.lr = 0.5;
            engine_training_defaults(&tr);
            optd_err rc = engine_sess_new(&codec, "b", info, &hp, &tr, OPTIM_F32, 4, NULL, 1.0, &c.req.newsess);
            assert_true(rc == OPTD_OK || rc == OPTD_E_NOMEM);
            if (rc == OPTD_OK) {
                c.req.type = ENGINE_REQ_CREATE;
                b_made = submit_under_faults(f, (engine_req *)&c.req, "b") == OPTD_OK;
                if (!b_made)
                    engine_sess_free(c.req.newsess);
                store_session_clear(&c.req.row);
            }
        }
        /* Three steps of a, the third a retry of the first's key: replayed
         * when the first succeeded, else applied now. */
        static const char *const keys[3] = {"k0", "k1", "k0"};
        int first_ok = 0;
        for (int k = 0; k < 3; k++) {
            step st;
            step_submit(f, &st, "a", 4, 1.0f, keys[k]);
            wait_flag(&st.done);
            assert_true(st.req.rc == OPTD_OK || st.req.rc == OPTD_E_NOMEM);
            if (k == 0)
                first_ok = st.req.rc == OPTD_OK;
            if (st.req.rc == OPTD_OK && k == 2 && first_ok) {
                assert_true(st.req.replayed);
                assert_int_equal(st.req.step, 1);
            } else if (st.req.rc == OPTD_OK) {
                assert_false(st.req.replayed);
                steps++;
                assert_int_equal(st.req.step, (uint64_t)steps);
            }
            step_clear(&st);
        }
        /* A round of two contributions to r: applied once with both, or
         * failed (out of memory, or timed out waiting for the other). */
        int round_ok = 0;
        {
            step r1, r2;
            step_submit(f, &r1, "r", 4, 1.0f, NULL);
            step_submit(f, &r2, "r", 4, 1.0f, NULL);
            wait_flag(&r1.done);
            wait_flag(&r2.done);
            optd_err rcs[2] = {r1.req.rc, r2.req.rc};
            for (int k = 0; k < 2; k++)
                assert_true(rcs[k] == OPTD_OK || rcs[k] == OPTD_E_NOMEM || rcs[k] == OPTD_E_ROUND_TIMEOUT);
            round_ok = rcs[0] == OPTD_OK;
            assert_int_equal(rcs[0] == OPTD_OK, rcs[1] == OPTD_OK);
            step_clear(&r1);
            step_clear(&r2);
        }
        /* fork a into c with lr 0.25, then patch a's lr */
        const optim_info *sgd = optim_find("sgd");
        engine_hp_item lr_item = {optim_hp_find(sgd, "lr")->name, ENGINE_VAL_NUMBER, {0.25, 0}};
        {
            engine_fork_req fk;
            memset(&fk, 0, sizeof fk);
            fk.type = ENGINE_REQ_FORK;
            snprintf(fk.from, sizeof fk.from, "a");
            fk.settings.items = &lr_item;
            fk.settings.n_items = 1;
            c_made = submit_under_faults(f, (engine_req *)&fk, "c") == OPTD_OK;
            store_session_clear(&fk.row);
        }
        {
            engine_patch_req pt;
            memset(&pt, 0, sizeof pt);
            pt.type = ENGINE_REQ_PATCH;
            pt.settings.items = &lr_item;
            pt.settings.n_items = 1;
            submit_under_faults(f, (engine_req *)&pt, "a");
            store_session_clear(&pt.row);
        }
        if (b_made) {
            engine_delete_req del;
            memset(&del, 0, sizeof del);
            del.type = ENGINE_REQ_DELETE;
            b_made = submit_under_faults(f, (engine_req *)&del, "b") != OPTD_OK;
        }
        int hit = inj_hit;
        inj_arm(0);

        /* What is committed is what succeeded, and the cache agrees. */
        assert_committed(f, "a", (uint64_t)steps, 1.0f - 0.5f * (float)steps);
        assert_committed(f, "r", round_ok ? 1 : 0, round_ok ? 0.5f : 1.0f);
        sess *s = NULL;
        assert_int_equal(engine_sess_read(f->st, &codec, "b", &s), b_made ? OPTD_OK : OPTD_E_NOT_FOUND);
        engine_sess_free(s);
        s = NULL;
        assert_int_equal(engine_sess_read(f->st, &codec, "c", &s), c_made ? OPTD_OK : OPTD_E_NOT_FOUND);
        engine_sess_free(s);
        step st;
        step_submit(f, &st, "a", 4, 1.0f, NULL);
        wait_flag(&st.done);
        assert_int_equal(st.req.rc, OPTD_OK);
        assert_int_equal(st.req.step, (uint64_t)steps + 1);
        step_clear(&st);
        teardown(&fs);
        if (!hit)
            break;
    }
    assert_true(runs > 10); /* the scenario allocates: a run that failed nothing proves nothing */
    assert_true(runs < 4999);
    print_message("    %ld allocations failed one at a time\n", runs);
}

/* The writer's map of a session's keys (engine/idem.c): every key of the
 * window is a candidate at its own step, none past it is, the map stays
 * the size of the window however many keys went through it, and a key
 * recorded in the store before the map is loaded is in it. */
static void test_the_key_map_holds_the_window_and_nothing_older(void **state)
{
    (void)state;
    char dir[] = "/tmp/optd-test-idem-XXXXXX", path[128], err[256], key[32];
    store *st = NULL;
    engine_idem_map *m = NULL;
    uint64_t steps[8];
    const uint64_t window = 1000, last = 20000;

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/optd.db", dir);
    assert_int_equal(store_open(path, NULL, &st, err, sizeof err), OPTD_OK);
    assert_int_equal(store_idem_put(st, 7, "stored", 3, 1, NULL, 0, window), OPTD_OK);
    assert_int_equal(engine_idem_load(st, 7, 0, &m), OPTD_OK);
    assert_int_equal(engine_idem_candidates(m, "stored", 0, steps, 8), 1);
    assert_int_equal(steps[0], 3);
    assert_int_equal(engine_idem_candidates(m, "stored", 3, steps, 8), 0);
    for (uint64_t k = 4; k <= last; k++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)k);
        assert_int_equal(engine_idem_add(m, key, k, k - window), OPTD_OK);
    }
    for (uint64_t k = 4; k <= last; k++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)k);
        size_t n = engine_idem_candidates(m, key, last - window, steps, 8);
        if (k <= last - window) {
            assert_int_equal(n, 0);
        } else {
            assert_int_equal(n, 1);
            assert_int_equal(steps[0], k);
        }
    }
    assert_true(engine_idem_bytes(m) <= 2048 * 8 + 64);
    /* Steps far past 2^32 from the first: the entries count from a new base. */
    uint64_t far = (UINT64_C(1) << 33) + 5;
    assert_int_equal(engine_idem_add(m, "far", far, far - window), OPTD_OK);
    assert_int_equal(engine_idem_candidates(m, "far", far - window, steps, 8), 1);
    assert_int_equal(steps[0], far);
    assert_int_equal(engine_idem_candidates(m, "k20000", far - window, steps, 8), 0);
    engine_idem_free(m);
    store_close(st);
    unlink(path);
    snprintf(path, sizeof path, "%s/optd.db-wal", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/optd.db-shm", dir);
    unlink(path);
    assert_int_equal(rmdir(dir), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_min_workers_follows_workers_until_set),
        cmocka_unit_test(test_every_allocation_failure_is_clean),
        cmocka_unit_test(test_the_key_map_holds_the_window_and_nothing_older),
        cmocka_unit_test_setup_teardown(test_many_sessions_commit_in_one_group, setup, teardown),
        cmocka_unit_test_setup_teardown(test_round_applies_when_it_fills, setup, teardown),
        cmocka_unit_test_setup_teardown(test_an_overflowing_round_keeps_nothing_of_its_lr, setup, teardown),
        cmocka_unit_test_setup_teardown(test_round_times_out_with_min_workers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_round_below_min_workers_fails_at_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_round_retry_replaces_the_waiting_contribution, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idempotent_replay_applies_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_write_rolls_back_only_its_request, setup, teardown),
        cmocka_unit_test_setup_teardown(test_a_step_failing_after_writing_reruns_its_group_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_failed_commit_fails_the_group_and_changes_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_the_shape_request_threads_read_is_the_committed_one, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eviction_under_a_byte_budget_keeps_every_step, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
