/* store: optd's SQLite database. One write connection with cached statements
 * for the writer thread, a pool of read-only connections for any thread, and a
 * small probe connection for store_writable. WAL mode; the schema version lives
 * in PRAGMA user_version and is upgraded by the steps in `migrations`. */
#include "store/store.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

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

/* The reply ring (schema 6): the replies saved for keyed steps, of every
 * session, one after another in the order they were written, so that a
 * group's replies share a few pages, which stay in the writer's cache
 * (in a ring per session, each reply dirtied a page of its own, which had
 * first to be read back: half a keyed step's cost). The ring is
 * RING_CHUNK-byte blobs (table replies, rowid = offset / RING_CHUNK, made
 * zeroed when first written, then overwritten in place with incremental
 * blob I/O), written from offset 0 up to the ring's capacity (ring_cap),
 * then from 0 again: a lap. A saved reply is a record, RING_HEAD bytes
 * (its pos, session, step and length, 8 bytes each, little-endian) and the
 * reply, and its key keeps its pos: lap << 32 | offset. A record is alive
 * while no later one has been written over it, which its pos and the ring's
 * head (the pos of the next record, in table ring) tell; its head is
 * checked too. The capacity is what the windows of the sessions need, each
 * at most IDEM_REPLY_BUDGET, all at most RING_MAX. */
#define RING_CHUNK ((uint64_t)65536)
#define RING_HEAD 32
#define RING_MAX ((uint64_t)1 << 30)
#define RING_NONE UINT64_MAX /* a key with no saved reply */
/* Schema 5's ring per session, read for the keys saved before schema 6
 * (sessions.idem_legacy: steps up to it) until they leave the window.
 * A session's reply to step k is in
 * slot k % slots of its ring, slots (store_idem_slots) being the most
 * replies of that length IDEM_REPLY_BUDGET holds, at most IDEM_SLOTS_MAX
 * and no more than the key window needs. A slot
 * is the step (8 bytes, little-endian), the reply's length (8) and the
 * reply; the slots are in blobs of about IDEM_CHUNK_BYTES, rowid
 * session << IDEM_RING_BITS | chunk, made (zeroed) when first needed and
 * then written in place with incremental blob I/O: a step rewrites the
 * pages its slot spans, never a row or the b-tree around it. */
#define IDEM_RING_BITS 20
#define IDEM_REPLY_BUDGET ((size_t)16 << 20)
#define IDEM_SLOTS_MAX 16384
#define IDEM_CHUNK_BYTES 65536
#define IDEM_SLOT_HEAD 16
#define STR_(x) #x
#define STR(x) STR_(x)
/* A session's newest keys wait in its row, IDEM_TAIL bytes made once and
 * kept at that size (so the row never grows or shrinks and its page is not
 * rebalanced), idem_used of them holding entries: the step, the digest and
 * the pos of its reply in the ring (8 bytes each, little-endian; RING_NONE
 * for none), the key's length (1) and the key. A key
 * that does not fit when the tail is empty (over 255 bytes) goes to
 * idem_keys directly. */
#define IDEM_TAIL 2048
#define IDEM_ENTRY_HEAD 25
#define IDEM_ENTRY_HEAD_5 17 /* schema 5's: no pos */

/* Keys leave a batch at a time: rows stay up to this many steps past the
 * window (the engine no longer finds them: it looks within the window). */
#define IDEM_PRUNE_SLACK 64

/* An entry of a session's key tail (see IDEM_TAIL); key is not
 * NUL-terminated. */
typedef struct idem_entry {
    uint64_t step, digest, pos;
    const char *key;
    size_t klen;
} idem_entry;

/* Schema migrations: migrations[n] takes a database from user_version n to
 * n + 1, so the current version is the number of steps. A new schema appends
 * a step; shipped steps are never edited, since files in the field were made
 * by them.
 *
 * Why the shape: the state blob (params and optimizer buffers, often MBs) has
 * its own table so that listing and loading sessions never reads it. Session
 * ids are AUTOINCREMENT so an id is never reused after a delete: a step queued
 * for a deleted session can never land on a newer one. Idempotency keys are
 * clustered by (session, step) since schema 5, so recording one appends and
 * pruning the window is a range delete; their replies are a ring overwritten
 * in place (see there). */
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
    /* 2 -> 3: the step log of big sessions (see store_session_log).
     * sessions.state_step is the step the state blob holds when the steps
     * after it are in the log (NULL: the session's own step); it is in the
     * small row, since changing any column of state's row would make
     * SQLite rewrite the whole blob. A session's log is a
     * ring of slots overwritten in place: steplog, small rows, says which
     * step each slot holds and where its bytes are; steplog_data holds the
     * bytes, a rowid table so that incremental blob I/O can overwrite them
     * without SQLite rewriting (or freeing and reallocating) their
     * overflow pages, and without a small change such as the step number
     * rewriting the whole record. */
    "ALTER TABLE sessions ADD COLUMN state_step INTEGER;"
    "CREATE TABLE steplog_data(id INTEGER PRIMARY KEY, data BLOB NOT NULL);"
    "CREATE TABLE steplog("
    " session_id INTEGER NOT NULL,"
    " slot INTEGER NOT NULL,"
    " step INTEGER NOT NULL,"
    " data_id INTEGER NOT NULL,"
    " PRIMARY KEY(session_id, slot)) WITHOUT ROWID;",
    /* 3 -> 4: the history's newest rows ride in the session's own row (the
     * first hist_n rows of hist_tail, see store_history_put) and move to the
     * history table HIST_BATCH at a time. A history row per step dirtied a
     * page of its own per session (the table is clustered by session), as
     * many bytes of WAL as the state of a small session; the session rows
     * share their pages, which every step dirties anyway. hist_tail keeps
     * one size once made, so that the rows never grow or shrink and their
     * pages are not rebalanced on every step.
     * The history table becomes a rowid table in the order rows are written,
     * indexed by (session, step): clustered by session, each insert landed
     * in the middle of the b-tree, in a full page of wide rows that SQLite
     * split and rebalanced (a third of a small step's history cost); now the
     * rows of every session append to the last page, and only the narrow
     * index entries go in the middle. */
    "ALTER TABLE sessions ADD COLUMN hist_tail BLOB;"
    "ALTER TABLE sessions ADD COLUMN hist_n INTEGER NOT NULL DEFAULT 0;"
    "CREATE TABLE history_rows("
    " id INTEGER PRIMARY KEY,"
    " session_id INTEGER NOT NULL,"
    " step INTEGER NOT NULL,"
    " time_ms INTEGER NOT NULL,"
    " lr REAL, grad_norm REAL, update_norm REAL, param_norm REAL,"
    " contributors INTEGER NOT NULL,"
    " loss REAL);"
    "INSERT INTO history_rows(session_id, step, time_ms, lr, grad_norm, update_norm, param_norm, contributors, loss)"
    " SELECT session_id, step, time_ms, lr, grad_norm, update_norm, param_norm, contributors, loss FROM history"
    " ORDER BY session_id, step;"
    "DROP TABLE history;"
    "ALTER TABLE history_rows RENAME TO history;"
    "CREATE UNIQUE INDEX history_step ON history(session_id, step);"
    /* The partial index of the rows still holding a reply goes: each keyed
     * step inserted into it and, a reply window later, deleted from it, two
     * more pages dirtied per step (6.2 WAL frames a keyed step in steady
     * state, 4.8 without). store_idem_put finds the rows whose replies fall
     * out of the window from the previous keyed step instead. */
    "DROP INDEX idem_reply_step;",
    /* 4 -> 5: idempotency records in step order, replies in a ring. The
     * keys were clustered by (session, key): every keyed step inserted a
     * row, a saved reply with it, at a random page of the table, and a
     * window later deleted one from another random page, cleared a reply
     * on a third and kept an index of steps besides (4.1 WAL frames a
     * keyed step, 1.3 without). Now a key's row goes at the end of its
     * session's rows (the page the previous step dirtied), the rows that
     * leave the window go a batch at a time from the front, and a key is
     * found from its step, which the engine keeps in memory (engine/idem.c).
     * The saved replies take the slots of a per-session ring of blobs
     * overwritten in place (see IDEM_SLOTS_MAX). idem_keys.reply holds the
     * replies saved before this schema, in the rows they came with, until
     * those leave the window: new rows leave it NULL. As the history's, the
     * newest keys wait in the session's row (idem_tail, see IDEM_TAIL) and
     * move to idem_keys together: each session's appends landed on a page
     * of its own, and the session rows share pages every step dirties. */
    "CREATE TABLE idem_keys("
    " session_id INTEGER NOT NULL,"
    " step INTEGER NOT NULL,"
    " key TEXT NOT NULL,"
    " digest INTEGER NOT NULL,"
    " reply BLOB,"
    " PRIMARY KEY(session_id, step, key)) WITHOUT ROWID;"
    "CREATE TABLE idem_replies(id INTEGER PRIMARY KEY, data BLOB NOT NULL);"
    "ALTER TABLE sessions ADD COLUMN idem_tail BLOB;"
    "ALTER TABLE sessions ADD COLUMN idem_used INTEGER NOT NULL DEFAULT 0;"
    "INSERT INTO idem_keys(session_id, step, key, digest, reply)"
    " SELECT session_id, step, key, digest, reply FROM idem;"
    "DROP TABLE idem;",
    /* 5 -> 6: one reply ring for all sessions (see RING_CHUNK), its head
     * in table ring and each key's place in it in idem_keys.pos (and in the
     * tail's entries, which therefore move to idem_keys first:
     * migrate_6_tails). The replies saved before stay in idem_replies for
     * the steps up to sessions.idem_legacy, until those leave the window. */
    "CREATE TABLE replies(chunk INTEGER PRIMARY KEY, data BLOB NOT NULL);"
    "CREATE TABLE ring(id INTEGER PRIMARY KEY CHECK (id = 1), head INTEGER NOT NULL);"
    "INSERT INTO ring(id, head) VALUES (1, 0);"
    "ALTER TABLE idem_keys ADD COLUMN pos INTEGER;"
    "ALTER TABLE sessions ADD COLUMN idem_legacy INTEGER;"
    "UPDATE sessions SET idem_legacy = step WHERE EXISTS (SELECT 1 FROM idem_replies"
    " WHERE id >= (sessions.id << 20) AND id < ((sessions.id + 1) << 20));",
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
    Q_HISTORY_TAIL,  /* the rows waiting in a session's row */
    Q_BEGIN_READ,
    Q_END_READ,
    Q_STEPLOG_READ, /* a session's logged steps past its state, in step order */
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
    Q_IDEM_REPLIES_DELETE_ALL,
    Q_IDEM_KEYS,   /* a session's keys past a step */
    Q_IDEM_GET,    /* a key's digest at its step */
    Q_IDEM_PUT,
    Q_IDEM_OLDEST, /* a session's oldest key's step */
    Q_IDEM_PRUNE,
    Q_IDEM_TAIL,       /* the keys waiting in a session's row */
    Q_IDEM_TAIL_ADD,
    Q_IDEM_TAIL_CLEAR,
    Q_IDEM_LEGACY,     /* up to which step a session's replies are schema 5's */
    Q_IDEM_LEGACY_END, /* ... none, once the window has passed it */
    Q_RING_HEAD,       /* the reply ring's head */
    Q_RING_HEAD_SET,
    Q_RING_CAP,        /* the capacity the sessions' windows need */
    Q_RING_CHUNK_ADD,  /* a chunk of the ring, zeroed */
    Q_RING_TRIM,       /* the chunks past the capacity */
    Q_HISTORY_PUT,
    Q_HISTORY_PRUNE,
    Q_HISTORY_DELETE_ALL,
    Q_HISTORY_TAIL_ADD,
    Q_HISTORY_TAIL_CLEAR,
    Q_SESSION_LOG,   /* the step path of a logged session */
    Q_SESSION_STEP_HIST, /* Q_SESSION_STEP and the step's history row */
    Q_SESSION_LOG_HIST,  /* Q_SESSION_LOG and the step's history row */
    Q_SESSION_STEP_HIST_KEY, /* Q_SESSION_STEP_HIST and the step's key */
    Q_SESSION_LOG_HIST_KEY,  /* Q_SESSION_LOG_HIST and the step's key */
    Q_STATE_CURRENT, /* the state blob holds the row's step again */
    Q_STEPLOG_SLOT,  /* a slot's row: its bytes' id and length */
    Q_STEPLOG_SET,   /* a slot's step */
    Q_STEPLOG_ADD,   /* a new slot */
    Q_STEPDATA_ADD,  /* its bytes, zero-filled */
    Q_STEPDATA_SET,  /* a slot's bytes rewritten at another length */
    Q_STEPLOG_DELETE_DATA,
    Q_STEPLOG_DELETE_ALL,
    Q_SAVEPOINT, /* a job's savepoint inside the group's transaction */
    Q_SAVEPOINT_RELEASE,
    Q_SAVEPOINT_ROLLBACK,
    Q_END
};

/* A history row in a session's hist_tail: step, time_ms, lr, grad_norm,
 * update_norm, param_norm, contributors, loss as 8 little-endian bytes each
 * (the doubles by their bits), then has_loss in one byte. */
#define HIST_ROW 65
/* Rows a tail holds before they move to the history table together: about
 * 1 KiB in the session's row, and one history page dirtied per 16 steps. */
#define HIST_BATCH 16
/* The SET clause that splices history row `row` (`len` bytes, HIST_ROW) in
 * at hist_n of a tail of `size` bytes (HIST_ROW * HIST_BATCH). substr of a
 * blob counts bytes; || makes text of the bytes as they are (a UTF-8
 * database), NULs included, and the CAST gives back the blob. */
#define HIST_SPLICE(row, len, size)                                                                              \
    "hist_tail = CAST(substr(coalesce(hist_tail, zeroblob(" size ")), 1, hist_n * " len ") || " row               \
    " || substr(coalesce(hist_tail, zeroblob(" size ")), (hist_n + 1) * " len " + 1) AS BLOB),"                   \
    " hist_n = hist_n + 1"
/* The SET clause that appends key entry `entry` (`len` bytes) to a key tail
 * of `size` bytes (IDEM_TAIL) at idem_used. As HIST_SPLICE. */
#define IDEM_SPLICE(entry, len, size)                                                                              \
    "idem_tail = CAST(substr(coalesce(idem_tail, zeroblob(" size ")), 1, idem_used) || " entry                    \
    " || substr(coalesce(idem_tail, zeroblob(" size ")), idem_used + " len " + 1) AS BLOB),"                      \
    " idem_used = idem_used + " len

/* The step path's UPDATE of a session row (bound by bind_row_step and
 * row_step): step ?2, time ?3, state_step `state` (NULL, or ?4 for a logged
 * step); optionally the history row and the key entry into the row's
 * tails; guarded by the row being at the step before, and by room in the
 * tails it splices into. */
#define STEP_SET(state) "UPDATE sessions SET step = ?2, updated_ms = ?3, state_step = " state
#define STEP_HIST ", " HIST_SPLICE("?5", "?6", "?7")
#define STEP_KEY ", " IDEM_SPLICE("?9", "?10", "?11")
#define STEP_GUARD " WHERE id = ?1 AND step = ?2 - 1"
#define STEP_HIST_ROOM " AND hist_n < ?8"
#define STEP_KEY_ROOM " AND idem_used + ?10 <= ?11"

/* The columns row_session reads, in its order; the state blob follows them. */
#define SESSION_COLS "s.id, s.name, s.optimizer, s.dtype, s.size, s.step, s.config, s.created_ms, s.updated_ms"
#define STATE_COL 9
#define STATE_STEP_COL 10

static const char *const sql[Q_END] = {
    [Q_SESSION] = "SELECT " SESSION_COLS " FROM sessions s WHERE s.name = ?1",
    [Q_SESSION_STATE] = "SELECT " SESSION_COLS ", st.data, s.state_step FROM sessions s"
                        " JOIN state st ON st.session_id = s.id WHERE s.name = ?1",
    /* Two list statements rather than "?1 IS NULL OR name > ?1", which would
     * keep SQLite from seeking the name index. */
    [Q_LIST_FIRST] = "SELECT " SESSION_COLS " FROM sessions s ORDER BY s.name LIMIT ?1",
    [Q_LIST_AFTER] = "SELECT " SESSION_COLS " FROM sessions s WHERE s.name > ?1 ORDER BY s.name LIMIT ?2",
    [Q_COUNT] = "SELECT count(*) FROM sessions",
    [Q_HISTORY_PAGE] = "SELECT step, time_ms, lr, grad_norm, update_norm, param_norm, contributors, loss"
                       " FROM history WHERE session_id = ?1 AND step > ?2 ORDER BY step LIMIT ?3",
    [Q_HISTORY_TAIL] = "SELECT hist_tail, hist_n FROM sessions WHERE id = ?1",
    [Q_BEGIN_READ] = "BEGIN",
    [Q_END_READ] = "COMMIT",
    [Q_STEPLOG_READ] = "SELECT l.step, d.data FROM steplog l JOIN steplog_data d ON d.id = l.data_id"
                       " WHERE l.session_id = ?1 AND l.step > ?2 AND l.step <= ?3 ORDER BY l.step",
    [Q_BEGIN] = "BEGIN IMMEDIATE",
    [Q_COMMIT] = "COMMIT",
    [Q_ROLLBACK] = "ROLLBACK",
    [Q_SESSION_INSERT] = "INSERT INTO sessions(name, optimizer, dtype, size, step, config, created_ms, updated_ms)"
                         " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    [Q_STATE_INSERT] = "INSERT INTO state(session_id, data) VALUES (?1, ?2)",
    [Q_SESSION_UPDATE] = "UPDATE sessions SET step = ?2, config = ?3, updated_ms = ?4 WHERE id = ?1",
    /* Guarded on the step it moves from: should the row have moved under us
     * (only another process could, and store_open's lock keeps one out),
     * the update changes nothing and the step is refused, not applied on top. */
    [Q_SESSION_STEP] = STEP_SET("NULL") STEP_GUARD,
    [Q_SESSION_LOG] = STEP_SET("?4") STEP_GUARD,
    /* The same with the step's history row (?5, ?6 bytes) spliced into the
     * tail of ?7 bytes in the same row rewrite, unless the tail holds ?8
     * rows already: one UPDATE of the row a step instead of two. */
    [Q_SESSION_STEP_HIST] = STEP_SET("NULL") STEP_HIST STEP_GUARD STEP_HIST_ROOM,
    [Q_SESSION_LOG_HIST] = STEP_SET("?4") STEP_HIST STEP_GUARD STEP_HIST_ROOM,
    /* And a keyed step's key entry (?9, ?10 bytes) into its tail of ?11
     * bytes, unless it is full. */
    [Q_SESSION_STEP_HIST_KEY] = STEP_SET("NULL") STEP_HIST STEP_KEY STEP_GUARD STEP_HIST_ROOM STEP_KEY_ROOM,
    [Q_SESSION_LOG_HIST_KEY] = STEP_SET("?4") STEP_HIST STEP_KEY STEP_GUARD STEP_HIST_ROOM STEP_KEY_ROOM,
    [Q_STATE_UPDATE] = "UPDATE state SET data = ?2 WHERE session_id = ?1",
    [Q_STATE_CURRENT] = "UPDATE sessions SET state_step = NULL WHERE id = ?1 AND state_step IS NOT NULL",
    [Q_STEPLOG_SLOT] = "SELECT l.data_id, length(d.data) FROM steplog l JOIN steplog_data d ON d.id = l.data_id"
                       " WHERE l.session_id = ?1 AND l.slot = ?2",
    [Q_STEPLOG_SET] = "UPDATE steplog SET step = ?3 WHERE session_id = ?1 AND slot = ?2",
    [Q_STEPLOG_ADD] = "INSERT INTO steplog(session_id, slot, step, data_id) VALUES (?1, ?2, ?3, ?4)",
    [Q_STEPDATA_ADD] = "INSERT INTO steplog_data(data) VALUES (zeroblob(?1))",
    [Q_STEPDATA_SET] = "UPDATE steplog_data SET data = zeroblob(?2) WHERE id = ?1",
    [Q_STEPLOG_DELETE_DATA] = "DELETE FROM steplog_data WHERE id IN (SELECT data_id FROM steplog WHERE session_id = ?1)",
    [Q_STEPLOG_DELETE_ALL] = "DELETE FROM steplog WHERE session_id = ?1",
    [Q_SESSION_ID] = "SELECT id FROM sessions WHERE name = ?1",
    [Q_SESSION_DELETE] = "DELETE FROM sessions WHERE id = ?1",
    [Q_STATE_DELETE] = "DELETE FROM state WHERE session_id = ?1",
    [Q_IDEM_DELETE_ALL] = "DELETE FROM idem_keys WHERE session_id = ?1",
    [Q_IDEM_REPLIES_DELETE_ALL] = "DELETE FROM idem_replies WHERE id >= (?1 << " STR(IDEM_RING_BITS) ")"
                                  " AND id < ((?1 + 1) << " STR(IDEM_RING_BITS) ")",
    [Q_IDEM_KEYS] = "SELECT step, key FROM idem_keys WHERE session_id = ?1 AND step > ?2",
    [Q_IDEM_GET] = "SELECT digest, reply, pos FROM idem_keys WHERE session_id = ?1 AND step = ?2 AND key = ?3",
    [Q_IDEM_PUT] = "INSERT OR REPLACE INTO idem_keys(session_id, step, key, digest, pos) VALUES (?1, ?2, ?3, ?4, ?5)",
    [Q_IDEM_OLDEST] = "SELECT min(step) FROM idem_keys WHERE session_id = ?1",
    [Q_IDEM_PRUNE] = "DELETE FROM idem_keys WHERE session_id = ?1 AND step <= ?2",
    [Q_IDEM_TAIL] = "SELECT idem_tail, idem_used FROM sessions WHERE id = ?1",
    /* Entry ?2 (?3 bytes) spliced in at idem_used of a tail of ?4 bytes
     * (IDEM_TAIL) when it fits; as Q_HISTORY_TAIL_ADD. */
    [Q_IDEM_TAIL_ADD] = "UPDATE sessions SET " IDEM_SPLICE("?2", "?3", "?4") " WHERE id = ?1 AND idem_used + ?3 <= ?4",
    [Q_IDEM_TAIL_CLEAR] = "UPDATE sessions SET idem_used = 0 WHERE id = ?1",
    [Q_IDEM_LEGACY] = "SELECT idem_legacy FROM sessions WHERE id = ?1",
    [Q_IDEM_LEGACY_END] = "UPDATE sessions SET idem_legacy = NULL WHERE id = ?1 AND idem_legacy <= ?2",
    [Q_RING_HEAD] = "SELECT head FROM ring WHERE id = 1",
    [Q_RING_HEAD_SET] = "UPDATE ring SET head = ?1 WHERE id = 1",
    /* A reply is its params (size elements of 4 << dtype bytes) and a few
     * numbers; 128 bytes cover those and the record's head. */
    [Q_RING_CAP] = "SELECT total(min(?1 * (size * (4 << dtype) + 128), ?2)) FROM sessions",
    [Q_RING_CHUNK_ADD] = "INSERT INTO replies(chunk, data) VALUES (?1, zeroblob(?2))",
    [Q_RING_TRIM] = "DELETE FROM replies WHERE chunk >= ?1",
    [Q_HISTORY_PUT] = "INSERT OR REPLACE INTO history(session_id, step, time_ms, lr, grad_norm, update_norm,"
                      " param_norm, contributors, loss) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    [Q_HISTORY_PRUNE] = "DELETE FROM history WHERE session_id = ?1 AND step <= ?2",
    [Q_HISTORY_DELETE_ALL] = "DELETE FROM history WHERE session_id = ?1",
    /* Row ?2 (?3 bytes) spliced into a tail of ?4 bytes, unless the tail
     * holds ?5 rows already (nothing changes: the caller flushes it first). */
    [Q_HISTORY_TAIL_ADD] = "UPDATE sessions SET " HIST_SPLICE("?2", "?3", "?4") " WHERE id = ?1 AND hist_n < ?5",
    [Q_HISTORY_TAIL_CLEAR] = "UPDATE sessions SET hist_n = 0 WHERE id = ?1",
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
     * back into the database, woken by the writer's WAL hook and by a tick.
     * The writer never checkpoints itself: with auto-checkpoint a 12 MB step
     * would also copy 12 MB and fsync the database inside its own commit.
     * See "The checkpointer" below for what it does when. */
    sqlite3 *ckpt_db;
    pthread_t ckpt_thread;
    pthread_mutex_t ckpt_mu;
    pthread_cond_t ckpt_cv; /* wakes the checkpointer */
    pthread_cond_t gate_cv; /* the gate opened, or a transaction ended */
    int ckpt_init;          /* ckpt_mu, ckpt_cv, gate_cv and the thread exist */
    int ckpt_wanted;        /* guarded by ckpt_mu */
    int ckpt_stop;          /* guarded by ckpt_mu */
    /* The gate, guarded by ckpt_mu: while gate_closed the writer begins no
     * transaction, so a RESTART or TRUNCATE checkpoint never waits in
     * SQLite's busy handler for the write lock (its sleeps are coarse) and
     * the writer never waits in its own. tx_active: the writer is inside a
     * transaction. urgent_req counts requests for an urgent checkpoint,
     * urgent_done the last one served. */
    int gate_closed, tx_active;
    uint64_t urgent_req, urgent_done;
    int page_size;                       /* bytes; a WAL frame is page_size + 24 */
    atomic_uint_fast64_t cache_kib;      /* the writer's page cache (PRAGMA cache_size), see cache_fit */
    uint64_t wal_max;                    /* bytes: refuse to begin past it */
    atomic_uint_fast64_t wal_frames;     /* frames in the WAL after the last commit (WAL hook) */
    atomic_uint_fast64_t ckpt_done;      /* of those, copied by the last checkpoint */
    atomic_uint_fast64_t last_commit_us; /* CLOCK_MONOTONIC of the last commit */
    atomic_uint_fast64_t n_ckpt, n_busy, n_fail, n_reset, n_refused;
    atomic_uint_fast64_t n_written; /* frames commits wrote, all told (WAL hook) */
    /* Free bytes a write must find on the filesystem before store_writable
     * trusts it again: twice the last failed transaction (its WAL frames,
     * then their copy into the database). 0: no failure pending. */
    atomic_uint_fast64_t need_bytes;
    uint64_t tx_bytes;        /* writer only: bytes of state the open transaction writes */
    uint64_t blob_writes;     /* writer only: sqlite3_blob_write calls made (writes_made) */
    /* Writer only: the write handles on state.data and replies.data that
     * the transaction's last step left open for the next (blob_at), or
     * NULL; closed before the transaction ends or a savepoint begins or
     * ends (blobs_close). */
    sqlite3_blob *blob_kept[2];
    uint64_t ring_head;       /* writer only: the reply ring's next pos, never behind table ring's */
    int ring_moved;           /* writer only: ring_head moved since table ring last took it (store_commit) */
    uint64_t ring_cap;        /* writer only: the ring's capacity, bytes; 0: to be worked out */
    uint64_t tx_writes;       /* writer only: writes_made when the transaction began */
    int lock_fd;              /* the exclusive lock (flock) on the database, or -1 */
    void (*log)(void *, const char *);
    void *log_ctx;
    pthread_mutex_t log_mu; /* guards the rate limit below */
    int log_init;
    uint64_t log_last_us[4]; /* per kind of failure: the last line written */
    unsigned log_dropped[4]; /* lines suppressed since */
    /* Set when a write transaction failed or was rolled back, cleared by the
     * next commit that succeeds: while set, store_writable makes a real write
     * rather than trust a lock that costs no I/O. */
    atomic_int write_failed;
};

static optd_err probe_open(store *st, char *err, size_t errlen);
static void rollback_tx(store *st);

/* --- Helpers. ------------------------------------------------------------ */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (!err || !errlen)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Kinds of failure the log rate-limits separately. */
enum { LOG_TX, LOG_CKPT, LOG_LIMIT, LOG_KINDS };
#define LOG_EVERY_US 1000000u

static uint64_t mono_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Reports a storage failure through the caller's log: at most one line a
 * second per kind, saying how many were held back since, so a failing disk
 * under load is visible without drowning the log. */
static void store_logf(store *st, int kind, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    uint64_t now = mono_now_us();
    unsigned dropped;
    int n;

    if (!st->log || !st->log_init)
        return;
    pthread_mutex_lock(&st->log_mu);
    if (st->log_last_us[kind] && now - st->log_last_us[kind] < LOG_EVERY_US) {
        st->log_dropped[kind]++;
        pthread_mutex_unlock(&st->log_mu);
        return;
    }
    st->log_last_us[kind] = now;
    dropped = st->log_dropped[kind];
    st->log_dropped[kind] = 0;
    pthread_mutex_unlock(&st->log_mu);
    n = snprintf(line, sizeof line, "store: ");
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    if (dropped && n > 0 && (size_t)n < sizeof line)
        snprintf(line + n, sizeof line - (size_t)n, " (%u more like it in the last second)", dropped);
    st->log(st->log_ctx, line);
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
    if (src == SQLITE_OK || src == SQLITE_ROW || src == SQLITE_DONE)
        return OPTD_OK;
    if (src == SQLITE_CONSTRAINT_UNIQUE || src == SQLITE_CONSTRAINT_PRIMARYKEY)
        return OPTD_E_ALREADY_EXISTS;
    /* A value past SQLite's length limit: a refusal of that value (nothing
     * was written), not a fault of the storage. */
    if (src == SQLITE_TOOBIG)
        return OPTD_E_SESSION_TOO_LARGE;
    switch (src & 0xff) {
    case SQLITE_NOMEM:
        return OPTD_E_NOMEM;
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
    case SQLITE_INTERRUPT:
        return OPTD_E_UNAVAILABLE;
    default:
        return OPTD_E_INTERNAL; /* misuse, schema drift */
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
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    stmt_done(q);
    return from_sqlite(src);
}

/* Fixed-width fields of the tails and ring records: 8 bytes, little-endian. */
static void le64_put(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t le64_get(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
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
    if (!p)
        return sqlite3_bind_null(q, i);
    if (!len)
        return sqlite3_bind_zeroblob(q, i, 0);
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
    if (sqlite3_column_type(q, col) == SQLITE_NULL)
        return OPTD_OK;
    p = sqlite3_column_blob(q, col);
    n = sqlite3_column_bytes(q, col);
    if (!p && sqlite3_errcode(sqlite3_db_handle(q)) == SQLITE_NOMEM)
        return OPTD_E_NOMEM;
    copy = malloc(n > 0 ? (size_t)n : 1);
    if (!copy)
        return OPTD_E_NOMEM;
    if (n > 0)
        memcpy(copy, p, (size_t)n);
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
    if (sqlite3_column_type(q, col) == SQLITE_NULL)
        return OPTD_OK;
    t = sqlite3_column_text(q, col);
    n = sqlite3_column_bytes(q, col);
    if (!t)
        return sqlite3_errcode(sqlite3_db_handle(q)) == SQLITE_NOMEM ? OPTD_E_NOMEM : OPTD_OK;
    if ((size_t)n >= cap)
        return OPTD_E_INTERNAL;
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
    if (sqlite3_column_type(q, col) == SQLITE_NULL)
        return OPTD_OK;
    t = sqlite3_column_text(q, col);
    n = sqlite3_column_bytes(q, col);
    if (!t && sqlite3_errcode(sqlite3_db_handle(q)) == SQLITE_NOMEM)
        return OPTD_E_NOMEM;
    *out = malloc((size_t)n + 1);
    if (!*out)
        return OPTD_E_NOMEM;
    if (n > 0)
        memcpy(*out, t, (size_t)n);
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
    if (rc)
        goto done;
    rc = column_text_into(q, 2, s.optimizer, sizeof s.optimizer);
    if (rc)
        goto done;
    s.dtype = sqlite3_column_int(q, 3);
    s.size = i2u(sqlite3_column_int64(q, 4));
    s.step = i2u(sqlite3_column_int64(q, 5));
    rc = column_text_dup(q, 6, &s.config);
    if (rc)
        goto done;
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

/* Reads the log entries s->state_step + 1 .. s->step into s. OPTD_E_INTERNAL
 * when a step is missing or the state is past the row: a file edited
 * behind our back, since they are written in one transaction. */
static optd_err log_read(sqlite3_stmt *q, store_session *s)
{
    uint64_t want = s->step - s->state_step;
    optd_err rc = OPTD_OK;
    int src;

    if (s->state_step > s->step || want > INT32_MAX)
        return OPTD_E_INTERNAL;
    if (want == 0)
        return OPTD_OK;
    if (!(s->log = calloc(want, sizeof *s->log)))
        return OPTD_E_NOMEM;
    src = sqlite3_bind_int64(q, 1, (int64_t)s->id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)s->state_step);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 3, (int64_t)s->step);
    while (src == SQLITE_OK && (src = sqlite3_step(q)) == SQLITE_ROW) {
        store_log_entry *e = &s->log[s->nlog];
        e->step = i2u(sqlite3_column_int64(q, 0));
        if (s->nlog == want || e->step != s->state_step + 1 + s->nlog) {
            rc = OPTD_E_INTERNAL;
            break;
        }
        rc = column_bytes_copy(q, 1, &e->data, &e->len);
        if (rc)
            break;
        s->nlog++;
        src = SQLITE_OK;
    }
    if (rc == OPTD_OK && src != SQLITE_DONE)
        rc = from_sqlite(src) ? from_sqlite(src) : OPTD_E_INTERNAL;
    if (rc == OPTD_OK && s->nlog != want)
        rc = OPTD_E_INTERNAL;
    stmt_done(q);
    return rc;
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
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_DONE) {
        rc = OPTD_E_NOT_FOUND;
        goto done;
    }
    if (src != SQLITE_ROW) {
        rc = from_sqlite(src);
        goto done;
    }
    rc = row_session(q, &s);
    if (rc)
        goto done;
    if (state) {
        rc = column_bytes_copy(q, STATE_COL, &blob, &n);
        s.state_step = s.step;
        if (rc == OPTD_OK && sqlite3_column_type(q, STATE_STEP_COL) != SQLITE_NULL) {
            s.state_step = i2u(sqlite3_column_int64(q, STATE_STEP_COL));
            /* q is still stepping, so its read transaction (one snapshot)
             * holds for the log's statement too. */
            rc = log_read(qs[Q_STEPLOG_READ], &s);
        }
    }
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
    if (src == SQLITE_OK)
        src = sqlite3_extended_result_codes(db, 1);
    if (src == SQLITE_OK)
        src = sqlite3_busy_timeout(db, busy_ms);
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

    if (src == SQLITE_OK)
        return OPTD_OK;
    seterr(err, errlen, "cannot set up %s: %s", path, msg ? msg : sqlite3_errstr(src));
    sqlite3_free(msg);
    /* At open, damage is a verdict on the file (do not retry), not an outage. */
    if ((src & 0xff) == SQLITE_CORRUPT || (src & 0xff) == SQLITE_NOTADB)
        return OPTD_E_INVALID;
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
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
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
        if (rc == OPTD_OK || rc == OPTD_E_INTERNAL)
            rc = OPTD_E_UNAVAILABLE;
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
               "%s is not an optd database (application_id %lld, %lld schema objects): refusing to touch it", path,
               (long long)h->app, (long long)h->objects);
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
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        t = sqlite3_column_text(q, 0);
        if (!t || strcmp((const char *)t, "ok") != 0) {
            seterr(err, errlen, "%s is corrupt: %s", path, t ? (const char *)t : "quick_check failed");
            /* quick_check's findings span lines; the message is one. */
            for (char *c = err; err && *c; c++)
                if (*c == '\n')
                    *c = ' ';
            rc = OPTD_E_INVALID;
        }
    } else if ((src & 0xff) == SQLITE_CORRUPT || (src & 0xff) == SQLITE_NOTADB) {
        seterr(err, errlen, "%s is corrupt: %s", path, sqlite3_errmsg(db));
        rc = OPTD_E_INVALID;
    } else {
        seterr(err, errlen, "cannot check %s: %s", path, sqlite3_errmsg(db));
        rc = from_sqlite(src);
        if (rc == OPTD_OK || rc == OPTD_E_INTERNAL)
            rc = OPTD_E_UNAVAILABLE;
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
    if (!name || !uri)
        goto done;
    memcpy(name, path, n);
    memcpy(name + n, "-wal", 5);
    /* file:///abs or file:rel, with the characters a URI gives meaning to
     * escaped. */
    o = uri + sprintf(uri, "file:%s", path[0] == '/' ? "//" : "");
    for (p = path; *p; p++) {
        if (*p == '%' || *p == '?' || *p == '#')
            o += sprintf(o, "%%%02X", (unsigned char)*p);
        else
            *o++ = *p;
    }
    strcpy(o, "?immutable=1");
    if (stat(name, &sb) == 0)
        rc = conn_open(path, SQLITE_OPEN_READONLY, busy_ms, &db, err, errlen);
    else
        rc = conn_open(uri, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, busy_ms, &db, err, errlen);
    if (rc) {
        seterr(err, errlen, "cannot open %s", path);
        goto done;
    }
    rc = header_read(db, path, &h, err, errlen);
    if (rc)
        goto done;
    rc = header_judge(&h, path, err, errlen);
    if (rc)
        goto done;
    rc = quick_check(db, path, err, errlen);
done:
    if (db)
        conn_close(db);
    free(name);
    free(uri);
    return rc;
}

static int idem_entry_next(const unsigned char *buf, size_t used, size_t *off, idem_entry *e, size_t head);

/* Schema 6's entries in a session's key tail hold their reply's pos, which
 * schema 5's do not: those go to idem_keys (pos NULL) before any new one
 * is added. */
static optd_err migrate_6_tails(sqlite3 *db, const char *path, char *err, size_t errlen)
{
    sqlite3_stmt *sel = NULL, *ins = NULL;
    int src = sqlite3_prepare_v2(db, "SELECT id, idem_tail, idem_used FROM sessions WHERE idem_used > 0", -1, &sel,
                                 NULL);
    if (src == SQLITE_OK)
        src = sqlite3_prepare_v2(db,
                                 "INSERT OR REPLACE INTO idem_keys(session_id, step, key, digest) VALUES (?1, ?2, ?3, ?4)",
                                 -1, &ins, NULL);
    while (src == SQLITE_OK && (src = sqlite3_step(sel)) == SQLITE_ROW) {
        const unsigned char *buf = sqlite3_column_blob(sel, 1);
        size_t used = (size_t)sqlite3_column_int64(sel, 2), off = 0;
        idem_entry e;
        int more;
        src = SQLITE_OK;
        if (!buf || used > (size_t)sqlite3_column_bytes(sel, 1))
            src = SQLITE_CORRUPT; /* not a tail schema 5 wrote */
        while (src == SQLITE_OK && (more = idem_entry_next(buf, used, &off, &e, IDEM_ENTRY_HEAD_5)) != 0) {
            if (more < 0)
                src = SQLITE_CORRUPT;
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(ins, 1, sqlite3_column_int64(sel, 0));
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(ins, 2, u2i(e.step));
            if (src == SQLITE_OK)
                src = sqlite3_bind_text(ins, 3, e.key, (int)e.klen, SQLITE_STATIC);
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(ins, 4, u2i(e.digest));
            if (src == SQLITE_OK && (src = sqlite3_step(ins)) == SQLITE_DONE)
                src = SQLITE_OK;
            (void)sqlite3_reset(ins);
        }
    }
    if (src == SQLITE_DONE)
        src = SQLITE_OK;
    (void)sqlite3_finalize(sel);
    (void)sqlite3_finalize(ins);
    if (src != SQLITE_OK) {
        seterr(err, errlen, "cannot move the idempotency keys of %s to schema 6: %s", path,
               src == SQLITE_CORRUPT ? "a key tail is damaged" : sqlite3_errmsg(db));
        return src == SQLITE_CORRUPT ? OPTD_E_INVALID : from_sqlite(src);
    }
    return exec_sql(db, "UPDATE sessions SET idem_used = 0", path, err, errlen);
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
    if (rc)
        return rc;
    rc = header_read(db, path, &h, err, errlen);
    if (rc)
        goto done;
    rc = header_judge(&h, path, err, errlen);
    if (rc)
        goto done;
    if (h.app == 0) {
        snprintf(text, sizeof text, "PRAGMA application_id = %d", STORE_APPLICATION_ID);
        rc = exec_sql(db, text, path, err, errlen);
        if (rc)
            goto done;
    }
    for (v = h.version; v < SCHEMA_VERSION; v++) {
        rc = exec_sql(db, migrations[v], path, err, errlen);
        if (rc == OPTD_OK && v == 5)
            rc = migrate_6_tails(db, path, err, errlen);
        if (rc)
            goto done;
    }
    if (h.version != SCHEMA_VERSION) {
        snprintf(text, sizeof text, "PRAGMA user_version = %d", SCHEMA_VERSION);
        rc = exec_sql(db, text, path, err, errlen);
        if (rc)
            goto done;
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

/* --- The checkpointer. ------------------------------------------------------
 *
 * SQLite appends every commit to the -wal file; a checkpoint copies the
 * newest version of each page back into the database, and only once every
 * frame is copied and no reader needs the old ones can the next commit start
 * the WAL over from its first byte. A writer that commits back to back never
 * leaves such a moment by itself, so the WAL would grow without end. Hence:
 *
 * - PASSIVE, in the background, once CKPT_PASSIVE_BYTES of frames wait:
 *   the bulk copy, while the writer goes on.
 * - RESTART past the soft limit (wal_soft, at most CKPT_SOFT_BYTES): the
 *   gate stops the writer between two transactions, the checkpoint copies
 *   what PASSIVE could not (the frames of the last commits) and waits for
 *   readers (theirs are short: no read transaction spans network I/O), and
 *   the next commit starts the WAL over. journal_size_limit then trims the
 *   file to the soft limit, so it is overwritten rather than grown.
 * - TRUNCATE once the daemon has been idle for CKPT_IDLE_US: the -wal file
 *   goes back to 0 bytes.
 * - Past wal_max (the hard limit) store_begin asks for a TRUNCATE, waits for
 *   that attempt and, when the WAL is still over, refuses the transaction
 *   (OPTD_E_UNAVAILABLE, logged): a reader stuck on an old snapshot or a
 *   database file that cannot grow must not let the WAL fill the disk.
 *
 * Every outcome is checked: busy and failed checkpoints are counted, and
 * failures logged with SQLite's message. */
#define CKPT_PASSIVE_BYTES ((uint64_t)8 << 20)
#define CKPT_SOFT_BYTES ((uint64_t)64 << 20)
#define CKPT_SOFT_MIN ((uint64_t)1 << 20)
#define CKPT_IDLE_US 2000000u
#define CKPT_TICK_MS 250
/* How long a RESTART or TRUNCATE waits for readers to move on. */
#define CKPT_BUSY_MS 1000

static uint64_t frame_bytes(const store *st) { return (uint64_t)st->page_size + 24; }

/* The soft limit: CKPT_SOFT_BYTES, or an eighth of the free space when the
 * filesystem is small, so a small disk restarts the WAL sooner. */
static uint64_t wal_soft(const store *st, uint64_t wal_file)
{
    struct statvfs sv;
    uint64_t soft = CKPT_SOFT_BYTES, room;

    if (statvfs(st->path, &sv) == 0) {
        room = ((uint64_t)sv.f_bavail * sv.f_frsize + wal_file) / 8;
        if (room < soft)
            soft = room;
    }
    return soft < CKPT_SOFT_MIN ? CKPT_SOFT_MIN : soft;
}

static uint64_t file_bytes(const char *path, const char *suffix)
{
    char name[4096];
    struct stat sb;

    if (snprintf(name, sizeof name, "%s%s", path, suffix) >= (int)sizeof name)
        return 0;
    return stat(name, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

static int wal_hook(void *ctx, sqlite3 *db, const char *name, int pages)
{
    store *st = ctx;
    uint64_t frames = (uint64_t)(pages > 0 ? pages : 0);
    (void)db;
    (void)name;
    /* Fewer frames than last time: the WAL started over, nothing of it is
     * copied yet. */
    uint64_t before = atomic_load(&st->wal_frames);
    if (frames < before) {
        atomic_store(&st->ckpt_done, 0);
        atomic_fetch_add(&st->n_reset, 1);
        before = 0;
    }
    atomic_fetch_add(&st->n_written, frames - before);
    atomic_store(&st->wal_frames, frames);
    atomic_store(&st->last_commit_us, mono_now_us());
    if ((frames - atomic_load(&st->ckpt_done)) * frame_bytes(st) >= CKPT_PASSIVE_BYTES) {
        pthread_mutex_lock(&st->ckpt_mu);
        st->ckpt_wanted = 1;
        pthread_cond_signal(&st->ckpt_cv);
        pthread_mutex_unlock(&st->ckpt_mu);
    }
    return SQLITE_OK;
}

/* Closes the gate once the writer's transaction in progress (if any) ends. */
static void gate_close(store *st)
{
    pthread_mutex_lock(&st->ckpt_mu);
    st->gate_closed = 1;
    while (st->tx_active)
        pthread_cond_wait(&st->gate_cv, &st->ckpt_mu);
    pthread_mutex_unlock(&st->ckpt_mu);
}

static void gate_open(store *st)
{
    pthread_mutex_lock(&st->ckpt_mu);
    st->gate_closed = 0;
    pthread_cond_broadcast(&st->gate_cv);
    pthread_mutex_unlock(&st->ckpt_mu);
}

static const char *mode_name(int mode)
{
    return mode == SQLITE_CHECKPOINT_PASSIVE ? "PASSIVE" : mode == SQLITE_CHECKPOINT_RESTART ? "RESTART" : "TRUNCATE";
}

/* One checkpoint in mode; RESTART and TRUNCATE run behind the gate.
 * Returns 1 when it ran to its end (for RESTART and TRUNCATE: the WAL starts
 * over), 0 when busy or failed (counted, and failures logged). */
static int ckpt_once(store *st, int mode)
{
    int nlog = -1, nckpt = -1, src, done;

    if (mode != SQLITE_CHECKPOINT_PASSIVE)
        gate_close(st);
    src = sqlite3_wal_checkpoint_v2(st->ckpt_db, NULL, mode, &nlog, &nckpt);
    if (src == SQLITE_OK && nlog >= 0 && nckpt >= 0) {
        done = nckpt == nlog;
        if (mode == SQLITE_CHECKPOINT_PASSIVE) {
            atomic_store(&st->ckpt_done, (uint64_t)nckpt);
        } else {
            /* The next commit starts the WAL over (TRUNCATE: it is empty now). */
            atomic_store(&st->wal_frames, 0);
            atomic_store(&st->ckpt_done, 0);
            atomic_fetch_add(&st->n_reset, 1);
        }
        atomic_fetch_add(&st->n_ckpt, 1);
    } else if ((src & 0xff) == SQLITE_BUSY || (src & 0xff) == SQLITE_LOCKED) {
        /* A reader (or, for PASSIVE, nothing worse than a concurrent
         * checkpoint) was in the way; the frames copied so far stay copied. */
        done = 0;
        if (nckpt >= 0 && mode == SQLITE_CHECKPOINT_PASSIVE)
            atomic_store(&st->ckpt_done, (uint64_t)nckpt);
        atomic_fetch_add(&st->n_busy, 1);
        store_logf(st, LOG_CKPT, "%s checkpoint of %s busy (a reader holds an old snapshot); %d of %d frames copied",
                   mode_name(mode), st->path, nckpt, nlog);
    } else {
        done = 0;
        atomic_fetch_add(&st->n_fail, 1);
        if (src == SQLITE_OK)
            store_logf(st, LOG_CKPT, "%s checkpoint of %s did nothing: the connection is not in WAL mode",
                       mode_name(mode), st->path);
        else
            store_logf(st, LOG_CKPT, "%s checkpoint of %s failed: %s (SQLite code %d)", mode_name(mode), st->path,
                       sqlite3_errmsg(st->ckpt_db), src);
    }
    if (mode != SQLITE_CHECKPOINT_PASSIVE)
        gate_open(st);
    return done;
}

/* Decides what the WAL needs now (see the top of this section). */
static void ckpt_run(store *st, int urgent)
{
    uint64_t fb = frame_bytes(st), frames = atomic_load(&st->wal_frames);
    uint64_t used = frames * fb, lag = (frames - atomic_load(&st->ckpt_done)) * fb;
    uint64_t file = file_bytes(st->path, "-wal");
    int idle = mono_now_us() - atomic_load(&st->last_commit_us) >= CKPT_IDLE_US;

    if (urgent || used >= st->wal_max) {
        (void)ckpt_once(st, SQLITE_CHECKPOINT_PASSIVE);
        (void)ckpt_once(st, SQLITE_CHECKPOINT_TRUNCATE);
        return;
    }
    /* Past the soft limit straight to RESTART: a PASSIVE first would let the
     * writer append for as long as it copies. The copy is of each page's
     * newest version, so it costs the pages the WAL touches, not its size. */
    if (used >= wal_soft(st, file)) {
        (void)ckpt_once(st, SQLITE_CHECKPOINT_RESTART);
        return;
    }
    if (lag >= CKPT_PASSIVE_BYTES)
        (void)ckpt_once(st, SQLITE_CHECKPOINT_PASSIVE);
    if (idle && file > 0) {
        if (lag > 0)
            (void)ckpt_once(st, SQLITE_CHECKPOINT_PASSIVE);
        (void)ckpt_once(st, SQLITE_CHECKPOINT_TRUNCATE);
    }
}

static void *ckpt_main(void *arg)
{
    store *st = arg;
    struct timespec ts;
    uint64_t urgent;

    pthread_mutex_lock(&st->ckpt_mu);
    for (;;) {
        if (!st->ckpt_wanted && !st->ckpt_stop) {
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += CKPT_TICK_MS * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            (void)pthread_cond_timedwait(&st->ckpt_cv, &st->ckpt_mu, &ts);
        }
        if (st->ckpt_stop)
            break;
        urgent = st->urgent_req;
        st->ckpt_wanted = 0;
        pthread_mutex_unlock(&st->ckpt_mu);
        ckpt_run(st, urgent > st->urgent_done);
        pthread_mutex_lock(&st->ckpt_mu);
        st->urgent_done = urgent;
        pthread_cond_broadcast(&st->gate_cv);
    }
    pthread_mutex_unlock(&st->ckpt_mu);
    return NULL;
}

/* The writer's side of the hard limit: called by store_begin outside any
 * transaction. Past wal_max it asks for an urgent checkpoint and waits for
 * that attempt to finish. Returns OPTD_OK or OPTD_E_UNAVAILABLE (logged). */
static optd_err wal_admit(store *st)
{
    uint64_t used = atomic_load(&st->wal_frames) * frame_bytes(st), req;

    if (!st->ckpt_init || used < st->wal_max)
        return OPTD_OK;
    pthread_mutex_lock(&st->ckpt_mu);
    req = ++st->urgent_req;
    st->ckpt_wanted = 1;
    pthread_cond_signal(&st->ckpt_cv);
    while (st->urgent_done < req && !st->ckpt_stop)
        pthread_cond_wait(&st->gate_cv, &st->ckpt_mu);
    pthread_mutex_unlock(&st->ckpt_mu);
    used = atomic_load(&st->wal_frames) * frame_bytes(st);
    if (used < st->wal_max)
        return OPTD_OK;
    atomic_fetch_add(&st->n_refused, 1);
    store_logf(st, LOG_LIMIT,
               "refusing writes: the WAL of %s holds %llu MiB, over its limit of %llu MiB, and cannot be"
               " checkpointed (see the checkpoint messages); writes resume once it can",
               st->path, (unsigned long long)(used >> 20), (unsigned long long)(st->wal_max >> 20));
    return OPTD_E_UNAVAILABLE;
}

/* Starts the checkpointer and hands checkpoints over from the writer. Its
 * connection reads the schema once: a connection that never read the
 * database has not opened the WAL, and a checkpoint on it silently does
 * nothing (rc OK, -1 frames). */
static optd_err ckpt_open(store *st, char *err, size_t errlen)
{
    pthread_condattr_t ca;
    char text[64];
    int ok;
    optd_err rc = conn_open(st->path, SQLITE_OPEN_READWRITE, CKPT_BUSY_MS, &st->ckpt_db, err, errlen);
    if (rc)
        return rc;
    if (sqlite3_exec(st->ckpt_db, "SELECT count(*) FROM sqlite_master", NULL, NULL, NULL) != SQLITE_OK) {
        seterr(err, errlen, "cannot read %s: %s", st->path, sqlite3_errmsg(st->ckpt_db));
        return OPTD_E_UNAVAILABLE;
    }
    /* The RESTART that the writer's next commit follows trims the -wal file
     * to this size instead of leaving it at its high-water mark. */
    snprintf(text, sizeof text, "PRAGMA journal_size_limit = %llu", (unsigned long long)CKPT_SOFT_BYTES);
    rc = exec_sql(st->db, text, st->path, err, errlen);
    if (rc)
        return rc;
    if (pthread_mutex_init(&st->ckpt_mu, NULL) != 0)
        return OPTD_E_NOMEM;
    /* ckpt_cv waits with CLOCK_MONOTONIC deadlines. */
    ok = pthread_condattr_init(&ca) == 0;
    if (ok) {
        ok = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0 && pthread_cond_init(&st->ckpt_cv, &ca) == 0;
        pthread_condattr_destroy(&ca);
    }
    if (!ok) {
        pthread_mutex_destroy(&st->ckpt_mu);
        return OPTD_E_NOMEM;
    }
    if (pthread_cond_init(&st->gate_cv, NULL) != 0) {
        pthread_cond_destroy(&st->ckpt_cv);
        pthread_mutex_destroy(&st->ckpt_mu);
        return OPTD_E_NOMEM;
    }
    atomic_store(&st->last_commit_us, mono_now_us());
    if (pthread_create(&st->ckpt_thread, NULL, ckpt_main, st) != 0) {
        pthread_cond_destroy(&st->gate_cv);
        pthread_cond_destroy(&st->ckpt_cv);
        pthread_mutex_destroy(&st->ckpt_mu);
        return OPTD_E_NOMEM;
    }
    (void)pthread_setname_np(st->ckpt_thread, "optd-ckpt");
    st->ckpt_init = 1;
    (void)sqlite3_wal_autocheckpoint(st->db, 0);
    sqlite3_wal_hook(st->db, wal_hook, st);
    return OPTD_OK;
}

static optd_err ring_load(store *st);

/* Opens the write connection: WAL, durability, schema, statements, and the
 * reply ring's head. */
static optd_err writer_open(store *st, const char *path, const store_options *o, int create, char *err, size_t errlen)
{
    sqlite3_stmt *q = NULL;
    const unsigned char *mode;
    optd_err rc;
    int src;

    rc = conn_open(path, SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0), o->busy_timeout_ms, &st->db, err,
                   errlen);
    if (rc)
        return rc;
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
        if (rc)
            return rc;
    }
    /* journal_mode answers with the mode in force, which is not WAL when the
     * switch was refused (e.g. a filesystem without shared memory). */
    src = sqlite3_prepare_v2(st->db, "PRAGMA journal_mode = WAL", -1, &q, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
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
    if (rc)
        return rc;

    rc =
        exec_sql(st->db, o->sync_full ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL", path, err, errlen);
    /* The savepoint a job runs in copies each page the job changes first
     * to a statement journal, which SQLite spills to a temporary file past
     * 64 KiB: four of our pages, so a small step's savepoint wrote its pages
     * through the kernel twice. In memory it is a memcpy. A huge job runs
     * alone and without a savepoint (engine/writer.c begin_part), so this
     * holds the pages of small jobs only. */
    if (rc == OPTD_OK)
        rc = exec_sql(st->db, "PRAGMA temp_store = MEMORY", path, err, errlen);
    if (rc)
        return rc;
    rc = migrate(st->db, path, err, errlen);
    if (rc)
        return rc;
    /* The WAL's frame size follows the page size, which the file fixes. */
    src = sqlite3_prepare_v2(st->db, "PRAGMA page_size", -1, &q, NULL);
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    st->page_size = src == SQLITE_ROW ? sqlite3_column_int(q, 0) : 0;
    atomic_store(&st->cache_kib, 2000); /* SQLite's default cache_size, -2000 */
    (void)sqlite3_finalize(q);
    if (st->page_size <= 0) {
        seterr(err, errlen, "cannot read the page size of %s: %s", path, sqlite3_errmsg(st->db));
        return OPTD_E_UNAVAILABLE;
    }
    rc = prepare_all(st->db, st->q, Q_END, path, err, errlen);
    if (rc == OPTD_OK && (rc = ring_load(st)) != OPTD_OK)
        seterr(err, errlen, "cannot read the reply ring's head in %s: %s", path, sqlite3_errmsg(st->db));
    return rc;
}

/* Opens the read-only pool; called after migrate so the schema exists. */
static optd_err readers_open(store *st, const char *path, const store_options *o, char *err, size_t errlen)
{
    optd_err rc;
    int i;

    st->readers = calloc((size_t)o->readers, sizeof *st->readers);
    st->idle = calloc((size_t)o->readers, sizeof *st->idle);
    if (!st->readers || !st->idle)
        return OPTD_E_NOMEM;
    for (i = 0; i < o->readers; i++) {
        struct reader *r = &st->readers[i];

        rc = conn_open(path, SQLITE_OPEN_READONLY, o->busy_timeout_ms, &r->db, err, errlen);
        if (rc)
            return rc;
        st->nreaders++; /* counted once open, so store_close closes it */
        rc = prepare_all(r->db, r->q, Q_READ_END, path, err, errlen);
        if (rc)
            return rc;
        st->idle[st->nidle++] = r;
    }
    return OPTD_OK;
}

/* Takes an idle reader, waiting while all are in use. */
static struct reader *reader_take(store *st)
{
    struct reader *r;

    pthread_mutex_lock(&st->pool_mu);
    while (st->nidle == 0)
        pthread_cond_wait(&st->pool_cv, &st->pool_mu);
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
    if (!own)
        return rc;
    if (rc == OPTD_OK)
        return store_commit(st);
    store_rollback(st);
    return rc;
}

/* Every incremental blob write of the writer goes through here, so that
 * writes_made sees it: blob writes change no row, so SQLite's change count
 * misses them. */
static int blob_write(store *st, sqlite3_blob *b, const void *p, int n, int off)
{
    st->blob_writes++;
    return sqlite3_blob_write(b, p, n, off);
}

/* The tables whose data column a step overwrites in place, each with a
 * write handle that the writer keeps open across a transaction's steps. */
enum { BLOB_STATE, BLOB_RING };
static const char *const blob_table[] = {"state", "replies"};

/* A write handle on the data column of row id of table which, in *out.
 * The handle the transaction's last step left open (blob_keep) is moved
 * to the row, which costs a b-tree seek, where opening one compiles and
 * runs a program of its own: 9k of a keyed step's 135k instructions
 * under callgrind went to opening and closing its two handles. Should
 * the move fail (no such row, a handle a rollback aborted), it is closed
 * and a new one opened, whose result code is the caller's to read as
 * sqlite3_blob_open's. */
static int blob_at(store *st, int which, int64_t id, sqlite3_blob **out)
{
    sqlite3_blob *b = st->blob_kept[which];

    st->blob_kept[which] = NULL;
    if (b) {
        if (sqlite3_blob_reopen(b, id) == SQLITE_OK) {
            *out = b;
            return SQLITE_OK;
        }
        (void)sqlite3_blob_close(b);
    }
    return sqlite3_blob_open(st->db, "main", blob_table[which], "data", id, 1, out);
}

/* Done with b (from blob_at, NULL is a no-op): inside a transaction, and
 * when its last use went well (ok), it stays open for the next step;
 * otherwise it is closed, returning sqlite3_blob_close's code. */
static int blob_keep(store *st, int which, sqlite3_blob *b, int ok)
{
    if (!b)
        return SQLITE_OK;
    if (ok && !st->blob_kept[which] && !sqlite3_get_autocommit(st->db)) {
        st->blob_kept[which] = b;
        return SQLITE_OK;
    }
    return sqlite3_blob_close(b);
}

/* Closes the kept handles: SQLite refuses to COMMIT, or to open or
 * release a savepoint, while a write handle is open, and a rollback would
 * abort them. So they live across the steps a group runs without
 * savepoints (engine/writer.c, begin_part), its leading plain ones. */
static void blobs_close(store *st)
{
    for (size_t i = 0; i < sizeof st->blob_kept / sizeof st->blob_kept[0]; i++) {
        if (st->blob_kept[i])
            (void)sqlite3_blob_close(st->blob_kept[i]);
        st->blob_kept[i] = NULL;
    }
}

/* A count every write of the writer's connection raises: rows changed
 * plus blob writes. */
static uint64_t writes_made(store *st) { return (uint64_t)sqlite3_total_changes64(st->db) + st->blob_writes; }

/* --- Public API. ----------------------------------------------------------- */

void store_session_clear(store_session *s)
{
    if (!s)
        return;
    free(s->config);
    for (size_t i = 0; i < s->nlog; i++)
        free(s->log[i].data);
    free(s->log);
    memset(s, 0, sizeof *s);
}

/* Takes the process's exclusive lock on the database file, creating the file
 * (empty, mode 0600: SQLite gives the -wal and -shm files the database's
 * mode) when it is absent. The lock is flock(2) on a descriptor of our own,
 * which SQLite's POSIX record locks neither see nor disturb; the descriptor
 * stays open until store_close has closed every connection, because closing
 * any descriptor of a file drops the process's record locks on it. */
static optd_err lock_open(store *st, const char *path, char *err, size_t errlen)
{
    char ebuf[128];
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);

    if (fd < 0 && (errno == EACCES || errno == EPERM || errno == EROFS))
        fd = open(path, O_RDONLY | O_CLOEXEC); /* the writer's open says why it cannot write */
    if (fd < 0) {
        seterr(err, errlen, "cannot open %s: %s", path, strerror_r(errno, ebuf, sizeof ebuf));
        return OPTD_E_UNAVAILABLE;
    }
    st->lock_fd = fd;
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) {
            seterr(err, errlen,
                   "%s is in use by another process (another optd?): one daemon per database; stop it or"
                   " choose another --db",
                   path);
            return OPTD_E_BUSY;
        }
        seterr(err, errlen, "cannot lock %s: %s", path, strerror_r(errno, ebuf, sizeof ebuf));
        return OPTD_E_UNAVAILABLE;
    }
    return OPTD_OK;
}

/* Options: NULL or an all-zero struct mean every default (so sync_full is 1
 * then, not 0); otherwise sync_full is taken as given and a busy timeout or a
 * reader count <= 0 means its default. Returns OPTD_OK, OPTD_E_INVALID (more
 * than MAX_READERS readers, foreign, corrupt or newer file, not a regular
 * file), OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. */
optd_err store_open(const char *path, const store_options *opt, store **out, char *err, size_t errlen)
{
    store_options o = {1, DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_READERS, 0, NULL, NULL};
    store *st = NULL;
    struct stat sb;
    char ebuf[128];
    int create = 0;
    optd_err rc = OPTD_OK;

    seterr(err, errlen, "%s", "");
    if (!out)
        return OPTD_E_INVALID;
    *out = NULL;
    if (!path || !*path) {
        seterr(err, errlen, "no database path given");
        return OPTD_E_INVALID;
    }
    if (opt) {
        o.sync_full = opt->sync_full != 0;
        if (opt->busy_timeout_ms > 0)
            o.busy_timeout_ms = opt->busy_timeout_ms;
        if (opt->readers > 0)
            o.readers = opt->readers;
    }

    if (o.readers > MAX_READERS) {
        seterr(err, errlen, "%d read connections asked for; at most %d", o.readers, MAX_READERS);
        return OPTD_E_INVALID;
    }
    st = calloc(1, sizeof *st);
    if (!st)
        return OPTD_E_NOMEM;
    st->lock_fd = -1;
    st->log = opt ? opt->log : NULL;
    st->log_ctx = opt ? opt->log_ctx : NULL;
    st->wal_max = opt && opt->wal_max_bytes ? opt->wal_max_bytes : STORE_WAL_MAX;
    atomic_init(&st->write_failed, 0);
    if (pthread_mutex_init(&st->log_mu, NULL) != 0) {
        free(st);
        return OPTD_E_NOMEM;
    }
    st->log_init = 1;

    /* Absent or empty: ours to create. Anything else is checked first, on a
     * connection that cannot write, once the lock says no other process
     * has it open. */
    if (stat(path, &sb) != 0) {
        if (errno != ENOENT) {
            seterr(err, errlen, "cannot open %s: %s", path, strerror_r(errno, ebuf, sizeof ebuf));
            rc = OPTD_E_UNAVAILABLE;
            goto done;
        }
        create = 1;
    } else if (!S_ISREG(sb.st_mode)) {
        seterr(err, errlen, "%s is not an optd database (not a regular file)", path);
        rc = OPTD_E_INVALID;
        goto done;
    } else {
        create = sb.st_size == 0;
    }
    rc = lock_open(st, path, err, errlen);
    if (rc)
        goto done;
    if (!create) {
        rc = check_existing(path, o.busy_timeout_ms, err, errlen);
        if (rc)
            goto done;
    }

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
    if (rc)
        goto done;
    rc = readers_open(st, path, &o, err, errlen);
    if (rc)
        goto done;
    st->path = strdup(path);
    if (!st->path) {
        rc = OPTD_E_NOMEM;
        goto done;
    }
    rc = probe_open(st, err, errlen);
    if (rc)
        goto done;
    rc = ckpt_open(st, err, errlen);
done:
    if (rc) {
        if (rc == OPTD_E_NOMEM && err && !*err)
            seterr(err, errlen, "out of memory opening %s", path);
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

    if (rc)
        return rc;
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

    if (!st)
        return;
    if (st->ckpt_init) {
        pthread_mutex_lock(&st->ckpt_mu);
        st->ckpt_stop = 1;
        pthread_cond_signal(&st->ckpt_cv);
        pthread_mutex_unlock(&st->ckpt_mu);
        pthread_join(st->ckpt_thread, NULL);
        pthread_cond_destroy(&st->gate_cv);
        pthread_cond_destroy(&st->ckpt_cv);
        pthread_mutex_destroy(&st->ckpt_mu);
        st->ckpt_init = 0;
    }
    if (st->db)
        sqlite3_wal_hook(st->db, NULL, NULL);
    if (st->ckpt_db)
        conn_close(st->ckpt_db);
    for (i = 0; i < st->nreaders; i++) {
        for (j = 0; j < Q_READ_END; j++)
            (void)sqlite3_finalize(st->readers[i].q[j]);
        conn_close(st->readers[i].db);
    }
    free(st->readers);
    free(st->idle);
    if (st->probe)
        conn_close(st->probe);
    blobs_close(st);
    /* finalize only repeats the last step's error; NULL is a no-op. */
    for (j = 0; j < Q_END; j++)
        (void)sqlite3_finalize(st->q[j]);
    if (st->db)
        conn_close(st->db);
    if (st->pool_init) {
        pthread_cond_destroy(&st->pool_cv);
        pthread_mutex_destroy(&st->pool_mu);
    }
    if (st->probe_init)
        pthread_mutex_destroy(&st->probe_mu);
    if (st->log_init)
        pthread_mutex_destroy(&st->log_mu);
    /* Last: closing it drops the process's locks on the file (see lock_open). */
    if (st->lock_fd >= 0)
        (void)close(st->lock_fd);
    free(st->path);
    free(st);
}

void store_stats_get(store *st, store_stats *out)
{
    uint64_t frames = atomic_load(&st->wal_frames), done = atomic_load(&st->ckpt_done);

    memset(out, 0, sizeof *out);
    out->db_bytes = file_bytes(st->path, "");
    out->wal_bytes = file_bytes(st->path, "-wal");
    out->wal_frames = frames;
    out->ckpt_lag_frames = frames > done ? frames - done : 0;
    out->ckpt_runs = atomic_load(&st->n_ckpt);
    out->ckpt_busy = atomic_load(&st->n_busy);
    out->ckpt_failures = atomic_load(&st->n_fail);
    out->wal_resets = atomic_load(&st->n_reset);
    out->wal_frames_written = atomic_load(&st->n_written);
    out->page_cache_limit = atomic_load(&st->cache_kib) * 1024;
    out->wal_refusals = atomic_load(&st->n_refused);
}

/* Takes and drops the write lock on the probe connection. That does no I/O
 * in WAL mode but fails when another connection holds the lock past
 * PROBE_TIMEOUT_MS. A disk that is full, read-only or failing shows only in
 * a real write, so after a write of the writer failed (write_failed) the
 * probe also rewrites the application id (the same value: nothing changes)
 * and commits. That one page fits where the failed transaction did not (in
 * the slack of a -wal file, say), so it clears the flag only when the
 * filesystem also has room for twice the failed transaction (need_bytes):
 * readiness comes back by itself once the storage works again, even when no
 * client writes, and not while every real write would still fail. A WAL
 * over its hard limit is not writable either. The probe is its own
 * connection because the write connection belongs to the writer thread. */
int store_writable(store *st)
{
    char text[64];
    struct statvfs sv;
    uint64_t need;
    int ok;

    if (!st)
        return 0;
    if (atomic_load(&st->wal_frames) * frame_bytes(st) >= st->wal_max)
        return 0;
    need = atomic_load(&st->need_bytes);
    if (need && atomic_load(&st->write_failed) && statvfs(st->path, &sv) == 0 &&
        (uint64_t)sv.f_bavail * sv.f_frsize < need)
        return 0;
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
        if (ok)
            atomic_store(&st->write_failed, 0);
    }
    if (!sqlite3_get_autocommit(st->probe)) {
        /* Nothing was written, so a failed ROLLBACK loses nothing; it does
         * mean the probe cannot be trusted this time. */
        if (sqlite3_exec(st->probe, "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK)
            ok = 0;
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

/* The writer enters (on) or leaves (off) a transaction; entering waits while
 * the checkpointer's gate is closed. */
static void tx_mark(store *st, int on)
{
    if (!st->ckpt_init)
        return;
    pthread_mutex_lock(&st->ckpt_mu);
    if (on) {
        while (st->gate_closed)
            pthread_cond_wait(&st->gate_cv, &st->ckpt_mu);
    } else if (st->gate_closed) {
        /* Only gate_close waits for a transaction to end. */
        pthread_cond_broadcast(&st->gate_cv);
    }
    st->tx_active = on;
    pthread_mutex_unlock(&st->ckpt_mu);
}

/* Nesting is a caller bug (asserted); every failure is OPTD_E_UNAVAILABLE
 * (logged), including a WAL over its hard limit that cannot be checkpointed. */
optd_err store_begin(store *st)
{
    sqlite3_stmt *q = st->q[Q_BEGIN];
    int src;

    if (!sqlite3_get_autocommit(st->db)) {
        /* A ROLLBACK that failed (rollback_tx, logged) left the last
         * transaction open: try once more; while it stays open, nothing
         * new begins, and the writer's next group tries again. */
        rollback_tx(st);
        if (!sqlite3_get_autocommit(st->db))
            return OPTD_E_UNAVAILABLE;
    }
    if (wal_admit(st) != OPTD_OK) {
        atomic_store(&st->write_failed, 1);
        return OPTD_E_UNAVAILABLE;
    }
    tx_mark(st, 1);
    st->tx_bytes = 0;
    st->tx_writes = writes_made(st);
    src = sqlite3_step(q);
    stmt_done(q);
    if (src == SQLITE_DONE)
        return OPTD_OK;
    store_logf(st, LOG_TX, "BEGIN on %s failed: %s (SQLite code %d)", st->path, sqlite3_errmsg(st->db), src);
    tx_mark(st, 0);
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

    if (!sqlite3_get_autocommit(st->db))
        return;
    snprintf(text, sizeof text, "BEGIN IMMEDIATE; PRAGMA application_id = %d; COMMIT", STORE_APPLICATION_ID);
    if (sqlite3_exec(st->db, text, NULL, NULL, NULL) != SQLITE_OK && !sqlite3_get_autocommit(st->db))
        (void)sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
}

optd_err store_commit(store *st)
{
    sqlite3_stmt *q = st->q[Q_COMMIT];
    int src;

    /* Only a commit that wrote something proves the storage works: one left
     * empty by a job rolled back for a fault proves nothing, nor does the
     * ring's head written below. */
    int wrote = writes_made(st) != st->tx_writes;

    blobs_close(st);
    if (st->ring_moved && !sqlite3_get_autocommit(st->db)) {
        /* The reply ring's head, once for the transaction's puts (a put
         * rolled back with its transaction leaves ring_moved clear). */
        sqlite3_stmt *h = st->q[Q_RING_HEAD_SET];
        src = sqlite3_bind_int64(h, 1, u2i(st->ring_head));
        if (src == SQLITE_OK)
            src = sqlite3_step(h);
        stmt_done(h);
        if (src != SQLITE_DONE) {
            store_logf(st, LOG_TX,
                       "writing the reply ring's head to %s failed: %s (SQLite code %d); the transaction of %llu "
                       "bytes of state was rolled back",
                       st->path, sqlite3_errmsg(st->db), src, (unsigned long long)st->tx_bytes);
            rollback_tx(st);
            tx_mark(st, 0);
            return OPTD_E_UNAVAILABLE;
        }
    }
    src = sqlite3_step(q);
    stmt_done(q);
    if (src == SQLITE_DONE) {
        if (wrote) {
            atomic_store(&st->write_failed, 0);
            atomic_store(&st->need_bytes, 0);
        }
        st->ring_moved = 0;
        tx_mark(st, 0);
        return OPTD_OK;
    }
    store_logf(st, LOG_TX, "COMMIT of %llu bytes of state to %s failed: %s (SQLite code %d); nothing of it was kept",
               (unsigned long long)st->tx_bytes, st->path, sqlite3_errmsg(st->db), src);
    /* SQLite may already have rolled back (disk full, I/O error) or may keep
     * the transaction open for a retry (busy); either way it is over for us. */
    rollback_tx(st);
    wal_tail_cover(st);
    tx_mark(st, 0);
    return OPTD_E_UNAVAILABLE;
}

/* The writer gives up its transaction after a failure: logged with the
 * last SQLite error on the connection, which is the failure's cause. */
void store_rollback(store *st)
{
    int src = sqlite3_errcode(st->db);

    if (src != SQLITE_OK && src != SQLITE_DONE && src != SQLITE_ROW)
        store_logf(st, LOG_TX, "a transaction writing %llu bytes of state to %s failed: %s (SQLite code %d)",
                   (unsigned long long)st->tx_bytes, st->path, sqlite3_errmsg(st->db),
                   sqlite3_extended_errcode(st->db));
    rollback_tx(st);
    tx_mark(st, 0);
}

/* ROLLBACK of the writer's transaction, if one is open. */
static void rollback_tx(store *st)
{
    sqlite3_stmt *q = st->q[Q_ROLLBACK];
    int src;

    /* A rollback means a write failed or was given up: let the next
     * store_writable check with a real write, and with room for this one. */
    atomic_store(&st->write_failed, 1);
    if (st->tx_bytes)
        atomic_store(&st->need_bytes, 2 * st->tx_bytes + ((uint64_t)1 << 20));
    blobs_close(st);
    /* The puts of the transaction go with it: table ring's head need only
     * cover committed records, and the one in memory stays ahead of it. */
    st->ring_moved = 0;
    if (!sqlite3_get_autocommit(st->db)) {
        src = sqlite3_step(q);
        stmt_done(q);
        /* A failed ROLLBACK (an I/O error) leaves the transaction open; the
         * next store_begin then fails with OPTD_E_UNAVAILABLE and the writer
         * retries, which is all that can be done here. */
        if (src != SQLITE_DONE)
            store_logf(st, LOG_TX, "ROLLBACK on %s failed: %s (SQLite code %d)", st->path, sqlite3_errmsg(st->db), src);
    }
}

/* Runs one of the savepoint statements; any failure ends the group. */
static optd_err savepoint_run(store *st, int which)
{
    sqlite3_stmt *q = st->q[which];
    int src;

    blobs_close(st);
    src = sqlite3_step(q);
    stmt_done(q);
    if (src == SQLITE_DONE)
        return OPTD_OK;
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

uint64_t store_tx_writes(store *st)
{
    return sqlite3_get_autocommit(st->db) ? UINT64_MAX : writes_made(st);
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

    if (!session_ok(s) || (!state && len))
        return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc)
        return rc;

    q = st->q[Q_SESSION_INSERT];
    src = sqlite3_bind_text(q, 1, s->name, -1, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_bind_text(q, 2, s->optimizer, -1, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int(q, 3, s->dtype);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 4, (int64_t)s->size);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 5, (int64_t)s->step);
    if (src == SQLITE_OK)
        src = sqlite3_bind_text(q, 6, s->config, -1, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 7, s->created_ms);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 8, s->updated_ms);
    rc = run(q, src);
    if (rc)
        goto done;
    id = sqlite3_last_insert_rowid(st->db);

    q = st->q[Q_STATE_INSERT];
    src = sqlite3_bind_int64(q, 1, id);
    if (src == SQLITE_OK)
        src = bind_bytes(q, 2, state ? state : "", len);
    st->tx_bytes += len;
    rc = run(q, src);
done:
    rc = tx_leave(st, own, rc);
    if (rc == OPTD_OK)
        s->id = id;
    return rc;
}

/* Writer-thread load. On failure *out, *state and *len are untouched.
 * Returns OPTD_OK, OPTD_E_NOT_FOUND, OPTD_E_INVALID (NULL name, or state
 * without len), OPTD_E_UNAVAILABLE, OPTD_E_NOMEM, OPTD_E_INTERNAL. An empty
 * state comes back as a non-NULL 1-byte buffer with *len 0. */
optd_err store_session_load(store *st, const char *name, store_session *out, void **state, size_t *len)
{
    if (!name || !out || (state && !len))
        return OPTD_E_INVALID;
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

    if (!session_ok(s))
        return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc)
        return rc;

    q = st->q[Q_SESSION_UPDATE];
    src = sqlite3_bind_int64(q, 1, s->id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)s->step);
    if (src == SQLITE_OK)
        src = sqlite3_bind_text(q, 3, s->config, -1, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 4, s->updated_ms);
    rc = run(q, src);
    if (rc)
        goto done;
    if (sqlite3_changes(st->db) == 0) {
        rc = OPTD_E_NOT_FOUND;
        goto done;
    }

    if (state) {
        st->tx_bytes += len;
        q = st->q[Q_STATE_UPDATE];
        src = sqlite3_bind_int64(q, 1, s->id);
        if (src == SQLITE_OK)
            src = bind_bytes(q, 2, state, len);
        rc = run(q, src);
        if (rc == OPTD_OK && sqlite3_changes(st->db) == 0)
            rc = OPTD_E_INTERNAL;
        if (rc == OPTD_OK)
            rc = run(st->q[Q_STATE_CURRENT], sqlite3_bind_int64(st->q[Q_STATE_CURRENT], 1, s->id));
    }
done:
    return tx_leave(st, own, rc);
}

/* Why a guarded step update changed nothing: the session is gone
 * (OPTD_E_NOT_FOUND), or its stored step is not step - 1, which means the
 * cached copy is stale (OPTD_E_UNAVAILABLE, logged: the writer drops its
 * cache and the client may retry on the stored state). */
static optd_err step_moved(store *st, int64_t id, uint64_t step)
{
    sqlite3_stmt *q = NULL;
    int64_t stored = -1;
    int src = sqlite3_prepare_v2(st->db, "SELECT step FROM sessions WHERE id = ?1", -1, &q, NULL);

    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 1, id);
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_ROW)
        stored = sqlite3_column_int64(q, 0);
    (void)sqlite3_finalize(q);
    if (src == SQLITE_DONE)
        return OPTD_E_NOT_FOUND;
    if (src != SQLITE_ROW)
        return from_sqlite(src) ? from_sqlite(src) : OPTD_E_INTERNAL;
    store_logf(st, LOG_TX, "session %lld of %s is at step %lld, not %llu as the writer's copy says: refusing the step",
               (long long)id, st->path, (long long)stored, (unsigned long long)(step - 1));
    return OPTD_E_UNAVAILABLE;
}

static void hist_pack(const store_history *h, unsigned char *p);
static optd_err ring_put(store *st, int64_t session_id, uint64_t step, const void *reply, size_t len,
                         uint64_t window, uint64_t *pos);
static size_t idem_entry_make(unsigned char *entry, uint64_t step, uint64_t digest, uint64_t pos, const char *key);
static optd_err idem_note(store *st, int64_t session_id, uint64_t step, const store_key *k, uint64_t pos);

/* Binds ?1..?4 of the step statements: the session, the step, the time and,
 * for a logged step (state_step >= 0), the step its state blob holds. */
static int bind_row_step(sqlite3_stmt *q, int64_t id, uint64_t step, int64_t updated_ms, int64_t state_step)
{
    int src = sqlite3_bind_int64(q, 1, id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)step);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 3, updated_ms);
    if (src == SQLITE_OK && state_step >= 0)
        src = sqlite3_bind_int64(q, 4, state_step);
    return src;
}

/* The row half of a step: step, time and state_step (NULL when state_step
 * is negative) of session id, its history row h (none when NULL) with
 * keep as store_history_put takes it, and its key k (none when NULL) as
 * store_idem_put records it. The common case is one UPDATE: the row's
 * rewrite takes h and k's entry into its tails when they have room.
 * Otherwise the row, then h through store_history_put and k through the
 * key path, which move full tails to their tables first.
 * OPTD_E_NOT_FOUND or _UNAVAILABLE (step_moved) when the row is not at
 * step - 1. Inside a transaction. */
static optd_err row_step(store *st, int64_t id, uint64_t step, int64_t updated_ms, int64_t state_step,
                         const store_history *h, uint64_t keep, const store_key *k)
{
    sqlite3_stmt *q;
    unsigned char entry[IDEM_ENTRY_HEAD + 255];
    size_t elen = 0;
    uint64_t pos = RING_NONE;
    optd_err rc;
    int src, logged = state_step >= 0;

    if (k && k->window == 0)
        k = NULL; /* no key kept at all (store_idem_put) */
    if (k && k->reply && (rc = ring_put(st, id, step, k->reply, k->reply_len, k->window, &pos)) != OPTD_OK)
        return rc;
    if (k)
        elen = idem_entry_make(entry, step, k->digest, pos, k->key);
    if (h && keep && (!k || elen)) {
        unsigned char packed[HIST_ROW];
        hist_pack(h, packed);
        q = st->q[logged ? (k ? Q_SESSION_LOG_HIST_KEY : Q_SESSION_LOG_HIST)
                         : (k ? Q_SESSION_STEP_HIST_KEY : Q_SESSION_STEP_HIST)];
        src = bind_row_step(q, id, step, updated_ms, state_step);
        if (src == SQLITE_OK)
            src = sqlite3_bind_blob(q, 5, packed, HIST_ROW, SQLITE_STATIC);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int(q, 6, HIST_ROW);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int(q, 7, HIST_ROW * HIST_BATCH);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 8, (int64_t)(keep < HIST_BATCH ? keep : HIST_BATCH));
        if (src == SQLITE_OK && k)
            src = sqlite3_bind_blob(q, 9, entry, (int)elen, SQLITE_STATIC);
        if (src == SQLITE_OK && k)
            src = sqlite3_bind_int(q, 10, (int)elen);
        if (src == SQLITE_OK && k)
            src = sqlite3_bind_int(q, 11, IDEM_TAIL);
        rc = run(q, src);
        if (rc || sqlite3_changes(st->db) == 1)
            return rc; /* k's entry went in the tail: no keys moved, none to forget */
        /* A full tail, or a row not at step - 1: the long way says which. */
    }
    q = st->q[logged ? Q_SESSION_LOG : Q_SESSION_STEP];
    rc = run(q, bind_row_step(q, id, step, updated_ms, state_step));
    if (rc == OPTD_OK && sqlite3_changes(st->db) == 0)
        rc = step_moved(st, id, step);
    if (rc == OPTD_OK && h)
        rc = store_history_put(st, id, h, keep);
    if (rc == OPTD_OK && k)
        rc = idem_note(st, id, step, k, pos);
    return rc;
}

/* Whether k can be recorded at step: a key, a reply that fits a record. */
static int key_valid(const store_key *k, uint64_t step)
{
    return !k || (k->key && step <= INT64_MAX && (k->reply || !k->reply_len) &&
                  k->reply_len <= INT32_MAX - IDEM_CHUNK_BYTES);
}

/* The step path: the row's step and time, and the state overwritten in place
 * with incremental blob I/O when its size is unchanged (no new overflow
 * pages allocated and old ones freed, as a whole-value UPDATE does; for a
 * 12 MB state that halves the pages a commit writes). Returns as
 * store_session_update. */
optd_err store_session_step(store *st, int64_t id, uint64_t step, int64_t updated_ms, const void *state, size_t len,
                            const store_history *h, uint64_t keep, const store_key *k)
{
    sqlite3_stmt *q;
    sqlite3_blob *blob = NULL;
    optd_err rc;
    int own, src;

    if (step == 0 || step > INT64_MAX || !state || len > INT_MAX || (h && h->step != step) || !key_valid(k, step))
        return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc)
        return rc;
    st->tx_bytes += len;
    rc = row_step(st, id, step, updated_ms, -1, h, keep, k);
    if (rc)
        goto done;
    src = blob_at(st, BLOB_STATE, id, &blob);
    if (src == SQLITE_OK && sqlite3_blob_bytes(blob) == (int)len) {
        rc = from_sqlite(blob_write(st, blob, state, (int)len, 0));
    } else if (src == SQLITE_OK || src == SQLITE_ERROR) {
        /* Another size (or a zero-length value, which has no blob): rewrite it. */
        q = st->q[Q_STATE_UPDATE];
        src = sqlite3_bind_int64(q, 1, id);
        if (src == SQLITE_OK)
            src = bind_bytes(q, 2, state, len);
        rc = run(q, src);
        if (rc == OPTD_OK && sqlite3_changes(st->db) == 0)
            rc = OPTD_E_INTERNAL;
    } else {
        rc = from_sqlite(src);
    }
done:
    (void)blob_keep(st, BLOB_STATE, blob, rc == OPTD_OK);
    return tx_leave(st, own, rc);
}

/* Writes the parts one after another into the blob of steplog_data row id
 * (a part whose p is NULL is len zero bytes). */
static optd_err parts_write(store *st, int64_t id, const store_part *parts, int n)
{
    sqlite3_blob *blob = NULL;
    int src = sqlite3_blob_open(st->db, "main", "steplog_data", "data", id, 1, &blob);
    size_t off = 0;

    static const unsigned char zeros[4096];

    for (int i = 0; src == SQLITE_OK && i < n; i++) {
        if (parts[i].p) {
            if (parts[i].len)
                src = blob_write(st, blob, parts[i].p, (int)parts[i].len, (int)off);
            off += parts[i].len;
            continue;
        }
        /* A NULL part is that many zero bytes. */
        for (size_t left = parts[i].len, k; src == SQLITE_OK && left; left -= k, off += k) {
            k = left < sizeof zeros ? left : sizeof zeros;
            src = blob_write(st, blob, zeros, (int)k, (int)off);
        }
    }
    if (blob) {
        int csrc = sqlite3_blob_close(blob);
        if (src == SQLITE_OK)
            src = csrc;
    }
    return from_sqlite(src);
}

/* The slot's bytes: overwritten in place when the slot exists at this
 * length (the ring's steady state), else sized anew or added. */
static optd_err slot_write(store *st, int64_t id, uint32_t slot, uint64_t step, const store_part *parts, int n,
                           size_t len)
{
    sqlite3_stmt *q = st->q[Q_STEPLOG_SLOT];
    int64_t data_id = 0, have = -1;
    optd_err rc;
    int src = sqlite3_bind_int64(q, 1, id);

    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, slot);
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        data_id = sqlite3_column_int64(q, 0);
        have = sqlite3_column_int64(q, 1);
    }
    stmt_done(q);
    if (src != SQLITE_ROW && src != SQLITE_DONE)
        return from_sqlite(src);
    if (src == SQLITE_ROW) {
        q = st->q[Q_STEPLOG_SET];
        src = sqlite3_bind_int64(q, 1, id);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 2, slot);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 3, (int64_t)step);
        rc = run(q, src);
        if (rc == OPTD_OK && have != (int64_t)len) {
            q = st->q[Q_STEPDATA_SET];
            src = sqlite3_bind_int64(q, 1, data_id);
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(q, 2, (int64_t)len);
            rc = run(q, src);
        }
    } else {
        q = st->q[Q_STEPDATA_ADD];
        rc = run(q, sqlite3_bind_int64(q, 1, (int64_t)len));
        data_id = sqlite3_last_insert_rowid(st->db);
        if (rc == OPTD_OK) {
            q = st->q[Q_STEPLOG_ADD];
            src = sqlite3_bind_int64(q, 1, id);
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(q, 2, slot);
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(q, 3, (int64_t)step);
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(q, 4, data_id);
            rc = run(q, src);
        }
    }
    return rc ? rc : parts_write(st, data_id, parts, n);
}

/* The writer's page cache grows (SQLite's default is 2 MB) to hold a big
 * session's log ring and state, up to CACHE_MAX_KIB: SQLite reads a page
 * before it overwrites it, and a logged step overwrites a slot (4 MB at 1e6
 * float32) that a small cache had evicted since the ring last came round,
 * 250 preads a step and a quarter of the writer's CPU. Only sessions that
 * log make it grow, so small ones keep the small cache and RSS they had;
 * it never shrinks (pages are freed as SQLite evicts them). Best effort: a
 * failed PRAGMA leaves the cache as it was. */
#define CACHE_MAX_KIB 65536
static void cache_fit(store *st, size_t entry_bytes)
{
    uint64_t want = (uint64_t)entry_bytes * 16 / 1024;
    char text[64];

    if (want > CACHE_MAX_KIB)
        want = CACHE_MAX_KIB;
    if (want <= atomic_load(&st->cache_kib))
        return;
    snprintf(text, sizeof text, "PRAGMA cache_size = -%llu", (unsigned long long)want);
    if (sqlite3_exec(st->db, text, NULL, NULL, NULL) == SQLITE_OK)
        atomic_store(&st->cache_kib, want);
}

/* Returns OPTD_OK, OPTD_E_NOT_FOUND, OPTD_E_INVALID, OPTD_E_UNAVAILABLE
 * (also: the row is not at step - 1, as store_session_step),
 * OPTD_E_SESSION_TOO_LARGE, OPTD_E_NOMEM, OPTD_E_INTERNAL. */
optd_err store_session_log(store *st, int64_t id, uint64_t step, int64_t updated_ms, uint64_t state_step,
                           uint32_t slot, const store_part *parts, int n, const store_history *h, uint64_t keep,
                           const store_key *k)
{
    size_t len = 0;
    optd_err rc;
    int own;

    if (step == 0 || step > INT64_MAX || state_step >= step || n < 0 || (n && !parts) || (h && h->step != step) ||
        !key_valid(k, step))
        return OPTD_E_INVALID;
    for (int i = 0; i < n; i++)
        len += parts[i].len;
    if (len > INT_MAX)
        return OPTD_E_SESSION_TOO_LARGE;
    cache_fit(st, len);
    rc = tx_enter(st, &own);
    if (rc)
        return rc;
    st->tx_bytes += len;
    rc = row_step(st, id, step, updated_ms, (int64_t)state_step, h, keep, k);
    if (rc == OPTD_OK)
        rc = slot_write(st, id, slot, step, parts, n, len);
    return tx_leave(st, own, rc);
}

/* Returns OPTD_OK, OPTD_E_NOT_FOUND (nothing written), OPTD_E_INVALID,
 * OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. */
optd_err store_session_delete(store *st, const char *name)
{
    static const int deletes[] = {Q_IDEM_DELETE_ALL,     Q_IDEM_REPLIES_DELETE_ALL, Q_HISTORY_DELETE_ALL,
                                  Q_STEPLOG_DELETE_DATA, Q_STEPLOG_DELETE_ALL,      Q_STATE_DELETE,
                                  Q_SESSION_DELETE};
    sqlite3_stmt *q;
    int64_t id = 0;
    optd_err rc;
    int own, src;
    size_t i;

    if (!name)
        return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc)
        return rc;

    q = st->q[Q_SESSION_ID];
    src = sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_ROW)
        id = sqlite3_column_int64(q, 0);
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
        if (rc)
            goto done;
    }
    /* Its replies in the ring are left to be written over; the capacity,
     * worked out again at the next reply, may now be smaller, and a lap
     * then starts and gives back the chunks past it. */
    st->ring_cap = 0;
done:
    return tx_leave(st, own, rc);
}

/* The entry at *off of a tail's used bytes (entries of head bytes before
 * the key: IDEM_ENTRY_HEAD, or IDEM_ENTRY_HEAD_5 in a schema 5 tail), and
 * *off past it: 1, 0 at the end, -1 for bytes this code did not write. */
static int idem_entry_next(const unsigned char *buf, size_t used, size_t *off, idem_entry *e, size_t head)
{
    if (*off >= used)
        return 0;
    if (used - *off < head || used - *off - head < buf[*off + head - 1])
        return -1;
    e->step = le64_get(buf + *off);
    e->digest = le64_get(buf + *off + 8);
    e->pos = head == IDEM_ENTRY_HEAD ? le64_get(buf + *off + 16) : RING_NONE;
    e->klen = buf[*off + head - 1];
    e->key = (const char *)buf + *off + head;
    *off += head + e->klen;
    return 1;
}

static int idem_tail_next(const unsigned char *buf, size_t used, size_t *off, idem_entry *e)
{
    return idem_entry_next(buf, used, off, e, IDEM_ENTRY_HEAD);
}

/* The first n units (of unit bytes) of a session's row tail, copied (*buf
 * malloc'd, NULL when n is 0): q selects the tail and how many units it
 * holds, at most most. OPTD_E_NOT_FOUND when the session row is gone. */
static optd_err tail_copy(sqlite3_stmt *q, int64_t session_id, size_t unit, int64_t most, unsigned char **buf,
                          size_t *n)
{
    optd_err rc = OPTD_OK;
    int src = sqlite3_bind_int64(q, 1, session_id);

    *buf = NULL;
    *n = 0;
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        const unsigned char *p = sqlite3_column_blob(q, 0);
        size_t len = (size_t)sqlite3_column_bytes(q, 0);
        int64_t k = sqlite3_column_int64(q, 1);
        if (k < 0 || k > most || (uint64_t)k * unit > len)
            rc = OPTD_E_INTERNAL; /* not a tail this code wrote */
        else if (k && !p)
            rc = sqlite3_errcode(sqlite3_db_handle(q)) == SQLITE_NOMEM ? OPTD_E_NOMEM : OPTD_E_INTERNAL;
        else if (k && !(*buf = malloc((size_t)k * unit)))
            rc = OPTD_E_NOMEM;
        if (rc == OPTD_OK && k) {
            memcpy(*buf, p, (size_t)k * unit);
            *n = (size_t)k;
        }
    } else {
        rc = src == SQLITE_DONE ? OPTD_E_NOT_FOUND : from_sqlite(src);
    }
    stmt_done(q);
    return rc;
}

/* The used bytes of session_id's key tail, as tail_copy. */
static optd_err idem_tail_read(store *st, int64_t session_id, unsigned char **buf, size_t *used)
{
    return tail_copy(st->q[Q_IDEM_TAIL], session_id, 1, IDEM_TAIL, buf, used);
}

/* Inserts (or replaces) key's row in idem_keys; pos RING_NONE: no reply. */
static optd_err idem_key_insert(store *st, int64_t session_id, uint64_t step, const char *key, size_t klen,
                                uint64_t digest, uint64_t pos)
{
    sqlite3_stmt *q = st->q[Q_IDEM_PUT];
    int src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)step);
    if (src == SQLITE_OK)
        src = sqlite3_bind_text(q, 3, key, (int)klen, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 4, u2i(digest));
    if (src == SQLITE_OK)
        src = pos == RING_NONE ? sqlite3_bind_null(q, 5) : sqlite3_bind_int64(q, 5, u2i(pos));
    return run(q, src);
}

/* Moves session_id's tail into idem_keys, but for the keys of steps <=
 * floor, which have left the window. OPTD_E_NOT_FOUND: no such session. */
static optd_err idem_tail_flush(store *st, int64_t session_id, uint64_t floor)
{
    unsigned char *buf;
    size_t used, off = 0;
    idem_entry e;
    int more;
    optd_err rc = idem_tail_read(st, session_id, &buf, &used);

    while (rc == OPTD_OK && (more = idem_tail_next(buf, used, &off, &e)) != 0) {
        if (more < 0)
            rc = OPTD_E_INTERNAL;
        else if (e.step > floor)
            rc = idem_key_insert(st, session_id, e.step, e.key, e.klen, e.digest, e.pos);
    }
    free(buf);
    if (rc == OPTD_OK) {
        sqlite3_stmt *q = st->q[Q_IDEM_TAIL_CLEAR];
        rc = run(q, sqlite3_bind_int64(q, 1, session_id));
    }
    return rc;
}

/* Splices len bytes into session_id's row tail with q (Q_HISTORY_TAIL_ADD or
 * Q_IDEM_TAIL_ADD: ?1 the session, ?2 the bytes, ?3 their length, ?4 the
 * tail's size; any further parameter bound by the caller): OPTD_E_NOT_FOUND
 * when they did not go in (no such session, or a full tail). */
static optd_err tail_splice(store *st, sqlite3_stmt *q, int64_t session_id, const unsigned char *bytes, size_t len,
                            int size)
{
    int src = sqlite3_bind_int64(q, 1, session_id);
    optd_err rc;

    if (src == SQLITE_OK)
        src = sqlite3_bind_blob(q, 2, bytes, (int)len, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int(q, 3, (int)len);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int(q, 4, size);
    rc = run(q, src);
    return rc == OPTD_OK && sqlite3_changes(st->db) == 0 ? OPTD_E_NOT_FOUND : rc;
}

/* A key's tail entry, its length (0 when the key is too long for one). */
static size_t idem_entry_make(unsigned char *entry, uint64_t step, uint64_t digest, uint64_t pos, const char *key)
{
    size_t klen = strlen(key);
    if (klen > 255)
        return 0;
    le64_put(entry, step);
    le64_put(entry + 8, digest);
    le64_put(entry + 16, pos);
    entry[IDEM_ENTRY_HEAD - 1] = (unsigned char)klen;
    memcpy(entry + IDEM_ENTRY_HEAD, key, klen);
    return IDEM_ENTRY_HEAD + klen;
}

/* Records key at step: in the session's tail, moving the tail to idem_keys
 * first when full; in idem_keys itself when the key is too long for a tail
 * or there is no session row to hold one. *moved: whether keys went to
 * idem_keys. */
static optd_err idem_key_record(store *st, int64_t session_id, uint64_t step, const char *key, uint64_t digest,
                                uint64_t pos, uint64_t floor, int *moved)
{
    size_t klen = strlen(key);
    unsigned char entry[IDEM_ENTRY_HEAD + 255];
    size_t elen = idem_entry_make(entry, step, digest, pos, key);
    optd_err rc = OPTD_E_NOT_FOUND;

    *moved = 1;
    if (elen) {
        rc = tail_splice(st, st->q[Q_IDEM_TAIL_ADD], session_id, entry, elen, IDEM_TAIL);
        *moved = rc != OPTD_OK;
        if (rc == OPTD_E_NOT_FOUND) {
            rc = idem_tail_flush(st, session_id, floor);
            if (rc == OPTD_OK)
                rc = tail_splice(st, st->q[Q_IDEM_TAIL_ADD], session_id, entry, elen, IDEM_TAIL);
        }
    }
    if (rc == OPTD_E_NOT_FOUND)
        rc = idem_key_insert(st, session_id, step, key, klen, digest, pos);
    return rc;
}

uint32_t store_idem_slots(size_t reply_len, uint64_t window)
{
    size_t n = IDEM_REPLY_BUDGET / (reply_len ? reply_len : 1);
    if (n > window)
        n = window;
    return n < 1 ? 1 : n > IDEM_SLOTS_MAX ? IDEM_SLOTS_MAX : (uint32_t)n;
}

/* Where the slot of step lies for replies of len bytes under window: the
 * chunk's rowid, its size and the slot's offset in it. */
typedef struct ring_pos {
    int64_t id;
    size_t chunk_bytes, off;
} ring_pos;

static ring_pos ring_at(int64_t session_id, uint64_t step, size_t len, uint64_t window)
{
    uint32_t slots = store_idem_slots(len, window);
    size_t rec = IDEM_SLOT_HEAD + len, per = IDEM_CHUNK_BYTES / rec;
    per = per < 1 ? 1 : per > slots ? slots : per;
    uint64_t slot = step % slots;
    ring_pos p = {(int64_t)((uint64_t)session_id << IDEM_RING_BITS | slot / per), per * rec, (slot % per) * rec};
    return p;
}

/* Opens the blob of the chunk at p, writable or not. *out is NULL when
 * there is no such chunk; *fits says whether it is laid out for slots of
 * this length. */
static optd_err ring_open(store *st, const ring_pos *p, int writable, sqlite3_blob **out, int *fits)
{
    int src = sqlite3_blob_open(st->db, "main", "idem_replies", "data", p->id, writable, out);
    *fits = 0;
    if (src == SQLITE_ERROR && sqlite3_extended_errcode(st->db) == SQLITE_ERROR) {
        if (*out) /* "no such rowid" */
            (void)sqlite3_blob_close(*out);
        *out = NULL;
        return OPTD_OK;
    }
    if (src != SQLITE_OK) {
        if (*out)
            (void)sqlite3_blob_close(*out);
        *out = NULL;
        return from_sqlite(src);
    }
    *fits = (size_t)sqlite3_blob_bytes(*out) == p->chunk_bytes;
    return OPTD_OK;
}

/* The reply of step, when its slot still holds it: *out malloc'd (at
 * least a byte), else left NULL. */
static optd_err ring_read(store *st, int64_t session_id, uint64_t step, size_t len, uint64_t window, void **out,
                          size_t *out_len)
{
    ring_pos p = ring_at(session_id, step, len, window);
    unsigned char head[IDEM_SLOT_HEAD];
    sqlite3_blob *b = NULL;
    int fits, src = SQLITE_OK;
    optd_err rc = ring_open(st, &p, 0, &b, &fits);
    if (rc || !b)
        return rc;
    if (fits)
        src = sqlite3_blob_read(b, head, IDEM_SLOT_HEAD, (int)p.off);
    if (src == SQLITE_OK && fits && le64_get(head) == step && le64_get(head + 8) == len) {
        if (!(*out = malloc(len ? len : 1)))
            rc = OPTD_E_NOMEM;
        else if (len)
            src = sqlite3_blob_read(b, *out, (int)len, (int)(p.off + IDEM_SLOT_HEAD));
        *out_len = len;
    }
    int csrc = sqlite3_blob_close(b);
    if (!rc)
        rc = from_sqlite(src != SQLITE_OK ? src : csrc);
    if (rc && *out) {
        free(*out);
        *out = NULL;
    }
    return rc;
}

#define RING_LAP(pos) ((pos) >> 32)
#define RING_OFF(pos) ((pos)&0xffffffffu)

/* Reads (write 0) or writes n bytes at offset off of the reply ring,
 * across chunks; a write makes the chunks it needs. OPTD_E_NOT_FOUND: a
 * read from a chunk that is not there. */
static optd_err ring_io(store *st, uint64_t off, void *buf, size_t n, int write)
{
    unsigned char *p = buf;
    optd_err rc = OPTD_OK;

    while (rc == OPTD_OK && n) {
        uint64_t chunk = off / RING_CHUNK, at = off % RING_CHUNK;
        size_t k = n < RING_CHUNK - at ? n : (size_t)(RING_CHUNK - at);
        sqlite3_blob *b = NULL;
        int src = write ? blob_at(st, BLOB_RING, (int64_t)chunk, &b)
                        : sqlite3_blob_open(st->db, "main", blob_table[BLOB_RING], "data", (int64_t)chunk, 0, &b);
        if (src == SQLITE_ERROR && sqlite3_extended_errcode(st->db) == SQLITE_ERROR) { /* "no such rowid" */
            if (b)
                (void)sqlite3_blob_close(b);
            b = NULL;
            if (!write)
                return OPTD_E_NOT_FOUND;
            sqlite3_stmt *q = st->q[Q_RING_CHUNK_ADD];
            src = sqlite3_bind_int64(q, 1, (int64_t)chunk);
            if (src == SQLITE_OK)
                src = sqlite3_bind_int64(q, 2, (int64_t)RING_CHUNK);
            rc = run(q, src);
            if (rc)
                return rc;
            st->tx_bytes += RING_CHUNK;
            src = blob_at(st, BLOB_RING, (int64_t)chunk, &b);
        }
        if (src == SQLITE_OK && (uint64_t)sqlite3_blob_bytes(b) != RING_CHUNK)
            src = SQLITE_CORRUPT; /* not a chunk this code made */
        if (src == SQLITE_OK)
            src = write ? blob_write(st, b, p, (int)k, (int)at) : sqlite3_blob_read(b, p, (int)k, (int)at);
        int csrc = write ? blob_keep(st, BLOB_RING, b, src == SQLITE_OK) : b ? sqlite3_blob_close(b) : SQLITE_OK;
        rc = from_sqlite(src != SQLITE_OK ? src : csrc);
        p += k;
        off += k;
        n -= k;
    }
    return rc;
}

/* The ring's capacity under window: what the sessions' windows need
 * (window replies of their params each), each at most IDEM_REPLY_BUDGET,
 * all at most RING_MAX, and at least one chunk. */
static optd_err ring_cap_find(store *st, uint64_t window, uint64_t *cap)
{
    sqlite3_stmt *q = st->q[Q_RING_CAP];
    int src = sqlite3_bind_int64(q, 1, (int64_t)(window < INT32_MAX ? window : INT32_MAX));
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)IDEM_REPLY_BUDGET);
    if (src == SQLITE_OK && (src = sqlite3_step(q)) == SQLITE_ROW) {
        double need = sqlite3_column_double(q, 0);
        *cap = need >= (double)RING_MAX ? RING_MAX : need <= (double)RING_CHUNK ? RING_CHUNK : (uint64_t)need;
        src = SQLITE_OK;
    }
    stmt_done(q);
    return from_sqlite(src);
}

/* Writes session_id's reply to step as the ring's next record, and *pos
 * where it went. Table ring takes the head once a transaction, as it
 * commits (store_commit): a keyed group's replies no longer each rewrite
 * its row. The head moves on in memory even when the transaction is
 * then rolled back: its bytes go back, and the gap they leave is never
 * read, since no key that committed points there. (A lap started in a
 * transaction that rolls back keeps its chunks past a smaller capacity
 * until the next lap: space, not data.) */
static optd_err ring_put(store *st, int64_t session_id, uint64_t step, const void *reply, size_t len,
                         uint64_t window, uint64_t *pos)
{
    uint64_t rec = RING_HEAD + (uint64_t)len, lap = RING_LAP(st->ring_head), off = RING_OFF(st->ring_head);
    unsigned char head[RING_HEAD];
    optd_err rc = OPTD_OK;

    if (off + rec > st->ring_cap) /* past the capacity known: is it still so? */
        rc = ring_cap_find(st, window, &st->ring_cap);
    if (rc == OPTD_OK && off + rec > st->ring_cap && off > 0) { /* a new lap */
        lap++;
        off = 0;
        /* The chunks past the capacity go (it shrinks when sessions go). */
        sqlite3_stmt *q = st->q[Q_RING_TRIM];
        uint64_t keep = st->ring_cap > rec ? st->ring_cap : rec;
        rc = run(q, sqlite3_bind_int64(q, 1, (int64_t)((keep + RING_CHUNK - 1) / RING_CHUNK)));
    }
    if (rc == OPTD_OK && (off + rec > 0xffffffffu || lap > 0xffffffffu))
        rc = OPTD_E_INTERNAL; /* beyond RING_MAX and 2^32 laps: not this code's */
    if (rc)
        return rc;
    *pos = lap << 32 | off;
    /* The head moves on first: bytes a failure leaves behind are past it
     * (and rolled back with the transaction, which fails with this put). */
    st->ring_head = lap << 32 | (off + rec);
    le64_put(head, *pos);
    le64_put(head + 8, (uint64_t)session_id);
    le64_put(head + 16, step);
    le64_put(head + 24, len);
    /* The head, then the reply, through the ring's kept write handle
     * (blob_at): no copy of the reply to write both at once. */
    rc = ring_io(st, off, head, RING_HEAD, 1);
    if (rc == OPTD_OK && len)
        rc = ring_io(st, off + RING_HEAD, (void *)reply, len, 1);
    st->tx_bytes += rec;
    st->ring_moved = 1; /* table ring takes it when the transaction commits */
    return rc;
}

/* The reply session_id saved for step at pos, while the ring still holds
 * it: *out malloc'd (at least a byte), else left NULL. */
static optd_err ring_get(store *st, uint64_t pos, int64_t session_id, uint64_t step, void **out, size_t *out_len)
{
    uint64_t lap = RING_LAP(pos), off = RING_OFF(pos);
    uint64_t head_lap = RING_LAP(st->ring_head), head_off = RING_OFF(st->ring_head);
    unsigned char head[RING_HEAD];

    /* Written over since: by this lap (up to the head), or by a later one. */
    if (!((lap == head_lap && off < head_off) || (lap + 1 == head_lap && off >= head_off)))
        return OPTD_OK;
    optd_err rc = ring_io(st, off, head, RING_HEAD, 0);
    if (rc == OPTD_E_NOT_FOUND) /* its chunk went with a smaller capacity */
        return OPTD_OK;
    if (rc || le64_get(head) != pos || le64_get(head + 8) != (uint64_t)session_id || le64_get(head + 16) != step)
        return rc;
    size_t len = (size_t)le64_get(head + 24);
    if (len > INT32_MAX)
        return OPTD_E_INTERNAL;
    if (!(*out = malloc(len ? len : 1)))
        return OPTD_E_NOMEM;
    rc = len ? ring_io(st, off + RING_HEAD, *out, len, 0) : OPTD_OK;
    if (rc) {
        free(*out);
        *out = NULL;
        return rc == OPTD_E_NOT_FOUND ? OPTD_OK : rc;
    }
    *out_len = len;
    return OPTD_OK;
}

/* The ring's head, from its table, at open (the writer's copy then only
 * moves on: see ring_put). */
static optd_err ring_load(store *st)
{
    sqlite3_stmt *q = st->q[Q_RING_HEAD];
    int src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        st->ring_head = i2u(sqlite3_column_int64(q, 0));
        src = SQLITE_OK;
    } else if (src == SQLITE_DONE) {
        src = SQLITE_CORRUPT; /* the row the schema made is gone */
    }
    stmt_done(q);
    st->ring_cap = 0;
    return from_sqlite(src);
}

/* Returns OPTD_OK, OPTD_E_INVALID, OPTD_E_UNAVAILABLE; each's failure
 * stops the walk and is returned. */
optd_err store_idem_keys(store *st, int64_t session_id, uint64_t after,
                         optd_err (*each)(void *ctx, uint64_t step, const char *key), void *ctx)
{
    sqlite3_stmt *q = st->q[Q_IDEM_KEYS];
    optd_err rc = OPTD_OK;
    int src;

    if (!each || after > INT64_MAX)
        return OPTD_E_INVALID;
    src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)after);
    while (src == SQLITE_OK && (src = sqlite3_step(q)) == SQLITE_ROW) {
        const unsigned char *key = sqlite3_column_text(q, 1);
        if (!key) { /* NOT NULL column: out of memory */
            src = SQLITE_NOMEM;
            break;
        }
        rc = each(ctx, i2u(sqlite3_column_int64(q, 0)), (const char *)key);
        if (rc)
            break;
        src = SQLITE_OK;
    }
    if (!rc && src != SQLITE_DONE)
        rc = from_sqlite(src);
    stmt_done(q);

    /* Then the newest, waiting in the session's row. */
    unsigned char *buf = NULL;
    size_t used = 0, off = 0;
    idem_entry e;
    int more;
    char key[256];
    if (rc == OPTD_OK) {
        rc = idem_tail_read(st, session_id, &buf, &used);
        if (rc == OPTD_E_NOT_FOUND)
            rc = OPTD_OK;
    }
    while (rc == OPTD_OK && (more = idem_tail_next(buf, used, &off, &e)) != 0) {
        if (more < 0) {
            rc = OPTD_E_INTERNAL;
        } else if (e.step > after) {
            memcpy(key, e.key, e.klen);
            key[e.klen] = '\0';
            rc = each(ctx, e.step, key);
        }
    }
    free(buf);
    return rc;
}

/* Returns OPTD_OK, OPTD_E_NOT_FOUND, OPTD_E_INVALID, OPTD_E_UNAVAILABLE,
 * OPTD_E_NOMEM. out->reply is NULL when no reply was kept, and a non-NULL
 * 1-byte buffer with reply_len 0 when an empty one was. On failure *out is
 * untouched. */
optd_err store_idem_get(store *st, int64_t session_id, const char *key, uint64_t step, size_t reply_len,
                        uint64_t window, store_idem *out)
{
    sqlite3_stmt *q = st->q[Q_IDEM_GET];
    store_idem r = {step, 0, NULL, 0};
    uint64_t pos = RING_NONE;
    optd_err rc = OPTD_OK;
    int src, legacy = 0;

    if (!key || !out || step > INT64_MAX)
        return OPTD_E_INVALID;
    src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)step);
    if (src == SQLITE_OK)
        src = sqlite3_bind_text(q, 3, key, -1, SQLITE_STATIC);
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        r.digest = i2u(sqlite3_column_int64(q, 0));
        /* A reply saved before schema 5, in the key's own row. */
        legacy = sqlite3_column_type(q, 1) != SQLITE_NULL;
        if (legacy)
            rc = column_bytes_copy(q, 1, &r.reply, &r.reply_len);
        if (sqlite3_column_type(q, 2) != SQLITE_NULL)
            pos = i2u(sqlite3_column_int64(q, 2));
    } else {
        rc = src == SQLITE_DONE ? OPTD_E_NOT_FOUND : from_sqlite(src);
    }
    stmt_done(q);
    if (rc == OPTD_E_NOT_FOUND) { /* in the session's tail, then? */
        unsigned char *buf;
        size_t used, off = 0, klen = strlen(key);
        idem_entry e;
        int more;
        rc = idem_tail_read(st, session_id, &buf, &used);
        if (rc == OPTD_OK)
            rc = OPTD_E_NOT_FOUND;
        while (rc == OPTD_E_NOT_FOUND && (more = idem_tail_next(buf, used, &off, &e)) != 0) {
            if (more < 0)
                rc = OPTD_E_INTERNAL;
            else if (e.step == step && e.klen == klen && memcmp(e.key, key, klen) == 0) {
                r.digest = e.digest;
                pos = e.pos;
                rc = OPTD_OK;
            }
        }
        free(buf);
    }
    if (rc == OPTD_OK && !legacy && pos != RING_NONE) {
        rc = ring_get(st, pos, session_id, step, &r.reply, &r.reply_len);
    } else if (rc == OPTD_OK && !legacy) { /* saved before schema 6? */
        q = st->q[Q_IDEM_LEGACY];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK && (src = sqlite3_step(q)) == SQLITE_ROW) {
            legacy = sqlite3_column_type(q, 0) != SQLITE_NULL && i2u(sqlite3_column_int64(q, 0)) >= step;
            src = SQLITE_DONE;
        }
        stmt_done(q);
        rc = src == SQLITE_DONE ? OPTD_OK : from_sqlite(src);
        if (rc == OPTD_OK && legacy)
            rc = ring_read(st, session_id, step, reply_len, window, &r.reply, &r.reply_len);
    }
    if (rc) {
        free(r.reply);
        return rc;
    }
    *out = r;
    return OPTD_OK;
}

/* Forgets session_id's keys of steps <= step - window, a batch at a time,
 * and schema 5's replies once their keys have gone. */
static optd_err idem_prune(store *st, int64_t session_id, uint64_t step, uint64_t window)
{
    uint64_t oldest = UINT64_MAX;
    sqlite3_stmt *q = st->q[Q_IDEM_OLDEST];
    int src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK)
        src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        if (sqlite3_column_type(q, 0) != SQLITE_NULL)
            oldest = i2u(sqlite3_column_int64(q, 0));
        src = SQLITE_DONE;
    }
    stmt_done(q);
    optd_err rc = from_sqlite(src);
    if (rc || oldest == UINT64_MAX || oldest + window + IDEM_PRUNE_SLACK > step)
        return rc;
    q = st->q[Q_IDEM_PRUNE];
    src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)(step - window));
    rc = run(q, src);
    if (rc == OPTD_OK) {
        q = st->q[Q_IDEM_LEGACY_END];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 2, (int64_t)(step - window));
        rc = run(q, src);
    }
    if (rc == OPTD_OK && sqlite3_changes(st->db)) {
        q = st->q[Q_IDEM_REPLIES_DELETE_ALL];
        rc = run(q, sqlite3_bind_int64(q, 1, session_id));
    }
    return rc;
}

/* Records k's key at step, its reply at pos (RING_NONE: none), then
 * forgets the keys the window has left when keys moved to idem_keys (only
 * those can make it outgrow the window). */
static optd_err idem_note(store *st, int64_t session_id, uint64_t step, const store_key *k, uint64_t pos)
{
    int moved;
    optd_err rc = idem_key_record(st, session_id, step, k->key, k->digest, pos,
                                  step > k->window ? step - k->window : 0, &moved);
    if (rc == OPTD_OK && moved && step > k->window)
        rc = idem_prune(st, session_id, step, k->window);
    return rc;
}

/* Replaces an existing record for the key at step. window 0 keeps no key
 * at all (even this one), as "the keys of the last 0 steps" says; window 1
 * keeps this step's. Keys of steps <= step - window leave in batches, when
 * keys move to idem_keys (a tail's worth, 33 UUID-length keys, at a time)
 * and the oldest there is IDEM_PRUNE_SLACK steps past the window: a
 * batch every 64 steps, and no statement for it on the others. Returns
 * OPTD_OK, OPTD_E_INVALID (NULL key, step >= 2^63, NULL reply with
 * reply_len > 0, a reply of 2 GiB), OPTD_E_UNAVAILABLE, OPTD_E_NOMEM. */
optd_err store_idem_put(store *st, int64_t session_id, const char *key, uint64_t step, uint64_t digest,
                        const void *reply, size_t reply_len, uint64_t window)
{
    store_key k = {key, digest, reply, reply_len, window};
    uint64_t pos = RING_NONE;
    optd_err rc;
    int own;

    if (!key_valid(&k, step))
        return OPTD_E_INVALID;
    if (window == 0)
        return OPTD_OK;
    rc = tx_enter(st, &own);
    if (rc)
        return rc;
    if (reply)
        rc = ring_put(st, session_id, step, reply, reply_len, window, &pos);
    if (rc == OPTD_OK)
        rc = idem_note(st, session_id, step, &k, pos);
    return tx_leave(st, own, rc);
}

/* As store_session_load, on a pooled read connection. */
optd_err store_read_session(store *st, const char *name, store_session *out, void **state, size_t *len)
{
    struct reader *r;
    optd_err rc;

    if (!name || !out || (state && !len))
        return OPTD_E_INVALID;
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

    if (limit < 0 || !out || !n || !more)
        return OPTD_E_INVALID;
    r = reader_take(st);
    if (after) {
        q = r->q[Q_LIST_AFTER];
        src = sqlite3_bind_text(q, 1, after, -1, SQLITE_STATIC);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 2, (int64_t)limit + 1);
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
            if (cap > (size_t)limit)
                cap = (size_t)limit;
            grown = realloc(rows, cap * sizeof *rows);
            if (!grown) {
                rc = OPTD_E_NOMEM;
                goto done;
            }
            rows = grown;
        }
        rc = row_session(q, &rows[count]);
        if (rc)
            goto done;
        count++;
    }
    if (src != SQLITE_ROW && src != SQLITE_DONE)
        rc = from_sqlite(src);
done:
    stmt_done(q);
    reader_give(st, r);
    if (rc) {
        for (i = 0; i < count; i++)
            store_session_clear(&rows[i]);
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

    if (!out)
        return OPTD_E_INVALID;
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

static uint64_t dbits(double d)
{
    uint64_t v;
    memcpy(&v, &d, sizeof v);
    return v;
}

static double bitsd(uint64_t v)
{
    double d;
    memcpy(&d, &v, sizeof d);
    return d;
}

static void hist_pack(const store_history *h, unsigned char *p)
{
    const uint64_t f[8] = {h->step,          (uint64_t)h->time_ms,    dbits(h->lr), dbits(h->grad_norm),
                           dbits(h->update_norm), dbits(h->param_norm), h->contributors, dbits(h->loss)};
    for (int i = 0; i < 8; i++)
        le64_put(p + 8 * i, f[i]);
    p[64] = h->has_loss ? 1 : 0;
}

static void hist_unpack(const unsigned char *p, store_history *h)
{
    h->step = le64_get(p);
    h->time_ms = (int64_t)le64_get(p + 8);
    h->lr = bitsd(le64_get(p + 16));
    h->grad_norm = bitsd(le64_get(p + 24));
    h->update_norm = bitsd(le64_get(p + 32));
    h->param_norm = bitsd(le64_get(p + 40));
    h->contributors = le64_get(p + 48);
    h->loss = bitsd(le64_get(p + 56));
    h->has_loss = p[64] != 0;
}

/* The rows of a session's tail, decoded into a malloc'd array (*out NULL
 * when there are none). q: a Q_HISTORY_TAIL statement of any connection;
 * OPTD_E_NOT_FOUND when the session row is gone. */
static optd_err tail_read(sqlite3_stmt *q, int64_t session_id, store_history **out, size_t *n)
{
    unsigned char *buf;
    size_t k;
    optd_err rc = tail_copy(q, session_id, HIST_ROW, HIST_BATCH, &buf, &k);

    *out = NULL;
    *n = 0;
    if (rc == OPTD_OK && k && !(*out = malloc(k * sizeof **out)))
        rc = OPTD_E_NOMEM;
    for (size_t i = 0; rc == OPTD_OK && i < k; i++)
        hist_unpack(buf + i * HIST_ROW, &(*out)[i]);
    if (rc == OPTD_OK)
        *n = k;
    free(buf);
    return rc;
}

/* Moves a session's tail into the history table, in the order it was
 * recorded (a step recorded again replaces its row), and forgets the rows
 * of steps <= the newest - keep. */
static optd_err tail_flush(store *st, int64_t session_id, uint64_t keep)
{
    store_history *rows = NULL;
    size_t n = 0;
    sqlite3_stmt *q;
    int src = SQLITE_OK;
    optd_err rc = tail_read(st->q[Q_HISTORY_TAIL], session_id, &rows, &n);

    for (size_t i = 0; rc == OPTD_OK && i < n; i++) {
        const store_history *h = &rows[i];
        q = st->q[Q_HISTORY_PUT];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 2, u2i(h->step));
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 3, h->time_ms);
        if (src == SQLITE_OK)
            src = sqlite3_bind_double(q, 4, h->lr);
        if (src == SQLITE_OK)
            src = sqlite3_bind_double(q, 5, h->grad_norm);
        if (src == SQLITE_OK)
            src = sqlite3_bind_double(q, 6, h->update_norm);
        if (src == SQLITE_OK)
            src = sqlite3_bind_double(q, 7, h->param_norm);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 8, u2i(h->contributors));
        if (src == SQLITE_OK)
            src = h->has_loss ? sqlite3_bind_double(q, 9, h->loss) : sqlite3_bind_null(q, 9);
        rc = run(q, src);
    }
    if (rc == OPTD_OK && n && rows[n - 1].step >= keep) {
        q = st->q[Q_HISTORY_PRUNE];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 2, u2i(rows[n - 1].step - keep));
        rc = run(q, src);
    }
    if (rc == OPTD_OK) {
        q = st->q[Q_HISTORY_TAIL_CLEAR];
        rc = run(q, sqlite3_bind_int64(q, 1, session_id));
    }
    free(rows);
    return rc;
}

/* The tail append of h: OPTD_OK when it went in, OPTD_E_NOT_FOUND when it
 * did not (no such session, or a full tail: most rows, ?5). */
static optd_err tail_add(store *st, int64_t session_id, const unsigned char *packed, uint64_t most)
{
    sqlite3_stmt *q = st->q[Q_HISTORY_TAIL_ADD];
    int src = sqlite3_bind_int64(q, 5, (int64_t)most);
    if (src != SQLITE_OK) {
        stmt_done(q);
        return from_sqlite(src);
    }
    return tail_splice(st, q, session_id, packed, HIST_ROW, HIST_ROW * HIST_BATCH);
}

/* Records h for session_id, then forgets rows of steps <= h->step - keep
 * (keep 0 keeps none). h goes into the session's tail; a full tail (keep
 * rows, or HIST_BATCH) moves to the table first, so a step pays for one
 * statement, and for the batch once in HIST_BATCH steps. */
optd_err store_history_put(store *st, int64_t session_id, const store_history *h, uint64_t keep)
{
    sqlite3_stmt *q;
    unsigned char packed[HIST_ROW];
    uint64_t most = keep < HIST_BATCH ? keep : HIST_BATCH;
    optd_err rc;
    int own, src;

    if (!h || h->step > INT64_MAX)
        return OPTD_E_INVALID;
    rc = tx_enter(st, &own);
    if (rc)
        return rc;
    if (keep == 0) { /* no history: none recorded, the old rows forgotten */
        q = st->q[Q_HISTORY_PRUNE];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 2, (int64_t)h->step);
        rc = run(q, src);
        if (rc == OPTD_OK) {
            q = st->q[Q_HISTORY_TAIL_CLEAR];
            rc = run(q, sqlite3_bind_int64(q, 1, session_id));
        }
        goto done;
    }
    hist_pack(h, packed);
    rc = tail_add(st, session_id, packed, most);
    if (rc == OPTD_E_NOT_FOUND) { /* full (or no session: the flush says so) */
        rc = tail_flush(st, session_id, keep);
        if (rc == OPTD_OK)
            rc = tail_add(st, session_id, packed, most);
    }
done:
    return tx_leave(st, own, rc);
}

static int hist_cmp(const void *a, const void *b)
{
    uint64_t x = ((const store_history *)a)->step, y = ((const store_history *)b)->step;
    return (x > y) - (x < y);
}

/* The history row at q's current result row (Q_HISTORY_PAGE's columns). */
static void hist_column(sqlite3_stmt *q, store_history *h)
{
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

optd_err store_history_get(store *st, int64_t session_id, uint64_t step, store_history *out)
{
    store_history *tail = NULL, h;
    size_t ntail = 0;
    int src, found = 0;

    if (step == 0 || step > INT64_MAX || !out)
        return OPTD_E_INVALID;
    optd_err rc = tail_read(st->q[Q_HISTORY_TAIL], session_id, &tail, &ntail);
    for (size_t i = ntail; rc == OPTD_OK && i-- > 0 && !found;)
        if (tail[i].step == step) {
            h = tail[i];
            found = 1;
        }
    free(tail);
    if (rc == OPTD_OK && !found) {
        sqlite3_stmt *q = st->q[Q_HISTORY_PAGE];
        src = sqlite3_bind_int64(q, 1, session_id);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 2, (int64_t)step - 1);
        if (src == SQLITE_OK)
            src = sqlite3_bind_int64(q, 3, 1);
        if (src == SQLITE_OK && (src = sqlite3_step(q)) == SQLITE_ROW) {
            hist_column(q, &h);
            found = h.step == step;
            src = SQLITE_DONE;
        }
        stmt_done(q);
        rc = src == SQLITE_DONE ? OPTD_OK : from_sqlite(src);
    }
    if (rc == OPTD_OK && !found)
        rc = OPTD_E_NOT_FOUND;
    if (rc == OPTD_OK)
        *out = h;
    return rc;
}

/* Returns OPTD_OK, OPTD_E_INVALID, OPTD_E_UNAVAILABLE, OPTD_E_NOMEM; on
 * failure the outputs are untouched. */
optd_err store_read_history(store *st, int64_t session_id, uint64_t after, int limit, uint64_t keep,
                            store_history **out, size_t *n, int *more)
{
    struct reader *r;
    sqlite3_stmt *q;
    store_history *rows = NULL, *tail = NULL;
    size_t count = 0, ntail = 0;
    int src;
    optd_err rc = OPTD_OK;

    if (limit < 0 || after > INT64_MAX || !out || !n || !more)
        return OPTD_E_INVALID;
    r = reader_take(st);
    /* The tail and the table in one snapshot: a flush between two reads
     * would move rows from the one to the other unseen. */
    q = r->q[Q_BEGIN_READ];
    src = sqlite3_step(q);
    stmt_done(q);
    if (src != SQLITE_DONE) {
        rc = from_sqlite(src);
        goto out;
    }
    rc = tail_read(r->q[Q_HISTORY_TAIL], session_id, &tail, &ntail);
    if (rc == OPTD_E_NOT_FOUND)
        rc = OPTD_OK; /* a deleted session has no history */
    /* The rows of steps <= the newest recorded - keep are gone, as each
     * record's prune left them (the last flush pruned the table to its own
     * newest). */
    if (ntail && tail[ntail - 1].step >= keep && tail[ntail - 1].step - keep > after)
        after = tail[ntail - 1].step - keep;
    if (rc == OPTD_OK && !(rows = malloc(((size_t)limit + 1 + ntail) * sizeof *rows)))
        rc = OPTD_E_NOMEM;
    q = r->q[Q_HISTORY_PAGE];
    src = sqlite3_bind_int64(q, 1, session_id);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 2, (int64_t)after);
    if (src == SQLITE_OK)
        src = sqlite3_bind_int64(q, 3, (int64_t)limit + 1);
    while (rc == OPTD_OK && (src == SQLITE_OK || src == SQLITE_ROW)) {
        src = sqlite3_step(q);
        if (src != SQLITE_ROW)
            break;
        hist_column(q, &rows[count++]);
    }
    if (rc == OPTD_OK && src != SQLITE_ROW && src != SQLITE_DONE)
        rc = from_sqlite(src);
    stmt_done(q);
    q = r->q[Q_END_READ];
    src = sqlite3_step(q);
    stmt_done(q);
    if (rc == OPTD_OK && src != SQLITE_DONE)
        rc = from_sqlite(src);
    /* The tail's rows after the table's, a step recorded again replacing
     * its earlier row, as the flush will. */
    for (size_t i = 0; rc == OPTD_OK && i < ntail; i++) {
        if (tail[i].step <= after)
            continue;
        size_t k = 0;
        while (k < count && rows[k].step != tail[i].step)
            k++;
        rows[k] = tail[i];
        count += k == count;
    }
    if (rc == OPTD_OK)
        qsort(rows, count, sizeof *rows, hist_cmp);
out:
    reader_give(st, r);
    free(tail);
    if (rc) {
        free(rows);
        return rc;
    }
    *more = count > (size_t)limit;
    *out = rows;
    *n = *more ? (size_t)limit : count;
    return OPTD_OK;
}

/* --- Online backup. -------------------------------------------------------- */

/* Pages copied per sqlite3_backup_step: 16 MiB at 16 KiB pages. Between two
 * steps the backup looks at its cancel flag. */
#define BACKUP_STEP_PAGES 1024
/* How often a busy or locked step is retried (10 ms apart) before giving up. */
#define BACKUP_BUSY_RETRIES 500

/* fsync of a file, or of a directory (so a rename in it is durable). */
static int sync_path(const char *path, int dir)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | (dir ? O_DIRECTORY : 0));
    int rc;

    if (fd < 0)
        return -1;
    rc = fsync(fd);
    if (close(fd) != 0)
        rc = -1;
    return rc;
}

/* The directory part of path ("." when none), into buf. */
static void dir_of(const char *path, char *buf, size_t cap)
{
    const char *slash = strrchr(path, '/');

    if (!slash)
        snprintf(buf, cap, ".");
    else if (slash == path)
        snprintf(buf, cap, "/");
    else
        snprintf(buf, cap, "%.*s", (int)(slash - path), path);
}

/* Reads what the snapshot holds; the statement also begins the read
 * transaction that pins the snapshot on src. */
static optd_err backup_census(sqlite3 *src, store_backup_info *out)
{
    sqlite3_stmt *q = NULL;
    int src_rc;

    src_rc = sqlite3_prepare_v2(src, "SELECT count(*), coalesce(sum(step), 0) FROM sessions", -1, &q, NULL);
    if (src_rc == SQLITE_OK)
        src_rc = sqlite3_step(q);
    if (src_rc == SQLITE_ROW) {
        out->sessions = i2u(sqlite3_column_int64(q, 0));
        out->step_commits = i2u(sqlite3_column_int64(q, 1));
    }
    (void)sqlite3_finalize(q); /* repeats the step's error, taken above */
    return src_rc == SQLITE_ROW ? OPTD_OK : from_sqlite(src_rc) == OPTD_E_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
}

/* Why the snapshot is consistent: src holds one read transaction from the
 * census to the last page, and a backup step run on a connection already
 * in a read transaction reads from it (SQLite restarts a backup only when
 * its source connection begins a new one and finds the database changed).
 * In WAL mode that reader blocks no writer; the checkpointer cannot go past
 * its snapshot meanwhile, so the -wal file grows by what is written while
 * the backup runs and shrinks again after. */
optd_err store_backup(store *st, const char *dest, const _Atomic int *cancel, store_backup_info *out, char *err,
                      size_t errlen)
{
    store_backup_info info = {0, 0, 0};
    sqlite3 *src = NULL, *dst = NULL;
    sqlite3_backup *b = NULL;
    char *tmp = NULL, dir[4096];
    struct stat sb;
    int fd = -1, src_rc = SQLITE_OK, tries = 0, in_tx = 0, made = 0;
    optd_err rc;

    seterr(err, errlen, "%s", "");
    if (!st || !dest || !*dest || !out) {
        seterr(err, errlen, "no backup file given");
        return OPTD_E_INVALID;
    }
    if (stat(dest, &sb) == 0) {
        seterr(err, errlen, "%s exists already", dest);
        return OPTD_E_ALREADY_EXISTS;
    }
    rc = OPTD_E_NOMEM;
    tmp = malloc(strlen(dest) + 5);
    if (!tmp)
        goto done;
    sprintf(tmp, "%s.tmp", dest);
    /* A .tmp left by a crash mid-backup is garbage: ours to replace. The file
     * is made here, owner-only, so SQLite opens it rather than creates it. */
    (void)unlink(tmp);
    fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        seterr(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
        rc = OPTD_E_UNAVAILABLE;
        goto done;
    }
    made = 1;

    rc = conn_open(st->path, SQLITE_OPEN_READONLY, DEFAULT_BUSY_TIMEOUT_MS, &src, err, errlen);
    if (rc)
        goto done;
    rc = exec_sql(src, "BEGIN", st->path, err, errlen);
    if (rc)
        goto done;
    in_tx = 1;
    rc = backup_census(src, &info);
    if (rc) {
        seterr(err, errlen, "cannot read %s: %s", st->path, sqlite3_errmsg(src));
        goto done;
    }
    rc = conn_open(tmp, SQLITE_OPEN_READWRITE, DEFAULT_BUSY_TIMEOUT_MS, &dst, err, errlen);
    if (rc)
        goto done;
    /* No journal and no syncs on the new file: nothing else reads it until
     * it is complete, and it is synced once, whole, before the rename. */
    rc = exec_sql(dst, "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF", tmp, err, errlen);
    if (rc)
        goto done;
    b = sqlite3_backup_init(dst, "main", src, "main");
    if (!b) {
        seterr(err, errlen, "cannot start the backup into %s: %s", tmp, sqlite3_errmsg(dst));
        rc = from_sqlite(sqlite3_errcode(dst)) == OPTD_E_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
        goto done;
    }
    for (;;) {
        if (cancel && atomic_load(cancel)) {
            seterr(err, errlen, "the backup was cancelled (the server is shutting down)");
            rc = OPTD_E_UNAVAILABLE;
            goto done;
        }
        src_rc = sqlite3_backup_step(b, BACKUP_STEP_PAGES);
        /* Each chunk goes to disk before the next: left to pile up, a
         * gigabyte of dirty pages makes the writer's next fsync wait for
         * all of it (measured: a step held 1 s at the end of a 2 GB backup). */
        if ((src_rc == SQLITE_OK || src_rc == SQLITE_DONE) && fdatasync(fd) != 0) {
            seterr(err, errlen, "cannot write the backup %s: %s", tmp, strerror(errno));
            rc = OPTD_E_UNAVAILABLE;
            goto done;
        }
        if (src_rc == SQLITE_DONE)
            break;
        if (src_rc == SQLITE_OK)
            continue;
        if ((src_rc == SQLITE_BUSY || src_rc == SQLITE_LOCKED) && ++tries < BACKUP_BUSY_RETRIES) {
            sqlite3_sleep(10);
            continue;
        }
        seterr(err, errlen, "cannot write the backup %s: %s", tmp, sqlite3_errstr(src_rc));
        rc = from_sqlite(src_rc) == OPTD_E_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
        goto done;
    }
    src_rc = sqlite3_backup_finish(b);
    b = NULL;
    if (src_rc != SQLITE_OK) {
        seterr(err, errlen, "cannot finish the backup %s: %s", tmp, sqlite3_errstr(src_rc));
        rc = OPTD_E_UNAVAILABLE;
        goto done;
    }
    src_rc = sqlite3_close(dst);
    dst = NULL;
    if (src_rc != SQLITE_OK) {
        seterr(err, errlen, "cannot close the backup %s: %s", tmp, sqlite3_errstr(src_rc));
        rc = OPTD_E_UNAVAILABLE;
        goto done;
    }
    dir_of(dest, dir, sizeof dir);
    if (fsync(fd) != 0 || rename(tmp, dest) != 0 || sync_path(dir, 1) != 0) {
        seterr(err, errlen, "cannot complete the backup %s: %s", dest, strerror(errno));
        (void)unlink(dest);
        rc = OPTD_E_UNAVAILABLE;
        goto done;
    }
    made = 0;
    if (stat(dest, &sb) == 0)
        info.bytes = (uint64_t)sb.st_size;
    rc = OPTD_OK;
done:
    if (b)
        (void)sqlite3_backup_finish(b); /* its error is the one reported */
    if (dst)
        (void)sqlite3_close(dst);
    if (in_tx)
        (void)sqlite3_exec(src, "COMMIT", NULL, NULL, NULL); /* a read: nothing to lose */
    if (src)
        conn_close(src);
    if (fd >= 0)
        (void)close(fd);
    if (made)
        (void)unlink(tmp);
    free(tmp);
    if (rc == OPTD_E_NOMEM && err && !*err)
        seterr(err, errlen, "out of memory making the backup %s", dest);
    if (rc == OPTD_OK)
        *out = info;
    return rc;
}
