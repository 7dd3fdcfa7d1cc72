/* store: optd's SQLite database. One write connection with cached statements
 * for the writer thread, a pool of read-only connections for any thread, and a
 * small probe connection for store_writable. WAL mode; the schema version lives
 * in PRAGMA user_version and is upgraded by the steps in `migrations`. */
#include "store/store.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <sqlite3.h>

/* 'optd' in ASCII, written to PRAGMA application_id when a file is created:
 * it is what tells our files from every other SQLite file. */
#define STORE_APPLICATION_ID 0x6F707464

#define DEFAULT_BUSY_TIMEOUT_MS 5000
#define DEFAULT_READERS 4
#define MAX_READERS 256

/* How long store_writable waits for the write lock, in milliseconds: enough
 * to ride out one group commit, short enough for a health check. */
#define PROBE_TIMEOUT_MS 100

/* Schema migrations: migrations[n] takes a database from user_version n to
 * n + 1, so the current version is the number of steps. A new schema appends
 * a step; shipped steps are never edited, since files in the field were made
 * by them.
 *
 * Why the shape: the state blob (params and optimizer buffers, often MBs) has
 * its own table so that listing and loading sessions never reads it. Session
 * ids are AUTOINCREMENT so an id is never reused after a delete: a step queued
 * for a deleted session can never land on a newer one. idem_step makes pruning
 * by step a range delete; idem_reply_step indexes only the rows that still
 * hold a reply, so dropping old replies touches just the rows it changes
 * rather than rescanning the whole window on every step. */
static const char *const migrations[] = {
    /* 0 -> 1: the first schema. */
    "CREATE TABLE sessions("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " name TEXT UNIQUE NOT NULL,"
    " optimizer TEXT NOT NULL,"
    " dtype INTEGER NOT NULL,"
    " size INTEGER NOT NULL,"
    " step INTEGER NOT NULL,"
    " config TEXT,"
    " created_ms INTEGER NOT NULL,"
    " updated_ms INTEGER NOT NULL);"
    "CREATE TABLE state(session_id INTEGER PRIMARY KEY, data BLOB NOT NULL);"
    "CREATE TABLE idem("
    " session_id INTEGER NOT NULL,"
    " key TEXT NOT NULL,"
    " step INTEGER NOT NULL,"
    " digest INTEGER NOT NULL,"
    " reply BLOB,"
    " PRIMARY KEY(session_id, key));"
    "CREATE INDEX idem_step ON idem(session_id, step);"
    "CREATE INDEX idem_reply_step ON idem(session_id, step) WHERE reply IS NOT NULL;",
    /* 1 -> 2: per-step history, clustered by (session, step) so a page and
     * the prune of the oldest row are both range operations. */
    "CREATE TABLE history("
    " session_id INTEGER NOT NULL,"
    " step INTEGER NOT NULL,"
    " time_ms INTEGER NOT NULL,"
    " lr REAL, grad_norm REAL, update_norm REAL, param_norm REAL,"
    " contributors INTEGER NOT NULL,"
    " loss REAL,"
    " PRIMARY KEY(session_id, step)) WITHOUT ROWID;",
};
#define SCHEMA_VERSION ((int)(sizeof migrations / sizeof migrations[0]))

/* Cached statements. The reads come first because every connection (writer
 * and readers) prepares them; the rest only the writer does. */
enum {
    Q_SESSION,       /* a session row by name */
    Q_SESSION_STATE, /* the same plus its state blob, in one snapshot */
    Q_LIST_FIRST,
    Q_LIST_AFTER,
    Q_COUNT,
    Q_HISTORY_PAGE,
    Q_READ_END,
    Q_BEGIN = Q_READ_END,
    Q_COMMIT,
    Q_ROLLBACK,
    Q_SESSION_INSERT,
    Q_STATE_INSERT,
    Q_SESSION_UPDATE,
    Q_SESSION_STEP,
    Q_STATE_UPDATE,
    Q_SESSION_ID,
    Q_SESSION_DELETE,
    Q_STATE_DELETE,
    Q_IDEM_DELETE_ALL,
    Q_IDEM_GET,
    Q_IDEM_PUT,
    Q_IDEM_PRUNE,
    Q_IDEM_DROP_REPLIES,
    Q_HISTORY_PUT,
    Q_HISTORY_PRUNE,
    Q_HISTORY_DELETE_ALL,
    Q_SAVEPOINT, /* a job's savepoint inside the group's transaction */
    Q_SAVEPOINT_RELEASE,
    Q_SAVEPOINT_ROLLBACK,
    Q_END
};

/* The columns row_session reads, in its order; the state blob follows them. */
#define SESSION_COLS "s.id, s.name, s.optimizer, s.dtype, s.size, s.step, s.config, s.created_ms, s.updated_ms"
#define STATE_COL 9

static const char *const sql[Q_END] = {
    [Q_SESSION] = "SELECT " SESSION_COLS " FROM sessions s WHERE s.name = ?1",
    [Q_SESSION_STATE] = "SELECT " SESSION_COLS ", st.data FROM sessions s"
                        " JOIN state st ON st.session_id = s.id WHERE s.name = ?1",
    /* Two list statements rather than "?1 IS NULL OR name > ?1", which would
     * keep SQLite from seeking the name index. */
    [Q_LIST_FIRST] = "SELECT " SESSION_COLS " FROM sessions s ORDER BY s.name LIMIT ?1",
    [Q_LIST_AFTER] = "SELECT " SESSION_COLS " FROM sessions s WHERE s.name > ?1 ORDER BY s.name LIMIT ?2",
    [Q_COUNT] = "SELECT count(*) FROM sessions",
    [Q_HISTORY_PAGE] = "SELECT step, time_ms, lr, grad_norm, update_norm, param_norm, contributors, loss"
                       " FROM history WHERE session_id = ?1 AND step > ?2 ORDER BY step LIMIT ?3",
    [Q_BEGIN] = "BEGIN IMMEDIATE",
    [Q_COMMIT] = "COMMIT",
    [Q_ROLLBACK] = "ROLLBACK",
    [Q_SESSION_INSERT] = "INSERT INTO sessions(name, optimizer, dtype, size, step, config, created_ms, updated_ms)"
                         " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    [Q_STATE_INSERT] = "INSERT INTO state(session_id, data) VALUES (?1, ?2)",
    [Q_SESSION_UPDATE] = "UPDATE sessions SET step = ?2, config = ?3, updated_ms = ?4 WHERE id = ?1",
    [Q_SESSION_STEP] = "UPDATE sessions SET step = ?2, updated_ms = ?3 WHERE id = ?1",
    [Q_STATE_UPDATE] = "UPDATE state SET data = ?2 WHERE session_id = ?1",
    [Q_SESSION_ID] = "SELECT id FROM sessions WHERE name = ?1",
    [Q_SESSION_DELETE] = "DELETE FROM sessions WHERE id = ?1",
    [Q_STATE_DELETE] = "DELETE FROM state WHERE session_id = ?1",
    [Q_IDEM_DELETE_ALL] = "DELETE FROM idem WHERE session_id = ?1",
    [Q_IDEM_GET] = "SELECT step, digest, reply FROM idem WHERE session_id = ?1 AND key = ?2",
    [Q_IDEM_PUT] = "INSERT OR REPLACE INTO idem(session_id, key, step, digest, reply) VALUES (?1, ?2, ?3, ?4, ?5)",
    [Q_IDEM_PRUNE] = "DELETE FROM idem WHERE session_id = ?1 AND step <= ?2",
    /* INDEXED BY pins the partial index (see migrations): should a later
     * schema lose it, preparing this fails at open instead of the step path
     * silently slowing down. */
    [Q_IDEM_DROP_REPLIES] = "UPDATE idem INDEXED BY idem_reply_step SET reply = NULL"
                            " WHERE session_id = ?1 AND step <= ?2 AND reply IS NOT NULL",
    [Q_HISTORY_PUT] = "INSERT OR REPLACE INTO history(session_id, step, time_ms, lr, grad_norm, update_norm,"
                      " param_norm, contributors, loss) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    [Q_HISTORY_PRUNE] = "DELETE FROM history WHERE session_id = ?1 AND step <= ?2",
    [Q_HISTORY_DELETE_ALL] = "DELETE FROM history WHERE session_id = ?1",
    [Q_SAVEPOINT] = "SAVEPOINT optd_job",
    [Q_SAVEPOINT_RELEASE] = "RELEASE optd_job",
    [Q_SAVEPOINT_ROLLBACK] = "ROLLBACK TO optd_job",
};

/* A read-only connection of the pool with its own copies of the reads. */
struct reader {
    sqlite3 *db;
    sqlite3_stmt *q[Q_READ_END];
};

struct store {
    sqlite3 *db;            /* the write connection: writer thread only */
    sqlite3_stmt *q[Q_END]; /* its cached statements */

    pthread_mutex_t pool_mu; /* guards idle and nidle */
    pthread_cond_t pool_cv;  /* signalled when a reader comes back */
    int pool_init;           /* pool_mu and pool_cv are initialised */
    struct reader *readers;  /* nreaders connections */
    struct reader **idle;    /* stack of the nidle ones not in use */
    int nreaders, nidle;

    pthread_mutex_t probe_mu; /* guards probe */
    int probe_init;           /* probe_mu is initialised */
    sqlite3 *probe;           /* store_writable's own connection; NULL after a failed reopen */
    char *path;               /* the database, for reopening the probe */
    /* The checkpointer: a thread with its own connection that copies the WAL
     * back into the database (PASSIVE, so the writer never waits for it),
     * woken by the writer's WAL hook. The writer never checkpoints itself:
     * with auto-checkpoint a 12 MB step would also copy 12 MB and fsync the
     * database inside its own commit. */
    sqlite3 *ckpt_db;
    pthread_t ckpt_thread;
    pthread_mutex_t ckpt_mu;
    pthread_cond_t ckpt_cv;
    int ckpt_init;    /* ckpt_mu, ckpt_cv and the thread exist */
    int ckpt_wanted;  /* guarded by ckpt_mu */
    int ckpt_stop;    /* guarded by ckpt_mu */
    /* Set when a write transaction failed or was rolled back, cleared by the
     * next commit that succeeds: while set, store_writable makes a real write
     * rather than trust a lock that costs no I/O. */
    atomic_int write_failed;
};

static optd_err probe_open(store *st, char *err, size_t errlen);

/* --- Helpers. ------------------------------------------------------------ */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || !errlen) return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Maps an SQLite result code (extended codes are on) to ours. A unique or
 * primary-key violation is the one constraint our statements break in normal
 * use (a taken name). Busy, locked, full, I/O and permission errors mean the
 * storage cannot be used right now, and the caller may retry. So do corrupt
 * and not-a-database once the file was opened and checked: SQLite reports a
 * page that fails to read (EIO) as "database disk image is malformed", and
 * either way the storage cannot serve while nothing was changed. */
static optd_err from_sqlite(int src)
{
    if (src == SQLITE_OK || src == SQLITE_ROW || src == SQLITE_DONE) return OPTD_OK;
    if (src == SQLITE_CONSTRAINT_UNIQUE || src == SQLITE_CONSTRAINT_PRIMARYKEY) return OPTD_E_ALREADY_EXISTS;
    /* A value past SQLite's length limit: a refusal of that value (nothing
     * was written), not a fault of the storage. */
    if (src == SQLITE_TOOBIG) return OPTD_E_SESSION_TOO_LARGE;
    switch (src & 0xff) {
    case SQLITE_NOMEM: return OPTD_E_NOMEM;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_FULL:
    case SQLITE_IOERR:
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
    case SQLITE_PROTOCOL:
    case SQLITE_PERM:
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
    case SQLITE_INTERRUPT: return OPTD_E_UNAVAILABLE;
    default: return OPTD_E_INTERNAL; /* misuse, schema drift */
    }
}

/* Makes a cached statement ready for its next use. sqlite3_reset's result
 * only repeats the error of the last step, which the caller has already
 * taken; clear_bindings always succeeds and drops the pointers to the
 * caller's buffers that SQLITE_STATIC bindings keep. */
static void stmt_done(sqlite3_stmt *q)
{
    (void)sqlite3_reset(q);
    (void)sqlite3_clear_bindings(q);
}

/* Runs a write statement whose binding returned src, then resets it. */
static optd_err run(sqlite3_stmt *q, int src)
{
    if (src == SQLITE_OK) src = sqlite3_step(q);
    stmt_done(q);
    return from_sqlite(src);
}

/* uint64 values are stored as the int64 with the same bits: SQLite integers
 * are signed, and digests use all 64 bits. */
static int64_t u2i(uint64_t v)
{
    int64_t r;
    memcpy(&r, &v, sizeof r);
    return r;
}

static uint64_t i2u(int64_t v)
{
    uint64_t r;
    memcpy(&r, &v, sizeof r);
    return r;
}

/* Binds bytes: NULL p as SQL NULL, an empty non-NULL buffer as an empty blob
 * (sqlite3_bind_blob64 would turn a NULL pointer into SQL NULL). Borrowed
 * until the statement is reset. */
static int bind_bytes(sqlite3_stmt *q, int i, const void *p, size_t len)
{
    if (!p) return sqlite3_bind_null(q, i);
    if (!len) return sqlite3_bind_zeroblob(q, i, 0);
    return sqlite3_bind_blob64(q, i, p, len, SQLITE_STATIC);
}

/* Copies a BLOB column, since SQLite's pointer dies at the next step or
 * reset. SQL NULL gives *out == NULL. An empty blob, for which
 * sqlite3_column_blob returns NULL, gives a 1-byte allocation with *len 0, so
 * a kept empty value stays distinguishable from none. */
static optd_err column_bytes_copy(sqlite3_stmt *q, int col, void **out, size_t *len)
{
    const void *p;
    void *copy;
    int n;

    *out = NULL;
    *len = 0;
    if (sqlite3_column_type(q, col) == SQLITE_NULL) return OPTD_OK;
    p = sqlite3_column_blob(q, col);
    n = sqlite3_column_bytes(q, col);
    if (!p && sqlite3_errcode(sqlite3_db_handle(q)) == SQLITE_NOMEM) return OPTD_E_NOMEM;
    copy = malloc(n > 0 ? (size_t)n : 1);
    if (!copy) return OPTD_E_NOMEM;
    if (n > 0) memcpy(copy, p, (size_t)n);
    *out = copy;
    *len = (size_t)n;
    return OPTD_OK;
}

/* Copies a TEXT column into buf; SQL NULL gives "". OPTD_E_INTERNAL when it
 * does not fit, which only a file edited behind our back can cause. */
static optd_err column_text_into(sqlite3_stmt *q, int col, char *buf, size_t cap)
{
    const unsigned char *t;
    int n;

    buf[0] = '\0';
    if (sqlite3_column_type(q, col) == SQLITE_NULL) return OPTD_OK;
    t = sqlite3_column_text(q, col);
    n = sqlite3_column_bytes(q, col);
    if (!t) return sqlite3_errcode(sqlite3_db_handle(q)) == SQLITE_NOMEM ? OPTD_E_NOMEM : OPTD_OK;
    if ((size_t)n >= cap) return OPTD_E_INTERNAL;
    memcpy(buf, t, (size_t)n);
    buf[n] = '\0';
    return OPTD_OK;
}

/* As column_text_into into a malloc'd string; SQL NULL gives NULL. */
static optd_err column_text_dup(sqlite3_stmt *q, int col, char **out)
{
    const unsigned char *t;
    int n;

    *out = NULL;
    if (sqlite3_column_type(q, col) == SQLITE_NULL) return OPTD_OK;
    t = sqlite3_column_text(q, col);
    n = sqlite3_column_bytes(q, col);
    if (!t && sqlite3_errcode(sqlite3_db_handle(q)) == SQLITE_NOMEM) return OPTD_E_NOMEM;
    *out = malloc((size_t)n + 1);
    if (!*out) return OPTD_E_NOMEM;
    if (n > 0) memcpy(*out, t, (size_t)n);
    (*out)[n] = '\0';
    return OPTD_OK;
}

/* Fills *out from a row whose first columns are SESSION_COLS. On failure
 * *out is untouched. */
static optd_err row_session(sqlite3_stmt *q, store_session *out)
{
    store_session s;
    optd_err rc;

    memset(&s, 0, sizeof s);
    s.id = sqlite3_column_int64(q, 0);
    rc = column_text_into(q, 1, s.name, sizeof s.name);
    if (rc) goto done;
    rc = column_text_into(q, 2, s.optimizer, sizeof s.optimizer);
    if (rc) goto done;
    s.dtype = sqlite3_column_int(q, 3);
    s.size = i2u(sqlite3_column_int64(q, 4));
    s.step = i2u(sqlite3_column_int64(q, 5));
    rc = column_text_dup(q, 6, &s.config);
    if (rc) goto done;
    s.created_ms = sqlite3_column_int64(q, 7);
    s.updated_ms = sqlite3_column_int64(q, 8);
done:
    if (rc) {
        store_session_clear(&s);
        return rc;
    }
    *out = s;
    return OPTD_OK;
}

/* The fixed-size strings end inside their arrays, and the counters fit the
 * signed integers SQLite stores (a step past 2^63 would break the ordering
 * idem pruning relies on). */
static int session_ok(const store_session *s)
{
    return s && memchr(s->name, '\0', sizeof s->name) && memchr(s->optimizer, '\0', sizeof s->optimizer) &&
           s->size <= INT64_MAX && s->step <= INT64_MAX;
}

/* Loads a session by name with the reads of one connection (the writer's
 * or a reader's): Q_SESSION_STATE reads row and blob in one statement, hence
 * one snapshot, so a reader never pairs a row with another step's state. */
static optd_err session_by_name(sqlite3_stmt *const *qs, const char *name, store_session *out, void **state,
                                size_t *len)
{
    sqlite3_stmt *q = qs[state ? Q_SESSION_STATE : Q_SESSION];
    store_session s;
    void *blob = NULL;
    size_t n = 0;
    optd_err rc;
    int src;

    memset(&s, 0, sizeof s);
    src = sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_step(q);
    if (src == SQLITE_DONE) {
        rc = OPTD_E_NOT_FOUND;
        goto done;
    }
    if (src != SQLITE_ROW) {
        rc = from_sqlite(src);
        goto done;
    }
    rc = row_session(q, &s);
    if (rc) goto done;
    if (state) rc = column_bytes_copy(q, STATE_COL, &blob, &n);
done:
    stmt_done(q);
    if (rc) {
        store_session_clear(&s);
        free(blob);
        return rc;
    }
    *out = s;
    if (state) {
        *state = blob;
        *len = n;
    }
    return OPTD_OK;
}

/* Opens one connection with extended result codes and a busy timeout. */
static optd_err conn_open(const char *path, int flags, int busy_ms, sqlite3 **out, char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    optd_err rc = OPTD_OK;
    int src;

    src = sqlite3_open_v2(path, &db, flags | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK) src = sqlite3_extended_result_codes(db, 1);
    if (src == SQLITE_OK) src = sqlite3_busy_timeout(db, busy_ms);
    if (src != SQLITE_OK) {
        /* open_v2 returns a handle to close even when it fails (NULL only
         * when out of memory). */
        seterr(err, errlen, "cannot open %s: %s", path, db ? sqlite3_errmsg(db) : sqlite3_errstr(src));
        rc = src == SQLITE_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
        (void)sqlite3_close(db);
        db = NULL;
    }
    *out = db;
    return rc;
}

/* Closes a connection whose statements are all finalized, which makes
 * sqlite3_close succeed; WAL mode checkpoints on the last one. */
static void conn_close(sqlite3 *db)
{
    int src = sqlite3_close(db);

    assert(src == SQLITE_OK);
    (void)src;
}

/* Runs SQL text without results (pragmas, migrations, BEGIN/COMMIT at open). */
static optd_err exec_sql(sqlite3 *db, const char *text, const char *path, char *err, size_t errlen)
{
    char *msg = NULL;
    int src = sqlite3_exec(db, text, NULL, NULL, &msg);

    if (src == SQLITE_OK) return OPTD_OK;
    seterr(err, errlen, "cannot set up %s: %s", path, msg ? msg : sqlite3_errstr(src));
    sqlite3_free(msg);
    /* At open, damage is a verdict on the file (do not retry), not an outage. */
    if ((src & 0xff) == SQLITE_CORRUPT || (src & 0xff) == SQLITE_NOTADB) return OPTD_E_INVALID;
    return from_sqlite(src) == OPTD_E_INTERNAL ? OPTD_E_INVALID : from_sqlite(src);
}

/* What the header of a file says about its owner. */
typedef struct header {
    int64_t app;     /* PRAGMA application_id */
    int64_t version; /* PRAGMA user_version */
    int64_t objects; /* rows of sqlite_schema: tables, indexes, ... */
} header;

/* Reads the header with one statement. Reading never writes; a file that is
 * not SQLite fails here with SQLITE_NOTADB. */
static optd_err header_read(sqlite3 *db, const char *path, header *out, char *err, size_t errlen)
{
    static const char text[] = "SELECT (SELECT application_id FROM pragma_application_id),"
                               " (SELECT user_version FROM pragma_user_version),"
                               " (SELECT count(*) FROM sqlite_master)";
    sqlite3_stmt *q = NULL;
    optd_err rc = OPTD_OK;
    int src;

    src = sqlite3_prepare_v2(db, text, -1, &q, NULL);
    if (src == SQLITE_OK) src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        out->app = sqlite3_column_int64(q, 0);
        out->version = sqlite3_column_int64(q, 1);
        out->objects = sqlite3_column_int64(q, 2);
    } else if ((src & 0xff) == SQLITE_NOTADB) {
        seterr(err, errlen, "%s is not an optd database (not an SQLite file)", path);
        rc = OPTD_E_INVALID;
    } else if ((src & 0xff) == SQLITE_CORRUPT) {
        seterr(err, errlen, "%s is corrupt: %s", path, sqlite3_errmsg(db));
        rc = OPTD_E_INVALID;
    } else {
        seterr(err, errlen, "cannot read %s: %s", path, sqlite3_errmsg(db));
        rc = from_sqlite(src);
        if (rc == OPTD_OK || rc == OPTD_E_INTERNAL) rc = OPTD_E_UNAVAILABLE;
    }
    (void)sqlite3_finalize(q); /* repeats the step's error, taken above */
    return rc;
}

/* Whether a header is ours. A blank SQLite file (no id, no version, no
 * objects) is adopted: a create that died before its first commit leaves
 * one, and there is nothing in it to damage. */
static optd_err header_judge(const header *h, const char *path, char *err, size_t errlen)
{
    int blank = h->app == 0 && h->version == 0 && h->objects == 0;

    if (h->app != STORE_APPLICATION_ID && !blank) {
        seterr(err, errlen,
               "%s is not an optd database (application_id %lld, %lld schema objects): refusing to touch it",
               path, (long long)h->app, (long long)h->objects);
        return OPTD_E_INVALID;
    }
    if (h->version > SCHEMA_VERSION) {
        seterr(err, errlen, "%s was made by a newer optd (schema %lld; this one knows up to %d)", path,
               (long long)h->version, SCHEMA_VERSION);
        return OPTD_E_INVALID;
    }
    return OPTD_OK;
}

/* PRAGMA quick_check: one row "ok", or rows describing the damage. */
static optd_err quick_check(sqlite3 *db, const char *path, char *err, size_t errlen)
{
    sqlite3_stmt *q = NULL;
    optd_err rc = OPTD_OK;
    const unsigned char *t;
    int src;

    src = sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &q, NULL);
    if (src == SQLITE_OK) src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        t = sqlite3_column_text(q, 0);
        if (!t || strcmp((const char *)t, "ok") != 0) {
            seterr(err, errlen, "%s is corrupt: %s", path, t ? (const char *)t : "quick_check failed");
            /* quick_check's findings span lines; the message is one. */
            for (char *c = err; err && *c; c++)
                if (*c == '\n') *c = ' ';
            rc = OPTD_E_INVALID;
        }
    } else if ((src & 0xff) == SQLITE_CORRUPT || (src & 0xff) == SQLITE_NOTADB) {
        seterr(err, errlen, "%s is corrupt: %s", path, sqlite3_errmsg(db));
        rc = OPTD_E_INVALID;
    } else {
        seterr(err, errlen, "cannot check %s: %s", path, sqlite3_errmsg(db));
        rc = from_sqlite(src);
        if (rc == OPTD_OK || rc == OPTD_E_INTERNAL) rc = OPTD_E_UNAVAILABLE;
    }
    (void)sqlite3_finalize(q); /* repeats the step's error, taken above */
    return rc;
}

/* Decides about an existing file before anything may write to it: a
 * read-only connection reads the header and runs quick_check. With no -wal
 * beside the file, the main file holds every commit, so it is opened
 * immutable: a plain read-only open of a WAL-mode file leaves an empty -wal
 * and -shm beside it, and the file may be another application's. With a
 * -wal (ours after a crash, say) the WAL must be read, so the open is plain. */
static optd_err check_existing(const char *path, int busy_ms, char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    struct stat sb;
    header h;
    optd_err rc;
    char *name = NULL, *uri = NULL, *o;
    const char *p;
    size_t n = strlen(path);

    rc = OPTD_E_NOMEM;
    name = malloc(n + 5);
    uri = malloc(3 * n + 32);
    if (!name || !uri) goto done;
    memcpy(name, path, n);
    memcpy(name + n, "-wal", 5);
    /* file:///abs or file:rel, with the characters a URI gives meaning to
     * escaped. */
    o = uri + sprintf(uri, "file:%s", path[0] == '/' ? "//" : "");
    for (p = path; *p; p++) {
        if (*p == '%' || *p == '?' || *p == '#') o += sprintf(o, "%%%02X", (unsigned char)*p);
        else *o++ = *p;
    }
    strcpy(o, "?immutable=1");
    if (stat(name, &sb) == 0) rc = conn_open(path, SQLITE_OPEN_READONLY, busy_ms, &db, err, errlen);
    else rc = conn_open(uri, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, busy_ms, &db, err, errlen);
    if (rc) {
        seterr(err, errlen, "cannot open %s", path);
        goto done;
    }
    rc = header_read(db, path, &h, err, errlen);
    if (rc) goto done;
    rc = header_judge(&h, path, err, errlen);
    if (rc) goto done;
    rc = quick_check(db, path, err, errlen);
done:
    if (db) conn_close(db);
    free(name);
    free(uri);
    return rc;
}

/* Brings the schema to SCHEMA_VERSION in one transaction. The header is read
 * again under the write lock, so two processes creating the same file, or a
 * file swapped since check_existing, cannot lead us to write a foreign one. */
static optd_err migrate(sqlite3 *db, const char *path, char *err, size_t errlen)
{
    char text[64];
    header h;
    optd_err rc;
    int64_t v;

    rc = exec_sql(db, "BEGIN IMMEDIATE", path, err, errlen);
    if (rc) return rc;
    rc = header_read(db, path, &h, err, errlen);
    if (rc) goto done;
    rc = header_judge(&h, path, err, errlen);
    if (rc) goto done;
    if (h.app == 0) {
        snprintf(text, sizeof text, "PRAGMA application_id = %d", STORE_APPLICATION_ID);
        rc = exec_sql(db, text, path, err, errlen);
        if (rc) goto done;
    }
    for (v = h.version; v < SCHEMA_VERSION; v++) {
        rc = exec_sql(db, migrations[v], path, err, errlen);
        if (rc) goto done;
    }
    if (h.version != SCHEMA_VERSION) {
        snprintf(text, sizeof text, "PRAGMA user_version = %d", SCHEMA_VERSION);
        rc = exec_sql(db, text, path, err, errlen);
        if (rc) goto done;
    }
    rc = exec_sql(db, "COMMIT", path, err, errlen);
done:
    if (rc && !sqlite3_get_autocommit(db)) {
        /* Best effort: the error being reported matters more, and closing
         * the connection rolls back anyway. */
        (void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    }
    return rc;
}

/* Prepares sql[0..n) into q for the life of the connection. */
static optd_err prepare_all(sqlite3 *db, sqlite3_stmt **q, int n, const char *path, char *err, size_t errlen)
{
    int i, src;

    for (i = 0; i < n; i++) {
        src = sqlite3_prepare_v3(db, sql[i], -1, SQLITE_PREPARE_PERSISTENT, &q[i], NULL);
        if (src != SQLITE_OK) {
            seterr(err, errlen, "%s does not have the expected schema: %s", path, sqlite3_errmsg(db));
            return src == SQLITE_NOMEM ? OPTD_E_NOMEM : OPTD_E_INVALID;
        }
    }
    return OPTD_OK;
}

/* WAL pages (of the default 4 KiB) past which the checkpointer is woken:
 * about 16 MiB, so small steps share a checkpoint. */
#define CKPT_PAGES 4096

static int wal_hook(void *ctx, sqlite3 *db, const char *name, int pages)
{
    store *st = ctx;
    (void)db;
    (void)name;
    if (pages >= CKPT_PAGES) {
        pthread_mutex_lock(&st->ckpt_mu);
        st->ckpt_wanted = 1;
        pthread_cond_signal(&st->ckpt_cv);
        pthread_mutex_unlock(&st->ckpt_mu);
    }
    return SQLITE_OK;
}

static void *ckpt_main(void *arg)
{
    store *st = arg;
    pthread_mutex_lock(&st->ckpt_mu);
    for (;;) {
        while (!st->ckpt_wanted && !st->ckpt_stop)
            pthread_cond_wait(&st->ckpt_cv, &st->ckpt_mu);
        if (st->ckpt_stop)
            break;
        st->ckpt_wanted = 0;
        pthread_mutex_unlock(&st->ckpt_mu);
        /* A failure (disk full, EIO) leaves the WAL as it is: the data is
         * safe there, and the next wake-up tries again. */
        (void)sqlite3_wal_checkpoint_v2(st->ckpt_db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_lock(&st->ckpt_mu);
    }
    pthread_mutex_unlock(&st->ckpt_mu);
    return NULL;
}

/* Starts the checkpointer and hands checkpoints over from the writer. */
static optd_err ckpt_open(store *st, const store_options *o, char *err, size_t errlen)
{
    optd_err rc = conn_open(st->path, SQLITE_OPEN_READWRITE, o->busy_timeout_ms, &st->ckpt_db, err, errlen);
    if (rc) return rc;
    if (pthread_mutex_init(&st->ckpt_mu, NULL) != 0) return OPTD_E_NOMEM;
    if (pthread_cond_init(&st->ckpt_cv, NULL) != 0) {
        pthread_mutex_destroy(&st->ckpt_mu);
        return OPTD_E_NOMEM;
    }
    if (pthread_create(&st->ckpt_thread, NULL, ckpt_main, st) != 0) {
        pthread_cond_destroy(&st->ckpt_cv);
        pthread_mutex_destroy(&st->ckpt_mu);
        return OPTD_E_NOMEM;
    }
    st->ckpt_init = 1;
    (void)sqlite3_wal_autocheckpoint(st->db, 0);
    sqlite3_wal_hook(st->db, wal_hook, st);
    return OPTD_OK;
}

/* Opens the write connection: WAL, durability, schema, statements. */
static optd_err writer_open(store *st, const char *path, const store_options *o, int create, char *err,
                            size_t errlen)
{
    sqlite3_stmt *q = NULL;
    const unsigned char *mode;
    optd_err rc;
    int src;

    rc = conn_open(path, SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0), o->busy_timeout_ms, &st->db,
                   err, errlen);
    if (rc) return rc;
    /* SQLite silently falls back to read-only when it cannot write the file;
     * say so now rather than fail at the first step. */
    if (sqlite3_db_readonly(st->db, "main") == 1) {
        seterr(err, errlen, "cannot open %s: the file is read-only", path);
        return OPTD_E_UNAVAILABLE;
    }

    /* A new database gets 16 KiB pages (before WAL and the first table fix
     * the size): measured with bench/sqlite_ceiling on this machine, group
     * commits of 32 12 KB states ran 1.4x and a 12 MB state 1.7x faster than
     * with the default 4 KiB; 64 KiB pages help big states more but halve
     * small ones. Existing files keep theirs. */
    if (create) {
        rc = exec_sql(st->db, "PRAGMA page_size = 16384", path, err, errlen);
        if (rc) return rc;
    }
    /* journal_mode answers with the mode in force, which is not WAL when the
     * switch was refused (e.g. a filesystem without shared memory). */
    src = sqlite3_prepare_v2(st->db, "PRAGMA journal_mode = WAL", -1, &q, NULL);
    if (src == SQLITE_OK) src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        mode = sqlite3_column_text(q, 0);
        if (!mode || strcmp((const char *)mode, "wal") != 0) {
            seterr(err, errlen, "cannot put %s in WAL mode (mode is %s)", path, mode ? (const char *)mode : "?");
            rc = OPTD_E_UNAVAILABLE;
        }
    } else {
        seterr(err, errlen, "cannot put %s in WAL mode: %s", path, sqlite3_errmsg(st->db));
        rc = from_sqlite(src) == OPTD_E_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
    }
    (void)sqlite3_finalize(q); /* repeats the step's error, taken above */
    if (rc) return rc;

    rc = exec_sql(st->db, o->sync_full ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL", path, err,
                  errlen);
    if (rc) return rc;
    rc = migrate(st->db, path, err, errlen);
    if (rc) return rc;
    return prepare_all(st->db, st->q, Q_END, path, err, errlen);
}

/* Opens the read-only pool; called after migrate so the schema exists. */
static optd_err readers_open(store *st, const char *path, const store_options *o, char *err, size_t errlen)
{
    optd_err rc;
    int i;

    st->readers = calloc((size_t)o->readers, sizeof *st->readers);
    st->idle = calloc((size_t)o->readers, sizeof *st->idle);
    if (!st->readers || !st->idle) return OPTD_E_NOMEM;
    for (i = 0; i < o->readers; i++) {
        struct reader *r = &st->readers[i];

        rc = conn_open(path, SQLITE_OPEN_READONLY, o->busy_timeout_ms, &r->db, err, errlen);
        if (rc) return rc;
        st->nreaders++; /* counted once open, so store_close closes it */
        rc = prepare_all(r->db, r->q, Q_READ_END, path, err, errlen);
        if (rc) return rc;
        st->idle[st->nidle++] = r;
    }
    return OPTD_OK;
}

/* Takes an idle reader, waiting while all are in use. */
static struct reader *reader_take(store *st)
{
    struct reader *r;

    pthread_mutex_lock(&st->pool_mu);
    while (st->nidle == 0) pthread_cond_wait(&st->pool_cv, &st->pool_mu);
    r = st->idle[--st->nidle];
    pthread_mutex_unlock(&st->pool_mu);
    return r;
}

static void reader_give(store *st, struct reader *r)
{
    pthread_mutex_lock(&st->pool_mu);
    st->idle[st->nidle++] = r;
    pthread_cond_signal(&st->pool_cv);
    pthread_mutex_unlock(&st->pool_mu);
}

/* Write functions join the caller's transaction. Called outside one, each
 * makes its own, so that its several statements commit together or not at
 * all. *own says whether tx_leave must end it. */
static optd_err tx_enter(store *st, int *own)
{
    *own = sqlite3_get_autocommit(st->db);
    return *own ? store_begin(st) : OPTD_OK;
}

static optd_err tx_leave(store *st, int own, optd_err rc)
{
    if (!own) return rc;
    if (rc == OPTD_OK) return store_commit(st);
    store_rollback(st);
    return rc;
}

/* --- Public API. ----------------------------------------------------------- */

void store_session_clear(store_session *s)
{
    if (!s) return;
    free(s->config);
    memset(s, 0, sizeof *s);
}

/* Options: NULL or an all-zero struct mean every default (so sync_full is 1
 * then, not 0); otherwise sync_full is taken as given and a busy timeout or a
 * reader count <= 0 means its default. Returns OPTD_OK, OPTD_E_INVALID (more
 * than MAX_READERS readers, foreign, corrupt or newer file, not a regular
 * file), OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. */
optd_err store_open(const char *path, const store_options *opt, store **out, char *err, size_t errlen)
{
    store_options o = {1, DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_READERS};
    store *st = NULL;
    struct stat sb;
    char ebuf[128];
    int create = 0;
    optd_err rc = OPTD_OK;

    seterr(err, errlen, "%s", "");
    if (!out) return OPTD_E_INVALID;
    *out = NULL;
    if (!path || !*path) {
        seterr(err, errlen, "no database path given");
        return OPTD_E_INVALID;
    }
    if (opt && (opt->sync_full || opt->busy_timeout_ms || opt->readers)) {
        o.sync_full = opt->sync_full != 0;
        if (opt->busy_timeout_ms > 0) o.busy_timeout_ms = opt->busy_timeout_ms;
        if (opt->readers > 0) o.readers = opt->readers;
    }
    if (o.readers > MAX_READERS) {
        seterr(err, errlen, "%d read connections asked for; at most %d", o.readers, MAX_READERS);
        return OPTD_E_INVALID;
    }

    /* Absent or empty: ours to create. Anything else is checked first, on a
     * connection that cannot write. */
    if (stat(path, &sb) != 0) {
        if (errno != ENOENT) {
            seterr(err, errlen, "cannot open %s: %s", path, strerror_r(errno, ebuf, sizeof ebuf));
            return OPTD_E_UNAVAILABLE;
        }
        create = 1;
    } else if (!S_ISREG(sb.st_mode)) {
        seterr(err, errlen, "%s is not an optd database (not a regular file)", path);
        return OPTD_E_INVALID;
    } else {
        create = sb.st_size == 0;
    }
    if (!create) {
        rc = check_existing(path, o.busy_timeout_ms, err, errlen);
        if (rc) return rc;
    }

    st = calloc(1, sizeof *st);
    if (!st) return OPTD_E_NOMEM;
    atomic_init(&st->write_failed, 0);
    if (pthread_mutex_init(&st->pool_mu, NULL) != 0) {
        rc = OPTD_E_NOMEM;
        goto done;
    }
    if (pthread_cond_init(&st->pool_cv, NULL) != 0) {
        pthread_mutex_destroy(&st->pool_mu);
        rc = OPTD_E_NOMEM;
        goto done;
    }
    st->pool_init = 1;
    if (pthread_mutex_init(&st->probe_mu, NULL) != 0) {
        rc = OPTD_E_NOMEM;
        goto done;
    }
    st->probe_init = 1;

    rc = writer_open(st, path, &o, create, err, errlen);
    if (rc) goto done;
    rc = readers_open(st, path, &o, err, errlen);
    if (rc) goto done;
    st->path = strdup(path);
    if (!st->path) {
        rc = OPTD_E_NOMEM;
        goto done;
    }
    rc = probe_open(st, err, errlen);
    if (rc) goto done;
    rc = ckpt_open(st, &o, err, errlen);
done:
    if (rc) {
        if (rc == OPTD_E_NOMEM && err && !*err) seterr(err, errlen, "out of memory opening %s", path);
        store_close(st);
        return rc;
    }
    *out = st;
    return OPTD_OK;
}

/* Opens the probe connection and opens its WAL now, with a read
 * transaction, while the file can be written: see store_writable. */
static optd_err probe_open(store *st, char *err, size_t errlen)
{
    optd_err rc = conn_open(st->path, SQLITE_OPEN_READWRITE, PROBE_TIMEOUT_MS, &st->probe, err, errlen);

    if (rc) return rc;
    if (sqlite3_exec(st->probe, "SELECT count(*) FROM sqlite_master", NULL, NULL, NULL) != SQLITE_OK) {
        seterr(err, errlen, "cannot read %s: %s", st->path, sqlite3_errmsg(st->probe));
        conn_close(st->probe);
        st->probe = NULL;
        return OPTD_E_UNAVAILABLE;
    }
    return OPTD_OK;
}

/* No call may be in flight on st. Readers and the probe close first so the
 * writer, closing last, is the connection that checkpoints the WAL. */
void store_close(store *st)
{
    int i, j;

    if (!st) return;
    if (st->ckpt_init) {
        pthread_mutex_lock(&st->ckpt_mu);
        st->ckpt_stop = 1;
        pthread_cond_signal(&st->ckpt_cv);
        pthread_mutex_unlock(&st->ckpt_mu);
        pthread_join(st->ckpt_thread, NULL);
        pthread_cond_destroy(&st->ckpt_cv);
        pthread_mutex_destroy(&st->ckpt_mu);
    }
    if (st->db) sqlite3_wal_hook(st->db, NULL, NULL);
    if (st->ckpt_db) conn_close(st->ckpt_db);
    for (i = 0; i < st->nreaders; i++) {
        for (j = 0; j < Q_READ_END; j++) (void)sqlite3_finalize(st->readers[i].q[j]);
        conn_close(st->readers[i].db);
    }
    free(st->readers);
    free(st->idle);
    if (st->probe) conn_close(st->probe);
    /* finalize only repeats the last step's error; NULL is a no-op. */
    for (j = 0; j < Q_END; j++) (void)sqlite3_finalize(st->q[j]);
    if (st->db) conn_close(st->db);
    if (st->pool_init) {
        pthread_cond_destroy(&st->pool_cv);
        pthread_mutex_destroy(&st->pool_mu);
    }
    if (st->probe_init) pthread_mutex_destroy(&st->probe_mu);
    free(st->path);
    free(st);
}

/* Takes and drops the write lock on the probe connection. That does no I/O
 * in WAL mode but fails when another connection holds the lock past
 * PROBE_TIMEOUT_MS. A disk that is full, read-only or failing shows only in
 * a real write, so after a write of the writer failed (write_failed) the
 * probe also rewrites the application id (the same value: nothing changes)
 * and commits; its success clears the flag, so readiness comes back by
 * itself once the storage works again, even when no client writes. The
 * probe is its own connection because the write connection belongs to the
 * writer thread. */
int store_writable(store *st)
{
    char text[64];
    int ok;

    if (!st) return 0;
    pthread_mutex_lock(&st->probe_mu);
    if (!st->probe && probe_open(st, NULL, 0) != OPTD_OK) {
        pthread_mutex_unlock(&st->probe_mu);
        return 0;
    }
    ok = sqlite3_exec(st->probe, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK;
    if (ok && atomic_load(&st->write_failed)) {
        snprintf(text, sizeof text, "PRAGMA application_id = %d", STORE_APPLICATION_ID);
        ok = sqlite3_exec(st->probe, text, NULL, NULL, NULL) == SQLITE_OK &&
             sqlite3_exec(st->probe, "COMMIT", NULL, NULL, NULL) == SQLITE_OK;
        if (ok) atomic_store(&st->write_failed, 0);
    }
    if (!sqlite3_get_autocommit(st->probe)) {
        /* Nothing was written, so a failed ROLLBACK loses nothing; it does
         * mean the probe cannot be trusted this time. */
        if (sqlite3_exec(st->probe, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK) ok = 0;
    }
    if (!ok) {
        /* A connection that first opened the WAL while the file could not be
         * written keeps a read-only handle on it for good (SQLITE_READONLY
         * ever after), so a failed probe starts afresh next time. */
        conn_close(st->probe);
        st->probe = NULL;
    }
    pthread_mutex_unlock(&st->probe_mu);
    return ok;
}

/* Nesting is a caller bug (asserted); every failure is OPTD_E_UNAVAILABLE. */
optd_err store_begin(store *st)
{
    sqlite3_stmt *q = st->q[Q_BEGIN];
    int src;

    assert(sqlite3_get_autocommit(st->db));
    src = sqlite3_step(q);
    stmt_done(q);
    if (src == SQLITE_DONE) return OPTD_OK;
    atomic_store(&st->write_failed, 1);
    return OPTD_E_UNAVAILABLE;
}

/* A COMMIT whose fsync failed has written its frames to the WAL, commit
 * mark included: SQLite forgets them (the next transaction writes over the
 * same slots), but a crash before that next transaction lets recovery replay
 * them, bringing back writes that were refused as "nothing changed". So a
 * failed commit is followed at once by one that changes nothing (the
 * application id, rewritten as it is): its frame takes the first slot, and
 * the refused transaction's frames after it no longer continue the WAL's
 * checksum chain, so recovery stops before them. Should this commit fail
 * too, it is a no-op either way. Writer thread only, outside a transaction. */
static void wal_tail_cover(store *st)
{
    char text[96];

    if (!sqlite3_get_autocommit(st->db)) return;
    snprintf(text, sizeof text, "BEGIN IMMEDIATE; PRAGMA application_id = %d; COMMIT", STORE_APPLICATION_ID);
    if (sqlite3_exec(st->db, text, NULL, NULL, NULL) != SQLITE_OK && !sqlite3_get_autocommit(st->db))
        (void)sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
}

optd_err store_commit(store *st)
{
    sqlite3_stmt *q = st->q[Q_COMMIT];
    int src;

    src = sqlite3_step(q);
    stmt_done(q);
    if (src == SQLITE_DONE) {
        atomic_store(&st->write_failed, 0);
        return OPTD_OK;
    }
    atomic_store(&st->write_failed, 1);
    /* SQLite may already have rolled back (disk full, I/O error) or may keep
     * the transaction open for a retry (busy); either way it is over for us. */
    store_rollback(st);
    wal_tail_cover(st);
    return OPTD_E_UNAVAILABLE;
}

void store_rollback(store *st)
{
    sqlite3_stmt *q = st->q[Q_ROLLBACK];
    int src;

    /* A rollback means a write failed or was given up: let the next
     * store_writable check with a real write. */
    atomic_store(&st->write_failed, 1);
    if (sqlite3_get_autocommit(st->db)) return; /* none open, or SQLite ended it */
    src = sqlite3_step(q);
    stmt_done(q);
    /* A failed ROLLBACK (an I/O error) leaves the transaction open; the next
     * store_begin then fails with OPTD_E_UNAVAILABLE and the writer retries,
     * which is all that can be done here. */
    (void)src;
}

/* Runs one of the savepoint statements; any failure ends the group. */
static optd_err savepoint_run(store *st, int which)
{
    sqlite3_stmt *q = st->q[which];
    int src = sqlite3_step(q);

    stmt_done(q);
    if (src == SQLITE_DONE) return OPTD_OK;
    atomic_store(&st->write_failed, 1);
    return OPTD_E_UNAVAILABLE;
}

optd_err store_savepoint(store *st)
{
    assert(!sqlite3_get_autocommit(st->db));
    return savepoint_run(st, Q_SAVEPOINT);
}

optd_err store_release(store *st) { return savepoint_run(st, Q_SAVEPOINT_RELEASE); }

/* After a disk-full, I/O or out-of-memory error SQLite may have rolled back
 * the whole transaction by itself: then there is no savepoint to return to
 * and the caller's group has failed. ROLLBACK TO leaves the savepoint open;
 * RELEASE closes it. */
optd_err store_rollback_to(store *st)
{
    if (sqlite3_get_autocommit(st->db)) {
        atomic_store(&st->write_failed, 1);
        return OPTD_E_UNAVAILABLE;
    }
    optd_err rc = savepoint_run(st, Q_SAVEPOINT_ROLLBACK);
    return rc ? rc : savepoint_run(st, Q_SAVEPOINT_RELEASE);
}

/* Returns OPTD_OK, OPTD_E_ALREADY_EXISTS (nothing written, a caller's
 * transaction may go on), OPTD_E_INVALID (unterminated strings, step or size
 * >= 2^63, NULL state with len > 0), OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. The
 * name row goes first so that a taken name fails before anything is written. */
optd_err store_session_insert(store *st, store_session *s, const void *state, size_t len)
{
    sqlite3_stmt *q;
    int64_t id = 0;
    optd_err rc;
    int own, src;

    if (!session_ok(s) || (!state && len)) return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc) return rc;

    q = st->q[Q_SESSION_INSERT];
    src = sqlite3_bind_text(q, 1, s->name, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_bind_text(q, 2, s->optimizer, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_bind_int(q, 3, s->dtype);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 4, (int64_t)s->size);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 5, (int64_t)s->step);
    if (src == SQLITE_OK) src = sqlite3_bind_text(q, 6, s->config, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 7, s->created_ms);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 8, s->updated_ms);
    rc = run(q, src);
    if (rc) goto done;
    id = sqlite3_last_insert_rowid(st->db);

    q = st->q[Q_STATE_INSERT];
    src = sqlite3_bind_int64(q, 1, id);
    if (src == SQLITE_OK) src = bind_bytes(q, 2, state ? state : "", len);
    rc = run(q, src);
done:
    rc = tx_leave(st, own, rc);
    if (rc == OPTD_OK) s->id = id;
    return rc;
}

/* Writer-thread load. On failure *out, *state and *len are untouched.
 * Returns OPTD_OK, OPTD_E_NOT_FOUND, OPTD_E_INVALID (NULL name, or state
 * without len), OPTD_E_UNAVAILABLE, OPTD_E_NOMEM, OPTD_E_INTERNAL. An empty
 * state comes back as a non-NULL 1-byte buffer with *len 0. */
optd_err store_session_load(store *st, const char *name, store_session *out, void **state, size_t *len)
{
    if (!name || !out || (state && !len)) return OPTD_E_INVALID;
    return session_by_name(st->q, name, out, state, len);
}

/* Returns OPTD_OK, OPTD_E_NOT_FOUND (no session with s->id; nothing
 * written), OPTD_E_INVALID, OPTD_E_UNAVAILABLE, OPTD_E_NOMEM,
 * OPTD_E_INTERNAL (the session has no state row). */
optd_err store_session_update(store *st, const store_session *s, const void *state, size_t len)
{
    sqlite3_stmt *q;
    optd_err rc;
    int own, src;

    if (!session_ok(s)) return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc) return rc;

    q = st->q[Q_SESSION_UPDATE];
    src = sqlite3_bind_int64(q, 1, s->id);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)s->step);
    if (src == SQLITE_OK) src = sqlite3_bind_text(q, 3, s->config, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 4, s->updated_ms);
    rc = run(q, src);
    if (rc) goto done;
    if (sqlite3_changes(st->db) == 0) {
        rc = OPTD_E_NOT_FOUND;
        goto done;
    }

    if (state) {
        q = st->q[Q_STATE_UPDATE];
        src = sqlite3_bind_int64(q, 1, s->id);
        if (src == SQLITE_OK) src = bind_bytes(q, 2, state, len);
        rc = run(q, src);
        if (rc == OPTD_OK && sqlite3_changes(st->db) == 0) rc = OPTD_E_INTERNAL;
    }
done:
    return tx_leave(st, own, rc);
}

/* The step path: the row's step and time, and the state overwritten in place
 * with incremental blob I/O when its size is unchanged (no new overflow
 * pages allocated and old ones freed, as a whole-value UPDATE does; for a
 * 12 MB state that halves the pages a commit writes). Returns as
 * store_session_update. */
optd_err store_session_step(store *st, int64_t id, uint64_t step, int64_t updated_ms, const void *state,
                            size_t len)
{
    sqlite3_stmt *q = st->q[Q_SESSION_STEP];
    sqlite3_blob *blob = NULL;
    optd_err rc;
    int own, src;

    if (step > INT64_MAX || !state || len > INT_MAX) return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc) return rc;
    src = sqlite3_bind_int64(q, 1, id);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)step);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 3, updated_ms);
    rc = run(q, src);
    if (rc) goto done;
    if (sqlite3_changes(st->db) == 0) {
        rc = OPTD_E_NOT_FOUND;
        goto done;
    }
    src = sqlite3_blob_open(st->db, "main", "state", "data", id, 1, &blob);
    if (src == SQLITE_OK && sqlite3_blob_bytes(blob) == (int)len) {
        rc = from_sqlite(sqlite3_blob_write(blob, state, (int)len, 0));
    } else if (src == SQLITE_OK || src == SQLITE_ERROR) {
        /* Another size (or a zero-length value, which has no blob): rewrite it. */
        q = st->q[Q_STATE_UPDATE];
        src = sqlite3_bind_int64(q, 1, id);
        if (src == SQLITE_OK) src = bind_bytes(q, 2, state, len);
        rc = run(q, src);
        if (rc == OPTD_OK && sqlite3_changes(st->db) == 0) rc = OPTD_E_INTERNAL;
    } else {
        rc = from_sqlite(src);
    }
done:
    if (blob) (void)sqlite3_blob_close(blob);
    return tx_leave(st, own, rc);
}

/* Returns OPTD_OK, OPTD_E_NOT_FOUND (nothing written), OPTD_E_INVALID,
 * OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. */
optd_err store_session_delete(store *st, const char *name)
{
    static const int deletes[] = {Q_IDEM_DELETE_ALL, Q_HISTORY_DELETE_ALL, Q_STATE_DELETE, Q_SESSION_DELETE};
    sqlite3_stmt *q;
    int64_t id = 0;
    optd_err rc;
    int own, src;
    size_t i;

    if (!name) return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc) return rc;

    q = st->q[Q_SESSION_ID];
    src = sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_step(q);
    if (src == SQLITE_ROW) id = sqlite3_column_int64(q, 0);
    stmt_done(q);
    if (src == SQLITE_DONE) {
        rc = OPTD_E_NOT_FOUND;
        goto done;
    }
    if (src != SQLITE_ROW) {
        rc = from_sqlite(src);
        goto done;
    }
    for (i = 0; i < sizeof deletes / sizeof deletes[0]; i++) {
        q = st->q[deletes[i]];
        rc = run(q, sqlite3_bind_int64(q, 1, id));
        if (rc) goto done;
    }
done:
    return tx_leave(st, own, rc);
}

/* Returns OPTD_OK, OPTD_E_NOT_FOUND, OPTD_E_INVALID, OPTD_E_UNAVAILABLE,
 * OPTD_E_NOMEM. out->reply is NULL when no reply was kept, and a non-NULL
 * 1-byte buffer with reply_len 0 when an empty one was. On failure *out is
 * untouched. */
optd_err store_idem_get(store *st, int64_t session_id, const char *key, store_idem *out)
{
    sqlite3_stmt *q = st->q[Q_IDEM_GET];
    store_idem r = {0, 0, NULL, 0};
    optd_err rc = OPTD_OK;
    int src;

    if (!key || !out) return OPTD_E_INVALID;
    src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK) src = sqlite3_bind_text(q, 2, key, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        r.step = i2u(sqlite3_column_int64(q, 0));
        r.digest = i2u(sqlite3_column_int64(q, 1));
        rc = column_bytes_copy(q, 2, &r.reply, &r.reply_len);
    } else {
        rc = src == SQLITE_DONE ? OPTD_E_NOT_FOUND : from_sqlite(src);
    }
    stmt_done(q);
    if (rc) return rc;
    *out = r;
    return OPTD_OK;
}

/* Replaces an existing record for the key. window 0 keeps no key at all
 * (even this one), as "the keys of the last 0 steps" says; window 1 keeps
 * this step's. Returns OPTD_OK, OPTD_E_INVALID (NULL key, step >= 2^63,
 * NULL reply with reply_len > 0), OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. */
optd_err store_idem_put(store *st, int64_t session_id, const char *key, uint64_t step, uint64_t digest,
                        const void *reply, size_t reply_len, uint64_t window, uint64_t reply_window)
{
    sqlite3_stmt *q;
    optd_err rc;
    int own, src;

    if (!key || step > INT64_MAX || (!reply && reply_len)) return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc) return rc;

    q = st->q[Q_IDEM_PUT];
    src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK) src = sqlite3_bind_text(q, 2, key, -1, SQLITE_STATIC);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 3, (int64_t)step);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 4, u2i(digest));
    if (src == SQLITE_OK) src = bind_bytes(q, 5, reply, reply_len);
    rc = run(q, src);
    if (rc) goto done;

    if (step > window) {
        q = st->q[Q_IDEM_PRUNE];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)(step - window));
        rc = run(q, src);
        if (rc) goto done;
    }
    /* With reply_window >= window the prune above already removed every row
     * whose reply would be dropped. */
    if (step > reply_window && reply_window < window) {
        q = st->q[Q_IDEM_DROP_REPLIES];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)(step - reply_window));
        rc = run(q, src);
    }
done:
    return tx_leave(st, own, rc);
}

/* As store_session_load, on a pooled read connection. */
optd_err store_read_session(store *st, const char *name, store_session *out, void **state, size_t *len)
{
    struct reader *r;
    optd_err rc;

    if (!name || !out || (state && !len)) return OPTD_E_INVALID;
    r = reader_take(st);
    rc = session_by_name(r->q, name, out, state, len);
    reader_give(st, r);
    return rc;
}

/* limit 0 is allowed: no rows, and *more says whether any exist past after.
 * *out is NULL when *n is 0. Returns OPTD_OK, OPTD_E_INVALID (limit < 0),
 * OPTD_E_UNAVAILABLE, OPTD_E_NOMEM, OPTD_E_INTERNAL; on failure the outputs
 * are untouched. One row past limit is asked for to learn *more. */
optd_err store_read_list(store *st, const char *after, int limit, store_session **out, size_t *n, int *more)
{
    struct reader *r;
    sqlite3_stmt *q;
    store_session *rows = NULL, *grown;
    size_t count = 0, cap = 0, i;
    int src, extra = 0;
    optd_err rc = OPTD_OK;

    if (limit < 0 || !out || !n || !more) return OPTD_E_INVALID;
    r = reader_take(st);
    if (after) {
        q = r->q[Q_LIST_AFTER];
        src = sqlite3_bind_text(q, 1, after, -1, SQLITE_STATIC);
        if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)limit + 1);
    } else {
        q = r->q[Q_LIST_FIRST];
        src = sqlite3_bind_int64(q, 1, (int64_t)limit + 1);
    }
    if (src != SQLITE_OK) {
        rc = from_sqlite(src);
        goto done;
    }
    while ((src = sqlite3_step(q)) == SQLITE_ROW) {
        if (count == (size_t)limit) {
            extra = 1;
            break;
        }
        if (count == cap) {
            cap = cap ? cap * 2 : 16;
            if (cap > (size_t)limit) cap = (size_t)limit;
            grown = realloc(rows, cap * sizeof *rows);
            if (!grown) {
                rc = OPTD_E_NOMEM;
                goto done;
            }
            rows = grown;
        }
        rc = row_session(q, &rows[count]);
        if (rc) goto done;
        count++;
    }
    if (src != SQLITE_ROW && src != SQLITE_DONE) rc = from_sqlite(src);
done:
    stmt_done(q);
    reader_give(st, r);
    if (rc) {
        for (i = 0; i < count; i++) store_session_clear(&rows[i]);
        free(rows);
        return rc;
    }
    *out = rows;
    *n = count;
    *more = extra;
    return OPTD_OK;
}

/* Returns OPTD_OK, OPTD_E_INVALID, OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. */
optd_err store_read_count(store *st, uint64_t *out)
{
    struct reader *r;
    sqlite3_stmt *q;
    optd_err rc;
    int src;

    if (!out) return OPTD_E_INVALID;
    r = reader_take(st);
    q = r->q[Q_COUNT];
    src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        *out = i2u(sqlite3_column_int64(q, 0));
        rc = OPTD_OK;
    } else {
        rc = src == SQLITE_DONE ? OPTD_E_INTERNAL : from_sqlite(src);
    }
    stmt_done(q);
    reader_give(st, r);
    return rc;
}

/* Records h for session_id and forgets rows of steps <= h->step - keep
 * (keep 0 keeps none). Returns OPTD_OK, OPTD_E_INVALID, OPTD_E_UNAVAILABLE,
 * OPTD_E_NOMEM. */
optd_err store_history_put(store *st, int64_t session_id, const store_history *h, uint64_t keep)
{
    sqlite3_stmt *q;
    optd_err rc;
    int own, src;

    if (!h || h->step > INT64_MAX) return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc) return rc;
    if (keep > 0) {
        q = st->q[Q_HISTORY_PUT];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)h->step);
        if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 3, h->time_ms);
        if (src == SQLITE_OK) src = sqlite3_bind_double(q, 4, h->lr);
        if (src == SQLITE_OK) src = sqlite3_bind_double(q, 5, h->grad_norm);
        if (src == SQLITE_OK) src = sqlite3_bind_double(q, 6, h->update_norm);
        if (src == SQLITE_OK) src = sqlite3_bind_double(q, 7, h->param_norm);
        if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 8, (int64_t)h->contributors);
        if (src == SQLITE_OK)
            src = h->has_loss ? sqlite3_bind_double(q, 9, h->loss) : sqlite3_bind_null(q, 9);
        rc = run(q, src);
        if (rc) goto done;
    }
    if (h->step >= keep) {
        q = st->q[Q_HISTORY_PRUNE];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)(h->step - keep));
        rc = run(q, src);
    }
done:
    return tx_leave(st, own, rc);
}

/* Returns OPTD_OK, OPTD_E_INVALID, OPTD_E_UNAVAILABLE, OPTD_E_NOMEM; on
 * failure the outputs are untouched. */
optd_err store_read_history(store *st, int64_t session_id, uint64_t after, int limit, store_history **out,
                            size_t *n, int *more)
{
    struct reader *r;
    sqlite3_stmt *q;
    store_history *rows = NULL;
    size_t count = 0;
    int src, extra = 0;
    optd_err rc = OPTD_OK;

    if (limit < 0 || after > INT64_MAX || !out || !n || !more) return OPTD_E_INVALID;
    rows = malloc(((size_t)limit + 1) * sizeof *rows);
    if (!rows) return OPTD_E_NOMEM;
    r = reader_take(st);
    q = r->q[Q_HISTORY_PAGE];
    src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 2, (int64_t)after);
    if (src == SQLITE_OK) src = sqlite3_bind_int64(q, 3, (int64_t)limit + 1);
    while (src == SQLITE_OK || src == SQLITE_ROW) {
        src = sqlite3_step(q);
        if (src != SQLITE_ROW) break;
        if (count == (size_t)limit) {
            extra = 1;
            break;
        }
        store_history *h = &rows[count++];
        h->step = i2u(sqlite3_column_int64(q, 0));
        h->time_ms = sqlite3_column_int64(q, 1);
        h->lr = sqlite3_column_double(q, 2);
        h->grad_norm = sqlite3_column_double(q, 3);
        h->update_norm = sqlite3_column_double(q, 4);
        h->param_norm = sqlite3_column_double(q, 5);
        h->contributors = i2u(sqlite3_column_int64(q, 6));
        h->has_loss = sqlite3_column_type(q, 7) != SQLITE_NULL;
        h->loss = h->has_loss ? sqlite3_column_double(q, 7) : 0;
    }
    if (src != SQLITE_ROW && src != SQLITE_DONE) rc = from_sqlite(src);
    stmt_done(q);
    reader_give(st, r);
    if (rc) {
        free(rows);
        return rc;
    }
    *out = rows;
    *n = count;
    *more = extra;
    return OPTD_OK;
}
