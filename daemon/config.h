/* daemon/config: optd's settings from the command line and the environment.
 * One table in config.c gives every setting its flag, its environment
 * variable, its default, its range and its help line; parsing, defaults and
 * --help all derive from it. A flag beats its variable, which beats the
 * default. Nothing here reads the real environment or exits: the caller
 * passes envp, which keeps the parser testable. */
#ifndef OPTD_DAEMON_CONFIG_H
#define OPTD_DAEMON_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/err.h"

#ifndef OPTD_VERSION
#define OPTD_VERSION "0.1.0"
#endif

#define DAEMON_HOST_MAX 256   /* bytes for a host name or address, with its NUL */
#define DAEMON_PATH_MAX 4096  /* bytes for a path, with its NUL */
#define DAEMON_TOKEN_MAX 4096 /* bytes for a token, with its NUL */

typedef enum daemon_sync { DAEMON_SYNC_FULL, DAEMON_SYNC_NORMAL } daemon_sync;
typedef enum daemon_log_level { DAEMON_LOG_QUIET, DAEMON_LOG_INFO } daemon_log_level;

/* Every setting of the daemon. Plain data: no pointers, nothing to free. */
typedef struct daemon_config {
    char listen_host[DAEMON_HOST_MAX]; /* "127.0.0.1", "::1" (no brackets), "0.0.0.0", a name */
    uint16_t listen_port;              /* 0 lets the kernel pick one */
    char db[DAEMON_PATH_MAX];          /* database file */
    char log_file[DAEMON_PATH_MAX];    /* log file; "" logs to stderr */
    char token[DAEMON_TOKEN_MAX];      /* bearer token; "" when none is configured */
    size_t max_body;                   /* bytes */
    size_t max_session_bytes;          /* bytes of state one session may have */
    unsigned threads;                  /* request threads, also the store's readers */
    daemon_sync sync;
    uint64_t max_wal;            /* bytes of -wal past which writes are refused */
    uint64_t idempotency_window; /* steps an Idempotency-Key is remembered */
    uint64_t history_steps;      /* history rows kept per session */
    unsigned max_connections;
    unsigned connection_timeout; /* seconds an idle connection is kept */
    unsigned header_timeout;     /* seconds a request head may take from its first byte */
    size_t cache_bytes;          /* bytes of session state the writer caches (--cache-mb) */
    daemon_log_level log_level;
    char backup_dir[DAEMON_PATH_MAX]; /* where POST /v1/backups writes; "" when backups are off */
    char peers[DAEMON_PATH_MAX];      /* the other shards' base URLs, comma-separated; "" for none */
    int show_help;                    /* --help was given: print usage, exit 0 */
    int show_version;                 /* --version was given: print the version, exit 0 */
} daemon_config;

/* Fills *out from argv (argv[0] is the program name and is skipped) and envp
 * (a NULL-terminated array of "NAME=value" strings, as environ; NULL means
 * an empty environment). Flags take `--flag value` or `--flag=value`; the last
 * of a repeated flag wins. --token-file (or OPTD_TOKEN_FILE) is read here;
 * it beats OPTD_TOKEN. When --help or --version is seen, parsing stops there
 * with the matching field set, and the environment is not looked at.
 *
 * Returns OPTD_OK; OPTD_E_INVALID when a flag is unknown, lacks its value or
 * has a bad one, or a variable has a bad value, or the token is empty or not
 * printable ASCII (err names the flag, and the variable when the value came
 * from there); OPTD_E_UNAVAILABLE when the token file cannot be read. On
 * failure *out holds no meaningful settings. err may be NULL when errlen is 0. */
optd_err daemon_config_parse(int argc, char *const argv[], char *const envp[], daemon_config *out, char *err,
                             size_t errlen);

/* Writes the --help text to f: every flag with its variable and default. */
void daemon_config_usage(FILE *f, const char *prog);

#endif
