/* daemon/config: parses optd's flags and environment into a daemon_config.
 * The options[] table below is the one source of every flag's name,
 * variable, default, range and help line: parsing, defaults (each default is
 * parsed as if it had been given) and --help all read it. */
#include "daemon/config.h"

#include <arpa/inet.h>
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

typedef enum opt_kind {
    K_LISTEN,     /* HOST:PORT into listen_host and listen_port */
    K_PATH,       /* a non-empty path into a char array */
    K_TOKEN_FILE, /* a path whose content becomes token */
    K_TOKEN,      /* the token itself (environment only) */
    K_UINT,       /* a decimal number, times scale */
    K_BYTES,      /* a decimal number with an optional K, M or G (1024-based) */
    K_CHOICE,     /* one of choices[]; its index into an enum field */
    K_URLS        /* comma-separated http:// or https:// base URLs into a char array */
} opt_kind;

typedef struct opt_def {
    const char *flag; /* without "--"; NULL for a variable with no flag */
    const char *env;
    const char *metavar;
    const char *def; /* default, as text parsed like a given value; NULL: none */
    opt_kind kind;
    uint64_t min, max;   /* range of the value as written (before scale) */
    uint64_t scale;      /* K_UINT: the field holds value * scale */
    size_t offset, size; /* the field in daemon_config */
    const char *const *choices;
    const char *help;
} opt_def;

#define FIELD(m) offsetof(daemon_config, m), sizeof(((daemon_config *)0)->m)
#define NONE 0, 0

#define KIB ((uint64_t)1 << 10)
#define MIB ((uint64_t)1 << 20)
#define TIB ((uint64_t)1 << 40)
#define BYTES_MAX ((uint64_t)SIZE_MAX < TIB ? (uint64_t)SIZE_MAX : TIB)
/* The largest session state the store can hold: SQLite refuses a value (and
 * a row) over 1e9 bytes, and the state is one value. 900 MiB leaves room for
 * the row around it. */
#define SESSION_BYTES_MAX (900 * MIB)

/* Indexed by daemon_sync and daemon_log_level. */
static const char *const sync_names[] = {"full", "normal", NULL};
static const char *const log_names[] = {"quiet", "info", NULL};

_Static_assert(sizeof(daemon_sync) == sizeof(unsigned), "enum fields are stored as unsigned");
_Static_assert(sizeof(daemon_log_level) == sizeof(unsigned), "enum fields are stored as unsigned");

static const opt_def options[] = {
    {"listen", "OPTD_LISTEN", "HOST:PORT", "127.0.0.1:8080", K_LISTEN, 0, 65535, 1, NONE, NULL,
     "address to listen on; [::1]:PORT for IPv6, :PORT for every IPv4\n"
     "      interface; port 0 picks a free one"},
    {"db", "OPTD_DB", "PATH", "./optd.db", K_PATH, 0, 0, 1, FIELD(db), NULL,
     "SQLite database file, created when absent"},
    {"token-file", "OPTD_TOKEN_FILE", "FILE", NULL, K_TOKEN_FILE, 0, 0, 1, NONE, NULL,
     "file holding the bearer token, less one trailing newline; without a\n"
     "      token (here or in OPTD_TOKEN) requests need no auth"},
    {NULL, "OPTD_TOKEN", "TOKEN", NULL, K_TOKEN, 0, 0, 1, NONE, NULL,
     "the bearer token itself; a token file wins over it"},
    {"max-body", "OPTD_MAX_BODY", "BYTES", "64M", K_BYTES, 1, BYTES_MAX, 1, FIELD(max_body), NULL,
     "largest request body; K, M, G suffixes are powers of 1024"},
    {"max-session-bytes", "OPTD_MAX_SESSION_BYTES", "BYTES", "512M", K_BYTES, KIB, SESSION_BYTES_MAX, 1,
     FIELD(max_session_bytes), NULL,
     "largest state of one session (params and optimizer buffers); a create,\n"
     "      PUT .../state or fork past it is 422 too_large; at most 900M (SQLite\n"
     "      stores values up to 1e9 bytes)"},
    {"threads", "OPTD_THREADS", "N", "4", K_UINT, 1, 1024, 1, FIELD(threads), NULL,
     "request threads (and database read connections)"},
    {"sync", "OPTD_SYNC", "full|normal", "full", K_CHOICE, 0, 0, 1, FIELD(sync), sync_names,
     "SQLite synchronous mode; normal may lose the last commits on power loss"},
    {"max-wal", "OPTD_MAX_WAL", "BYTES", "1G", K_BYTES, MIB, BYTES_MAX, 1, FIELD(max_wal), NULL,
     "-wal file size past which writes are refused (503, logged) until\n"
     "      checkpoints catch up; they restart it at 64M in normal running"},
    {"idempotency-window", "OPTD_IDEMPOTENCY_WINDOW", "N", "10000", K_UINT, 1, 1000000000, 1, FIELD(idempotency_window),
     NULL, "steps of a session an Idempotency-Key is remembered for"},
    {"history-steps", "OPTD_HISTORY_STEPS", "N", "100000", K_UINT, 0, 1000000000, 1, FIELD(history_steps), NULL,
     "history rows kept per session"},
    {"max-connections", "OPTD_MAX_CONNECTIONS", "N", "1024", K_UINT, 1, 1000000, 1, FIELD(max_connections), NULL,
     "connections served at once; more are refused (steps waiting in\n"
     "      worker rounds do not count: as many again may wait)"},
    {"connection-timeout", "OPTD_CONNECTION_TIMEOUT", "SECONDS", "60", K_UINT, 1, 86400, 1, FIELD(connection_timeout),
     NULL, "an idle connection is closed after this long"},
    {"header-timeout", "OPTD_HEADER_TIMEOUT", "SECONDS", "30", K_UINT, 1, 3600, 1, FIELD(header_timeout), NULL,
     "a request head must arrive whole within this long of its first byte"},
    {"cache-mb", "OPTD_CACHE_MB", "N", "256", K_UINT, 0, 1048576, MIB, FIELD(cache_bytes), NULL,
     "MiB of session state kept in memory"},
    {"log-level", "OPTD_LOG", "quiet|info", "info", K_CHOICE, 0, 0, 1, FIELD(log_level), log_names,
     "info logs one line per request to stderr; quiet logs errors only"},
    {"log-file", "OPTD_LOG_FILE", "PATH", NULL, K_PATH, 0, 0, 1, FIELD(log_file), NULL,
     "append the log to this file (mode 0600) instead of stderr; SIGHUP\n"
     "      reopens it, for log rotation"},
    {"backup-dir", "OPTD_BACKUP_DIR", "DIR", NULL, K_PATH, 0, 0, 1, FIELD(backup_dir), NULL,
     "directory POST /v1/backups writes online backups into (made when\n"
     "      absent); without it backups are off"},
    {"peers", "OPTD_PEERS", "URL,URL,...", NULL, K_URLS, 0, 0, 1, FIELD(peers), NULL,
     "the other shards (http://HOST:PORT each) that GET /v1/sessions?scope=cluster\n"
     "      lists with this one; the daemon's own URL may be among them"},
};

#define N_OPTIONS (sizeof options / sizeof options[0])

/* The value of name in envp, or NULL. */
static const char *env_lookup(char *const envp[], const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; envp && envp[i]; i++)
        if (strncmp(envp[i], name, n) == 0 && envp[i][n] == '=')
            return envp[i] + n + 1;
    return NULL;
}

/* Stores v into an unsigned integer field of o->size bytes. The table's
 * ranges make every value fit; a misfit is a bug in the table. */
static void set_uint(daemon_config *c, const opt_def *o, uint64_t v)
{
    char *p = (char *)c + o->offset;
    if (o->size == sizeof(uint16_t)) {
        uint16_t x = (uint16_t)v;
        assert(x == v);
        memcpy(p, &x, sizeof x);
    } else if (o->size == sizeof(uint32_t)) {
        uint32_t x = (uint32_t)v;
        assert(x == v);
        memcpy(p, &x, sizeof x);
    } else {
        assert(o->size == sizeof(uint64_t));
        memcpy(p, &v, sizeof v);
    }
}

/* Parses a decimal number strictly: digits only (no sign, no space), no
 * overflow. *end is set past the digits; trailing text is the caller's. */
static int parse_digits(const char *s, uint64_t *out, const char **end)
{
    char *e;
    if (!isdigit((unsigned char)s[0]))
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &e, 10);
    if (errno == ERANGE)
        return -1;
    *out = v;
    *end = e;
    return 0;
}

/* Parses a number within [o->min, o->max] (K_BYTES: after its suffix is
 * applied). On failure writes the reason, without the flag, into why. */
static int parse_flag_number(const opt_def *o, const char *s, uint64_t *out, char *why, size_t whylen)
{
    uint64_t v, mult = 1;
    const char *end;
    if (parse_digits(s, &v, &end)) {
        snprintf(why, whylen, "'%s' is not a whole number%s", s,
                 isdigit((unsigned char)s[0]) ? " that fits in 64 bits" : "");
        return -1;
    }
    if (o->kind == K_BYTES && *end) {
        switch (toupper((unsigned char)*end)) {
        case 'K':
            mult = KIB;
            break;
        case 'M':
            mult = MIB;
            break;
        case 'G':
            mult = (uint64_t)1 << 30;
            break;
        default:
            mult = 0;
            break;
        }
        if (mult)
            end++;
    }
    if (*end || !mult) {
        snprintf(why, whylen, "'%s' is not a whole number%s", s, o->kind == K_BYTES ? " (with K, M or G)" : "");
        return -1;
    }
    if (v > UINT64_MAX / mult || v * mult < o->min || v * mult > o->max) {
        snprintf(why, whylen, "'%s' is out of range %llu..%llu", s, (unsigned long long)o->min,
                 (unsigned long long)o->max);
        return -1;
    }
    *out = v * mult;
    return 0;
}

/* Whether s is a plausible host name: letters, digits, dots and hyphens, and
 * a dotted quad when it is all digits and dots. Resolving it is the API's job. */
static int host_ok(const char *s, size_t n)
{
    int name = 0;
    char buf[DAEMON_HOST_MAX];
    if (n == 0 || n >= sizeof buf)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!isalnum(ch) && ch != '.' && ch != '-')
            return 0;
        if (isalpha(ch) || ch == '-')
            name = 1;
    }
    if (name)
        return 1;
    struct in_addr a4;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return inet_pton(AF_INET, buf, &a4) == 1;
}

/* Parses HOST:PORT, [IPV6]:PORT or :PORT (every IPv4 interface). */
static int parse_listen(daemon_config *c, const opt_def *o, const char *s, char *why, size_t whylen)
{
    const char *host = s, *port;
    size_t hostlen;
    uint64_t v;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        char buf[DAEMON_HOST_MAX];
        struct in6_addr a6;
        host = s + 1;
        hostlen = close ? (size_t)(close - host) : 0;
        if (!close || close[1] != ':' || hostlen == 0 || hostlen >= sizeof buf) {
            snprintf(why, whylen, "'%s' is not [IPV6]:PORT", s);
            return -1;
        }
        memcpy(buf, host, hostlen);
        buf[hostlen] = '\0';
        if (inet_pton(AF_INET6, buf, &a6) != 1) {
            snprintf(why, whylen, "'%s' is not an IPv6 address", buf);
            return -1;
        }
        port = close + 2;
    } else {
        const char *colon = strrchr(s, ':');
        if (!colon) {
            snprintf(why, whylen, "'%s' is not HOST:PORT", s);
            return -1;
        }
        hostlen = (size_t)(colon - s);
        if (memchr(s, ':', hostlen)) {
            snprintf(why, whylen, "'%s': write an IPv6 address in brackets, as [::1]:8080", s);
            return -1;
        }
        if (hostlen == 0) {
            host = "0.0.0.0";
            hostlen = strlen(host);
        } else if (!host_ok(s, hostlen)) {
            snprintf(why, whylen, "'%.*s' is not a host name or IPv4 address", (int)hostlen, s);
            return -1;
        }
        port = colon + 1;
    }
    if (parse_flag_number(o, port, &v, why, whylen)) {
        snprintf(why, whylen, "the port in '%s' is not a number in 0..65535", s);
        return -1;
    }
    memcpy(c->listen_host, host, hostlen);
    c->listen_host[hostlen] = '\0';
    c->listen_port = (uint16_t)v;
    return 0;
}

/* Checks a token: non-empty, visible ASCII only (it travels in an HTTP
 * header as `Bearer <token>`, RFC 6750), and short enough to keep. */
static int token_ok(const char *t, size_t n, char *why, size_t whylen)
{
    if (n == 0) {
        snprintf(why, whylen, "the token is empty");
        return 0;
    }
    if (n >= DAEMON_TOKEN_MAX) {
        snprintf(why, whylen, "the token is over %d bytes", DAEMON_TOKEN_MAX - 1);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)t[i];
        if (ch < 0x21 || ch > 0x7e) {
            snprintf(why, whylen, "the token has a space, control or non-ASCII byte at offset %zu", i);
            return 0;
        }
    }
    return 1;
}

/* Reads the token from path: its content less one trailing "\n" or "\r\n".
 * Returns OPTD_OK, OPTD_E_UNAVAILABLE (unreadable) or OPTD_E_INVALID. */
static optd_err read_token_file(daemon_config *c, const char *path, char *why, size_t whylen)
{
    char buf[DAEMON_TOKEN_MAX + 2]; /* room for a full token, \r\n, and one byte to see it is too long */
    FILE *f = fopen(path, "rb");
    size_t n;
    if (!f) {
        snprintf(why, whylen, "cannot read '%s': %s", path, strerror(errno));
        return OPTD_E_UNAVAILABLE;
    }
    n = fread(buf, 1, sizeof buf, f);
    if (ferror(f)) {
        snprintf(why, whylen, "cannot read '%s': %s", path, strerror(errno));
        fclose(f);
        return OPTD_E_UNAVAILABLE;
    }
    fclose(f);
    if (n > 0 && buf[n - 1] == '\n') {
        n--;
        if (n > 0 && buf[n - 1] == '\r')
            n--;
    }
    if (!token_ok(buf, n, why, whylen)) {
        size_t used = strlen(why);
        snprintf(why + used, whylen - used, " (in '%s')", path);
        return OPTD_E_INVALID;
    }
    memcpy(c->token, buf, n);
    c->token[n] = '\0';
    return OPTD_OK;
}

/* Whether s is a list of base URLs, "http://HOST[:PORT][/]" or https, comma
 * separated (empty items allowed, so a trailing comma is harmless). */
static int urls_ok(const char *s, char *why, size_t whylen)
{
    int n = 0;
    while (*s) {
        const char *end = strchr(s, ',');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        size_t scheme = strncmp(s, "http://", 7) == 0 ? 7 : strncmp(s, "https://", 8) == 0 ? 8 : 0;
        if (len) {
            const char *host = s + scheme;
            size_t hl = len - scheme;
            while (hl && host[hl - 1] == '/')
                hl--;
            int ok = scheme && hl > 0 && !memchr(host, '/', hl) && !memchr(host, '?', hl) && !memchr(host, '@', hl);
            for (size_t i = 0; ok && i < hl; i++)
                ok = isalnum((unsigned char)host[i]) || strchr(".-:[]", host[i]);
            if (!ok) {
                snprintf(why, whylen, "'%.*s' is not a base URL like http://10.0.0.2:8080", (int)len, s);
                return 0;
            }
            n++;
        }
        s += len + (end ? 1 : 0);
        if (!end)
            break;
    }
    if (!n) {
        snprintf(why, whylen, "no URL given");
        return 0;
    }
    return 1;
}

/* Parses value s for option o into c. Returns OPTD_OK, or an error with the
 * reason (without the option's name) in why. */
static optd_err apply(daemon_config *c, const opt_def *o, const char *s, char *why, size_t whylen)
{
    uint64_t v;
    size_t n = strlen(s);
    switch (o->kind) {
    case K_LISTEN:
        return parse_listen(c, o, s, why, whylen) ? OPTD_E_INVALID : OPTD_OK;
    case K_PATH:
        if (n == 0 || n >= o->size) {
            snprintf(why, whylen, n ? "the path is over %zu bytes" : "the path is empty", o->size - 1);
            return OPTD_E_INVALID;
        }
        memcpy((char *)c + o->offset, s, n + 1);
        return OPTD_OK;
    case K_TOKEN_FILE:
        if (n == 0) {
            snprintf(why, whylen, "the path is empty");
            return OPTD_E_INVALID;
        }
        return read_token_file(c, s, why, whylen);
    case K_TOKEN:
        if (!token_ok(s, n, why, whylen))
            return OPTD_E_INVALID;
        memcpy(c->token, s, n + 1);
        return OPTD_OK;
    case K_UINT:
    case K_BYTES:
        if (parse_flag_number(o, s, &v, why, whylen))
            return OPTD_E_INVALID;
        set_uint(c, o, v * o->scale);
        return OPTD_OK;
    case K_URLS:
        if (n >= o->size) {
            snprintf(why, whylen, "the list is over %zu bytes", o->size - 1);
            return OPTD_E_INVALID;
        }
        if (!urls_ok(s, why, whylen))
            return OPTD_E_INVALID;
        memcpy((char *)c + o->offset, s, n + 1);
        return OPTD_OK;
    case K_CHOICE:
        for (unsigned i = 0; o->choices[i]; i++) {
            if (strcmp(s, o->choices[i]) == 0) {
                set_uint(c, o, i);
                return OPTD_OK;
            }
        }
        snprintf(why, whylen, "'%s' is not one of %s", s, o->metavar);
        return OPTD_E_INVALID;
    }
    assert(0 && "unknown option kind");
    return OPTD_E_INTERNAL;
}

/* The option named by the first n bytes of name, or NULL. */
static const opt_def *find_flag(const char *name, size_t n)
{
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (options[i].flag && strlen(options[i].flag) == n && memcmp(options[i].flag, name, n) == 0)
            return &options[i];
    return NULL;
}

optd_err daemon_config_parse(int argc, char *const argv[], char *const envp[], daemon_config *out, char *err,
                             size_t errlen)
{
    const char *given[N_OPTIONS] = {0}; /* values from argv, borrowed from it */
    char why[DAEMON_PATH_MAX + 256];
    const opt_def *token_file = NULL;

    memset(out, 0, sizeof *out);
    if (err && errlen)
        err[0] = '\0';

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *name, *eq, *value;
        size_t namelen;
        const opt_def *o;
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0')
            return optd_fail(err, errlen, OPTD_E_INVALID, "unexpected argument '%s'", arg);
        name = arg + 2;
        eq = strchr(name, '=');
        namelen = eq ? (size_t)(eq - name) : strlen(name);
        if ((namelen == 4 && memcmp(name, "help", 4) == 0) || (namelen == 7 && memcmp(name, "version", 7) == 0)) {
            if (eq)
                return optd_fail(err, errlen, OPTD_E_INVALID, "--%.*s takes no value", (int)namelen, name);
            if (namelen == 4)
                out->show_help = 1;
            else
                out->show_version = 1;
            return OPTD_OK;
        }
        o = find_flag(name, namelen);
        if (!o)
            return optd_fail(err, errlen, OPTD_E_INVALID, "unknown flag '--%.*s'", (int)namelen, name);
        if (eq) {
            value = eq + 1;
        } else {
            /* A following flag is not taken as a value: `--db --threads 4`
             * is a missing value, not a database named "--threads". */
            if (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0)
                return optd_fail(err, errlen, OPTD_E_INVALID, "--%s needs a value (%s)", o->flag, o->metavar);
            value = argv[++i];
        }
        given[o - options] = value;
    }

    for (size_t i = 0; i < N_OPTIONS; i++) {
        const opt_def *o = &options[i];
        const char *value = given[i];
        int from_env = 0;
        optd_err rc;
        if (!value && (value = env_lookup(envp, o->env)) != NULL)
            from_env = 1;
        if (!value)
            value = o->def;
        if (!value)
            continue;
        if (o->kind == K_TOKEN_FILE)
            token_file = o;
        if (o->kind == K_TOKEN && token_file)
            continue; /* the token file wins; OPTD_TOKEN is not even checked */
        rc = apply(out, o, value, why, sizeof why);
        if (rc == OPTD_OK)
            continue;
        if (!o->flag)
            return optd_fail(err, errlen, rc, "%s: %s", o->env, why);
        if (from_env)
            return optd_fail(err, errlen, rc, "%s (--%s): %s", o->env, o->flag, why);
        return optd_fail(err, errlen, rc, "--%s: %s", o->flag, why);
    }
    return OPTD_OK;
}

void daemon_config_usage(FILE *f, const char *prog)
{
    fprintf(f,
            "Usage: %s [FLAGS]\n"
            "Serves the optd HTTP API. Every flag can also come from the environment\n"
            "variable named beside it; a flag beats its variable. Both --flag VALUE and\n"
            "--flag=VALUE work.\n\n",
            prog);
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const opt_def *o = &options[i];
        char head[64];
        if (o->flag)
            snprintf(head, sizeof head, "--%s %s", o->flag, o->metavar);
        else
            snprintf(head, sizeof head, "%s=%s", o->env, o->metavar);
        if (o->flag)
            fprintf(f, "  %-30s %s, default %s\n", head, o->env, o->def ? o->def : "none");
        else
            fprintf(f, "  %-30s environment only\n", head);
        fprintf(f, "      %s\n", o->help);
    }
    fprintf(f, "  --help\n      print this and exit\n");
    fprintf(f, "  --version\n      print the version and exit\n");
    fprintf(f, "\nSIGTERM or SIGINT finishes the requests in flight, closes the database\n"
               "and exits 0. SIGHUP reopens --log-file (and is otherwise ignored).\n"
               "Exit status 1: cannot start; 2: bad flags.\n");
}
