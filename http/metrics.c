/* Prometheus metrics: requests by route and status, step and commit latency
 * histograms, steps by optimizer, and the session count. Counters are atomics
 * updated by the request threads and the writer; rendering reads them. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "http/httpInt.h"

void metrics_count_request(metrics *m, http_route r, int status)
{
    if (r < HTTP_R_COUNT && status >= 100 && status < 600)
        atomic_fetch_add(&m->requests[r][status / 100][status % 100], 1);
}

static void render_histogram(sbuf *b, const char *name, const char *help, engine_histogram *h)
{
    uint64_t cum = 0;
    sbuf_printf(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    for (size_t i = 0; i < ENGINE_LAT_BUCKETS; i++) {
        cum += atomic_load(&h->bucket[i]);
        if (i < ENGINE_LAT_BUCKETS - 1)
            sbuf_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, (double)engine_latency_bounds_us[i] / 1e6,
                        (unsigned long long)cum);
        else
            sbuf_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    }
    sbuf_printf(b, "%s_sum %.6f\n%s_count %llu\n", name, (double)atomic_load(&h->sum_us) / 1e6, name,
                (unsigned long long)atomic_load(&h->count));
}

/* The store's files and checkpoints, one gauge or counter each. */
static void render_store(sbuf *b, const store_stats *ss)
{
    static const struct {
        const char *name, *type, *help;
        size_t off;
    } rows[] = {
        {"optd_db_bytes", "gauge", "Size of the database file.", offsetof(store_stats, db_bytes)},
        {"optd_db_wal_bytes", "gauge", "Size of the -wal file.", offsetof(store_stats, wal_bytes)},
        {"optd_db_wal_frames", "gauge", "Frames in the WAL since it last started over.",
         offsetof(store_stats, wal_frames)},
        {"optd_db_checkpoint_lag_frames", "gauge", "WAL frames not yet copied into the database.",
         offsetof(store_stats, ckpt_lag_frames)},
        {"optd_db_checkpoints_total", "counter", "Checkpoints that ran to their end.",
         offsetof(store_stats, ckpt_runs)},
        {"optd_db_checkpoint_busy_total", "counter", "Checkpoints a reader kept from finishing.",
         offsetof(store_stats, ckpt_busy)},
        {"optd_db_checkpoint_failures_total", "counter", "Checkpoints that failed (I/O error, disk full).",
         offsetof(store_stats, ckpt_failures)},
        {"optd_db_wal_resets_total", "counter", "Times the WAL started over from its first byte.",
         offsetof(store_stats, wal_resets)},
        {"optd_db_wal_refusals_total", "counter", "Write transactions refused at the WAL limit (--max-wal).",
         offsetof(store_stats, wal_refusals)},
        {"optd_db_wal_frames_written_total", "counter",
         "WAL frames (one database page each) that commits wrote: the bytes a write costs.",
         offsetof(store_stats, wal_frames_written)},
        {"optd_db_page_cache_limit_bytes", "gauge",
         "What the writer's page cache may hold: 2 MB, grown (to 64 MiB at most) for sessions that log their steps.",
         offsetof(store_stats, page_cache_limit)},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        uint64_t v;
        memcpy(&v, (const char *)ss + rows[i].off, sizeof v);
        sbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", rows[i].name, rows[i].help, rows[i].name, rows[i].type,
                    rows[i].name, (unsigned long long)v);
    }
}

void metrics_render(sbuf *b, metrics *m, uint64_t sessions, const store_stats *ss)
{
    sbuf_puts(b, "# HELP optd_http_requests_total HTTP requests by route and status.\n"
                 "# TYPE optd_http_requests_total counter\n");
    for (int r = 0; r < HTTP_R_COUNT; r++)
        for (int c = 1; c < 6; c++)
            for (int k = 0; k < 100; k++) {
                uint64_t v = atomic_load(&m->requests[r][c][k]);
                if (v)
                    sbuf_printf(b, "optd_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n", http_routes[r].path,
                                c * 100 + k, (unsigned long long)v);
            }
    sbuf_puts(b, "# HELP optd_steps_total Optimizer steps committed, by optimizer.\n"
                 "# TYPE optd_steps_total counter\n");
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++)
        sbuf_printf(b, "optd_steps_total{optimizer=\"%s\"} %llu\n", optim_at(k)->name,
                    (unsigned long long)atomic_load(&m->eng.steps[k]));
    render_histogram(b, "optd_step_duration_seconds", "Step request latency, decode to reply.", &m->step_latency);
    render_histogram(b, "optd_db_commit_duration_seconds", "SQLite COMMIT latency of one group of writes.",
                     &m->eng.commit_latency);
    uint64_t cum = 0;
    sbuf_puts(b, "# HELP optd_writer_group_bytes State bytes one group of writes commits (about).\n"
                 "# TYPE optd_writer_group_bytes histogram\n");
    for (size_t i = 0; i < ENGINE_GROUP_BYTES_BUCKETS; i++) {
        cum += atomic_load(&m->eng.group_bytes_bucket[i]);
        if (i < ENGINE_GROUP_BYTES_BUCKETS - 1)
            sbuf_printf(b, "optd_writer_group_bytes_bucket{le=\"%llu\"} %llu\n",
                        (unsigned long long)(engine_group_bounds_mib[i] << 20), (unsigned long long)cum);
        else
            sbuf_printf(b, "optd_writer_group_bytes_bucket{le=\"+Inf\"} %llu\n", (unsigned long long)cum);
    }
    sbuf_printf(b, "optd_writer_group_bytes_sum %llu\noptd_writer_group_bytes_count %llu\n",
                (unsigned long long)atomic_load(&m->eng.group_bytes_sum),
                (unsigned long long)atomic_load(&m->eng.group_bytes_count));
    sbuf_puts(b, "# HELP optd_step_heavy_waits_total Steps within the writer's group budget, by how many commits "
                 "of a larger step (one past the budget) they waited for, queued to reply.\n"
                 "# TYPE optd_step_heavy_waits_total counter\n");
    for (int i = 0; i < 4; i++)
        sbuf_printf(b, "optd_step_heavy_waits_total{commits=\"%d%s\"} %llu\n", i, i == 3 ? "+" : "",
                    (unsigned long long)atomic_load(&m->eng.heavy_waits[i]));
    sbuf_printf(b,
                "# HELP optd_db_commits_total Group commits.\n# TYPE optd_db_commits_total counter\n"
                "optd_db_commits_total %llu\n"
                "# HELP optd_db_commit_failures_total Groups rolled back by a storage fault.\n"
                "# TYPE optd_db_commit_failures_total counter\noptd_db_commit_failures_total %llu\n"
                "# HELP optd_writer_group_reruns_total Groups run again, a savepoint per request, after a "
                "request run without one failed having written.\n"
                "# TYPE optd_writer_group_reruns_total counter\noptd_writer_group_reruns_total %llu\n"
                "# HELP optd_sessions Sessions in the database.\n# TYPE optd_sessions gauge\noptd_sessions %llu\n",
                (unsigned long long)atomic_load(&m->eng.commits),
                (unsigned long long)atomic_load(&m->eng.commit_failures),
                (unsigned long long)atomic_load(&m->eng.group_reruns), (unsigned long long)sessions);
    render_store(b, ss);
}

void metrics_render_rounds(sbuf *b, unsigned waiting, uint64_t withdrawn)
{
    sbuf_printf(b,
                "# HELP optd_round_contributions_waiting Step requests waiting for their worker round to fill.\n"
                "# TYPE optd_round_contributions_waiting gauge\noptd_round_contributions_waiting %u\n"
                "# HELP optd_round_contributions_withdrawn_total Contributions withdrawn from their round because "
                "the client hung up.\n# TYPE optd_round_contributions_withdrawn_total counter\n"
                "optd_round_contributions_withdrawn_total %llu\n",
                waiting, (unsigned long long)withdrawn);
}
