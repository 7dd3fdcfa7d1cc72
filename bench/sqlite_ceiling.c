/* The fsync ceiling: a bare SQLite loop that commits one blob UPDATE per
 * transaction, as a step service without group commit would. Same settings
 * as optd's store (WAL, synchronous FULL by default, SQLite's other defaults)
 * and the same layout (state(session_id INTEGER PRIMARY KEY, data BLOB)), so
 * a step's state blob of the same size costs the same here as there.
 *
 * Usage: sqlite_ceiling --db PATH [--bytes B] [--rows R] [--seconds D]
 *                       [--warmup W] [--sync full|normal]
 *                       [--page-size BYTES] [--cache-kib K] [--autocheckpoint PAGES]
 *                       [--group G]
 * --group G updates G rows (the next G of the round-robin) per transaction:
 * the ceiling of a writer that group-commits G sessions' steps at once;
 * "updates_per_s" counts rows, "commits_per_s" transactions.
 * The last three leave SQLite's defaults unless given (optd uses the
 * defaults); they exist to measure what a different setting would buy.
 * Each transaction is BEGIN IMMEDIATE; UPDATE one row (round-robin over R
 * rows) with B bytes that all differ from the row's old bytes; COMMIT. (SQLite
 * skips overflow pages whose bytes did not change, so rewriting nearly the
 * same blob would commit a page or two: the two blobs alternate instead, as an
 * optimizer step changes every element.) Prints one JSON object: commits, seconds,
 * commits_per_s, p50_ms, p99_ms, mb_per_s. The database file is created and
 * left for the caller to delete.
 *
 * --raw: the physical floor instead of SQLite. --db names a plain file,
 * preallocated to R rows of B bytes and synced before the clock starts; each
 * transaction is then one pwrite of B bytes (alternating as above) per row
 * at the row's offset, and one fdatasync: what making B bytes durable costs
 * on this disk with no database at all. */
#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench.h"

static int exec(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        fprintf(stderr, "sqlite_ceiling: %s: %s\n", sql, msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
    }
    return rc;
}

int main(int argc, char **argv)
{
    const char *path = NULL, *sync = "full";
    long page_size = 0, cache_kib = 0, autockpt = -1;
    size_t bytes = 12000;
    int rows = 1, group = 1, raw = 0, fd = -1;
    double seconds = 3, warmup = 0.5;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--raw")) {
            raw = 1;
            memmove(argv + i, argv + i + 1, (size_t)(argc - i) * sizeof *argv);
            argc--;
        }
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--db"))
            path = v;
        else if (!strcmp(a, "--bytes"))
            bytes = (size_t)strtod(v, NULL);
        else if (!strcmp(a, "--rows"))
            rows = atoi(v);
        else if (!strcmp(a, "--seconds"))
            seconds = strtod(v, NULL);
        else if (!strcmp(a, "--warmup"))
            warmup = strtod(v, NULL);
        else if (!strcmp(a, "--sync"))
            sync = v;
        else if (!strcmp(a, "--page-size"))
            page_size = atol(v);
        else if (!strcmp(a, "--cache-kib"))
            cache_kib = atol(v);
        else if (!strcmp(a, "--autocheckpoint"))
            autockpt = atol(v);
        else if (!strcmp(a, "--group"))
            group = atoi(v);
    }
    if (!path || rows < 1 || bytes < 1 || group < 1) {
        fprintf(stderr, "usage: sqlite_ceiling --db PATH [--bytes B] [--rows R] [--seconds D] [--warmup W] "
                        "[--sync full|normal] [--raw]\n");
        return 2;
    }

    sqlite3 *db = NULL;
    sqlite3_stmt *ins = NULL, *upd = NULL;
    unsigned char *blob = malloc(bytes), *alt = malloc(bytes);
    double *lat = NULL;
    size_t nlat = 0, cap = 0;
    int rc = 1;
    if (!blob || !alt)
        goto done;
    for (size_t i = 0; i < bytes; i++) {
        blob[i] = (unsigned char)((i * 2654435761u) >> 13);
        alt[i] = blob[i] ^ 0x5a;
    }
    if (raw) {
        fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
        int frc = fd < 0 ? errno : posix_fallocate(fd, 0, (off_t)bytes * rows);
        if (frc || fdatasync(fd) != 0) {
            fprintf(stderr, "sqlite_ceiling: cannot preallocate %s: %s\n", path, strerror(frc ? frc : errno));
            goto done;
        }
        goto timed;
    }
    if (sqlite3_open(path, &db) != SQLITE_OK) {
        fprintf(stderr, "sqlite_ceiling: cannot open %s\n", path);
        goto done;
    }
    char pragma[64], extra[3][64] = {"", "", ""};
    snprintf(pragma, sizeof pragma, "PRAGMA synchronous = %s", !strcmp(sync, "normal") ? "NORMAL" : "FULL");
    if (page_size > 0) /* before WAL: a WAL database cannot change its page size */
        snprintf(extra[0], sizeof extra[0], "PRAGMA page_size = %ld", page_size);
    if (cache_kib > 0)
        snprintf(extra[1], sizeof extra[1], "PRAGMA cache_size = -%ld", cache_kib);
    if (autockpt >= 0)
        snprintf(extra[2], sizeof extra[2], "PRAGMA wal_autocheckpoint = %ld", autockpt);
    for (int e = 0; e < 3; e++)
        if (extra[e][0] && exec(db, extra[e]))
            goto done;
    if (exec(db, "PRAGMA journal_mode = WAL") || exec(db, pragma) ||
        exec(db, "CREATE TABLE IF NOT EXISTS state(session_id INTEGER PRIMARY KEY, data BLOB NOT NULL)") ||
        exec(db, "DELETE FROM state"))
        goto done;
    if (sqlite3_prepare_v2(db, "INSERT INTO state(session_id, data) VALUES (?1, ?2)", -1, &ins, NULL) ||
        sqlite3_prepare_v2(db, "UPDATE state SET data = ?2 WHERE session_id = ?1", -1, &upd, NULL)) {
        fprintf(stderr, "sqlite_ceiling: %s\n", sqlite3_errmsg(db));
        goto done;
    }
    if (exec(db, "BEGIN IMMEDIATE"))
        goto done;
    for (int r = 0; r < rows; r++) {
        sqlite3_bind_int(ins, 1, r + 1);
        sqlite3_bind_blob(ins, 2, blob, (int)bytes, SQLITE_STATIC);
        if (sqlite3_step(ins) != SQLITE_DONE) {
            fprintf(stderr, "sqlite_ceiling: insert: %s\n", sqlite3_errmsg(db));
            goto done;
        }
        sqlite3_reset(ins);
    }
    if (exec(db, "COMMIT"))
        goto done;

timed:;
    double t0 = now_ns(), t_measure = t0 + warmup * 1e9, t_end = t_measure + seconds * 1e9;
    long k = 0;
    for (;;) {
        double a = now_ns();
        if (a >= t_end)
            break;
        if (raw) {
            for (int gi = 0; gi < group; gi++, k++) {
                const unsigned char *data = (k / rows) % 2 ? blob : alt;
                if (pwrite(fd, data, bytes, (off_t)(k % rows) * (off_t)bytes) != (ssize_t)bytes) {
                    perror("sqlite_ceiling: pwrite");
                    goto done;
                }
            }
            if (fdatasync(fd) != 0) {
                perror("sqlite_ceiling: fdatasync");
                goto done;
            }
        } else if (exec(db, "BEGIN IMMEDIATE"))
            goto done;
        for (int gi = 0; !raw && gi < group; gi++, k++) {
            /* Row k % rows gets blob and alt by turns: every byte changes. */
            const unsigned char *data = (k / rows) % 2 ? blob : alt;
            sqlite3_bind_int(upd, 1, (int)(k % rows) + 1);
            sqlite3_bind_blob(upd, 2, data, (int)bytes, SQLITE_STATIC);
            if (sqlite3_step(upd) != SQLITE_DONE) {
                fprintf(stderr, "sqlite_ceiling: update: %s\n", sqlite3_errmsg(db));
                exec(db, "ROLLBACK");
                goto done;
            }
            sqlite3_reset(upd);
        }
        if (!raw && exec(db, "COMMIT"))
            goto done;
        double b = now_ns();
        if (a < t_measure)
            continue;
        if (nlat == cap) {
            cap = cap ? cap * 2 : 4096;
            double *nl = realloc(lat, cap * sizeof *lat);
            if (!nl)
                goto done;
            lat = nl;
        }
        lat[nlat++] = (b - a) / 1e6;
    }
    double secs = (now_ns() - t_measure) / 1e9;
    qsort(lat, nlat, sizeof *lat, cmp_double);
    double p50 = nlat ? lat[nlat / 2] : 0, p99 = nlat ? lat[(size_t)(0.99 * (double)(nlat - 1) + 0.5)] : 0;
    printf("{\"commits\": %zu, \"seconds\": %.3f, \"commits_per_s\": %.1f, \"updates_per_s\": %.1f, "
           "\"group\": %d, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"mean_ms\": %.3f, \"mb_per_s\": %.2f, \"bytes\": %zu, \"rows\": %d, \"sync\": \"%s\", "
           "\"page_size\": %ld, \"raw\": %s}\n",
           nlat, secs, (double)nlat / secs, (double)nlat * group / secs, group, p50, p99,
           nlat ? secs * 1e3 / (double)nlat : 0.0, (double)nlat * group * (double)bytes / secs / 1e6, bytes, rows,
           sync, page_size, raw ? "true" : "false");
    rc = 0;
done:
    sqlite3_finalize(ins);
    sqlite3_finalize(upd);
    sqlite3_close(db);
    if (fd >= 0)
        close(fd);
    free(blob);
    free(alt);
    free(lat);
    return rc;
}
