/* store: optd's SQLite database. Sessions (a small row each), their state (one
 * opaque blob each: params, buffers and scalars laid out by the caller), and the
 * idempotency keys of recent steps. WAL mode, a versioned schema upgraded in
 * code, and a refusal to touch a file that is not an optd database.
 *
 * Threads: one thread (the writer) calls the write functions and owns the
 * transaction; any thread may call the store_read_* functions at any time,
 * which use a pool of read-only connections and see only committed data.
 * This is the only module that includes <sqlite3.h>; it knows no HTTP and no
 * optimizer. */
#ifndef OPTD_STORE_H
#define OPTD_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

typedef struct store store;

#define STORE_NAME_MAX 128

/* What store_open takes; a NULL store_options is every default. Each field
 * means what it says (sync_full 0 is NORMAL); a count or time of 0 is its
 * default. */
typedef struct store_options {
    int sync_full;       /* 1: synchronous=FULL (the default of NULL options), 0: NORMAL */
    int busy_timeout_ms; /* how long a locked database is waited for; 0: 5000 */
    int readers;         /* read connections in the pool; 0: 4 */
    /* WAL bytes past which writes are refused (OPTD_E_UNAVAILABLE, logged)
     * until the checkpointer has copied it back: the guard against a disk
     * that fills while checkpoints cannot make progress. 0: STORE_WAL_MAX. */
    uint64_t wal_max_bytes;
    /* Where storage failures are reported, one line each, rate-limited;
     * NULL reports nothing. Called from the writer and checkpointer threads. */
    void (*log)(void *ctx, const char *line);
    void *log_ctx;
} store_options;

/* The default of store_options.wal_max_bytes. */
#define STORE_WAL_MAX ((uint64_t)1 << 30)

/* What the store reports about its files and its checkpoints. Plain data. */
typedef struct store_stats {
    uint64_t db_bytes;        /* size of the database file */
    uint64_t wal_bytes;       /* size of the -wal file */
    uint64_t wal_frames;      /* frames the WAL holds since it last started over */
    uint64_t ckpt_lag_frames; /* of those, frames not yet copied into the database */
    uint64_t ckpt_runs;       /* checkpoints that ran to their end */
    uint64_t ckpt_busy;       /* checkpoints that could not finish (a reader or the writer in the way) */
    uint64_t ckpt_failures;   /* checkpoints that failed (I/O error, disk full, ...) */
    uint64_t wal_resets;      /* times the WAL was started over (RESTART or TRUNCATE) */
    uint64_t wal_refusals;    /* write transactions refused at the WAL limit */
    uint64_t wal_frames_written; /* frames (page_size + 24 bytes each) commits wrote since the start */
    uint64_t page_cache_limit;   /* bytes the writer's page cache may hold: it grows for big sessions */
} store_stats;

/* A snapshot of st's figures; any thread. */
void store_stats_get(store *st, store_stats *out);

/* One step of a session's log (store_session_log): the step it made and
 * the bytes the engine wrote to redo it. data is malloc'd. */
typedef struct store_log_entry {
    uint64_t step;
    void *data;
    size_t len;
} store_log_entry;

/* A session's row. Plain data; config and log are owned by the struct (free
 * them with store_session_clear). */
typedef struct store_session {
    int64_t id; /* rowid; set by store_session_insert */
    char name[STORE_NAME_MAX + 1];
    char optimizer[32];
    int dtype;     /* 0 float32, 1 float64 (optim_dtype) */
    uint64_t size; /* elements */
    uint64_t step;
    char *config;                   /* caller's JSON text (hyperparams and more) */
    int64_t created_ms, updated_ms; /* Unix time, milliseconds */
    /* Filled by the loads that return the state: the step the state blob
     * holds, and the logged steps state_step + 1 .. step that follow it, in
     * order (none when state_step == step). */
    uint64_t state_step;
    store_log_entry *log;
    size_t nlog;
} store_session;

/* Frees what s owns and zeroes it; safe on a zeroed struct. */
void store_session_clear(store_session *s);

/* Opens (creating when absent, mode 0600) the database at path and holds an
 * exclusive lock on it until store_close, so a second process (another optd)
 * cannot open it: that one gets OPTD_E_BUSY. A file that is not an
 * optd database (another application's SQLite file, or not SQLite at all), a
 * corrupt one, or one made by a newer optd is refused and left unchanged; an
 * older schema is upgraded. On failure writes a sentence into err.
 * Returns OPTD_OK, OPTD_E_INVALID (foreign, corrupt or too new: do not retry),
 * OPTD_E_BUSY (another process has it open), OPTD_E_UNAVAILABLE (cannot open
 * or write), OPTD_E_NOMEM.
 * The caller closes *out with store_close. */
optd_err store_open(const char *path, const store_options *opt, store **out, char *err, size_t errlen);
/* Closes every connection (checkpointing the WAL); store_close(NULL) does nothing. */
void store_close(store *st);

/* Whether the database can be written right now (a cheap probe for /readyz):
 * after a failed write it stays 0 until a write of the failed one's size is
 * known to fit (see store.c). */
int store_writable(store *st);

/* --- Writer thread only. ------------------------------------------------ */

/* BEGIN IMMEDIATE / COMMIT / ROLLBACK. Returns OPTD_OK or OPTD_E_UNAVAILABLE
 * (locked past the busy timeout, disk full, I/O error, read-only file). After
 * a failed commit the transaction is rolled back. */
optd_err store_begin(store *st);
optd_err store_commit(store *st);
void store_rollback(store *st);

/* A savepoint inside the transaction (one at a time): what a job does
 * between store_savepoint and store_release commits with the group, and
 * store_rollback_to undoes it alone, so one job's failure is not its
 * group's. Each returns OPTD_OK or OPTD_E_UNAVAILABLE; store_rollback_to
 * returns OPTD_E_UNAVAILABLE also when SQLite has already rolled back the
 * whole transaction (after disk full, I/O errors, out of memory), and the
 * transaction is then over. */
optd_err store_savepoint(store *st);
optd_err store_release(store *st);
optd_err store_rollback_to(store *st);
/* A count that every write of the open transaction raises (rows changed,
 * blob bytes written), so that comparing two readings tells whether
 * anything was written between them; UINT64_MAX when no transaction is
 * open (SQLite rolls back the whole of it after disk full, I/O errors and
 * out of memory). */
uint64_t store_tx_writes(store *st);

/* The write functions below return OPTD_E_SESSION_TOO_LARGE for a value
 * past SQLite's length limit (nothing of that statement is written; roll
 * back to the job's savepoint for the rest). */

/* One applied step as the history keeps it. Plain data. */
typedef struct store_history {
    uint64_t step;
    int64_t time_ms; /* Unix time, milliseconds */
    double lr, grad_norm, update_norm, param_norm;
    uint64_t contributors;
    int has_loss;
    double loss; /* the client's, when has_loss */
} store_history;

/* Inserts a session and its state blob; sets s->id. OPTD_E_ALREADY_EXISTS
 * when the name is taken. */
optd_err store_session_insert(store *st, store_session *s, const void *state, size_t len);
/* Loads a session by name: row into *out (caller clears), and when state is
 * non-NULL a malloc'd copy of the state blob (caller frees) and its length.
 * OPTD_E_NOT_FOUND when absent. */
optd_err store_session_load(store *st, const char *name, store_session *out, void **state, size_t *len);
/* Writes step, config, updated_ms (by s->id) and, when state is non-NULL,
 * the state blob. */
optd_err store_session_update(store *st, const store_session *s, const void *state, size_t len);
/* A step's idempotency key, recorded with it as store_idem_put(key,
 * digest, reply, reply_len, window) does. Borrowed for the call. */
typedef struct store_key {
    const char *key;
    uint64_t digest;
    const void *reply; /* NULL: none saved */
    size_t reply_len;
    uint64_t window;
} store_key;

/* The step path: writes step and updated_ms of session id and its state blob
 * (in place when its size is unchanged), records the step's history row h
 * (h->step == step; none when NULL) as store_history_put(h, keep) does, and
 * its key k (none when NULL), both in the same rewrite of the row when the
 * row's tails have room. */
optd_err store_session_step(store *st, int64_t id, uint64_t step, int64_t updated_ms, const void *state, size_t len,
                            const store_history *h, uint64_t keep, const store_key *k);
/* The step path of a session whose state is too big to rewrite at every
 * step: writes step and updated_ms of session id, and in place of the state
 * the n parts of what redoes the step (the engine's bytes, written one after
 * another) into slot of the session's log; the state blob stays at
 * state_step (< step) and loads return the logged steps after it. Slots are
 * overwritten in place, so a session's log takes at most as many rows as
 * slots it uses. A later store_session_step or store_session_update with
 * state ends the log (its slots are kept for reuse). h, keep and k: as
 * store_session_step. */
typedef struct store_part {
    const void *p; /* NULL: len zero bytes */
    size_t len;
} store_part;
optd_err store_session_log(store *st, int64_t id, uint64_t step, int64_t updated_ms, uint64_t state_step,
                           uint32_t slot, const store_part *parts, int n, const store_history *h, uint64_t keep,
                           const store_key *k);
/* Deletes a session, its state, log, history and keys. OPTD_E_NOT_FOUND when absent. */
optd_err store_session_delete(store *st, const char *name);

/* An idempotency record: the step a key was applied at, a digest of the
 * request it came with, and the reply body saved then (may be empty). */
typedef struct store_idem {
    uint64_t step;
    uint64_t digest;
    void *reply; /* malloc'd, caller frees; NULL when none is kept */
    size_t reply_len;
} store_idem;

/* The keys are kept in step order and found from their step: the caller
 * keeps the key -> step map (built with store_idem_keys). Saved replies go
 * one after another into a ring that all sessions share, whose capacity
 * is what the sessions' windows need (at most 16 MiB a session, 1 GiB in
 * all): a reply is kept until the ring comes round to it. The replies
 * saved before schema 6 took the slots of a ring per session, slot
 * step % store_idem_slots(the reply's length, window), and are found with
 * the length and window they were saved under. */
uint32_t store_idem_slots(size_t reply_len, uint64_t window);
/* Calls each(ctx, step, key) for every key of session id at a step after
 * after, in step order (some may be older than the window: see put). */
optd_err store_idem_keys(store *st, int64_t session_id, uint64_t after,
                         optd_err (*each)(void *ctx, uint64_t step, const char *key), void *ctx);
/* Looks up key at step for session id, with the reply of that step if its
 * slot still holds one of reply_len bytes (saved under window).
 * OPTD_E_NOT_FOUND when unknown. */
optd_err store_idem_get(store *st, int64_t session_id, const char *key, uint64_t step, size_t reply_len,
                        uint64_t window, store_idem *out);
/* Records key at step with digest and reply (may be NULL: then the ring is
 * left as it is), then forgets keys of steps <= step - window, in batches:
 * such keys may still be listed and found up to about a hundred keyed steps
 * later (callers look within the window). */
optd_err store_idem_put(store *st, int64_t session_id, const char *key, uint64_t step, uint64_t digest,
                        const void *reply, size_t reply_len, uint64_t window);

/* Records h for session_id, then forgets the rows of steps <= h->step - keep
 * so exactly the last keep steps stay (keep 0 keeps none). The newest rows
 * wait in the session's own row and move to the history table 16 at a time
 * (a step then dirties no page of its own for its history); reads see both.
 * OPTD_E_NOT_FOUND when there is no such session. */
optd_err store_history_put(store *st, int64_t session_id, const store_history *h, uint64_t keep);
/* The history row of step, read on the writer's connection (so what its
 * open transaction wrote included). OPTD_E_NOT_FOUND when there is none. */
optd_err store_history_get(store *st, int64_t session_id, uint64_t step, store_history *out);

/* --- Any thread. -------------------------------------------------------- */

/* As store_session_load, from committed data, on a read connection. */
optd_err store_read_session(store *st, const char *name, store_session *out, void **state, size_t *len);
/* Up to limit sessions with name > after (after may be NULL), in byte order
 * of name. *out is a malloc'd array of *n rows (caller clears each and frees
 * the array). *more is set to 1 when further rows exist. */
optd_err store_read_list(store *st, const char *after, int limit, store_session **out, size_t *n, int *more);
/* Up to limit history rows of session_id with step > after, in step order,
 * of the last keep steps recorded (keep: as given to store_history_put).
 * *out is a malloc'd array of *n rows (caller frees); *more is 1 when
 * further rows exist. */
optd_err store_read_history(store *st, int64_t session_id, uint64_t after, int limit, uint64_t keep,
                            store_history **out, size_t *n, int *more);
/* Number of sessions. */
optd_err store_read_count(store *st, uint64_t *out);

/* --- Online backup (any thread). --------------------------------------- */

/* What a backup holds. Plain data. */
typedef struct store_backup_info {
    uint64_t bytes;        /* size of the backup file */
    uint64_t sessions;     /* sessions in the snapshot */
    uint64_t step_commits; /* their steps, summed: every step committed in the snapshot */
} store_backup_info;

/* Writes a consistent snapshot of the whole database, as of the last commit
 * when it starts, into a new file dest (a complete optd database: open it
 * with store_open to serve exactly that state). Pages are copied with
 * SQLite's online backup API from a read transaction of its own connection,
 * so the writer is never locked out meanwhile; the file is written as
 * dest.tmp, synced and renamed, so dest never exists half-written. *cancel
 * (may be NULL) is polled between chunks: once non-zero the backup stops.
 * Returns OPTD_OK, OPTD_E_INVALID (no dest), OPTD_E_ALREADY_EXISTS (dest
 * exists), OPTD_E_UNAVAILABLE (the database cannot be read, dest cannot be
 * written: disk full, I/O error, permissions; or cancelled), OPTD_E_NOMEM,
 * with a sentence in err. On failure no file is left at dest or dest.tmp. */
optd_err store_backup(store *st, const char *dest, const _Atomic int *cancel, store_backup_info *out, char *err,
                      size_t errlen);

#endif
