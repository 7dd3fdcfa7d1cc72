/* Operations that run off the request threads: online backups (POST and
 * GET /v1/backups, into --backup-dir) and the cluster-wide listing (GET
 * /v1/sessions?scope=cluster, which asks every --peers shard with libcurl
 * and merges their pages with this daemon's in name order). Each operation
 * gets a thread of its own while its connection is suspended, so a backup of
 * gigabytes or a peer slow to answer never holds a request thread that
 * other clients' connections share. */
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "http/httpInt.h"

/* A peer must connect within PEER_CONNECT_MS and answer whole within
 * PEER_TIMEOUT_MS; past that the listing is a 503 naming it. */
#define PEER_CONNECT_MS 2000
#define PEER_TIMEOUT_MS 10000
/* A page of 1000 sessions is well under 1 MiB; a peer sending more than
 * this is not an optd. */
#define PEER_MAX_BYTES ((size_t)16 << 20)
#define MAX_PEERS 64
/* Bytes of a backup's sidecar file read back by GET /v1/backups. */
#define SIDECAR_MAX 65536
/* Room for a path in the backup directory (--backup-dir is at most 4095 bytes). */
#define PATH_BUF 4400

struct ops {
    store *st;
    char *backup_dir; /* owned; NULL when backups are off */
    char **peers;     /* owned base URLs without a trailing slash */
    size_t npeers;
    struct curl_slist *auth; /* the Authorization header for the peers, or NULL */
    int curl_init;           /* curl_global_init succeeded */
    char instance[40];
    http_log_fn log;
    void *log_ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;         /* signalled when running drops */
    unsigned running;          /* ops between submit and completion, guarded by mu */
    int stopping;              /* guarded by mu */
    _Atomic int cancel;        /* set by ops_stop: backups in progress give up */
    pthread_mutex_t backup_mu; /* one backup at a time */
};

static void logf_(ops *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logf_(ops *s, const char *fmt, ...)
{
    char line[1400];
    va_list ap;
    if (!s->log)
        return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    s->log(s->log_ctx, line);
}

/* ---- Lifecycle -------------------------------------------------------- */

/* Splits "URL,URL,..." into s->peers, each without its trailing slashes. */
static optd_err parse_peers(ops *s, const char *list, char *err, size_t errlen)
{
    const char *p = list;
    while (p && *p) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        while (n && p[n - 1] == '/')
            n--;
        if (n) {
            if (s->npeers == MAX_PEERS) {
                snprintf(err, errlen, "more than %d peers", MAX_PEERS);
                return OPTD_E_INVALID;
            }
            if (!(s->peers[s->npeers] = strndup(p, n)))
                return OPTD_E_NOMEM;
            s->npeers++;
        }
        p = comma ? comma + 1 : NULL;
    }
    return OPTD_OK;
}

optd_err ops_start(const ops_config *cfg, ops **out, char *err, size_t errlen)
{
    optd_err rc = OPTD_E_NOMEM;
    ops *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s)
        return rc;
    s->st = cfg->st;
    s->log = cfg->log;
    s->log_ctx = cfg->log_ctx;
    snprintf(s->instance, sizeof s->instance, "%s", cfg->instance ? cfg->instance : "");
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_mutex_init(&s->backup_mu, NULL);
    if (cfg->backup_dir && *cfg->backup_dir && !(s->backup_dir = strdup(cfg->backup_dir)))
        goto done;
    if (!(s->peers = calloc(MAX_PEERS, sizeof *s->peers)))
        goto done;
    rc = parse_peers(s, cfg->peers, err, errlen);
    if (rc)
        goto done;
    if (s->npeers) {
        /* Once, before any op thread exists (it is not thread-safe). */
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            snprintf(err, errlen, "cannot initialise libcurl");
            rc = OPTD_E_UNAVAILABLE;
            goto done;
        }
        s->curl_init = 1;
        if (cfg->token) {
            size_t n = strlen(cfg->token) + 32;
            char *h = malloc(n);
            if (!h) {
                rc = OPTD_E_NOMEM;
                goto done;
            }
            snprintf(h, n, "Authorization: Bearer %s", cfg->token);
            s->auth = curl_slist_append(NULL, h);
            free(h);
            if (!s->auth) {
                rc = OPTD_E_NOMEM;
                goto done;
            }
        }
    }
    rc = OPTD_OK;
done:
    if (rc) {
        ops_free(s);
        return rc;
    }
    *out = s;
    return OPTD_OK;
}

void ops_stop(ops *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    atomic_store(&s->cancel, 1);
    while (s->running)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

void ops_free(ops *s)
{
    if (!s)
        return;
    ops_stop(s);
    for (size_t i = 0; i < s->npeers; i++)
        free(s->peers[i]);
    free(s->peers);
    curl_slist_free_all(s->auth);
    if (s->curl_init)
        curl_global_cleanup();
    free(s->backup_dir);
    pthread_mutex_destroy(&s->backup_mu);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* ---- Backups ---------------------------------------------------------- */

/* Writes len bytes to path through path.tmp, synced, so a reader never
 * sees half of it. Returns 0, or -1 with errno set. */
static int write_whole(const char *path, const char *data, size_t len)
{
    char tmp[PATH_BUF + 16];
    int fd, saved;
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    for (size_t off = 0; off < len;) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            goto fail;
        off += (size_t)w;
    }
    if (fsync(fd) != 0)
        goto fail;
    if (close(fd) != 0) {
        fd = -1;
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) != 0)
        goto fail;
    return 0;
fail:
    saved = errno ? errno : EIO;
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    errno = saved;
    return -1;
}

/* A backup's file name from its time: optd-2026-11-24T10-00-00.123Z.db
 * (no colons, which some file systems and tools refuse), made unique with
 * a -N suffix when two fall in one millisecond. */
static int backup_name(const char *dir, int64_t ms, char *name, size_t cap)
{
    char stamp[32];
    struct stat sb;
    rfc3339(ms, 1, stamp);
    for (char *c = stamp; *c; c++)
        if (*c == ':')
            *c = '-';
    for (int k = 0; k < 100; k++) {
        char path[PATH_BUF];
        if (k)
            snprintf(name, cap, "optd-%.*s-%d.db", (int)(strlen(stamp)), stamp, k + 1);
        else
            snprintf(name, cap, "optd-%s.db", stamp);
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if (stat(path, &sb) != 0 && errno == ENOENT) {
            snprintf(path, sizeof path, "%s/%s.tmp", dir, name);
            if (stat(path, &sb) != 0 && errno == ENOENT)
                return 0;
        }
    }
    return -1;
}

/* Appends one backup's JSON object. */
static void backup_json(sbuf *b, const char *dir, const char *name, uint64_t bytes, const char *created,
                        const store_backup_info *info, int64_t duration_ms)
{
    char path[PATH_BUF];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    sbuf_puts(b, "{\"name\":");
    sbuf_json_str(b, name);
    sbuf_puts(b, ",\"path\":");
    sbuf_json_str(b, path);
    sbuf_printf(b, ",\"bytes\":%llu", (unsigned long long)bytes);
    if (created) {
        sbuf_puts(b, ",\"created_at\":");
        sbuf_json_str(b, created);
    }
    if (info)
        sbuf_printf(b, ",\"sessions\":%llu,\"step_commits\":%llu", (unsigned long long)info->sessions,
                    (unsigned long long)info->step_commits);
    if (duration_ms >= 0)
        sbuf_printf(b, ",\"duration_ms\":%lld", (long long)duration_ms);
    sbuf_puts(b, "}");
}

static void run_backup(ops *s, op *o)
{
    char name[256], path[PATH_BUF], side[PATH_BUF + 8], created[32], err[1024] = "";
    store_backup_info info;
    optd_err rc;
    if (!s->backup_dir) {
        o->rc = OPTD_E_UNAVAILABLE;
        snprintf(o->msg, sizeof o->msg, "backups are off: start optd with --backup-dir DIR");
        return;
    }
    pthread_mutex_lock(&s->backup_mu);
    int64_t ms = optd_now_ms();
    uint64_t t0 = optd_mono_us();
    rfc3339(ms, 1, created);
    if (mkdir(s->backup_dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, sizeof err, "cannot make the backup directory %.900s: %s", s->backup_dir, strerror(errno));
        rc = OPTD_E_UNAVAILABLE;
    } else if (backup_name(s->backup_dir, ms, name, sizeof name) != 0) {
        snprintf(err, sizeof err, "no free backup name in %.900s", s->backup_dir);
        rc = OPTD_E_UNAVAILABLE;
    } else {
        snprintf(path, sizeof path, "%s/%s", s->backup_dir, name);
        rc = store_backup(s->st, path, &s->cancel, &info, err, sizeof err);
    }
    if (rc == OPTD_OK) {
        int64_t duration_ms = (int64_t)((optd_mono_us() - t0) / 1000);
        backup_json(&o->out, s->backup_dir, name, info.bytes, created, &info, duration_ms);
        /* The sidecar keeps what GET /v1/backups reports (reading it back
         * from each file would mean opening gigabytes). */
        snprintf(side, sizeof side, "%s.json", path);
        if (o->out.oom) {
            rc = OPTD_E_NOMEM;
        } else if (write_whole(side, o->out.p, o->out.len) != 0) {
            snprintf(err, sizeof err, "cannot write %.900s: %s", side, strerror(errno));
            rc = OPTD_E_UNAVAILABLE;
        }
        if (rc) {
            unlink(path);
            sbuf_free(&o->out);
        }
    }
    pthread_mutex_unlock(&s->backup_mu);
    if (rc) {
        o->rc = rc == OPTD_E_NOMEM ? OPTD_E_NOMEM : OPTD_E_UNAVAILABLE;
        snprintf(o->msg, sizeof o->msg, "the backup failed, nothing else is affected: %.900s", err);
        logf_(s, "backup failed: %s", err);
        return;
    }
    logf_(s, "backup %s: %llu bytes, %llu sessions, %llu step commits", path, (unsigned long long)info.bytes,
          (unsigned long long)info.sessions, (unsigned long long)info.step_commits);
    o->status = 201;
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Reads a sidecar (at most SIDECAR_MAX bytes) as JSON; NULL when absent or
 * unreadable. The caller deletes the tree. */
static cJSON *read_sidecar(const char *path)
{
    char *buf = malloc(SIDECAR_MAX + 1);
    cJSON *j = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (buf && fd >= 0) {
        ssize_t n = read(fd, buf, SIDECAR_MAX);
        if (n > 0) {
            buf[n] = '\0';
            j = cJSON_Parse(buf);
        }
    }
    if (fd >= 0)
        close(fd);
    free(buf);
    return j;
}

optd_err ops_list_backups(ops *s, sbuf *out, char *msg, size_t msglen)
{
    char **names = NULL;
    size_t n = 0, cap = 0;
    optd_err rc = OPTD_OK;
    DIR *d;
    if (!s->backup_dir) {
        sbuf_puts(out, "{\"backups\":[],\"backup_dir\":null}");
        return OPTD_OK;
    }
    d = opendir(s->backup_dir);
    if (!d && errno != ENOENT) {
        snprintf(msg, msglen, "cannot read the backup directory %.900s: %s", s->backup_dir, strerror(errno));
        return OPTD_E_UNAVAILABLE;
    }
    for (struct dirent *e; d && (e = readdir(d));) {
        size_t len = strlen(e->d_name);
        if (len < 9 || strncmp(e->d_name, "optd-", 5) != 0 || strcmp(e->d_name + len - 3, ".db") != 0)
            continue;
        if (n == cap) {
            char **grown = realloc(names, (cap = cap ? cap * 2 : 16) * sizeof *names);
            if (!grown) {
                rc = OPTD_E_NOMEM;
                break;
            }
            names = grown;
        }
        if (!(names[n] = strdup(e->d_name))) {
            rc = OPTD_E_NOMEM;
            break;
        }
        n++;
    }
    if (d)
        closedir(d);
    if (rc == OPTD_OK) {
        if (n > 1) /* (qsort's base must not be NULL, even for 0 items) */
            qsort(names, n, sizeof *names, by_name);
        sbuf_puts(out, "{\"backups\":[");
        for (size_t i = 0; i < n; i++) {
            char path[PATH_BUF];
            struct stat sb;
            snprintf(path, sizeof path, "%s/%s", s->backup_dir, names[i]);
            if (stat(path, &sb) != 0)
                continue; /* removed meanwhile */
            snprintf(path, sizeof path, "%s/%s.json", s->backup_dir, names[i]);
            cJSON *j = read_sidecar(path);
            const cJSON *created = cJSON_GetObjectItemCaseSensitive(j, "created_at");
            const cJSON *ses = cJSON_GetObjectItemCaseSensitive(j, "sessions");
            const cJSON *steps = cJSON_GetObjectItemCaseSensitive(j, "step_commits");
            const cJSON *dur = cJSON_GetObjectItemCaseSensitive(j, "duration_ms");
            store_backup_info info = {0, 0, 0};
            int full = cJSON_IsNumber(ses) && cJSON_IsNumber(steps);
            if (full) {
                info.sessions = (uint64_t)ses->valuedouble;
                info.step_commits = (uint64_t)steps->valuedouble;
            }
            if (out->len && out->p[out->len - 1] == '}')
                sbuf_put(out, ",", 1);
            backup_json(out, s->backup_dir, names[i], (uint64_t)sb.st_size,
                        cJSON_IsString(created) ? created->valuestring : NULL, full ? &info : NULL,
                        cJSON_IsNumber(dur) ? (int64_t)dur->valuedouble : -1);
            cJSON_Delete(j);
        }
        sbuf_puts(out, "],\"backup_dir\":");
        sbuf_json_str(out, s->backup_dir);
        sbuf_puts(out, "}");
    }
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    if (rc == OPTD_OK && out->oom)
        rc = OPTD_E_NOMEM;
    return rc;
}

/* ---- The cluster-wide listing ----------------------------------------- */

/* One session of the merged listing: its name and its JSON object. */
typedef struct entry {
    const char *name; /* into json's tree or the row (borrowed) */
    char *json;       /* malloc'd */
} entry;

/* One peer's page being fetched. */
typedef struct fetch {
    ops *s;
    const char *base;
    CURL *h;
    sbuf body;
    int self; /* its Optd-Instance is ours: the daemon itself */
    int too_big;
    CURLcode cres;
    long status;
    char errbuf[CURL_ERROR_SIZE];
    cJSON *json; /* the parsed page */
} fetch;

static size_t on_body(char *p, size_t size, size_t n, void *ctx)
{
    fetch *f = ctx;
    size_t len = size * n;
    if (f->body.len + len > PEER_MAX_BYTES) {
        f->too_big = 1;
        return 0; /* aborts the transfer */
    }
    sbuf_put(&f->body, p, len);
    return f->body.oom ? 0 : len;
}

static size_t on_header(char *p, size_t size, size_t n, void *ctx)
{
    fetch *f = ctx;
    size_t len = size * n;
    static const char key[] = "Optd-Instance:";
    if (len > sizeof key && strncasecmp(p, key, sizeof key - 1) == 0) {
        const char *v = p + sizeof key - 1;
        size_t vl = len - (sizeof key - 1);
        while (vl && (*v == ' ' || *v == '\t'))
            v++, vl--;
        while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
            vl--;
        f->self = f->s->instance[0] && vl == strlen(f->s->instance) && memcmp(v, f->s->instance, vl) == 0;
    }
    return len;
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const entry *)a)->name, ((const entry *)b)->name);
}

/* Asks every peer for its page at once; each fetch ends by itself within
 * PEER_TIMEOUT_MS, so the loop does too. */
static optd_err fetch_all(ops *s, fetch *f, const char *after, unsigned limit)
{
    CURLM *m = curl_multi_init();
    optd_err rc = OPTD_OK;
    if (!m)
        return OPTD_E_NOMEM;
    for (size_t i = 0; i < s->npeers && rc == OPTD_OK; i++) {
        char url[4096], *esc = NULL;
        f[i].s = s;
        f[i].base = s->peers[i];
        f[i].h = curl_easy_init();
        if (!f[i].h) {
            rc = OPTD_E_NOMEM;
            break;
        }
        if (*after && !(esc = curl_easy_escape(f[i].h, after, 0))) {
            rc = OPTD_E_NOMEM;
            break;
        }
        snprintf(url, sizeof url, "%s/v1/sessions?limit=%u%s%s", s->peers[i], limit, esc ? "&after=" : "",
                 esc ? esc : "");
        curl_free(esc);
        curl_easy_setopt(f[i].h, CURLOPT_URL, url);
        curl_easy_setopt(f[i].h, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(f[i].h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(f[i].h, CURLOPT_CONNECTTIMEOUT_MS, (long)PEER_CONNECT_MS);
        curl_easy_setopt(f[i].h, CURLOPT_TIMEOUT_MS, (long)PEER_TIMEOUT_MS);
        curl_easy_setopt(f[i].h, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(f[i].h, CURLOPT_WRITEDATA, &f[i]);
        curl_easy_setopt(f[i].h, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(f[i].h, CURLOPT_HEADERDATA, &f[i]);
        curl_easy_setopt(f[i].h, CURLOPT_ERRORBUFFER, f[i].errbuf);
        curl_easy_setopt(f[i].h, CURLOPT_USERAGENT, "optd-peer/1");
        if (s->auth)
            curl_easy_setopt(f[i].h, CURLOPT_HTTPHEADER, s->auth);
        if (curl_multi_add_handle(m, f[i].h) != CURLM_OK)
            rc = OPTD_E_NOMEM;
    }
    int running = 1;
    while (rc == OPTD_OK && running) {
        if (curl_multi_perform(m, &running) != CURLM_OK)
            rc = OPTD_E_INTERNAL;
        else if (running && curl_multi_poll(m, NULL, 0, 1000, NULL) != CURLM_OK)
            rc = OPTD_E_INTERNAL;
    }
    for (CURLMsg *msg; rc == OPTD_OK && (msg = curl_multi_info_read(m, &running));) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        for (size_t i = 0; i < s->npeers; i++)
            if (f[i].h == msg->easy_handle)
                f[i].cres = msg->data.result;
    }
    for (size_t i = 0; i < s->npeers; i++) {
        if (!f[i].h)
            continue;
        curl_easy_getinfo(f[i].h, CURLINFO_RESPONSE_CODE, &f[i].status);
        curl_multi_remove_handle(m, f[i].h);
        curl_easy_cleanup(f[i].h);
        f[i].h = NULL;
    }
    curl_multi_cleanup(m);
    return rc;
}

/* Why peer f cannot be listed, into msg (appended after what is there);
 * 0 when its page is usable (then f->json holds it). */
static int peer_problem(fetch *f, char *msg, size_t msglen)
{
    size_t used = strlen(msg);
    char *o = msg + used;
    size_t left = msglen - used;
    const char *sep = used ? "; " : "";
    if (f->cres != CURLE_OK) {
        snprintf(o, left, "%speer %s did not answer (%s)", sep, f->base,
                 f->too_big     ? "its reply is too large"
                 : f->errbuf[0] ? f->errbuf
                                : curl_easy_strerror(f->cres));
        return 1;
    }
    if (f->body.oom)
        return snprintf(o, left, "%speer %s: out of memory reading its reply", sep, f->base), 1;
    f->json = cJSON_ParseWithLength(f->body.p ? f->body.p : "", f->body.len);
    if (f->status != 200) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(f->json, "error");
        const cJSON *em = cJSON_GetObjectItemCaseSensitive(e, "message");
        snprintf(o, left, "%speer %s answered %ld%s%.200s", sep, f->base, f->status, cJSON_IsString(em) ? ": " : "",
                 cJSON_IsString(em) ? em->valuestring : "");
        return 1;
    }
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(f->json, "sessions");
    const cJSON *next = cJSON_GetObjectItemCaseSensitive(f->json, "next");
    int ok = cJSON_IsArray(list) && (cJSON_IsNull(next) || cJSON_IsString(next));
    for (const cJSON *e = ok ? list->child : NULL; e && ok; e = e->next) {
        const cJSON *nm = cJSON_GetObjectItemCaseSensitive(e, "name");
        ok = cJSON_IsString(nm) && strlen(nm->valuestring) <= STORE_NAME_MAX;
    }
    if (!ok)
        return snprintf(o, left, "%speer %s sent a listing that is not an optd one", sep, f->base), 1;
    return 0;
}

static void run_list(ops *s, op *o)
{
    store_session *rows = NULL;
    size_t nrows = 0, nent = 0, cap = 0, shards = 1;
    entry *ents = NULL;
    fetch *f = NULL;
    int more = 0;
    optd_err rc = store_read_list(s->st, o->after[0] ? o->after : NULL, (int)o->limit, &rows, &nrows, &more);
    if (rc)
        goto done;
    rc = OPTD_E_NOMEM;
    if (s->npeers && !(f = calloc(s->npeers, sizeof *f)))
        goto done;
    if (s->npeers && (rc = fetch_all(s, f, o->after, o->limit)) != OPTD_OK)
        goto done;
    o->msg[0] = '\0';
    int failed = 0;
    for (size_t i = 0; i < s->npeers; i++) {
        if (f[i].self && f[i].cres == CURLE_OK)
            continue; /* this daemon, listed in --peers too */
        failed |= peer_problem(&f[i], o->msg, sizeof o->msg);
        shards++;
    }
    if (failed) {
        rc = OPTD_E_UNAVAILABLE;
        size_t used = strlen(o->msg);
        snprintf(o->msg + used, sizeof o->msg - used, "; the cluster cannot be listed whole, retry");
        logf_(s, "cluster listing: %s", o->msg);
        goto done;
    }
    rc = OPTD_E_NOMEM;
    cap = nrows;
    for (size_t i = 0; i < s->npeers; i++)
        if (f[i].json && !f[i].self)
            cap += (size_t)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(f[i].json, "sessions"));
    if (cap && !(ents = calloc(cap, sizeof *ents)))
        goto done;
    for (size_t i = 0; i < nrows; i++, nent++) {
        sbuf b = {0};
        sess_to_json(&b, &rows[i]);
        if (b.oom)
            goto done;
        ents[nent].name = rows[i].name;
        ents[nent].json = b.p;
    }
    for (size_t i = 0; i < s->npeers; i++) {
        if (!f[i].json || f[i].self)
            continue;
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(f[i].json, "sessions");
        more |= cJSON_IsString(cJSON_GetObjectItemCaseSensitive(f[i].json, "next"));
        for (const cJSON *e = list->child; e; e = e->next, nent++) {
            ents[nent].name = cJSON_GetObjectItemCaseSensitive(e, "name")->valuestring;
            if (!(ents[nent].json = cJSON_PrintUnformatted(e)))
                goto done;
        }
    }
    /* Every shard lists in byte order of name, so the merge is the order
     * one daemon holding them all would give; past the first limit names
     * lies the next page, which starts after the last one shown. */
    if (nent > 1)
        qsort(ents, nent, sizeof *ents, entry_cmp);
    size_t shown = nent < o->limit ? nent : o->limit;
    more |= nent > shown;
    sbuf_puts(&o->out, "{\"sessions\":[");
    for (size_t i = 0; i < shown; i++) {
        if (i)
            sbuf_put(&o->out, ",", 1);
        sbuf_puts(&o->out, ents[i].json);
    }
    sbuf_puts(&o->out, "],\"next\":");
    if (more && shown)
        sbuf_json_str(&o->out, ents[shown - 1].name);
    else
        sbuf_puts(&o->out, "null");
    sbuf_printf(&o->out, ",\"shards\":%zu}", shards);
    rc = o->out.oom ? OPTD_E_NOMEM : OPTD_OK;
    o->status = 200;
done:
    if (rc)
        sbuf_free(&o->out);
    o->rc = rc;
    for (size_t i = 0; i < nent; i++)
        free(ents[i].json);
    free(ents);
    for (size_t i = 0; f && i < s->npeers; i++) {
        sbuf_free(&f[i].body);
        cJSON_Delete(f[i].json);
    }
    free(f);
    for (size_t i = 0; i < nrows; i++)
        store_session_clear(&rows[i]);
    free(rows);
}

/* ---- Threads ---------------------------------------------------------- */

typedef struct task {
    ops *s;
    op *o;
} task;

static void *op_main(void *arg)
{
    task t = *(task *)arg;
    free(arg);
    if (t.o->kind == OP_BACKUP)
        run_backup(t.s, t.o);
    else
        run_list(t.s, t.o);
    t.o->on_done(t.o, t.o->done_ctx); /* t.o may be gone after this */
    pthread_mutex_lock(&t.s->mu);
    t.s->running--;
    pthread_cond_broadcast(&t.s->cv);
    pthread_mutex_unlock(&t.s->mu);
    return NULL;
}

optd_err ops_submit(ops *s, op *o)
{
    pthread_attr_t attr;
    pthread_t th;
    optd_err rc = OPTD_OK;
    task *t = malloc(sizeof *t);
    if (!t)
        return OPTD_E_NOMEM;
    t->s = s;
    t->o = o;
    o->rc = OPTD_OK;
    o->status = 0;
    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        rc = OPTD_E_UNAVAILABLE;
    } else {
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &attr, op_main, t) != 0)
            rc = OPTD_E_UNAVAILABLE;
        else
            s->running++;
        pthread_attr_destroy(&attr);
    }
    pthread_mutex_unlock(&s->mu);
    if (rc)
        free(t);
    return rc;
}
