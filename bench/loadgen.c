/* A closed-loop HTTP/1.1 load generator for optd's step endpoint: C
 * connections (one thread each, plain blocking sockets, keep-alive), each
 * bound to one of S sessions, each sending its next step as soon as the
 * previous reply is in. Measures steps/s and latency percentiles over a timed
 * window after a warm-up. The same requests go to optd, to the MHD ceiling and
 * to the Python reference service, so their numbers compare directly.
 *
 * Usage: loadgen --port P [--host 127.0.0.1] [--conns C] [--sessions S]
 *                [--size N] [--body json|binary] [--seconds D] [--warmup W]
 *                [--create] [--prefix NAME] [--optimizer adam]
 * --create makes the sessions first (POST /v1/sessions, float32, N params);
 * --create-only makes them and exits, printing {"created": S}.
 * --minimal: steps ask for no params back (Prefer: return=minimal).
 * --churn: each connection instead loops create (PUT), one step, DELETE of
 * a session of its own; one cycle counts as one request (ok when all three
 * succeed), for the create/delete side of a sustained load.
 * Prints one JSON object: ok, all_ok (with the warm-up), errors, seconds, steps_per_s, p50_ms, p90_ms,
 * p99_ms, max_ms, req_bytes, resp_bytes (per request, mean). Exit 1 when no
 * request succeeded. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct opts {
    const char *host;
    int port;
    int conns, sessions;
    long size;
    int binary;
    double seconds, warmup;
    int create, create_only;
    const char *prefix, *optimizer;
    int churn;
    int minimal;
    int keys; /* a fresh Idempotency-Key on every step, as the Python client sends */
} opts;

static opts O = {"127.0.0.1", 0, 32, 32, 1000, 0, 5, 1, 0, 0, "bench", "adam", 0, 0, 0};

/* Shared, read-only once threads start. */
static char *body_json, *body_bin;
static size_t body_json_len, body_bin_len;
static double t_start, t_measure, t_end; /* ns, CLOCK_MONOTONIC */
static atomic_int first_error_printed;

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int connect_to(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)O.port)};
    inet_pton(AF_INET, O.host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* A connection's receive buffer: bytes [off, len) are unread. */
typedef struct rbuf {
    char *b;
    size_t off, len, cap;
} rbuf;

static int rb_fill(int fd, rbuf *r)
{
    if (r->off == r->len)
        r->off = r->len = 0;
    if (r->len == r->cap) {
        if (r->off > 0) {
            memmove(r->b, r->b + r->off, r->len - r->off);
            r->len -= r->off;
            r->off = 0;
        } else {
            r->cap = r->cap ? r->cap * 2 : 65536;
            r->b = realloc(r->b, r->cap);
            if (!r->b)
                return -1;
        }
    }
    ssize_t n;
    do
        n = recv(fd, r->b + r->len, r->cap - r->len, 0);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return -1;
    r->len += (size_t)n;
    return 0;
}

/* Discards n bytes of body. */
static int rb_skip(int fd, rbuf *r, size_t n)
{
    while (n) {
        if (r->off == r->len && rb_fill(fd, r))
            return -1;
        size_t k = r->len - r->off < n ? r->len - r->off : n;
        r->off += k;
        n -= k;
    }
    return 0;
}

/* Reads one line ending in CRLF into out (NUL-terminated, CRLF removed). */
static int rb_line(int fd, rbuf *r, char *out, size_t outlen)
{
    for (;;) {
        /* Nothing read yet: no buffer either (memchr must not see NULL). */
        char *nl = r->len > r->off ? memchr(r->b + r->off, '\n', r->len - r->off) : NULL;
        if (nl) {
            size_t k = (size_t)(nl - (r->b + r->off));
            size_t c = k && nl[-1] == '\r' ? k - 1 : k;
            if (c >= outlen)
                c = outlen - 1;
            memcpy(out, r->b + r->off, c);
            out[c] = 0;
            r->off += k + 1;
            return 0;
        }
        if (rb_fill(fd, r))
            return -1;
    }
}

/* Reads one response; returns its status (or -1 on a broken connection) and
 * sets *keep to whether the connection stays open, *bytes to the body size.
 * The first few bytes of an error body go to err. */
static int read_response(int fd, rbuf *r, int *keep, size_t *bytes, char *err, size_t errlen)
{
    char line[1024];
    if (rb_line(fd, r, line, sizeof line))
        return -1;
    int status = 0, minor = 1;
    if (sscanf(line, "HTTP/1.%d %d", &minor, &status) != 2)
        return -1;
    long clen = -1;
    int chunked = 0;
    *keep = minor >= 1; /* HTTP/1.0 closes unless it says keep-alive */
    for (;;) {
        if (rb_line(fd, r, line, sizeof line))
            return -1;
        if (!line[0])
            break;
        if (!strncasecmp(line, "Content-Length:", 15))
            clen = atol(line + 15);
        else if (!strncasecmp(line, "Transfer-Encoding:", 18) && strcasestr(line, "chunked"))
            chunked = 1;
        else if (!strncasecmp(line, "Connection:", 11))
            *keep = strcasestr(line, "keep-alive") ? 1 : strcasestr(line, "close") ? 0 : *keep;
    }
    *bytes = 0;
    if (chunked) {
        for (;;) {
            if (rb_line(fd, r, line, sizeof line))
                return -1;
            size_t n = strtoul(line, NULL, 16);
            if (n == 0) {
                do
                    if (rb_line(fd, r, line, sizeof line))
                        return -1;
                while (line[0]);
                break;
            }
            if (rb_skip(fd, r, n) || rb_line(fd, r, line, sizeof line))
                return -1;
            *bytes += n;
        }
    } else if (clen > 0) {
        if (status >= 300 && err && errlen) {
            while (r->len - r->off < (size_t)clen && r->len - r->off < errlen - 1)
                if (rb_fill(fd, r))
                    return -1;
            size_t k = r->len - r->off < errlen - 1 ? r->len - r->off : errlen - 1;
            memcpy(err, r->b + r->off, k);
            err[k] = 0;
        }
        if (rb_skip(fd, r, (size_t)clen))
            return -1;
        *bytes = (size_t)clen;
    } else if (clen < 0 && status != 204 && status != 304) {
        *keep = 0; /* body until close: not expected from any server here */
    }
    return status;
}

/* One request/response on fd (connecting when *fd < 0); returns status. */
static int roundtrip(int *fd, rbuf *r, const char *head, size_t headlen, const char *body, size_t bodylen,
                     size_t *resp_bytes, char *err, size_t errlen)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        if (*fd < 0) {
            *fd = connect_to();
            r->off = r->len = 0;
            if (*fd < 0)
                return -1;
        }
        int keep = 1;
        int st = -1;
        /* Head and body in one send when the caller built them contiguous. */
        if (head + headlen == body) {
            if (write_all(*fd, head, headlen + bodylen) == 0)
                st = read_response(*fd, r, &keep, resp_bytes, err, errlen);
        } else if (write_all(*fd, head, headlen) == 0 && write_all(*fd, body, bodylen) == 0) {
            st = read_response(*fd, r, &keep, resp_bytes, err, errlen);
        }
        if (st < 0 || !keep) {
            close(*fd);
            *fd = -1;
        }
        if (st >= 0)
            return st;
    }
    return -1;
}

typedef struct worker {
    int id;
    pthread_t th;
    double *lat; /* ms, measured window only */
    size_t nlat, cap;
    long ok, errors, all_ok; /* all_ok counts the warm-up too */
    double resp_bytes;
} worker;

/* One --churn cycle on fd: PUT a session of its own, step it, DELETE it.
 * Returns 200 when all three did what they should, else the first status
 * that did not (or -1). */
static int churn_cycle(worker *w, long k, int *fd, rbuf *r, char *err, size_t errlen)
{
    char name[160], head[1024], body[256];
    size_t rb;
    int bl, hl, st;
    snprintf(name, sizeof name, "%schurn%d-%ld", O.prefix, w->id, k);
    bl = snprintf(body, sizeof body, "{\"optimizer\":\"%s\",\"size\":%ld,\"fill\":0.5}", O.optimizer, O.size);
    hl = snprintf(head, sizeof head,
                  "PUT /v1/sessions/%s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                  "Content-Length: %d\r\n\r\n",
                  name, O.host, O.port, bl);
    st = roundtrip(fd, r, head, (size_t)hl, body, (size_t)bl, &rb, err, errlen);
    if (st != 201)
        return st;
    const char *b = O.binary ? body_bin : body_json;
    size_t blen = O.binary ? body_bin_len : body_json_len;
    hl = snprintf(head, sizeof head,
                  "POST /v1/sessions/%s/step HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\n"
                  "Content-Length: %zu\r\n\r\n",
                  name, O.host, O.port, O.binary ? "application/octet-stream" : "application/json", blen);
    st = roundtrip(fd, r, head, (size_t)hl, b, blen, &rb, err, errlen);
    if (st != 200)
        return st;
    hl = snprintf(head, sizeof head, "DELETE /v1/sessions/%s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", name, O.host,
                  O.port);
    st = roundtrip(fd, r, head, (size_t)hl, "", 0, &rb, err, errlen);
    return st == 204 ? 200 : st;
}

static void *run_worker(void *arg)
{
    worker *w = arg;
    char path[256], head[1024];
    snprintf(path, sizeof path, "/v1/sessions/%s%d/step", O.prefix, w->id % O.sessions);
    const char *body0 = O.binary ? body_bin : body_json;
    size_t bodylen = O.binary ? body_bin_len : body_json_len;
    /* With --keys, the key is a fixed-width field rewritten in place. */
    static const char key_head[] = "Idempotency-Key: ";
    enum { KEY_DIGITS = 16 };
    int hl = snprintf(head, sizeof head,
                      "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\n%s%s%s%.*s%sContent-Length: %zu\r\n\r\n",
                      path, O.host, O.port, O.binary ? "application/octet-stream" : "application/json",
                      O.binary ? "Accept: application/octet-stream\r\n" : "",
                      O.minimal ? "Prefer: return=minimal\r\n" : "", O.keys ? key_head : "", O.keys ? KEY_DIGITS : 0,
                      "0000000000000000", O.keys ? "\r\n" : "", bodylen);
    char *key_at = O.keys ? strstr(head, key_head) + sizeof key_head - 1 : NULL;
    /* The whole request in one buffer, sent with one send() as a client
     * library would; two sends can meet Nagle and delayed ACKs on a server
     * that does not set TCP_NODELAY. */
    char *req = malloc((size_t)hl + bodylen);
    if (!req) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(1);
    }
    memcpy(req, head, (size_t)hl);
    memcpy(req + hl, body0, bodylen);
    if (key_at)
        key_at = req + (key_at - head);
    const char *body = req + hl;
    int fd = -1;
    rbuf r = {0};
    char err[256];
    for (long k = 0;; k++) {
        double t0 = now_ns();
        if (t0 >= t_end)
            break;
        size_t rb = 0;
        err[0] = 0;
        if (key_at) {
            char key[KEY_DIGITS + 1];
            /* Unique across runs on the same sessions (the process id) and
             * across connections: a repeated key would be a replay. */
            snprintf(key, sizeof key, "%04u%04u%08lu", (unsigned)getpid() % 10000u, (unsigned)w->id % 10000u,
                     (unsigned long)k % 100000000ul);
            memcpy(key_at, key, KEY_DIGITS);
        }
        int st = O.churn ? churn_cycle(w, k, &fd, &r, err, sizeof err)
                         : roundtrip(&fd, &r, req, (size_t)hl, body, bodylen, &rb, err, sizeof err);
        double t1 = now_ns();
        if (st == 200)
            w->all_ok++;
        if (t0 < t_measure)
            continue;
        if (st == 200) {
            w->ok++;
            w->resp_bytes += (double)rb;
            if (w->nlat == w->cap) {
                w->cap = w->cap ? w->cap * 2 : 4096;
                w->lat = realloc(w->lat, w->cap * sizeof *w->lat);
            }
            w->lat[w->nlat++] = (t1 - t0) / 1e6;
        } else {
            w->errors++;
            if (atomic_exchange(&first_error_printed, 1) == 0)
                fprintf(stderr, "loadgen: status %d on %s: %s\n", st, path, err);
            if (st < 0)
                usleep(10000);
        }
    }
    if (fd >= 0)
        close(fd);
    free(r.b);
    free(req);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, size_t n, double p)
{
    if (!n)
        return 0;
    size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static void make_bodies(void)
{
    size_t n = (size_t)O.size;
    body_bin_len = n * 4;
    body_bin = malloc(body_bin_len);
    body_json = malloc(n * 24 + 32);
    if (!body_bin || !body_json) {
        fprintf(stderr, "loadgen: out of memory\n");
        exit(1);
    }
    size_t off = (size_t)sprintf(body_json, "{\"grad\":[");
    for (size_t i = 0; i < n; i++) {
        uint32_t h = (uint32_t)i * 2654435761u;
        float g = (float)(((double)(h >> 16 & 1023) / 1024.0 - 0.5) * 0.1 + 0.001);
        memcpy(body_bin + i * 4, &g, 4); /* little-endian hosts only (x86, arm) */
        off += (size_t)sprintf(body_json + off, i ? ",%.9g" : "%.9g", (double)g);
    }
    off += (size_t)sprintf(body_json + off, "]}");
    body_json_len = off;
}

static int create_sessions(void)
{
    int fd = -1;
    rbuf r = {0};
    char err[256];
    for (int i = 0; i < O.sessions; i++) {
        char body[512], head[512];
        int bl = snprintf(body, sizeof body,
                          "{\"name\":\"%s%d\",\"optimizer\":\"%s\",\"dtype\":\"float32\",\"size\":%ld,\"fill\":0.5}",
                          O.prefix, i, O.optimizer, O.size);
        int hl = snprintf(head, sizeof head,
                          "POST /v1/sessions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          "Content-Length: %d\r\n\r\n",
                          O.host, O.port, bl);
        size_t rb;
        err[0] = 0;
        int st = roundtrip(&fd, &r, head, (size_t)hl, body, (size_t)bl, &rb, err, sizeof err);
        if (st != 201 && st != 200) {
            fprintf(stderr, "loadgen: creating %s%d: status %d: %s\n", O.prefix, i, st, err);
            return -1;
        }
    }
    if (fd >= 0)
        close(fd);
    free(r.b);
    return 0;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--churn")) {
            O.churn = 1;
            continue;
        }
        if (!strcmp(a, "--minimal")) {
            O.minimal = 1;
            continue;
        }
        if (!strcmp(a, "--keys")) {
            O.keys = 1;
            continue;
        }
        if (!strcmp(a, "--create") || !strcmp(a, "--create-only")) {
            O.create = 1;
            O.create_only = !strcmp(a, "--create-only");
            continue;
        }
        if (!v) {
            fprintf(stderr, "loadgen: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--port"))
            O.port = atoi(v);
        else if (!strcmp(a, "--host"))
            O.host = v;
        else if (!strcmp(a, "--conns"))
            O.conns = atoi(v);
        else if (!strcmp(a, "--sessions"))
            O.sessions = atoi(v);
        else if (!strcmp(a, "--size"))
            O.size = (long)strtod(v, NULL);
        else if (!strcmp(a, "--body"))
            O.binary = !strcmp(v, "binary");
        else if (!strcmp(a, "--seconds"))
            O.seconds = strtod(v, NULL);
        else if (!strcmp(a, "--warmup"))
            O.warmup = strtod(v, NULL);
        else if (!strcmp(a, "--prefix"))
            O.prefix = v;
        else if (!strcmp(a, "--optimizer"))
            O.optimizer = v;
        else {
            fprintf(stderr, "loadgen: unknown flag %s\n", a);
            return 2;
        }
    }
    if (O.port <= 0 || O.conns < 1 || O.sessions < 1 || O.size < 1) {
        fprintf(stderr, "usage: loadgen --port P [--conns C] [--sessions S] [--size N] [--body json|binary]\n"
                        "               [--seconds D] [--warmup W] [--create] [--prefix NAME] [--minimal] [--keys]\n");
        return 2;
    }
    make_bodies();
    if (O.create && create_sessions())
        return 1;
    if (O.create_only) {
        printf("{\"created\": %d}\n", O.sessions);
        return 0;
    }

    worker *ws = calloc((size_t)O.conns, sizeof *ws);
    t_start = now_ns();
    t_measure = t_start + O.warmup * 1e9;
    t_end = t_measure + O.seconds * 1e9;
    for (int i = 0; i < O.conns; i++) {
        ws[i].id = i;
        pthread_create(&ws[i].th, NULL, run_worker, &ws[i]);
    }
    long ok = 0, errors = 0, all_ok = 0;
    size_t total = 0;
    double resp = 0;
    for (int i = 0; i < O.conns; i++) {
        pthread_join(ws[i].th, NULL);
        ok += ws[i].ok;
        errors += ws[i].errors;
        all_ok += ws[i].all_ok;
        total += ws[i].nlat;
        resp += ws[i].resp_bytes;
    }
    /* The window closes when the last in-flight request returns. */
    double secs = (now_ns() - t_measure) / 1e9;
    double *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < O.conns; i++) {
        memcpy(all + k, ws[i].lat, ws[i].nlat * sizeof *all);
        k += ws[i].nlat;
        free(ws[i].lat);
    }
    qsort(all, total, sizeof *all, cmp_double);
    printf("{\"ok\": %ld, \"all_ok\": %ld, \"errors\": %ld, \"seconds\": %.3f, \"steps_per_s\": %.1f, \"p50_ms\": %.3f, "
           "\"p90_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, \"req_bytes\": %zu, \"resp_bytes\": %.0f, "
           "\"conns\": %d, \"sessions\": %d, \"size\": %ld, \"body\": \"%s\"}\n",
           ok, all_ok, errors, secs, (double)ok / secs, pct(all, total, 50), pct(all, total, 90), pct(all, total, 99),
           total ? all[total - 1] : 0.0, O.binary ? body_bin_len : body_json_len, ok ? resp / (double)ok : 0.0,
           O.conns, O.sessions, O.size, O.binary ? "binary" : "json");
    free(all);
    free(ws);
    return ok > 0 ? 0 : 1;
}
