/* Tests of daemon/config: defaults, every flag in both forms and from the
 * environment, precedence (flag over variable, token file over OPTD_TOKEN),
 * the token file's trailing newline, strict numbers and ranges, listen
 * addresses (IPv4, names, bracketed IPv6), and the errors, each of which
 * must name the flag. The environment is passed in, never read. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "daemon/config.h"

/* ARGS("--a", "b") expands to argc, argv with "optd" as argv[0];
 * ENV("A=1") to a NULL-terminated environment. */
#define ARGV(...) ((char *[]){"optd", __VA_ARGS__})
#define ARGS(...) (int)(sizeof ARGV(__VA_ARGS__) / sizeof(char *)), ARGV(__VA_ARGS__)
#define NO_ARGS 1, ((char *[]){"optd", NULL})
#define ENV(...) ((char *[]){__VA_ARGS__, NULL})

static daemon_config cfg;
static char err[8192];

static optd_err parse(char *const env[], int argc, char **argv)
{
    return daemon_config_parse(argc, argv, env, &cfg, err, sizeof err);
}

/* Asserts that hay contains needle, printing both when it does not. */
static void assert_contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle))
        fail_msg("'%s' does not contain '%s'", hay, needle);
}

/* Writes len bytes to a new temporary file; its path goes into path. */
static void write_temp(const void *data, size_t len, char *path, size_t pathlen)
{
    const char *dir = getenv("TMPDIR");
    snprintf(path, pathlen, "%s/optd_test_token_XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    assert_int_equal(close(fd), 0);
}

/* Parses --token-file with a file holding content; returns the result. */
static optd_err parse_token_file(const char *content, size_t len, char *const env[])
{
    char path[512];
    write_temp(content, len, path, sizeof path);
    optd_err rc = parse(env, ARGS("--token-file", path));
    unlink(path);
    return rc;
}

/* ---- Defaults ------------------------------------------------------------ */

static void test_defaults_are_the_documented_ones(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, NO_ARGS), OPTD_OK);
    assert_string_equal(cfg.listen_host, "127.0.0.1");
    assert_int_equal(cfg.listen_port, 8080);
    assert_string_equal(cfg.db, "./optd.db");
    assert_string_equal(cfg.token, "");
    assert_int_equal(cfg.max_body, 67108864);
    assert_int_equal(cfg.max_session_bytes, (size_t)512 << 20);
    assert_int_equal(cfg.threads, 4);
    assert_int_equal(cfg.sync, DAEMON_SYNC_FULL);
    assert_int_equal(cfg.idempotency_window, 10000);
    assert_int_equal(cfg.history_steps, 100000);
    assert_int_equal(cfg.max_connections, 1024);
    assert_int_equal(cfg.connection_timeout, 60);
    assert_int_equal(cfg.header_timeout, 30);
    assert_int_equal(cfg.cache_bytes, (size_t)256 << 20);
    assert_int_equal(cfg.log_level, DAEMON_LOG_INFO);
    assert_string_equal(cfg.log_file, "");
    assert_false(cfg.show_help);
    assert_false(cfg.show_version);
}

static void test_an_unrelated_environment_changes_nothing(void **state)
{
    (void)state;
    assert_int_equal(parse(ENV("PATH=/bin", "OPTD=1", "OPTD_THREADSX=9", "XOPTD_THREADS=9"), NO_ARGS), OPTD_OK);
    assert_int_equal(cfg.threads, 4);
}

/* ---- Every flag, three ways ---------------------------------------------- */

/* One setting: its flag, its variable, a value and a check that the value
 * landed, and another valid value to put in the variable to see the flag win. */
typedef struct setting_case {
    const char *flag;
    const char *env;
    const char *value;
    const char *other;
    void (*check)(const daemon_config *c);
} setting_case;

static void check_listen(const daemon_config *c)
{
    assert_string_equal(c->listen_host, "0.0.0.0");
    assert_int_equal(c->listen_port, 9001);
}
static void check_db(const daemon_config *c) { assert_string_equal(c->db, "/var/lib/optd/x.db"); }
static void check_max_body(const daemon_config *c) { assert_int_equal(c->max_body, 1000); }
static void check_max_session(const daemon_config *c) { assert_int_equal(c->max_session_bytes, (size_t)3 << 20); }
static void check_threads(const daemon_config *c) { assert_int_equal(c->threads, 16); }
static void check_sync(const daemon_config *c) { assert_int_equal(c->sync, DAEMON_SYNC_NORMAL); }
static void check_idem(const daemon_config *c) { assert_int_equal(c->idempotency_window, 5); }
static void check_history(const daemon_config *c) { assert_int_equal(c->history_steps, 0); }
static void check_max_conn(const daemon_config *c) { assert_int_equal(c->max_connections, 7); }
static void check_conn_timeout(const daemon_config *c) { assert_int_equal(c->connection_timeout, 2); }
static void check_header_timeout(const daemon_config *c) { assert_int_equal(c->header_timeout, 3); }
static void check_cache(const daemon_config *c) { assert_int_equal(c->cache_bytes, (size_t)3 << 20); }
static void check_log(const daemon_config *c) { assert_int_equal(c->log_level, DAEMON_LOG_QUIET); }
static void check_log_file(const daemon_config *c) { assert_string_equal(c->log_file, "/var/log/optd.log"); }
static void check_backup_dir(const daemon_config *c) { assert_string_equal(c->backup_dir, "/backups"); }
static void check_peers(const daemon_config *c)
{
    assert_string_equal(c->peers, "http://optd-0.optd:8080,https://[::1]:9/");
}

static const setting_case settings[] = {
    {"listen", "OPTD_LISTEN", "0.0.0.0:9001", "127.0.0.1:1", check_listen},
    {"db", "OPTD_DB", "/var/lib/optd/x.db", "other.db", check_db},
    {"max-body", "OPTD_MAX_BODY", "1000", "1K", check_max_body},
    {"max-session-bytes", "OPTD_MAX_SESSION_BYTES", "3M", "2048", check_max_session},
    {"threads", "OPTD_THREADS", "16", "2", check_threads},
    {"sync", "OPTD_SYNC", "normal", "full", check_sync},
    {"idempotency-window", "OPTD_IDEMPOTENCY_WINDOW", "5", "6", check_idem},
    {"history-steps", "OPTD_HISTORY_STEPS", "0", "9", check_history},
    {"max-connections", "OPTD_MAX_CONNECTIONS", "7", "8", check_max_conn},
    {"connection-timeout", "OPTD_CONNECTION_TIMEOUT", "2", "5", check_conn_timeout},
    {"header-timeout", "OPTD_HEADER_TIMEOUT", "3", "5", check_header_timeout},
    {"cache-mb", "OPTD_CACHE_MB", "3", "5", check_cache},
    {"log-level", "OPTD_LOG", "quiet", "info", check_log},
    {"log-file", "OPTD_LOG_FILE", "/var/log/optd.log", "other.log", check_log_file},
    {"backup-dir", "OPTD_BACKUP_DIR", "/backups", "/b2", check_backup_dir},
    {"peers", "OPTD_PEERS", "http://optd-0.optd:8080,https://[::1]:9/", "http://x:1", check_peers},
};
#define N_SETTINGS (sizeof settings / sizeof settings[0])

static void test_each_flag_takes_a_separate_value(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_SETTINGS; i++) {
        char flag[64];
        snprintf(flag, sizeof flag, "--%s", settings[i].flag);
        char *argv[] = {"optd", flag, (char *)settings[i].value, NULL};
        if (parse(NULL, 3, argv) != OPTD_OK)
            fail_msg("%s %s: %s", flag, settings[i].value, err);
        settings[i].check(&cfg);
    }
}

static void test_each_flag_takes_an_equals_value(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_SETTINGS; i++) {
        char arg[128];
        snprintf(arg, sizeof arg, "--%s=%s", settings[i].flag, settings[i].value);
        char *argv[] = {"optd", arg, NULL};
        if (parse(NULL, 2, argv) != OPTD_OK)
            fail_msg("%s: %s", arg, err);
        settings[i].check(&cfg);
    }
}

static void test_each_setting_falls_back_to_its_variable(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_SETTINGS; i++) {
        char var[128];
        snprintf(var, sizeof var, "%s=%s", settings[i].env, settings[i].value);
        if (parse(ENV("HOME=/root", var), NO_ARGS) != OPTD_OK)
            fail_msg("%s: %s", var, err);
        settings[i].check(&cfg);
    }
}

static void test_each_flag_beats_its_variable(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_SETTINGS; i++) {
        char var[128], arg[128];
        snprintf(var, sizeof var, "%s=%s", settings[i].env, settings[i].other);
        snprintf(arg, sizeof arg, "--%s=%s", settings[i].flag, settings[i].value);
        char *argv[] = {"optd", arg, NULL};
        if (parse(ENV(var), 2, argv) != OPTD_OK)
            fail_msg("%s with %s: %s", arg, var, err);
        settings[i].check(&cfg);
    }
}

static void test_a_flag_beats_a_bad_variable(void **state)
{
    (void)state;
    assert_int_equal(parse(ENV("OPTD_THREADS=lots"), ARGS("--threads", "2")), OPTD_OK);
    assert_int_equal(cfg.threads, 2);
}

static void test_the_last_of_a_repeated_flag_wins(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--threads", "2", "--threads=3")), OPTD_OK);
    assert_int_equal(cfg.threads, 3);
}

static void test_an_equals_value_may_contain_equals_and_start_with_dashes(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--db=--a=b.db")), OPTD_OK);
    assert_string_equal(cfg.db, "--a=b.db");
}

/* ---- Numbers --------------------------------------------------------------- */

static void test_max_body_takes_k_m_g_suffixes_in_powers_of_1024(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        size_t want;
    } cases[] = {{"1K", 1024}, {"1k", 1024}, {"64M", 64u << 20}, {"2G", (size_t)2 << 30}, {"1", 1}, {"0K", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        optd_err rc = parse(NULL, ARGS("--max-body", (char *)cases[i].in));
        if (cases[i].want == 0) {
            assert_int_equal(rc, OPTD_E_INVALID); /* 0 bytes is below the range */
            assert_contains(err, "--max-body");
            continue;
        }
        if (rc != OPTD_OK)
            fail_msg("%s: %s", cases[i].in, err);
        assert_int_equal(cfg.max_body, cases[i].want);
    }
}

static void test_cache_mb_is_stored_in_bytes(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--cache-mb", "0")), OPTD_OK);
    assert_int_equal(cfg.cache_bytes, 0);
    assert_int_equal(parse(NULL, ARGS("--cache-mb", "1048576")), OPTD_OK);
    assert_int_equal(cfg.cache_bytes, (size_t)1 << 40);
}

static void test_bad_numbers_are_rejected_naming_the_flag(void **state)
{
    (void)state;
    static const struct {
        const char *flag, *value;
    } cases[] = {
        {"threads", "abc"},
        {"threads", ""},
        {"threads", "-1"},
        {"threads", "+4"},
        {"threads", " 4"},
        {"threads", "4 "},
        {"threads", "4x"},
        {"threads", "0x10"},
        {"threads", "1.5"},
        {"threads", "0"},
        {"threads", "1025"},
        {"threads", "99999999999999999999999"},
        {"threads", "4294967297"}, /* would wrap to 1 in an unsigned */
        {"max-body", "1T"},
        {"max-body", "64MB"},
        {"max-body", "K"},
        {"max-body", "0"},
        {"max-body", "18446744073709551615G"},
        {"idempotency-window", "0"},
        {"history-steps", "-0"},
        {"max-connections", "0"},
        {"connection-timeout", "0"},
        {"header-timeout", "3601"},
        {"cache-mb", "1048577"},
        {"cache-mb", "1M"},
        {"max-session-bytes", "901M"}, /* past what SQLite stores in one value */
        {"max-session-bytes", "1G"},
        {"max-session-bytes", "1023"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char flag[64];
        snprintf(flag, sizeof flag, "--%s", cases[i].flag);
        if (parse(NULL, ARGS(flag, (char *)cases[i].value)) != OPTD_E_INVALID)
            fail_msg("%s '%s' was accepted", flag, cases[i].value);
        assert_contains(err, flag);
        /* The equals form fails the same way. */
        char arg[128];
        snprintf(arg, sizeof arg, "%s=%s", flag, cases[i].value);
        char *argv[] = {"optd", arg, NULL};
        assert_int_equal(parse(NULL, 2, argv), OPTD_E_INVALID);
        assert_contains(err, flag);
    }
}

static void test_a_bad_variable_is_rejected_naming_it_and_its_flag(void **state)
{
    (void)state;
    assert_int_equal(parse(ENV("OPTD_THREADS=lots"), NO_ARGS), OPTD_E_INVALID);
    assert_contains(err, "OPTD_THREADS");
    assert_contains(err, "--threads");
    assert_contains(err, "lots");
    assert_int_equal(parse(ENV("OPTD_MAX_BODY="), NO_ARGS), OPTD_E_INVALID);
    assert_contains(err, "OPTD_MAX_BODY");
}

/* ---- Choices --------------------------------------------------------------- */

static void test_sync_accepts_only_full_and_normal(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--sync", "full")), OPTD_OK);
    assert_int_equal(cfg.sync, DAEMON_SYNC_FULL);
    assert_int_equal(parse(NULL, ARGS("--sync", "normal")), OPTD_OK);
    assert_int_equal(cfg.sync, DAEMON_SYNC_NORMAL);
    static const char *const bad[] = {"off", "FULL", "", "full ", "extra"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(parse(NULL, ARGS("--sync", (char *)bad[i])), OPTD_E_INVALID);
        assert_contains(err, "--sync");
        assert_contains(err, "full|normal");
    }
    assert_int_equal(parse(ENV("OPTD_SYNC=off"), NO_ARGS), OPTD_E_INVALID);
    assert_contains(err, "OPTD_SYNC");
}

static void test_log_level_accepts_only_quiet_and_info(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--log-level=info")), OPTD_OK);
    assert_int_equal(cfg.log_level, DAEMON_LOG_INFO);
    assert_int_equal(parse(NULL, ARGS("--log-level=debug")), OPTD_E_INVALID);
    assert_contains(err, "--log-level");
}

/* ---- Listen addresses ------------------------------------------------------- */

static void test_listen_parses_ipv4_names_and_bracketed_ipv6(void **state)
{
    (void)state;
    static const struct {
        const char *in, *host;
        unsigned port;
    } cases[] = {
        {"127.0.0.1:8080", "127.0.0.1", 8080},
        {"0.0.0.0:0", "0.0.0.0", 0},
        {":9000", "0.0.0.0", 9000},
        {"localhost:65535", "localhost", 65535},
        {"my-host.example.com:80", "my-host.example.com", 80},
        {"[::1]:8080", "::1", 8080},
        {"[::]:0", "::", 0},
        {"[2001:db8::42]:443", "2001:db8::42", 443},
        {"[::ffff:127.0.0.1]:1", "::ffff:127.0.0.1", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (parse(NULL, ARGS("--listen", (char *)cases[i].in)) != OPTD_OK)
            fail_msg("%s: %s", cases[i].in, err);
        assert_string_equal(cfg.listen_host, cases[i].host);
        assert_int_equal(cfg.listen_port, cases[i].port);
    }
}

static void test_listen_rejects_malformed_addresses(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "127.0.0.1",                                                           /* no port */
        "127.0.0.1:",                                                          /* empty port */
        "127.0.0.1:65536",                                                     /* port out of range */
        "127.0.0.1:-1",    "127.0.0.1:80x", "127.0.0.1:+80", "::1:8080",       /* IPv6 without brackets */
        "[::1]8080",                                                           /* no colon after the bracket */
        "[::1]:",          "[::1",          "[]:80",         "[127.0.0.1]:80", /* brackets hold IPv6 only */
        "[zz::1]:80",      "1.2.3:80", /* all digits and dots but not a dotted quad */
        "999.1.1.1:80",    "bad_host:80",   "ho st:80",      "",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (parse(NULL, ARGS("--listen", (char *)bad[i])) != OPTD_E_INVALID)
            fail_msg("--listen '%s' was accepted as %s port %u", bad[i], cfg.listen_host, cfg.listen_port);
        assert_contains(err, "--listen");
    }
    assert_int_equal(parse(NULL, ARGS("--listen", "::1:8080")), OPTD_E_INVALID);
    assert_contains(err, "brackets");
}

/* ---- Tokens ------------------------------------------------------------------- */

static void test_token_file_loses_one_trailing_newline(void **state)
{
    (void)state;
    assert_int_equal(parse_token_file("s3cret\n", 7, NULL), OPTD_OK);
    assert_string_equal(cfg.token, "s3cret");
}

static void test_token_file_loses_one_trailing_crlf(void **state)
{
    (void)state;
    assert_int_equal(parse_token_file("s3cret\r\n", 8, NULL), OPTD_OK);
    assert_string_equal(cfg.token, "s3cret");
}

static void test_token_file_without_newline_is_taken_whole(void **state)
{
    (void)state;
    assert_int_equal(parse_token_file("s3cret", 6, NULL), OPTD_OK);
    assert_string_equal(cfg.token, "s3cret");
}

static void test_token_file_keeps_no_second_newline_or_lone_cr(void **state)
{
    (void)state;
    /* Only one newline is stripped; what is left is not a valid token, and
     * saying so beats silently refusing every client. */
    assert_int_equal(parse_token_file("s3cret\n\n", 8, NULL), OPTD_E_INVALID);
    assert_contains(err, "--token-file");
    assert_int_equal(parse_token_file("s3cret\r", 7, NULL), OPTD_E_INVALID);
    assert_int_equal(parse_token_file("two words\n", 10, NULL), OPTD_E_INVALID);
}

static void test_an_empty_token_file_is_an_error(void **state)
{
    (void)state;
    assert_int_equal(parse_token_file("", 0, NULL), OPTD_E_INVALID);
    assert_contains(err, "--token-file");
    assert_contains(err, "empty");
    assert_int_equal(parse_token_file("\n", 1, NULL), OPTD_E_INVALID);
    assert_int_equal(parse_token_file("\r\n", 2, NULL), OPTD_E_INVALID);
}

static void test_an_overlong_token_file_is_an_error(void **state)
{
    (void)state;
    static char big[DAEMON_TOKEN_MAX + 8];
    memset(big, 'a', sizeof big);
    assert_int_equal(parse_token_file(big, DAEMON_TOKEN_MAX - 1, NULL), OPTD_OK);
    assert_int_equal(strlen(cfg.token), DAEMON_TOKEN_MAX - 1);
    big[DAEMON_TOKEN_MAX - 1] = '\n';
    assert_int_equal(parse_token_file(big, DAEMON_TOKEN_MAX, NULL), OPTD_OK);
    big[DAEMON_TOKEN_MAX - 1] = '\r';
    big[DAEMON_TOKEN_MAX] = '\n';
    assert_int_equal(parse_token_file(big, DAEMON_TOKEN_MAX + 1, NULL), OPTD_OK);
    assert_int_equal(strlen(cfg.token), DAEMON_TOKEN_MAX - 1);
    memset(big, 'a', sizeof big);
    assert_int_equal(parse_token_file(big, DAEMON_TOKEN_MAX, NULL), OPTD_E_INVALID);
    assert_int_equal(parse_token_file(big, sizeof big, NULL), OPTD_E_INVALID);
    assert_contains(err, "--token-file");
}

static void test_a_missing_token_file_is_unavailable_and_named(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--token-file", "/nonexistent/optd/token")), OPTD_E_UNAVAILABLE);
    assert_contains(err, "--token-file");
    assert_contains(err, "/nonexistent/optd/token");
    assert_int_equal(parse(NULL, ARGS("--token-file=")), OPTD_E_INVALID);
}

static void test_optd_token_is_the_token_itself(void **state)
{
    (void)state;
    assert_int_equal(parse(ENV("OPTD_TOKEN=abc.DEF-123"), NO_ARGS), OPTD_OK);
    assert_string_equal(cfg.token, "abc.DEF-123");
}

static void test_an_empty_or_spaced_optd_token_is_an_error(void **state)
{
    (void)state;
    assert_int_equal(parse(ENV("OPTD_TOKEN="), NO_ARGS), OPTD_E_INVALID);
    assert_contains(err, "OPTD_TOKEN");
    assert_int_equal(parse(ENV("OPTD_TOKEN=a b"), NO_ARGS), OPTD_E_INVALID);
    assert_contains(err, "OPTD_TOKEN");
}

static void test_token_file_beats_optd_token(void **state)
{
    (void)state;
    assert_int_equal(parse_token_file("fromfile\n", 9, ENV("OPTD_TOKEN=fromenv")), OPTD_OK);
    assert_string_equal(cfg.token, "fromfile");
    /* OPTD_TOKEN is not even checked when a file gives the token. */
    assert_int_equal(parse_token_file("fromfile\n", 9, ENV("OPTD_TOKEN=")), OPTD_OK);
    assert_string_equal(cfg.token, "fromfile");
}

static void test_optd_token_file_variable_works_and_beats_optd_token(void **state)
{
    (void)state;
    char path[512], var[600];
    write_temp("envfile\n", 8, path, sizeof path);
    snprintf(var, sizeof var, "OPTD_TOKEN_FILE=%s", path);
    optd_err rc = parse(ENV(var, "OPTD_TOKEN=fromenv"), NO_ARGS);
    unlink(path);
    assert_int_equal(rc, OPTD_OK);
    assert_string_equal(cfg.token, "envfile");
    assert_int_equal(parse(ENV("OPTD_TOKEN_FILE=/nonexistent/t"), NO_ARGS), OPTD_E_UNAVAILABLE);
    assert_contains(err, "OPTD_TOKEN_FILE");
}

/* ---- Command-line shape ------------------------------------------------------- */

static void test_an_unknown_flag_is_rejected_by_name(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--listen", ":1", "--bogus", "1")), OPTD_E_INVALID);
    assert_contains(err, "--bogus");
    assert_int_equal(parse(NULL, ARGS("--bogus=1")), OPTD_E_INVALID);
    assert_contains(err, "'--bogus'");
    assert_int_equal(parse(NULL, ARGS("--thread", "4")), OPTD_E_INVALID); /* no prefix matching */
    assert_contains(err, "--thread");
}

static void test_positional_and_short_arguments_are_rejected(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("serve")), OPTD_E_INVALID);
    assert_contains(err, "serve");
    assert_int_equal(parse(NULL, ARGS("-h")), OPTD_E_INVALID);
    assert_int_equal(parse(NULL, ARGS("--")), OPTD_E_INVALID);
}

static void test_a_missing_value_is_rejected_naming_the_flag(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--threads")), OPTD_E_INVALID);
    assert_contains(err, "--threads");
    assert_contains(err, "needs a value");
    assert_int_equal(parse(NULL, ARGS("--db", "--threads", "4")), OPTD_E_INVALID);
    assert_contains(err, "--db");
    assert_int_equal(parse(NULL, ARGS("--db=")), OPTD_E_INVALID);
    assert_contains(err, "--db");
}

static void test_an_overlong_db_path_is_rejected(void **state)
{
    (void)state;
    static char arg[DAEMON_PATH_MAX + 16];
    memset(arg, 'a', sizeof arg - 1);
    memcpy(arg, "--db=", 5);
    char *argv[] = {"optd", arg, NULL};
    assert_int_equal(parse(NULL, 2, argv), OPTD_E_INVALID);
    assert_contains(err, "--db");
}

static void test_help_and_version_stop_parsing(void **state)
{
    (void)state;
    assert_int_equal(parse(ENV("OPTD_THREADS=bad"), ARGS("--help")), OPTD_OK);
    assert_true(cfg.show_help);
    assert_int_equal(parse(NULL, ARGS("--threads", "2", "--help", "--bogus")), OPTD_OK);
    assert_true(cfg.show_help);
    assert_int_equal(parse(NULL, ARGS("--version")), OPTD_OK);
    assert_true(cfg.show_version);
    assert_false(cfg.show_help);
    assert_int_equal(parse(NULL, ARGS("--help=yes")), OPTD_E_INVALID);
    assert_contains(err, "--help");
}

static void test_errors_fit_a_small_buffer_and_a_null_one(void **state)
{
    (void)state;
    char small[8];
    memset(small, 'x', sizeof small);
    assert_int_equal(daemon_config_parse(ARGS("--bogus"), NULL, &cfg, small, sizeof small), OPTD_E_INVALID);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_int_equal(daemon_config_parse(ARGS("--bogus"), NULL, &cfg, NULL, 0), OPTD_E_INVALID);
}

static void test_max_session_bytes_takes_its_maximum_and_no_more(void **state)
{
    (void)state;
    assert_int_equal(parse(NULL, ARGS("--max-session-bytes", "900M")), OPTD_OK);
    assert_int_equal(cfg.max_session_bytes, (size_t)900 << 20);
    assert_int_equal(parse(NULL, ARGS("--max-session-bytes", "943718401")), OPTD_E_INVALID);
    assert_contains(err, "943718400");
}

static void test_usage_lists_every_flag_variable_and_default(void **state)
{
    (void)state;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    assert_non_null(f);
    daemon_config_usage(f, "optd");
    fclose(f);
    static const char *const want[] = {
        "--listen",
        "OPTD_LISTEN",
        "127.0.0.1:8080",
        "--db",
        "OPTD_DB",
        "./optd.db",
        "--token-file",
        "OPTD_TOKEN_FILE",
        "OPTD_TOKEN=",
        "--max-body",
        "OPTD_MAX_BODY",
        "64M",
        "--max-session-bytes",
        "OPTD_MAX_SESSION_BYTES",
        "512M",
        "at most 900M",
        "--threads",
        "OPTD_THREADS",
        "--sync",
        "OPTD_SYNC",
        "full|normal",
        "--idempotency-window",
        "OPTD_IDEMPOTENCY_WINDOW",
        "10000",
        "--history-steps",
        "OPTD_HISTORY_STEPS",
        "100000",
        "--max-connections",
        "OPTD_MAX_CONNECTIONS",
        "1024",
        "--connection-timeout",
        "OPTD_CONNECTION_TIMEOUT",
        "--header-timeout",
        "OPTD_HEADER_TIMEOUT",
        "--cache-mb",
        "OPTD_CACHE_MB",
        "256",
        "--log-level",
        "OPTD_LOG",
        "quiet|info",
        "--log-file",
        "OPTD_LOG_FILE",
        "SIGHUP",
        "--help",
        "--version",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        assert_contains(text, want[i]);
    free(text);
}

static void test_peers_must_be_base_urls(void **state)
{
    (void)state;
    static const char *const bad[] = {"optd-0:8080",  "ftp://x",    "http://", "http://a/v1",
                                      "http://u@h:1", "http://h?x", ",",       "http://a,b:1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *argv[] = {"optd", "--peers", (char *)bad[i], NULL};
        if (parse(NULL, 3, argv) != OPTD_E_INVALID)
            fail_msg("--peers %s was accepted", bad[i]);
        assert_contains(err, "--peers");
    }
    assert_int_equal(parse(NULL, NO_ARGS), OPTD_OK);
    assert_string_equal(cfg.peers, "");
    assert_string_equal(cfg.backup_dir, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_are_the_documented_ones),
        cmocka_unit_test(test_an_unrelated_environment_changes_nothing),
        cmocka_unit_test(test_each_flag_takes_a_separate_value),
        cmocka_unit_test(test_each_flag_takes_an_equals_value),
        cmocka_unit_test(test_each_setting_falls_back_to_its_variable),
        cmocka_unit_test(test_each_flag_beats_its_variable),
        cmocka_unit_test(test_a_flag_beats_a_bad_variable),
        cmocka_unit_test(test_the_last_of_a_repeated_flag_wins),
        cmocka_unit_test(test_peers_must_be_base_urls),
        cmocka_unit_test(test_an_equals_value_may_contain_equals_and_start_with_dashes),
        cmocka_unit_test(test_max_body_takes_k_m_g_suffixes_in_powers_of_1024),
        cmocka_unit_test(test_cache_mb_is_stored_in_bytes),
        cmocka_unit_test(test_max_session_bytes_takes_its_maximum_and_no_more),
        cmocka_unit_test(test_bad_numbers_are_rejected_naming_the_flag),
        cmocka_unit_test(test_a_bad_variable_is_rejected_naming_it_and_its_flag),
        cmocka_unit_test(test_sync_accepts_only_full_and_normal),
        cmocka_unit_test(test_log_level_accepts_only_quiet_and_info),
        cmocka_unit_test(test_listen_parses_ipv4_names_and_bracketed_ipv6),
        cmocka_unit_test(test_listen_rejects_malformed_addresses),
        cmocka_unit_test(test_token_file_loses_one_trailing_newline),
        cmocka_unit_test(test_token_file_loses_one_trailing_crlf),
        cmocka_unit_test(test_token_file_without_newline_is_taken_whole),
        cmocka_unit_test(test_token_file_keeps_no_second_newline_or_lone_cr),
        cmocka_unit_test(test_an_empty_token_file_is_an_error),
        cmocka_unit_test(test_an_overlong_token_file_is_an_error),
        cmocka_unit_test(test_a_missing_token_file_is_unavailable_and_named),
        cmocka_unit_test(test_optd_token_is_the_token_itself),
        cmocka_unit_test(test_an_empty_or_spaced_optd_token_is_an_error),
        cmocka_unit_test(test_token_file_beats_optd_token),
        cmocka_unit_test(test_optd_token_file_variable_works_and_beats_optd_token),
        cmocka_unit_test(test_an_unknown_flag_is_rejected_by_name),
        cmocka_unit_test(test_positional_and_short_arguments_are_rejected),
        cmocka_unit_test(test_a_missing_value_is_rejected_naming_the_flag),
        cmocka_unit_test(test_an_overlong_db_path_is_rejected),
        cmocka_unit_test(test_help_and_version_stop_parsing),
        cmocka_unit_test(test_errors_fit_a_small_buffer_and_a_null_one),
        cmocka_unit_test(test_usage_lists_every_flag_variable_and_default),
    };
    return cmocka_run_group_tests_name("daemon_config", tests, NULL, NULL) ? 1 : 0;
}
