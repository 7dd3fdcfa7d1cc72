/* Unit tests of store/: each test gets a fresh directory under /tmp. Files
 * made by "another application" and the lock held by "another process" are
 * made with SQLite directly, which is why this test, like store.c, includes
 * <sqlite3.h>. */
#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include "store/store.h"

typedef struct fixture {
    char dir[64];
    char path[96];
    store *st;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);

    assert_non_null(f);
    strcpy(f->dir, "/tmp/optd-test-store-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(f->path, sizeof f->path, "%s/optd.db", f->dir);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    struct dirent *e;
    char p[512];
    DIR *d;

    store_close(f->st);
    d = opendir(f->dir);
    if (d) {
        while ((e = readdir(d)) != NULL) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            snprintf(p, sizeof p, "%s/%s", f->dir, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(f->dir);
    free(f);
    return 0;
}

/* --- Helpers. ------------------------------------------------------------ */

static void open_store(fixture *f, const store_options *opt)
{
    char err[256] = "";
    optd_err rc = store_open(f->path, opt, &f->st, err, sizeof err);

    if (rc != OPTD_OK)
        fail_msg("store_open: %d %s", rc, err);
    assert_non_null(f->st);
}

static void reopen(fixture *f)
{
    store_close(f->st);
    f->st = NULL;
    open_store(f, NULL);
}

static store_session make_session(const char *name, uint64_t step)
{
    store_session s;

    memset(&s, 0, sizeof s);
    snprintf(s.name, sizeof s.name, "%s", name);
    snprintf(s.optimizer, sizeof s.optimizer, "adam");
    s.dtype = 1;
    s.size = 3;
    s.step = step;
    s.config = (char *)"{\"lr\":0.001}";
    s.created_ms = 1700000000123;
    s.updated_ms = 1700000000456;
    return s;
}

static void insert(fixture *f, const char *name)
{
    store_session s = make_session(name, 0);

    assert_int_equal(store_session_insert(f->st, &s, "abc", 3), OPTD_OK);
}

/* store_session_load or store_read_session. */
typedef optd_err (*load_fn)(store *st, const char *name, store_session *out, void **state, size_t *len);

/* Loads want's row by name through load and checks every field against
 * want and the state against the len bytes at state. */
static void assert_stored(fixture *f, load_fn load, const store_session *want, const void *state, size_t len)
{
    store_session got;
    void *st_out = NULL;
    size_t got_len = 0;

    memset(&got, 0, sizeof got);
    assert_int_equal(load(f->st, want->name, &got, &st_out, &got_len), OPTD_OK);
    assert_int_equal(got.id, want->id);
    assert_string_equal(got.name, want->name);
    assert_string_equal(got.optimizer, want->optimizer);
    assert_int_equal(got.dtype, want->dtype);
    assert_int_equal(got.size, want->size);
    assert_int_equal(got.step, want->step);
    assert_string_equal(got.config, want->config);
    assert_int_equal(got.created_ms, want->created_ms);
    assert_int_equal(got.updated_ms, want->updated_ms);
    assert_int_equal(got_len, len);
    assert_memory_equal(st_out, state, len);
    free(st_out);
    store_session_clear(&got);
    assert_null(got.config);
}

/* Opens f's file (creating or upgrading it as store_open does), stores one
 * session "a" and closes it again: what the schema tests then read with
 * their own SQLite connection. */
static void store_one_session(fixture *f)
{
    open_store(f, NULL);
    insert(f, "a");
    store_close(f->st);
    f->st = NULL;
}

/* Reads a whole file; *len gets its size. */
static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    unsigned char *buf;
    long n;

    assert_non_null(fp);
    assert_int_equal(fseek(fp, 0, SEEK_END), 0);
    n = ftell(fp);
    assert_true(n >= 0);
    rewind(fp);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return buf;
}

static void spit(const char *path, const void *p, size_t len)
{
    FILE *fp = fopen(path, "wb");

    assert_non_null(fp);
    assert_int_equal(fwrite(p, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
}

/* Runs SQL on the file as another program would. */
static void sql_on(const char *path, const char *text)
{
    sqlite3 *db = NULL;
    char *msg = NULL;

    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    if (sqlite3_exec(db, text, NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("%s: %s", text, msg);
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
}

static int64_t pragma_on(const char *path, const char *pragma)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *q = NULL;
    int64_t v;

    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, pragma, -1, &q, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    v = sqlite3_column_int64(q, 0);
    assert_int_equal(sqlite3_finalize(q), SQLITE_OK);
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
    return v;
}

/* The text of a one-value query, copied into buf. */
static const char *text_on(const char *path, const char *query, char *buf, size_t cap)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *q = NULL;
    const unsigned char *t;

    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_prepare_v2(db, query, -1, &q, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(q), SQLITE_ROW);
    t = sqlite3_column_text(q, 0);
    assert_non_null(t);
    snprintf(buf, cap, "%s", (const char *)t);
    assert_int_equal(sqlite3_finalize(q), SQLITE_OK);
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
    return buf;
}

/* Opening must fail with OPTD_E_INVALID, a message containing want, and the
 * file byte-for-byte as it was. */
static void assert_refused_unchanged(fixture *f, const char *want)
{
    unsigned char *before, *after;
    size_t nbefore, nafter;
    char err[256] = "";

    before = slurp(f->path, &nbefore);
    assert_int_equal(store_open(f->path, NULL, &f->st, err, sizeof err), OPTD_E_INVALID);
    assert_null(f->st);
    if (!strstr(err, want))
        fail_msg("message \"%s\" lacks \"%s\"", err, want);
    assert_non_null(strstr(err, f->path));
    after = slurp(f->path, &nafter);
    assert_int_equal(nafter, nbefore);
    assert_memory_equal(after, before, nbefore);
    free(before);
    free(after);
}

/* --- Tests. -------------------------------------------------------------- */

static void test_open_creates_an_optd_database_that_close_releases(void **state)
{
    fixture *f = *state;
    char buf[16];
    uint64_t n = 99;

    open_store(f, NULL);
    assert_int_equal(access(f->path, F_OK), 0);
    assert_int_equal(store_read_count(f->st, &n), OPTD_OK);
    assert_int_equal(n, 0);
    store_close(f->st);
    f->st = NULL;
    store_close(NULL);

    assert_int_equal(pragma_on(f->path, "PRAGMA application_id"), 0x6F707464);
    assert_int_equal(pragma_on(f->path, "PRAGMA user_version"), 6);
    assert_string_equal(text_on(f->path, "PRAGMA journal_mode", buf, sizeof buf), "wal");
}

static void test_open_of_an_empty_file_creates_the_database(void **state)
{
    fixture *f = *state;

    spit(f->path, "", 0);
    store_one_session(f);
    assert_int_equal(pragma_on(f->path, "PRAGMA application_id"), 0x6F707464);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM sessions"), 1);
}

static void test_session_round_trip_keeps_every_field_and_a_1mb_state(void **state)
{
    fixture *f = *state;
    const size_t big = 1 << 20;
    unsigned char *blob = malloc(big), *blob2 = malloc(big);
    store_session s = make_session("alpha", 7), got;
    size_t i;

    assert_non_null(blob);
    assert_non_null(blob2);
    for (i = 0; i < big; i++) {
        blob[i] = (unsigned char)(i * 31 + 7);
        blob2[i] = (unsigned char)(i * 17 + 1);
    }
    open_store(f, NULL);
    s.size = UINT64_C(1) << 40;
    assert_int_equal(store_session_insert(f->st, &s, blob, big), OPTD_OK);
    assert_true(s.id > 0);
    /* s as make_session made it: "alpha", adam, float64, step 7, {"lr":0.001}. */
    assert_stored(f, store_session_load, &s, blob, big);

    /* Update step, config, time and state; the rest stays. */
    s.step = 8;
    s.config = (char *)"{\"lr\":0.5}";
    s.updated_ms = 1700000009999;
    assert_int_equal(store_session_update(f->st, &s, blob2, big), OPTD_OK);
    assert_stored(f, store_read_session, &s, blob2, big);

    /* Update without state leaves the blob; a row without the blob. */
    s.step = 9;
    assert_int_equal(store_session_update(f->st, &s, NULL, 0), OPTD_OK);
    assert_stored(f, store_session_load, &s, blob2, big);
    memset(&got, 0, sizeof got);
    assert_int_equal(store_read_session(f->st, "alpha", &got, NULL, NULL), OPTD_OK);
    assert_int_equal(got.step, 9);
    store_session_clear(&got);

    assert_int_equal(store_session_delete(f->st, "alpha"), OPTD_OK);
    assert_int_equal(store_session_load(f->st, "alpha", &got, NULL, NULL), OPTD_E_NOT_FOUND);
    assert_int_equal(store_read_session(f->st, "alpha", &got, NULL, NULL), OPTD_E_NOT_FOUND);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM state"), 0);
    free(blob);
    free(blob2);
}

static void test_an_empty_state_and_a_null_config_round_trip(void **state)
{
    fixture *f = *state;
    store_session s = make_session("empty", 0), got;
    void *st_out = NULL;
    size_t len = 123;

    s.config = NULL;
    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &s, NULL, 0), OPTD_OK);
    assert_int_equal(store_read_session(f->st, "empty", &got, &st_out, &len), OPTD_OK);
    assert_int_equal(len, 0);
    assert_non_null(st_out); /* kept but empty, not absent */
    assert_null(got.config);
    free(st_out);
    store_session_clear(&got);

    /* From a 3-byte state back to an empty one through update. */
    assert_int_equal(store_session_update(f->st, &s, "xyz", 3), OPTD_OK);
    assert_int_equal(store_session_load(f->st, "empty", &got, &st_out, &len), OPTD_OK);
    assert_int_equal(len, 3);
    assert_memory_equal(st_out, "xyz", 3);
    free(st_out);
    store_session_clear(&got);
    assert_int_equal(store_session_update(f->st, &s, "", 0), OPTD_OK);
    assert_int_equal(store_session_load(f->st, "empty", &got, &st_out, &len), OPTD_OK);
    assert_int_equal(len, 0);
    free(st_out);
    store_session_clear(&got);
}

static void test_inserting_a_taken_name_is_already_exists_and_keeps_the_first(void **state)
{
    fixture *f = *state;
    store_session a = make_session("dup", 1), b = make_session("dup", 2), c = make_session("other", 0), got;

    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &a, "a", 1), OPTD_OK);
    b.id = -5;
    assert_int_equal(store_session_insert(f->st, &b, "b", 1), OPTD_E_ALREADY_EXISTS);
    assert_int_equal(b.id, -5);

    /* Inside a transaction the failure leaves it usable. */
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &b, "b", 1), OPTD_E_ALREADY_EXISTS);
    assert_int_equal(store_session_insert(f->st, &c, "c", 1), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);

    assert_int_equal(store_read_session(f->st, "dup", &got, NULL, NULL), OPTD_OK);
    assert_int_equal(got.step, 1);
    assert_int_equal(got.id, a.id);
    store_session_clear(&got);
    assert_int_equal(store_read_session(f->st, "other", &got, NULL, NULL), OPTD_OK);
    store_session_clear(&got);
}

static void test_missing_sessions_are_not_found_everywhere(void **state)
{
    fixture *f = *state;
    store_session got, ghost = make_session("ghost", 1);
    void *blob = (void *)0x1;
    size_t len = 77;

    open_store(f, NULL);
    memset(&got, 0, sizeof got);
    assert_int_equal(store_session_load(f->st, "nope", &got, &blob, &len), OPTD_E_NOT_FOUND);
    assert_int_equal(store_read_session(f->st, "nope", &got, &blob, &len), OPTD_E_NOT_FOUND);
    assert_ptr_equal(blob, (void *)0x1); /* outputs untouched on failure */
    assert_int_equal(len, 77);
    assert_int_equal(store_session_delete(f->st, "nope"), OPTD_E_NOT_FOUND);
    ghost.id = 424242;
    assert_int_equal(store_session_update(f->st, &ghost, "x", 1), OPTD_E_NOT_FOUND);
}

static void test_ids_are_not_reused_after_a_delete(void **state)
{
    fixture *f = *state;
    store_session a = make_session("a", 0), b = make_session("b", 0);
    int64_t first;

    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &a, "", 0), OPTD_OK);
    first = a.id;
    assert_int_equal(store_session_delete(f->st, "a"), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &b, "", 0), OPTD_OK);
    assert_true(b.id > first);
}

static void test_list_pages_through_names_in_byte_order(void **state)
{
    fixture *f = *state;
    static const char *names[] = {"a", "B", "b", "a.1", "a-2"};
    /* Byte order: 'B' (0x42) < 'a' (0x61); '-' (0x2d) < '.' (0x2e). The
     * last page is exactly all of them: no more. */
    static const struct {
        const char *after;
        int limit;
        size_t n;
        int more;
        const char *names[5];
    } pages[] = {
        {NULL, 2, 2, 1, {"B", "a"}},
        {"a", 2, 2, 1, {"a-2", "a.1"}},
        {"a.1", 2, 1, 0, {"b"}},
        {NULL, 5, 5, 0, {"B", "a", "a-2", "a.1", "b"}},
    };
    store_session *rows = NULL;
    size_t n = 99, i, p;
    int more = -1;

    open_store(f, NULL);
    for (i = 0; i < 5; i++)
        insert(f, names[i]);

    for (p = 0; p < sizeof pages / sizeof pages[0]; p++) {
        assert_int_equal(store_read_list(f->st, pages[p].after, pages[p].limit, &rows, &n, &more), OPTD_OK);
        assert_int_equal(n, pages[p].n);
        assert_int_equal(more, pages[p].more);
        for (i = 0; i < n; i++) {
            assert_string_equal(rows[i].name, pages[p].names[i]);
            assert_string_equal(rows[i].config, "{\"lr\":0.001}");
            store_session_clear(&rows[i]);
        }
        free(rows);
    }

    /* limit 0 only answers whether there is anything. */
    assert_int_equal(store_read_list(f->st, NULL, 0, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 0);
    assert_int_equal(more, 1);
    assert_null(rows);
    assert_int_equal(store_read_list(f->st, "zzz", 10, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 0);
    assert_int_equal(more, 0);
    assert_int_equal(store_read_list(f->st, NULL, -1, &rows, &n, &more), OPTD_E_INVALID);
}

static void test_count_follows_inserts_and_deletes(void **state)
{
    fixture *f = *state;
    uint64_t n = 99;

    open_store(f, NULL);
    insert(f, "x");
    insert(f, "y");
    insert(f, "z");
    assert_int_equal(store_read_count(f->st, &n), OPTD_OK);
    assert_int_equal(n, 3);
    assert_int_equal(store_session_delete(f->st, "y"), OPTD_OK);
    assert_int_equal(store_read_count(f->st, &n), OPTD_OK);
    assert_int_equal(n, 2);
}

static void test_idem_put_then_get_returns_the_record(void **state)
{
    fixture *f = *state;
    const uint64_t digest = UINT64_C(0xFEDCBA9876543210);
    store_idem r;

    open_store(f, NULL);
    assert_int_equal(store_idem_put(f->st, 1, "k1", 5, digest, "{\"step\":5}", 10, 100), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, 1, "k-none", 6, 1, NULL, 0, 100), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, 3, "k-empty", 7, 2, "", 0, 100), OPTD_OK);

    memset(&r, 0, sizeof r);
    assert_int_equal(store_idem_get(f->st, 1, "k1", 5, 10, 100, &r), OPTD_OK);
    assert_int_equal(r.step, 5);
    assert_int_equal(r.digest, digest);
    assert_int_equal(r.reply_len, 10);
    assert_memory_equal(r.reply, "{\"step\":5}", 10);
    free(r.reply);

    assert_int_equal(store_idem_get(f->st, 1, "k-none", 6, 10, 100, &r), OPTD_OK);
    assert_int_equal(r.step, 6);
    assert_int_equal(r.digest, 1);
    assert_null(r.reply);
    assert_int_equal(r.reply_len, 0);
    assert_int_equal(store_idem_get(f->st, 3, "k-empty", 7, 0, 100, &r), OPTD_OK);
    assert_non_null(r.reply); /* an empty reply was kept */
    assert_int_equal(r.reply_len, 0);
    free(r.reply);

    assert_int_equal(store_idem_get(f->st, 1, "unknown", 5, 10, 100, &r), OPTD_E_NOT_FOUND);
    assert_int_equal(store_idem_get(f->st, 1, "k1", 6, 10, 100, &r), OPTD_E_NOT_FOUND);
    assert_int_equal(store_idem_get(f->st, 2, "k1", 5, 10, 100, &r), OPTD_E_NOT_FOUND);
    /* The ring keeps each reply's length: the one the caller expects
     * matters only for replies saved before schema 6. */
    assert_int_equal(store_idem_get(f->st, 1, "k1", 5, 11, 100, &r), OPTD_OK);
    assert_int_equal(r.reply_len, 10);
    free(r.reply);
}

/* Asserts that session's key at step is kept with digest and the len bytes
 * of want as its reply (len also the length asked for, and window the
 * window, which lay out replies saved before schema 6). */
static void assert_reply(fixture *f, int64_t session, const char *key, uint64_t step, uint64_t window,
                         uint64_t digest, const void *want, size_t len)
{
    store_idem r;
    memset(&r, 0, sizeof r);
    assert_int_equal(store_idem_get(f->st, session, key, step, len, window, &r), OPTD_OK);
    assert_int_equal(r.digest, digest);
    assert_non_null(r.reply);
    assert_int_equal(r.reply_len, len);
    assert_memory_equal(r.reply, want, len);
    free(r.reply);
}

static optd_err list_key(void *ctx, uint64_t step, const char *key)
{
    char *out = ctx;
    snprintf(out + strlen(out), 256 - strlen(out), "%llu:%s ", (unsigned long long)step, key);
    return OPTD_OK;
}

static void test_idem_put_forgets_keys_older_than_the_window_in_batches(void **state)
{
    fixture *f = *state;
    char key[16], listed[256] = "";
    store_idem r;
    uint64_t step;

    open_store(f, NULL);
    assert_int_equal(store_idem_put(f->st, 2, "other", 1, 0, "o", 1, 3), OPTD_OK);
    for (step = 1; step <= 100; step++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)step);
        assert_int_equal(store_idem_put(f->st, 1, key, step, step, "r", 1, 3), OPTD_OK);
    }
    /* Step 68 was the first with its oldest key (1) 3 + 64 steps back: it
     * forgot the keys of steps <= 65. The next batch goes at step 133. */
    for (step = 1; step <= 100; step++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)step);
        memset(&r, 0, sizeof r);
        if (step <= 65) {
            assert_int_equal(store_idem_get(f->st, 1, key, step, 1, 3, &r), OPTD_E_NOT_FOUND);
        } else {
            assert_int_equal(store_idem_get(f->st, 1, key, step, 1, 3, &r), OPTD_OK);
            assert_int_equal(r.digest, step);
            free(r.reply);
        }
    }
    /* Another session's keys are its own business. */
    assert_int_equal(store_idem_get(f->st, 2, "other", 1, 1, 3, &r), OPTD_OK);
    free(r.reply);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_keys"), 36);
    assert_int_equal(store_idem_keys(f->st, 1, 96, list_key, listed), OPTD_OK);
    assert_string_equal(listed, "97:k97 98:k98 99:k99 100:k100 ");
    /* Window 0 keeps no key at all. */
    assert_int_equal(store_idem_put(f->st, 4, "none", 1, 1, "r", 1, 0), OPTD_OK);
    assert_int_equal(store_idem_get(f->st, 4, "none", 1, 1, 3, &r), OPTD_E_NOT_FOUND);
}

/* A session's keys wait in its row, a tail of fixed size, and move to
 * idem_keys when it is full; the lookups and the listing see both. A key
 * too long for a tail goes to the table at once; keys the window has left
 * by the time their tail moves are dropped rather than moved. */
static void test_idem_keys_wait_in_the_session_row(void **state)
{
    fixture *f = *state;
    store_session s = make_session("tails", 0);
    char key[400], listed[256] = "";
    store_idem r;
    int64_t tail_bytes;

    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &s, "t", 1), OPTD_OK);
    for (uint64_t step = 1; step <= 100; step++) {
        snprintf(key, sizeof key, "%036llu", (unsigned long long)step); /* a UUID's length */
        assert_int_equal(store_idem_put(f->st, s.id, key, step, step * 7, "r", 1, 1000),
                         OPTD_OK);
    }
    /* 61 bytes a key: 33 to a 2 KiB tail, so three tails moved, 1 key waits. */
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_keys"), 99);
    tail_bytes = pragma_on(f->path, "SELECT length(idem_tail) FROM sessions WHERE name = 'tails'");
    assert_int_equal(tail_bytes, 2048);
    for (uint64_t step = 1; step <= 100; step++) {
        snprintf(key, sizeof key, "%036llu", (unsigned long long)step);
        memset(&r, 0, sizeof r);
        assert_int_equal(store_idem_get(f->st, s.id, key, step, 1, 1000, &r), OPTD_OK);
        assert_int_equal(r.digest, step * 7);
        free(r.reply);
        assert_int_equal(store_idem_get(f->st, s.id, key, step + 1, 1, 1000, &r),
                         OPTD_E_NOT_FOUND);
    }
    assert_int_equal(store_idem_keys(f->st, s.id, 97, list_key, listed), OPTD_OK);
    assert_string_equal(listed, "98:000000000000000000000000000000000098 99:000000000000000000000000000000000099 "
                                "100:000000000000000000000000000000000100 ");

    /* 255 bytes fit a tail; 300 do not. */
    memset(key, 'x', 300);
    key[255] = '\0';
    assert_int_equal(store_idem_put(f->st, s.id, key, 101, 1, "r", 1, 1000), OPTD_OK);
    assert_int_equal(store_idem_get(f->st, s.id, key, 101, 1, 1000, &r), OPTD_OK);
    free(r.reply);
    key[255] = 'x';
    key[300] = '\0';
    assert_int_equal(store_idem_put(f->st, s.id, key, 102, 2, "r", 1, 1000), OPTD_OK);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_keys WHERE length(key) = 300"), 1);
    assert_int_equal(store_idem_get(f->st, s.id, key, 102, 1, 1000, &r), OPTD_OK);
    assert_int_equal(r.digest, 2);
    free(r.reply);

    /* Window 3: a tail that moves takes only the keys of its last 3 steps. */
    store_session w = make_session("narrow", 0);
    assert_int_equal(store_session_insert(f->st, &w, "t", 1), OPTD_OK);
    for (uint64_t step = 1; step <= 39; step++) {
        snprintf(key, sizeof key, "%036llu", (unsigned long long)step);
        assert_int_equal(store_idem_put(f->st, w.id, key, step, step, NULL, 0, 3), OPTD_OK);
    }
    snprintf(key, sizeof key, "SELECT group_concat(step) FROM idem_keys WHERE session_id = %lld", (long long)w.id);
    assert_string_equal(text_on(f->path, key, listed, sizeof listed), "32,33");
}

/* The reply ring: replies of all sessions one after another; a reply
 * stays until the ring comes round to it. With no sessions the capacity
 * is one chunk (64 KiB): 63 records of 1,000 bytes (and 32 of head) a lap,
 * so after 100, the first 37 are written over and the rest are kept,
 * exact, each its own session's. */
static void test_idem_replies_stay_until_the_ring_comes_round(void **state)
{
    fixture *f = *state;
    unsigned char reply[1000];
    char key[16];
    store_idem r;

    open_store(f, NULL);
    for (uint64_t step = 1; step <= 100; step++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)step);
        memset(reply, (int)step, sizeof reply);
        assert_int_equal(store_idem_put(f->st, 1 + step % 2, key, step, step, reply, sizeof reply, 1000), OPTD_OK);
    }
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM replies"), 1);
    for (uint64_t step = 1; step <= 100; step++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)step);
        memset(&r, 0, sizeof r);
        assert_int_equal(store_idem_get(f->st, 1 + step % 2, key, step, sizeof reply, 1000, &r), OPTD_OK);
        if (step <= 37) {
            assert_null(r.reply);
        } else {
            memset(reply, (int)step, sizeof reply);
            assert_int_equal(r.reply_len, sizeof reply);
            assert_memory_equal(r.reply, reply, sizeof reply);
        }
        free(r.reply);
        /* The same step and key of the other session: not its reply. */
        assert_int_equal(store_idem_get(f->st, 2 - step % 2, key, step, sizeof reply, 1000, &r), OPTD_E_NOT_FOUND);
    }
    /* The head is in the database: after a restart the ring goes on where
     * it was, and what it kept is still there. */
    reopen(f);
    memset(reply, 101, sizeof reply);
    assert_int_equal(store_idem_put(f->st, 2, "k101", 101, 101, reply, sizeof reply, 1000), OPTD_OK);
    for (uint64_t step = 38; step <= 101; step++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)step);
        memset(&r, 0, sizeof r);
        assert_int_equal(store_idem_get(f->st, 1 + step % 2, key, step, sizeof reply, 1000, &r), OPTD_OK);
        memset(reply, (int)step, sizeof reply);
        if (step == 38) { /* 101 took its place */
            assert_null(r.reply);
        } else {
            assert_int_equal(r.reply_len, sizeof reply);
            assert_memory_equal(r.reply, reply, sizeof reply);
        }
        free(r.reply);
    }
}

/* Replies longer than a chunk span chunks; a session of 1 MiB of params
 * under window 1000 makes the capacity its 16 MiB share: 15 replies of
 * 1 MiB a lap. A put rolled back leaves the ring as it was, and the next
 * one is kept. A ring whose sessions went shrinks back to a chunk at its
 * next lap. */
static void test_idem_ring_spans_chunks_rolls_back_and_shrinks(void **state)
{
    fixture *f = *state;
    const size_t big = (size_t)1 << 20;
    unsigned char *reply = malloc(big);
    store_session s = make_session("big", 0);
    char key[16];
    store_idem r;

    assert_non_null(reply);
    open_store(f, NULL);
    memset(reply, 0, big);
    s.size = big / 8; /* float64: replies of 1 MiB */
    assert_int_equal(store_session_insert(f->st, &s, reply, big), OPTD_OK);
    for (uint64_t step = 1; step <= 20; step++) {
        snprintf(key, sizeof key, "k%llu", (unsigned long long)step);
        memset(reply, (int)step, big);
        reply[big - 1] = (unsigned char)(step + 1);
        assert_int_equal(store_idem_put(f->st, s.id, key, step, step, reply, big, 1000), OPTD_OK);
    }
    assert_int_equal(store_begin(f->st), OPTD_OK);
    memset(reply, 0xEE, big);
    assert_int_equal(store_idem_put(f->st, s.id, "k21", 21, 21, reply, big, 1000), OPTD_OK);
    store_rollback(f->st);
    assert_int_equal(store_idem_get(f->st, s.id, "k21", 21, big, 1000, &r), OPTD_E_NOT_FOUND);
    memset(reply, 22, big);
    assert_int_equal(store_idem_put(f->st, s.id, "k22", 22, 22, reply, big, 1000), OPTD_OK);
    /* 16..20 and 22 in the second lap (21's place left empty): 1..7 gone. */
    for (uint64_t step = 1; step <= 22; step++) {
        if (step == 21)
            continue;
        snprintf(key, sizeof key, "k%llu", (unsigned long long)step);
        memset(&r, 0, sizeof r);
        assert_int_equal(store_idem_get(f->st, s.id, key, step, big, 1000, &r), OPTD_OK);
        if (step <= 7) {
            assert_null(r.reply);
        } else {
            memset(reply, (int)step, big);
            if (step != 22)
                reply[big - 1] = (unsigned char)(step + 1);
            assert_int_equal(r.reply_len, big);
            assert_memory_equal(r.reply, reply, big);
        }
        free(r.reply);
    }
    assert_true(pragma_on(f->path, "SELECT count(*) FROM replies") <= 16 * 16 + 1);
    assert_int_equal(store_session_delete(f->st, "big"), OPTD_OK);
    memset(reply, 1, 100);
    for (uint64_t step = 1; step <= 2000; step++) {
        snprintf(key, sizeof key, "s%llu", (unsigned long long)step);
        assert_int_equal(store_idem_put(f->st, 77, key, step, step, reply, 100, 1000), OPTD_OK);
    }
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM replies"), 1);
    free(reply);
}

static void test_delete_removes_the_sessions_state_and_keys(void **state)
{
    fixture *f = *state;
    store_session s = make_session("gone", 1), keep = make_session("kept", 1);
    store_idem r;

    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &s, "s", 1), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &keep, "k", 1), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, s.id, "key", 1, 1, "r", 1, 10), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, keep.id, "key", 1, 1, "r", 1, 10), OPTD_OK);
    assert_int_equal(store_session_delete(f->st, "gone"), OPTD_OK);
    assert_int_equal(store_idem_get(f->st, s.id, "key", 1, 1, 10, &r), OPTD_E_NOT_FOUND);
    assert_int_equal(store_idem_get(f->st, keep.id, "key", 1, 1, 10, &r), OPTD_OK);
    assert_int_equal(r.reply_len, 1);
    free(r.reply);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM state"), 1);
    /* The kept session's key waits in its row; the other's went with it. */
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_keys"), 0);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM replies"), 1);
}

static void test_rollback_leaves_nothing_behind(void **state)
{
    fixture *f = *state;
    store_session s = make_session("temp", 0), got;
    store_idem r;
    uint64_t n = 99;

    open_store(f, NULL);
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &s, "t", 1), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, s.id, "k", 1, 1, "r", 1, 10), OPTD_OK);
    /* The writer sees its own uncommitted work. */
    assert_int_equal(store_session_load(f->st, "temp", &got, NULL, NULL), OPTD_OK);
    store_session_clear(&got);
    store_rollback(f->st);
    store_rollback(f->st); /* a second one is harmless */

    assert_int_equal(store_session_load(f->st, "temp", &got, NULL, NULL), OPTD_E_NOT_FOUND);
    assert_int_equal(store_idem_get(f->st, s.id, "k", 1, 1, 10, &r), OPTD_E_NOT_FOUND);
    assert_int_equal(store_read_count(f->st, &n), OPTD_OK);
    assert_int_equal(n, 0);
    /* And the connection can start again. */
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);
}

static void test_a_savepoint_rolls_back_one_job_and_the_group_commits_the_rest(void **state)
{
    fixture *f = *state;
    store_session kept = make_session("kept", 0), undone = make_session("undone", 0), got;
    unsigned char big[4096], old[4096];
    void *blob = NULL;
    size_t len = 0;

    open_store(f, NULL);
    memset(old, 1, sizeof old);
    assert_int_equal(store_session_insert(f->st, &kept, old, sizeof old), OPTD_OK);

    assert_int_equal(store_begin(f->st), OPTD_OK);
    /* Job 1: a step of "kept", kept. */
    assert_int_equal(store_savepoint(f->st), OPTD_OK);
    memset(big, 2, sizeof big);
    assert_int_equal(store_session_step(f->st, kept.id, 1, 5, big, sizeof big, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_release(f->st), OPTD_OK);
    /* Job 2: a create and a second step (in place) of "kept", undone. */
    assert_int_equal(store_savepoint(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &undone, "u", 1), OPTD_OK);
    memset(big, 3, sizeof big);
    assert_int_equal(store_session_step(f->st, kept.id, 2, 6, big, sizeof big, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_rollback_to(f->st), OPTD_OK);
    /* Job 3 sees job 1's step, not job 2's. */
    assert_int_equal(store_savepoint(f->st), OPTD_OK);
    assert_int_equal(store_session_load(f->st, "kept", &got, &blob, &len), OPTD_OK);
    assert_int_equal(got.step, 1);
    assert_int_equal(len, sizeof big);
    assert_int_equal(((unsigned char *)blob)[100], 2);
    store_session_clear(&got);
    free(blob);
    assert_int_equal(store_release(f->st), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);

    assert_int_equal(store_read_session(f->st, "undone", &got, NULL, NULL), OPTD_E_NOT_FOUND);
    assert_int_equal(store_read_session(f->st, "kept", &got, &blob, &len), OPTD_OK);
    assert_int_equal(got.step, 1);
    assert_int_equal(((unsigned char *)blob)[len - 1], 2);
    store_session_clear(&got);
    free(blob);
}

static void test_a_value_past_sqlites_limit_is_too_large_and_the_transaction_goes_on(void **state)
{
    fixture *f = *state;
    store_session huge = make_session("huge", 0), small = make_session("small", 0), got;
    size_t n = (size_t)1000000000 + 1; /* SQLite's default SQLITE_MAX_LENGTH, plus one */
    /* Address space only: pages never touched cost nothing, and SQLite
     * refuses the length before reading any of it. */
    void *p = mmap(NULL, n, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

    assert_true(p != MAP_FAILED);
    open_store(f, NULL);
    /* On its own: refused, and nothing of it stays. */
    assert_int_equal(store_session_insert(f->st, &huge, p, n), OPTD_E_SESSION_TOO_LARGE);
    assert_int_equal(store_read_session(f->st, "huge", &got, NULL, NULL), OPTD_E_NOT_FOUND);
    /* In a group: the job rolls back to its savepoint, the group commits. */
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_savepoint(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &huge, p, n), OPTD_E_SESSION_TOO_LARGE);
    assert_int_equal(store_rollback_to(f->st), OPTD_OK);
    assert_int_equal(store_savepoint(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &small, "s", 1), OPTD_OK);
    assert_int_equal(store_release(f->st), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);
    assert_int_equal(store_read_session(f->st, "huge", &got, NULL, NULL), OPTD_E_NOT_FOUND);
    assert_int_equal(store_read_session(f->st, "small", &got, NULL, NULL), OPTD_OK);
    store_session_clear(&got);
    munmap(p, n);
}

static void test_reopen_sees_committed_data(void **state)
{
    fixture *f = *state;
    store_session s = make_session("persist", 41), got;
    void *blob = NULL;
    size_t len = 0;
    store_idem r;

    open_store(f, NULL);
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &s, "state!", 6), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, s.id, "k", 41, 9, "r", 1, 10), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);
    reopen(f);

    assert_int_equal(store_read_session(f->st, "persist", &got, &blob, &len), OPTD_OK);
    assert_int_equal(got.step, 41);
    assert_int_equal(got.id, s.id);
    assert_int_equal(len, 6);
    assert_memory_equal(blob, "state!", 6);
    free(blob);
    store_session_clear(&got);
    assert_int_equal(store_idem_get(f->st, s.id, "k", 41, 1, 10, &r), OPTD_OK);
    assert_int_equal(r.digest, 9);
    assert_int_equal(r.reply_len, 1);
    assert_memory_equal(r.reply, "r", 1);
    free(r.reply);
}

static void test_readers_see_committed_data_but_not_the_open_transaction(void **state)
{
    fixture *f = *state;
    store_session a = make_session("a", 1), b = make_session("b", 0), got;
    void *blob = NULL;
    size_t len = 0;
    uint64_t n = 0;

    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &a, "old", 3), OPTD_OK);

    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &b, "", 0), OPTD_OK);
    a.step = 2;
    assert_int_equal(store_session_update(f->st, &a, "new", 3), OPTD_OK);

    assert_int_equal(store_read_session(f->st, "b", &got, NULL, NULL), OPTD_E_NOT_FOUND);
    assert_int_equal(store_read_session(f->st, "a", &got, &blob, &len), OPTD_OK);
    assert_int_equal(got.step, 1);
    assert_memory_equal(blob, "old", 3);
    free(blob);
    store_session_clear(&got);
    assert_int_equal(store_read_count(f->st, &n), OPTD_OK);
    assert_int_equal(n, 1);

    assert_int_equal(store_commit(f->st), OPTD_OK);
    assert_int_equal(store_read_session(f->st, "b", &got, NULL, NULL), OPTD_OK);
    store_session_clear(&got);
    assert_int_equal(store_read_session(f->st, "a", &got, &blob, &len), OPTD_OK);
    assert_int_equal(got.step, 2);
    assert_memory_equal(blob, "new", 3);
    free(blob);
    store_session_clear(&got);
    assert_int_equal(store_read_count(f->st, &n), OPTD_OK);
    assert_int_equal(n, 2);
}

static void test_a_text_file_is_refused_and_left_unchanged(void **state)
{
    fixture *f = *state;
    static const char text[] = "lr = 0.001\nthis is a config file, not a database\n";

    spit(f->path, text, sizeof text - 1);
    assert_refused_unchanged(f, "is not an optd database");
}

static void test_another_applications_sqlite_database_is_refused_and_left_unchanged(void **state)
{
    fixture *f = *state;
    char buf[16];

    sql_on(f->path, "CREATE TABLE photos(id INTEGER PRIMARY KEY, path TEXT);"
                    "INSERT INTO photos(path) VALUES ('/a.jpg'), ('/b.jpg');");
    assert_refused_unchanged(f, "is not an optd database");
    assert_string_equal(text_on(f->path, "PRAGMA journal_mode", buf, sizeof buf), "delete");
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM photos"), 2);
}

static void test_an_sqlite_file_with_another_application_id_is_refused(void **state)
{
    fixture *f = *state;

    /* No tables at all: the application id alone says it is not ours. */
    sql_on(f->path, "PRAGMA application_id = 1234; PRAGMA user_version = 1;");
    assert_refused_unchanged(f, "is not an optd database");
}

static void test_a_database_from_a_newer_optd_is_refused(void **state)
{
    fixture *f = *state;

    store_one_session(f);
    sql_on(f->path, "PRAGMA user_version = 7;");
    assert_refused_unchanged(f, "made by a newer optd");
}

static void test_a_corrupt_database_is_refused(void **state)
{
    fixture *f = *state;
    unsigned char *bytes;
    size_t len, i;
    char name[16];

    open_store(f, NULL);
    assert_int_equal(store_begin(f->st), OPTD_OK);
    for (i = 0; i < 50; i++) {
        snprintf(name, sizeof name, "s%zu", i);
        insert(f, name);
    }
    assert_int_equal(store_commit(f->st), OPTD_OK);
    store_close(f->st); /* checkpoints everything into the main file */
    f->st = NULL;

    /* Scribble over every page after the first: the header still says
     * "optd", the b-trees are garbage. */
    bytes = slurp(f->path, &len);
    assert_true(len > 4096);
    for (i = 4096; i < len; i++)
        bytes[i] = (unsigned char)(i * 7 + 3);
    spit(f->path, bytes, len);
    free(bytes);
    assert_refused_unchanged(f, "corrupt");
}

/* Opens the store with one new session named name, for history; its id. */
static int64_t history_session(fixture *f, const char *name)
{
    open_store(f, NULL);
    store_session s = make_session(name, 0);
    assert_int_equal(store_session_insert(f->st, &s, "abc", 3), OPTD_OK);
    return s.id;
}

static void test_history_keeps_exactly_the_last_steps_and_pages_in_order(void **state)
{
    fixture *f = *state;
    store_history *rows = NULL;
    size_t n = 0;
    int more = 0;

    int64_t id = history_session(f, "h");
    for (uint64_t step = 1; step <= 10; step++) {
        store_history h = {step, 1000 + (int64_t)step, 0.1, 2.0 * step, 0.5, 3.0, 1, step % 2, 0.25 * step};
        assert_int_equal(store_history_put(f->st, id, &h, 4), OPTD_OK);
    }
    assert_int_equal(store_read_history(f->st, id, 0, 3, 4, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 3);
    assert_int_equal(more, 1);
    assert_int_equal(rows[0].step, 7);
    assert_int_equal(rows[2].step, 9);
    assert_true(rows[0].has_loss);
    assert_true(rows[0].loss == 0.25 * 7);
    assert_false(rows[1].has_loss);
    assert_true(rows[1].grad_norm == 16.0);
    free(rows);
    assert_int_equal(store_read_history(f->st, id, 9, 3, 4, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 1);
    assert_int_equal(more, 0);
    assert_int_equal(rows[0].step, 10);
    free(rows);
    assert_int_equal(store_session_delete(f->st, "h"), OPTD_OK);
    assert_int_equal(store_read_history(f->st, id, 0, 100, 4, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 0);
    free(rows);
}

static store_history hist_row(uint64_t step, double lr)
{
    store_history h = {step, 5000 + (int64_t)step, lr, 1.0 / (double)step, 0.1 + (double)step, 3.5, step % 3,
                       step % 2, -0.3 * (double)step};
    return h;
}

static void assert_hist_eq(const store_history *a, const store_history *b)
{
    assert_int_equal(a->step, b->step);
    assert_int_equal(a->time_ms, b->time_ms);
    assert_memory_equal(&a->lr, &b->lr, sizeof a->lr);
    assert_memory_equal(&a->grad_norm, &b->grad_norm, sizeof a->grad_norm);
    assert_memory_equal(&a->update_norm, &b->update_norm, sizeof a->update_norm);
    assert_memory_equal(&a->param_norm, &b->param_norm, sizeof a->param_norm);
    assert_int_equal(a->contributors, b->contributors);
    assert_int_equal(a->has_loss, b->has_loss);
    if (a->has_loss)
        assert_memory_equal(&a->loss, &b->loss, sizeof a->loss);
}

/* The newest rows wait in the session's row and move to the history table
 * 16 at a time: reads see both, in order and bit for bit, across a reopen
 * and across the boundary between the two; a step recorded again replaces
 * its row wherever it is. */
static void test_history_rows_wait_in_the_session_row_and_move_in_batches(void **state)
{
    fixture *f = *state;
    store_history *rows = NULL;
    size_t n = 0;
    int more = 0;

    int64_t id = history_session(f, "t");
    for (uint64_t step = 1; step <= 40; step++) {
        store_history h = hist_row(step, 0.01 * (double)step);
        assert_int_equal(store_history_put(f->st, id, &h, 1000), OPTD_OK);
    }
    store_history again = hist_row(38, 7.0), early = hist_row(3, 9.0);
    assert_int_equal(store_history_put(f->st, id, &again, 1000), OPTD_OK);
    store_close(f->st);
    f->st = NULL;
    /* Two batches in the table, nine rows (the last a repeat) in the tail. */
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM history"), 32);
    assert_int_equal(pragma_on(f->path, "SELECT hist_n FROM sessions"), 9);
    assert_int_equal(pragma_on(f->path, "SELECT length(hist_tail) FROM sessions"), 16 * 65);
    open_store(f, NULL);
    assert_int_equal(store_read_history(f->st, id, 0, 1000, 1000, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 40);
    assert_int_equal(more, 0);
    for (uint64_t i = 0; i < 40; i++) {
        store_history want = i + 1 == 38 ? again : hist_row(i + 1, 0.01 * (double)(i + 1));
        assert_hist_eq(&rows[i], &want);
    }
    free(rows);
    /* A page across the boundary. */
    assert_int_equal(store_read_history(f->st, id, 30, 5, 1000, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 5);
    assert_int_equal(more, 1);
    assert_int_equal(rows[0].step, 31);
    assert_int_equal(rows[4].step, 35);
    free(rows);
    /* A step in the table recorded again (a restored session steps on). */
    assert_int_equal(store_history_put(f->st, id, &early, 1000), OPTD_OK);
    assert_int_equal(store_read_history(f->st, id, 2, 2, 1000, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 2);
    assert_hist_eq(&rows[0], &early);
    assert_int_equal(rows[1].step, 4);
    free(rows);
    /* No history kept: nothing recorded, the rows up to the step forgotten. */
    assert_int_equal(store_history_put(f->st, id, &early, 0), OPTD_OK);
    assert_int_equal(store_read_history(f->st, id, 0, 100, 0, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 29);
    assert_int_equal(rows[0].step, 4);
    free(rows);
    assert_int_equal(store_history_put(f->st, id + 1, &early, 10), OPTD_E_NOT_FOUND);
}

/* A step's history row goes with the step (store_session_step and
 * store_session_log, mostly in the same row rewrite): the rows of 40 steps
 * across both paths, with keep 20 and tails moving to the table on the
 * way, read back as the last 20, in order and exact; a refused step (its
 * row not at step - 1) leaves no row; keep 0 forgets them all. */
static void test_a_step_records_its_history_row_with_it(void **state)
{
    fixture *f = *state;
    store_history *rows = NULL;
    size_t n = 0;
    int more = 0;
    store_part part = {"L", 1};

    int64_t id = history_session(f, "h");
    for (uint64_t step = 1; step <= 40; step++) {
        store_history h = hist_row(step, 0.25);
        if (step % 5 == 0) /* a logged step now and then */
            assert_int_equal(store_session_log(f->st, id, step, 7, step - 1, 0, &part, 1, &h, 20, NULL), OPTD_OK);
        else
            assert_int_equal(store_session_step(f->st, id, step, 7, "def", 3, &h, 20, NULL), OPTD_OK);
    }
    store_history late = hist_row(40, 0.5), wrong = hist_row(41, 0.5);
    assert_int_equal(store_session_step(f->st, id, 40, 8, "xyz", 3, &late, 20, NULL), OPTD_E_UNAVAILABLE);
    assert_int_equal(store_session_log(f->st, id, 40, 8, 39, 0, &part, 1, &late, 20, NULL), OPTD_E_UNAVAILABLE);
    assert_int_equal(store_session_step(f->st, id, 42, 8, "xyz", 3, &wrong, 20, NULL), OPTD_E_INVALID);
    assert_int_equal(store_read_history(f->st, id, 0, 100, 20, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 20);
    assert_false(more);
    for (uint64_t i = 0; i < 20; i++) {
        store_history want = hist_row(21 + i, 0.25);
        assert_hist_eq(&rows[i], &want);
    }
    free(rows);
    rows = NULL;

    store_history h41 = hist_row(41, 0.25);
    assert_int_equal(store_session_step(f->st, id, 41, 9, "def", 3, &h41, 0, NULL), OPTD_OK);
    assert_int_equal(store_read_history(f->st, id, 0, 100, 20, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 0);
    free(rows);
}

/* Asserts that session name is at step with state want (len bytes). */
static void assert_state(fixture *f, const char *name, uint64_t step, const void *want, size_t len)
{
    store_session got;
    void *blob = NULL;
    size_t n = 0;
    assert_int_equal(store_session_load(f->st, name, &got, &blob, &n), OPTD_OK);
    assert_int_equal(got.step, step);
    assert_int_equal(n, len);
    assert_memory_equal(blob, want, len);
    free(blob);
    store_session_clear(&got);
}

/* The writer keeps its write handles on the state and the reply ring open
 * from one step of a transaction to the next (store.c, blob_at), moving
 * them to each step's row. Each step must still land on its own row: after
 * another row, after its row was rewritten at another size, deleted beside
 * it or rolled back to a savepoint, and the transaction must commit
 * although it has left them open. */
static void test_kept_blob_handles_write_each_steps_own_row(void **state)
{
    fixture *f = *state;
    open_store(f, NULL);
    int64_t id[3];
    const char *names[3] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++) {
        store_session s = make_session(names[i], 0);
        assert_int_equal(store_session_insert(f->st, &s, "....", 4), OPTD_OK);
        id[i] = s.id;
    }
    char reply[3][5000];
    for (int i = 0; i < 3; i++)
        memset(reply[i], 'x' + i, sizeof reply[i]);

    /* One step each, the handles moving from row to row. */
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_session_step(f->st, id[0], 1, 7, "A001", 4, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, id[0], "k1", 1, 11, reply[0], sizeof reply[0], 100), OPTD_OK);
    assert_int_equal(store_session_step(f->st, id[1], 1, 7, "B001", 4, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, id[1], "k1", 1, 12, reply[1], sizeof reply[1], 100), OPTD_OK);
    assert_int_equal(store_session_step(f->st, id[2], 1, 7, "C001", 4, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);
    assert_state(f, "a", 1, "A001", 4);
    assert_state(f, "b", 1, "B001", 4);
    assert_state(f, "c", 1, "C001", 4);

    assert_int_equal(store_begin(f->st), OPTD_OK);
    /* a's row rewritten at another size, then a step of the new size. */
    store_session sa = make_session("a", 1);
    sa.id = id[0];
    assert_int_equal(store_session_update(f->st, &sa, "A00001", 6), OPTD_OK);
    assert_int_equal(store_session_step(f->st, id[0], 2, 7, "A00002", 6, NULL, 0, NULL), OPTD_OK);
    /* c's step rolled back to its savepoint, then b steps again. */
    assert_int_equal(store_savepoint(f->st), OPTD_OK);
    assert_int_equal(store_session_step(f->st, id[2], 2, 7, "C002", 4, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_rollback_to(f->st), OPTD_OK);
    assert_state(f, "c", 1, "C001", 4);
    assert_int_equal(store_session_step(f->st, id[1], 2, 7, "B002", 4, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, id[1], "k2", 2, 13, reply[2], sizeof reply[2], 100), OPTD_OK);
    /* c deleted beside the open handles; b steps once more. */
    assert_int_equal(store_session_delete(f->st, "c"), OPTD_OK);
    assert_int_equal(store_session_step(f->st, id[1], 3, 7, "B003", 4, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);

    assert_state(f, "a", 2, "A00002", 6);
    assert_state(f, "b", 3, "B003", 4);
    store_session gone;
    assert_int_equal(store_session_load(f->st, "c", &gone, NULL, NULL), OPTD_E_NOT_FOUND);
    assert_reply(f, id[0], "k1", 1, 100, 11, reply[0], sizeof reply[0]);
    assert_reply(f, id[1], "k1", 1, 100, 12, reply[1], sizeof reply[1]);
    assert_reply(f, id[1], "k2", 2, 100, 13, reply[2], sizeof reply[2]);
    /* And again after a reopen, from the file. */
    reopen(f);
    assert_state(f, "a", 2, "A00002", 6);
    assert_state(f, "b", 3, "B003", 4);
    assert_reply(f, id[1], "k2", 2, 100, 13, reply[2], sizeof reply[2]);
}

/* The ring's head is written as a transaction commits, when a put moved
 * it. A put rolled back with its transaction must not make the next,
 * empty, commit write the head: that commit would then count as a write
 * that proves the storage works (store_commit) and add a WAL frame. */
static void test_a_rolled_back_put_leaves_the_next_empty_commit_empty(void **state)
{
    fixture *f = *state;
    store_stats a, b;
    char reply[100];
    memset(reply, 'r', sizeof reply);

    int64_t id = history_session(f, "k");
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_idem_put(f->st, id, "gone", 1, 5, reply, sizeof reply, 100), OPTD_OK);
    store_rollback(f->st);
    store_stats_get(f->st, &a);
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);
    store_stats_get(f->st, &b);
    assert_int_equal(b.wal_frames_written, a.wal_frames_written);
    /* A put that commits still carries the head with it. */
    assert_int_equal(store_idem_put(f->st, id, "kept", 1, 6, reply, sizeof reply, 100), OPTD_OK);
    reopen(f);
    assert_reply(f, id, "kept", 1, 100, 6, reply, sizeof reply);
}

/* store_history_get finds a step's row in the table or in the session's
 * tail, on the writer's connection: what its open transaction wrote too. */
static void test_history_get_finds_a_steps_row_where_it_waits(void **state)
{
    fixture *f = *state;
    store_history got;

    int64_t id = history_session(f, "one");
    for (uint64_t step = 1; step <= 20; step++) { /* 16 go to the table, 4 wait */
        store_history h = hist_row(step, 0.5);
        assert_int_equal(store_history_put(f->st, id, &h, 1000), OPTD_OK);
    }
    for (uint64_t step = 1; step <= 20; step++) {
        store_history want = hist_row(step, 0.5);
        assert_int_equal(store_history_get(f->st, id, step, &got), OPTD_OK);
        assert_hist_eq(&got, &want);
    }
    assert_int_equal(store_history_get(f->st, id, 21, &got), OPTD_E_NOT_FOUND);
    assert_int_equal(store_history_get(f->st, id + 1, 1, &got), OPTD_E_NOT_FOUND);
    assert_int_equal(store_history_get(f->st, id, 0, &got), OPTD_E_INVALID);
    assert_int_equal(store_begin(f->st), OPTD_OK);
    store_history h21 = hist_row(21, 0.5);
    assert_int_equal(store_history_put(f->st, id, &h21, 1000), OPTD_OK);
    assert_int_equal(store_history_get(f->st, id, 21, &got), OPTD_OK);
    assert_hist_eq(&got, &h21);
    store_rollback(f->st);
    assert_int_equal(store_history_get(f->st, id, 21, &got), OPTD_E_NOT_FOUND);
}

/* A keyed step's key and reply go with the step (mostly in the same row
 * rewrite as its history row): 140 steps across both step paths, window
 * 40, key tails and history tails moving on the way; every key in the
 * window is found with its digest and reply, the older ones are not kept
 * past a batch, and a refused step records no key. Keys longer than a
 * tail entry and history off take the long way, to the same effect. */
static void test_a_keyed_step_records_its_key_with_it(void **state)
{
    fixture *f = *state;
    store_part part = {"L", 1};
    char key[300], reply[16];
    store_idem r;

    int64_t id = history_session(f, "keyed");
    for (uint64_t step = 1; step <= 140; step++) {
        store_history h = hist_row(step, 0.25);
        snprintf(key, sizeof key, "%036llu", (unsigned long long)step);
        snprintf(reply, sizeof reply, "reply-%06llu", (unsigned long long)step);
        store_key k = {key, step * 3, reply, 12, 40};
        if (step == 120) { /* too long for a tail */
            memset(key, 'x', 299);
            key[299] = '\0';
        }
        uint64_t keep = step == 125 ? 0 : 1000; /* history off: no merged UPDATE */
        if (step % 7 == 0)
            assert_int_equal(store_session_log(f->st, id, step, 7, step - 1, 0, &part, 1, &h, keep, &k), OPTD_OK);
        else
            assert_int_equal(store_session_step(f->st, id, step, 7, "def", 3, &h, keep, &k), OPTD_OK);
    }
    store_history late = hist_row(140, 0.5);
    store_key again = {"refused", 1, "r", 1, 40};
    assert_int_equal(store_session_step(f->st, id, 140, 8, "xyz", 3, &late, 1000, &again), OPTD_E_UNAVAILABLE);
    assert_int_equal(store_idem_get(f->st, id, "refused", 140, 1, 40, &r), OPTD_E_NOT_FOUND);
    store_history next = hist_row(141, 0.5);
    store_key bad = {NULL, 1, "r", 1, 40};
    assert_int_equal(store_session_step(f->st, id, 141, 8, "xyz", 3, &next, 1000, &bad), OPTD_E_INVALID);
    for (uint64_t step = 101; step <= 140; step++) {
        if (step == 120)
            continue;
        snprintf(key, sizeof key, "%036llu", (unsigned long long)step);
        snprintf(reply, sizeof reply, "reply-%06llu", (unsigned long long)step);
        assert_reply(f, id, key, step, 40, step * 3, reply, 12);
    }
    memset(key, 'x', 299);
    key[299] = '\0';
    assert_reply(f, id, key, 120, 40, 360, "reply-000120", 12);
    /* Keys far out of the window have left with a batch: at step 120, the
     * first key to go to the table with its oldest key (1) 40 + 64 steps
     * back, those of steps <= 80. */
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_keys WHERE step <= 80"), 0);
    assert_int_equal(pragma_on(f->path, "SELECT min(step) FROM idem_keys"), 81);
    assert_true(pragma_on(f->path, "SELECT count(*) FROM idem_keys") > 0);
    assert_int_equal(pragma_on(f->path, "SELECT step FROM sessions WHERE name = 'keyed'"), 140);
}

/* Schema 6's reply ring taken back to schema 5's rings per session. */
#define SCHEMA_5_IDEM                                                                                                  \
    "DROP TABLE replies;"                                                                                              \
    "DROP TABLE ring;"                                                                                                 \
    "ALTER TABLE idem_keys DROP COLUMN pos;"                                                                           \
    "ALTER TABLE sessions DROP COLUMN idem_legacy;"

/* Schema 5's idempotency tables and columns taken back to schema 4's. */
#define SCHEMA_4_IDEM                                                                                                  \
    SCHEMA_5_IDEM                                                                                                      \
    "DROP TABLE idem_keys;"                                                                                            \
    "DROP TABLE idem_replies;"                                                                                         \
    "ALTER TABLE sessions DROP COLUMN idem_tail;"                                                                      \
    "ALTER TABLE sessions DROP COLUMN idem_used;"                                                                      \
    "CREATE TABLE idem(session_id INTEGER NOT NULL, key TEXT NOT NULL, step INTEGER NOT NULL,"                         \
    " digest INTEGER NOT NULL, reply BLOB, PRIMARY KEY(session_id, key));"                                             \
    "CREATE INDEX idem_step ON idem(session_id, step);"

/* A file of schema 3 (history clustered by session, no tail in the session
 * row) keeps its history rows through the upgrade, and steps on. */
static void test_history_of_schema_3_survives_the_upgrade(void **state)
{
    fixture *f = *state;
    store_history *rows = NULL;
    size_t n = 0;
    int more = 0;

    int64_t id = history_session(f, "old");
    for (uint64_t step = 1; step <= 20; step++) {
        store_history h = hist_row(step, 0.5);
        assert_int_equal(store_history_put(f->st, id, &h, 1000), OPTD_OK);
    }
    store_close(f->st);
    f->st = NULL;
    /* Back to schema 3's tables, with the 16 flushed rows (the 4 waiting in
     * the tail go with its columns). */
    sql_on(f->path,
           "CREATE TABLE h3(session_id INTEGER NOT NULL, step INTEGER NOT NULL, time_ms INTEGER NOT NULL,"
           " lr REAL, grad_norm REAL, update_norm REAL, param_norm REAL, contributors INTEGER NOT NULL, loss REAL,"
           " PRIMARY KEY(session_id, step)) WITHOUT ROWID;"
           "INSERT INTO h3 SELECT session_id, step, time_ms, lr, grad_norm, update_norm, param_norm, contributors,"
           " loss FROM history;"
           "DROP TABLE history;"
           "ALTER TABLE h3 RENAME TO history;"
           "ALTER TABLE sessions DROP COLUMN hist_n;"
           "ALTER TABLE sessions DROP COLUMN hist_tail;"
           SCHEMA_4_IDEM
           "CREATE INDEX idem_reply_step ON idem(session_id, step) WHERE reply IS NOT NULL;"
           "PRAGMA user_version = 3;");
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM history"), 16);
    open_store(f, NULL);
    assert_int_equal(pragma_on(f->path, "PRAGMA user_version"), 6);
    store_history h21 = hist_row(21, 0.5);
    assert_int_equal(store_history_put(f->st, id, &h21, 1000), OPTD_OK);
    assert_int_equal(store_read_history(f->st, id, 0, 100, 1000, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 17);
    for (uint64_t i = 0; i < 16; i++) {
        store_history want = hist_row(i + 1, 0.5);
        assert_hist_eq(&rows[i], &want);
    }
    assert_hist_eq(&rows[16], &h21);
    free(rows);
}

/* Schema 5 kept a ring of replies per session and keys in the session's
 * tail without a pos: the upgrade moves the tail's keys to idem_keys, both
 * replays still find their replies in the old ring, new replies go to the
 * shared one, and the old ring goes once the window has passed the steps
 * it served. Schema 5's bytes as store.c wrote them: a tail entry is step
 * and digest (8 bytes each, little-endian), the key's length and the key;
 * a ring of 4-byte replies under window 10,000 has slots of 20 bytes (step,
 * length, reply) in a chunk of 65,520, rowid session << 20. */
static void test_schema_5_keys_and_replies_are_kept(void **state)
{
    fixture *f = *state;
    char listed[256] = "", key[16];

    store_one_session(f);
    sql_on(f->path, SCHEMA_5_IDEM
           "UPDATE sessions SET step = 7, idem_used = 24,"
           " idem_tail = x'07000000000000004d000000000000000777616974696e67' || zeroblob(2024) WHERE id = 1;"
           "INSERT INTO idem_keys(session_id, step, key, digest) VALUES (1, 5, 'flushed', 55);"
           "INSERT INTO idem_replies(id, data) VALUES (1 << 20, zeroblob(100)"
           " || x'05000000000000000400000000000000' || x'05050505' || zeroblob(20)"
           " || x'07000000000000000400000000000000' || x'07070707' || zeroblob(65360));"
           "PRAGMA user_version = 5;");
    open_store(f, NULL);
    assert_int_equal(pragma_on(f->path, "PRAGMA user_version"), 6);
    assert_int_equal(pragma_on(f->path, "SELECT idem_used FROM sessions"), 0);
    assert_int_equal(pragma_on(f->path, "SELECT idem_legacy FROM sessions"), 7);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_keys WHERE pos IS NULL"), 2);
    assert_reply(f, 1, "flushed", 5, 10000, 55, "\x05\x05\x05\x05", 4);
    assert_reply(f, 1, "waiting", 7, 10000, 77, "\x07\x07\x07\x07", 4);
    assert_int_equal(store_idem_keys(f->st, 1, 0, list_key, listed), OPTD_OK);
    assert_string_equal(listed, "5:flushed 7:waiting ");

    /* Window 3: the old keys leave with the first batch that moves to
     * idem_keys (short keys: a tail holds 73), and the old ring with them. */
    for (uint64_t step = 8; step <= 200; step++) {
        snprintf(key, sizeof key, "n%llu", (unsigned long long)step);
        assert_int_equal(store_idem_put(f->st, 1, key, step, step, "\x08\x08\x08\x08", 4, 3), OPTD_OK);
        if (step <= 10) /* the old ring stays while keys it serves may be asked for */
            assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_replies"), 1);
    }
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_replies"), 0);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM sessions WHERE idem_legacy IS NULL"), 1);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM idem_keys WHERE step <= 7"), 0);
    assert_reply(f, 1, "n200", 200, 3, 200, "\x08\x08\x08\x08", 4);
}

/* Schema 4 kept each key's reply in its row: the upgrade keeps both, and
 * the replay of a key from before it still has its reply. */
static void test_schema_4_keys_and_their_replies_are_kept(void **state)
{
    fixture *f = *state;
    store_idem r;
    char listed[256] = "";

    store_one_session(f);
    sql_on(f->path, SCHEMA_4_IDEM "INSERT INTO idem VALUES (1, 'old', 7, 99, x'01020304'), (1, 'gone', 6, 98, NULL);"
                    "PRAGMA user_version = 4;");
    open_store(f, NULL);
    assert_int_equal(pragma_on(f->path, "PRAGMA user_version"), 6);
    assert_reply(f, 1, "old", 7, 10000, 99, "\x01\x02\x03\x04", 4);
    assert_int_equal(store_idem_get(f->st, 1, "gone", 6, 4, 10000, &r), OPTD_OK);
    assert_int_equal(r.digest, 98);
    assert_null(r.reply);
    assert_int_equal(store_idem_keys(f->st, 1, 0, list_key, listed), OPTD_OK);
    assert_string_equal(listed, "6:gone 7:old ");
}

static void test_an_older_schema_is_upgraded(void **state)
{
    fixture *f = *state;

    /* Ours at version 0: the id is set but no migration has run. */
    sql_on(f->path, "PRAGMA application_id = 1869640804;");
    store_one_session(f);
    assert_int_equal(pragma_on(f->path, "PRAGMA user_version"), 6);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM sessions"), 1);
}

static void test_a_lock_held_elsewhere_makes_writes_unavailable_and_writable_false(void **state)
{
    fixture *f = *state;
    store_options opt = {1, 50, 2, 0, NULL, NULL};
    store_session s = make_session("late", 0), got;
    sqlite3 *other = NULL;

    open_store(f, &opt);
    insert(f, "early");
    assert_int_equal(store_writable(f->st), 1);

    assert_int_equal(sqlite3_open(f->path, &other), SQLITE_OK);
    assert_int_equal(sqlite3_exec(other, "BEGIN EXCLUSIVE", NULL, NULL, NULL), SQLITE_OK);

    assert_int_equal(store_writable(f->st), 0);
    assert_int_equal(store_begin(f->st), OPTD_E_UNAVAILABLE);
    /* Outside a transaction a write makes its own, and fails the same way. */
    assert_int_equal(store_session_insert(f->st, &s, "", 0), OPTD_E_UNAVAILABLE);
    /* WAL readers are not blocked by a writer. */
    assert_int_equal(store_read_session(f->st, "early", &got, NULL, NULL), OPTD_OK);
    store_session_clear(&got);

    assert_int_equal(sqlite3_exec(other, "ROLLBACK", NULL, NULL, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_close(other), SQLITE_OK);

    assert_int_equal(store_writable(f->st), 1);
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &s, "", 0), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);
    assert_int_equal(store_read_session(f->st, "late", &got, NULL, NULL), OPTD_OK);
    store_session_clear(&got);
}

static void test_bad_arguments_are_invalid(void **state)
{
    fixture *f = *state;
    store_options too_many = {1, 50, 100000, 0, NULL, NULL};
    store_session s = make_session("x", 0);
    char err[128] = "";

    assert_int_equal(store_open(f->path, &too_many, &f->st, err, sizeof err), OPTD_E_INVALID);
    assert_null(f->st);
    assert_int_equal(store_open(f->dir, NULL, &f->st, err, sizeof err), OPTD_E_INVALID);
    assert_non_null(strstr(err, "not a regular file"));

    open_store(f, NULL);
    s.step = UINT64_C(1) << 63;
    assert_int_equal(store_session_insert(f->st, &s, "", 0), OPTD_E_INVALID);
    s.step = 0;
    assert_int_equal(store_session_insert(f->st, &s, NULL, 5), OPTD_E_INVALID);
    memset(s.name, 'n', sizeof s.name); /* no terminator */
    assert_int_equal(store_session_insert(f->st, &s, "", 0), OPTD_E_INVALID);
    assert_int_equal(store_idem_put(f->st, 1, NULL, 1, 1, NULL, 0, 1), OPTD_E_INVALID);
    assert_int_equal(store_idem_put(f->st, 1, "k", 1, 1, NULL, 3, 1), OPTD_E_INVALID);
}

/* A step moves the stored step by one: a stale copy (the stored step is
 * not the one before) is refused and changes nothing, so two writers can
 * never overwrite each other's steps. */
static void test_a_step_guards_on_the_stored_step(void **state)
{
    fixture *f = *state;
    store_session row = {0};
    void *blob = NULL;
    size_t len = 0;

    open_store(f, NULL);
    insert(f, "g");
    assert_int_equal(store_session_load(f->st, "g", &row, NULL, NULL), OPTD_OK);
    assert_int_equal(store_session_step(f->st, row.id, 1, 1, "def", 3, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_session_step(f->st, row.id, 1, 2, "xyz", 3, NULL, 0, NULL), OPTD_E_UNAVAILABLE);
    assert_int_equal(store_session_step(f->st, row.id, 3, 2, "xyz", 3, NULL, 0, NULL), OPTD_E_UNAVAILABLE);
    assert_int_equal(store_session_step(f->st, row.id + 100, 1, 2, "xyz", 3, NULL, 0, NULL), OPTD_E_NOT_FOUND);
    store_session_clear(&row);
    assert_int_equal(store_session_load(f->st, "g", &row, &blob, &len), OPTD_OK);
    assert_int_equal(row.step, 1);
    assert_int_equal(len, 3);
    assert_memory_equal(blob, "def", 3);
    free(blob);
    store_session_clear(&row);
}

static uint64_t page_cache_limit(fixture *f)
{
    store_stats ss;
    store_stats_get(f->st, &ss);
    return ss.page_cache_limit;
}

/* The writer's page cache stays at SQLite's 2 MB for small steps and grows
 * (16 times a log entry, 64 MiB at most) once a session logs its steps, so
 * that overwriting a slot of the ring finds its pages cached. */
static void test_the_page_cache_grows_for_logged_steps_only(void **state)
{
    fixture *f = *state;
    open_store(f, NULL);
    store_session s = make_session("c", 0);
    assert_int_equal(store_session_insert(f->st, &s, "S0", 2), OPTD_OK);
    assert_int_equal(page_cache_limit(f), 2000 * 1024);
    assert_int_equal(store_session_step(f->st, s.id, 1, 5, "S1", 2, NULL, 0, NULL), OPTD_OK);
    store_history h = hist_row(1, 0.5);
    assert_int_equal(store_history_put(f->st, s.id, &h, 100), OPTD_OK);
    assert_int_equal(page_cache_limit(f), 2000 * 1024);
    store_part p = {NULL, 1 << 20}; /* 1 MiB of zeros */
    assert_int_equal(store_session_log(f->st, s.id, 2, 6, 1, 0, &p, 1, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(page_cache_limit(f), 16u << 20);
    p.len = 16u << 20;
    assert_int_equal(store_session_log(f->st, s.id, 3, 7, 1, 1, &p, 1, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(page_cache_limit(f), 64u << 20);
    p.len = 1;
    assert_int_equal(store_session_log(f->st, s.id, 4, 8, 1, 2, &p, 1, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(page_cache_limit(f), 64u << 20); /* it never shrinks */
}

static void test_a_backup_is_the_last_commit_and_opens_as_a_database(void **state)
{
    fixture *f = *state;
    store_session a = make_session("kept", 3), b = make_session("uncommitted", 5), got;
    store_backup_info info = {0, 0, 0};
    char dest[160], err[256];
    store *bk = NULL;
    void *blob = NULL;
    size_t len = 0, n = 0;
    store_session *rows = NULL;
    int more = 0;

    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &a, "abc", 3), OPTD_OK);
    /* A transaction in progress is not in the snapshot. */
    assert_int_equal(store_begin(f->st), OPTD_OK);
    assert_int_equal(store_session_insert(f->st, &b, "xyz", 3), OPTD_OK);
    snprintf(dest, sizeof dest, "%s/backup.db", f->dir);
    assert_int_equal(store_backup(f->st, dest, NULL, &info, err, sizeof err), OPTD_OK);
    assert_int_equal(store_commit(f->st), OPTD_OK);
    assert_int_equal(info.sessions, 1);
    assert_int_equal(info.step_commits, 3);
    assert_true(info.bytes > 0);
    assert_int_equal(access(dest, F_OK), 0);

    assert_int_equal(store_open(dest, NULL, &bk, err, sizeof err), OPTD_OK);
    assert_int_equal(store_read_list(bk, NULL, 10, &rows, &n, &more), OPTD_OK);
    assert_int_equal(n, 1);
    assert_string_equal(rows[0].name, "kept");
    store_session_clear(&rows[0]);
    free(rows);
    assert_int_equal(store_read_session(bk, "kept", &got, &blob, &len), OPTD_OK);
    assert_int_equal(got.step, 3);
    assert_int_equal(len, 3);
    assert_memory_equal(blob, "abc", 3);
    free(blob);
    store_session_clear(&got);
    store_close(bk);
}

static void test_a_backup_never_replaces_a_file_nor_leaves_one_when_cancelled(void **state)
{
    fixture *f = *state;
    store_session a = make_session("a", 1);
    store_backup_info info = {0, 0, 0};
    char dest[160], tmp[170], err[256];
    _Atomic int cancel = 1;

    open_store(f, NULL);
    assert_int_equal(store_session_insert(f->st, &a, "s", 1), OPTD_OK);
    snprintf(dest, sizeof dest, "%s/backup.db", f->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", dest);
    assert_int_equal(store_backup(f->st, dest, &cancel, &info, err, sizeof err), OPTD_E_UNAVAILABLE);
    assert_non_null(strstr(err, "cancelled"));
    assert_int_not_equal(access(dest, F_OK), 0);
    assert_int_not_equal(access(tmp, F_OK), 0);
    spit(dest, "mine", 4);
    assert_int_equal(store_backup(f->st, dest, NULL, &info, err, sizeof err), OPTD_E_ALREADY_EXISTS);
    size_t len = 0;
    unsigned char *kept = slurp(dest, &len);
    assert_int_equal(len, 4);
    assert_memory_equal(kept, "mine", 4);
    free(kept);
}

/* Reads session name with its state through the writer's load and a
 * reader's, checking both see the same state_step and log. */
static void assert_log(fixture *f, const char *name, uint64_t step, uint64_t state_step, const char *state,
                       const char *const *entries, size_t n)
{
    for (int via = 0; via < 2; via++) {
        store_session got;
        void *blob = NULL;
        size_t len = 0;
        optd_err rc = via ? store_read_session(f->st, name, &got, &blob, &len)
                          : store_session_load(f->st, name, &got, &blob, &len);
        assert_int_equal(rc, OPTD_OK);
        assert_int_equal(got.step, step);
        assert_int_equal(got.state_step, state_step);
        assert_int_equal(len, strlen(state));
        assert_memory_equal(blob, state, len);
        assert_int_equal(got.nlog, n);
        for (size_t i = 0; i < n; i++) {
            assert_int_equal(got.log[i].step, state_step + 1 + i);
            assert_int_equal(got.log[i].len, strlen(entries[i]));
            assert_memory_equal(got.log[i].data, entries[i], got.log[i].len);
        }
        store_session_clear(&got);
        free(blob);
    }
}

static void test_a_log_holds_the_steps_past_the_state_until_the_state_is_written(void **state)
{
    fixture *f = *state;
    open_store(f, NULL);
    store_session s = make_session("g", 0);
    assert_int_equal(store_session_insert(f->st, &s, "S0", 2), OPTD_OK);
    /* Steps 1-3 logged in slots 0-2, each entry in two parts; the second a
     * NULL part (zeros). */
    const char *e[] = {"one-\0\0", "two-\0\0", "six---\0\0"};
    const char *heads[] = {"one-", "two-", "six---"};
    for (uint32_t i = 0; i < 3; i++) {
        store_part parts[2] = {{heads[i], strlen(heads[i])}, {NULL, 2}};
        assert_int_equal(store_session_log(f->st, s.id, i + 1, 5, 0, i, parts, 2, NULL, 0, NULL), OPTD_OK);
    }
    /* The entries hold NULs: compare by explicit lengths. */
    for (int via = 0; via < 2; via++) {
        store_session got;
        void *blob = NULL;
        size_t len = 0;
        assert_int_equal(via ? store_read_session(f->st, "g", &got, &blob, &len)
                             : store_session_load(f->st, "g", &got, &blob, &len),
                         OPTD_OK);
        assert_int_equal(got.step, 3);
        assert_int_equal(got.state_step, 0);
        assert_int_equal(got.nlog, 3);
        for (size_t i = 0; i < 3; i++) {
            assert_int_equal(got.log[i].step, i + 1);
            assert_int_equal(got.log[i].len, strlen(heads[i]) + 2);
            assert_memory_equal(got.log[i].data, e[i], got.log[i].len);
        }
        store_session_clear(&got);
        free(blob);
    }
    /* A step that writes the state ends the log; the next log starts over
     * in slot 0, overwriting it in place at the same length and resizing
     * slot 1. */
    assert_int_equal(store_session_step(f->st, s.id, 4, 6, "S4", 2, NULL, 0, NULL), OPTD_OK);
    assert_log(f, "g", 4, 4, "S4", NULL, 0);
    store_part p5 = {"FIVE-\0", 6}, p6 = {"x", 1};
    assert_int_equal(store_session_log(f->st, s.id, 5, 7, 4, 0, &p5, 1, NULL, 0, NULL), OPTD_OK);
    assert_int_equal(store_session_log(f->st, s.id, 6, 8, 4, 1, &p6, 1, NULL, 0, NULL), OPTD_OK);
    {
        store_session got;
        void *blob = NULL;
        size_t len = 0;
        assert_int_equal(store_read_session(f->st, "g", &got, &blob, &len), OPTD_OK);
        assert_int_equal(got.state_step, 4);
        assert_int_equal(got.nlog, 2);
        assert_int_equal(got.log[0].len, 6);
        assert_memory_equal(got.log[0].data, "FIVE-\0", 6);
        assert_int_equal(got.log[1].len, 1);
        assert_memory_equal(got.log[1].data, "x", 1);
        store_session_clear(&got);
        free(blob);
    }
    /* A step not following the row's is refused, and changes nothing. */
    assert_int_equal(store_session_log(f->st, s.id, 9, 9, 4, 2, &p6, 1, NULL, 0, NULL), OPTD_E_UNAVAILABLE);
    /* An update with state ends the log too; one without keeps it. */
    store_session row;
    void *blob = NULL;
    size_t len = 0;
    assert_int_equal(store_session_load(f->st, "g", &row, &blob, &len), OPTD_OK);
    free(blob);
    assert_int_equal(store_session_update(f->st, &row, NULL, 0), OPTD_OK);
    assert_int_equal(store_read_session(f->st, "g", &s, &blob, &len), OPTD_OK);
    assert_int_equal(s.nlog, 2);
    store_session_clear(&s);
    free(blob);
    assert_int_equal(store_session_update(f->st, &row, "S6", 2), OPTD_OK);
    assert_log(f, "g", 6, 6, "S6", NULL, 0);
    store_session_clear(&row);
    /* Delete takes the log's rows with it. */
    assert_int_equal(store_session_delete(f->st, "g"), OPTD_OK);
    store_close(f->st);
    f->st = NULL;
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM steplog"), 0);
    assert_int_equal(pragma_on(f->path, "SELECT count(*) FROM steplog_data"), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
        T(test_open_creates_an_optd_database_that_close_releases),
        T(test_open_of_an_empty_file_creates_the_database),
        T(test_session_round_trip_keeps_every_field_and_a_1mb_state),
        T(test_an_empty_state_and_a_null_config_round_trip),
        T(test_inserting_a_taken_name_is_already_exists_and_keeps_the_first),
        T(test_missing_sessions_are_not_found_everywhere),
        T(test_ids_are_not_reused_after_a_delete),
        T(test_list_pages_through_names_in_byte_order),
        T(test_count_follows_inserts_and_deletes),
        T(test_idem_put_then_get_returns_the_record),
        T(test_idem_put_forgets_keys_older_than_the_window_in_batches),
        T(test_idem_replies_stay_until_the_ring_comes_round),
        T(test_idem_ring_spans_chunks_rolls_back_and_shrinks),
        T(test_idem_keys_wait_in_the_session_row),
        T(test_schema_5_keys_and_replies_are_kept),
        T(test_schema_4_keys_and_their_replies_are_kept),
        T(test_delete_removes_the_sessions_state_and_keys),
        T(test_rollback_leaves_nothing_behind),
        T(test_a_savepoint_rolls_back_one_job_and_the_group_commits_the_rest),
        T(test_a_value_past_sqlites_limit_is_too_large_and_the_transaction_goes_on),
        T(test_reopen_sees_committed_data),
        T(test_readers_see_committed_data_but_not_the_open_transaction),
        T(test_a_text_file_is_refused_and_left_unchanged),
        T(test_another_applications_sqlite_database_is_refused_and_left_unchanged),
        T(test_an_sqlite_file_with_another_application_id_is_refused),
        T(test_a_database_from_a_newer_optd_is_refused),
        T(test_a_corrupt_database_is_refused),
        T(test_history_keeps_exactly_the_last_steps_and_pages_in_order),
        T(test_history_rows_wait_in_the_session_row_and_move_in_batches),
        T(test_a_step_records_its_history_row_with_it),
        T(test_a_keyed_step_records_its_key_with_it),
        T(test_kept_blob_handles_write_each_steps_own_row),
        T(test_a_rolled_back_put_leaves_the_next_empty_commit_empty),
        T(test_history_get_finds_a_steps_row_where_it_waits),
        T(test_history_of_schema_3_survives_the_upgrade),
        T(test_an_older_schema_is_upgraded),
        T(test_a_lock_held_elsewhere_makes_writes_unavailable_and_writable_false),
        T(test_bad_arguments_are_invalid),
        T(test_a_step_guards_on_the_stored_step),
        T(test_a_log_holds_the_steps_past_the_state_until_the_state_is_written),
        T(test_the_page_cache_grows_for_logged_steps_only),
        T(test_a_backup_is_the_last_commit_and_opens_as_a_database),
        T(test_a_backup_never_replaces_a_file_nor_leaves_one_when_cancelled),
#undef T
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
