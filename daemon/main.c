/* daemon/main: the optd process. Parses flags and environment, opens the
 * store, starts the HTTP API, then waits in sigwait() for SIGTERM or SIGINT
 * and shuts down in order: http_stop (finishes requests in flight), then
 * store_close. SIGHUP reopens --log-file and never stops the daemon. Exit status: 0 after a clean shutdown or
 * --help/--version, 1 when the store or the API cannot start, 2 for bad flags. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "http/http.h"
#include "daemon/config.h"
#include "store/store.h"

extern char **environ;

/* Writes one line to stderr prefixed with an RFC 3339 UTC timestamp
 * (milliseconds). The API calls it from its threads: the whole line goes out
 * in one fprintf, which POSIX makes atomic with respect to other stdio calls
 * on the same stream, so lines never interleave. ctx is unused. */
static void log_line(void *ctx, const char *line)
{
    struct timespec ts;
    struct tm tm;
    char stamp[32];
    (void)ctx;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%s.%03ldZ %s\n", stamp, ts.tv_nsec / 1000000L, line);
}

/* Opens path for appending (created mode 0600: request lines name sessions)
 * and makes it the process's stderr, where every thread's log lines go.
 * dup2 swaps fd 2 in one step, so a line written meanwhile lands whole in
 * the old file or in the new one. Returns 0 or an errno value; on failure
 * stderr is left as it was. */
static int log_file_open(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    int rc = 0;
    if (fd < 0)
        return errno;
    if (dup2(fd, STDERR_FILENO) < 0)
        rc = errno;
    close(fd);
    return rc;
}

/* Blocks SIGTERM, SIGINT and SIGHUP in the calling thread, so in every
 * thread it starts afterwards (they inherit the mask): only sigwait() in
 * main sees them, and SIGHUP, whose default action kills, cannot. SIGPIPE is ignored so a client that hangs up
 * mid-reply costs an EPIPE, not the process. Returns 0 or an errno value. */
static int setup_signals(sigset_t *set)
{
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    if (sigaction(SIGPIPE, &ign, NULL) != 0)
        return errno;
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    return pthread_sigmask(SIG_BLOCK, set, NULL);
}

/* SIGHUP: reopens the log file (logrotate has renamed it); without one
 * there is nothing to do. A failure keeps logging to the old file. */
static void on_sighup(const daemon_config *cfg, int quiet)
{
    char line[DAEMON_PATH_MAX + 96];
    int rc;
    if (!cfg->log_file[0]) {
        if (!quiet)
            log_line(NULL, "SIGHUP: no --log-file to reopen; going on");
        return;
    }
    rc = log_file_open(cfg->log_file);
    if (rc != 0)
        snprintf(line, sizeof line, "SIGHUP: cannot reopen the log file %s: %s; still logging to the old one",
                 cfg->log_file, strerror(rc));
    else
        snprintf(line, sizeof line, "SIGHUP: reopened the log file %s", cfg->log_file);
    if (rc != 0 || !quiet)
        log_line(NULL, line);
}

/* The store's options from the daemon's flags. */
static void store_options_from(const daemon_config *cfg, store_options *sopt)
{
    memset(sopt, 0, sizeof *sopt); /* busy_timeout_ms 0: the store's default */
    sopt->sync_full = cfg->sync == DAEMON_SYNC_FULL;
    sopt->readers = (int)cfg->threads;
    sopt->wal_max_bytes = cfg->max_wal;
    /* Storage failures are errors: logged at every level. */
    sopt->log = log_line;
}

/* The HTTP server's settings from the daemon's flags (strings borrowed). */
static void http_config_from(const daemon_config *cfg, int quiet, http_config *acfg)
{
    memset(acfg, 0, sizeof *acfg);
    acfg->listen_host = cfg->listen_host;
    acfg->listen_port = cfg->listen_port;
    acfg->token = cfg->token[0] ? cfg->token : NULL;
    acfg->max_body = cfg->max_body;
    acfg->max_session_bytes = cfg->max_session_bytes;
    acfg->threads = cfg->threads;
    acfg->max_connections = cfg->max_connections;
    acfg->connection_timeout = cfg->connection_timeout;
    acfg->header_timeout = cfg->header_timeout;
    acfg->idempotency_window = cfg->idempotency_window;
    acfg->history_steps = cfg->history_steps;
    acfg->cache_bytes = cfg->cache_bytes;
    acfg->log = quiet ? NULL : log_line;
    acfg->backup_dir = cfg->backup_dir[0] ? cfg->backup_dir : NULL;
    acfg->peers = cfg->peers[0] ? cfg->peers : NULL;
}

/* Waits for SIGTERM or SIGINT (*sig), reopening the log on each SIGHUP.
 * Returns the exit status: 0, or 1 when sigwait fails. */
static int wait_for_stop(const sigset_t *set, const daemon_config *cfg, int quiet, int *sig)
{
    for (;;) {
        int rc = sigwait(set, sig);
        if (rc == EINTR)
            continue;
        if (rc != 0) {
            fprintf(stderr, "optd: sigwait: %s\n", strerror(rc));
            *sig = 0;
            return 1;
        }
        if (*sig != SIGHUP)
            return 0;
        on_sighup(cfg, quiet);
    }
}

int main(int argc, char **argv)
{
    daemon_config cfg;
    store_options sopt;
    http_config acfg;
    store *st = NULL;
    http_server *srv = NULL;
    sigset_t set;
    char err[DAEMON_PATH_MAX + 512];
    int sig = 0, rc;

    optd_err prc = daemon_config_parse(argc, argv, environ, &cfg, err, sizeof err);
    if (prc != OPTD_OK) {
        fprintf(stderr, "optd: %s\n", err);
        if (prc == OPTD_E_INVALID) {
            fprintf(stderr, "Try 'optd --help'.\n");
            return 2;
        }
        return 1;
    }
    if (cfg.show_help) {
        daemon_config_usage(stdout, "optd");
        return 0;
    }
    if (cfg.show_version) {
        printf("optd %s\n", OPTD_VERSION);
        return 0;
    }
    int quiet = cfg.log_level == DAEMON_LOG_QUIET;

    /* Before any thread exists: the store may start some, the API does. */
    rc = setup_signals(&set);
    if (rc != 0) {
        fprintf(stderr, "optd: cannot set up signals: %s\n", strerror(rc));
        return 1;
    }
    if (cfg.log_file[0] && (rc = log_file_open(cfg.log_file)) != 0) {
        fprintf(stderr, "optd: cannot open the log file %s: %s\n", cfg.log_file, strerror(rc));
        return 1;
    }
    store_options_from(&cfg, &sopt);
    if (store_open(cfg.db, &sopt, &st, err, sizeof err) != OPTD_OK) {
        fprintf(stderr, "optd: %s\n", err);
        return 1;
    }
    http_config_from(&cfg, quiet, &acfg);
    if (http_start(&acfg, st, &srv, err, sizeof err) != OPTD_OK) {
        fprintf(stderr, "optd: %s\n", err);
        store_close(st);
        return 1;
    }

    /* IPv6 addresses go in brackets in a URL. */
    int v6 = strchr(cfg.listen_host, ':') != NULL;
    printf("optd listening on http://%s%s%s:%u (db %s, sync %s, %s)\n", v6 ? "[" : "", cfg.listen_host, v6 ? "]" : "",
           (unsigned)http_port(srv), cfg.db, cfg.sync == DAEMON_SYNC_FULL ? "full" : "normal",
           cfg.token[0] ? "bearer token required" : "no token: requests need no auth");
    fflush(stdout);

    int status = wait_for_stop(&set, &cfg, quiet, &sig);
    if (!quiet) {
        char line[64];
        snprintf(line, sizeof line, "shutting down (%s)",
                 sig == SIGINT    ? "SIGINT"
                 : sig == SIGTERM ? "SIGTERM"
                                  : "error");
        log_line(NULL, line);
    }
    http_stop(srv);
    store_close(st);
    return status;
}
