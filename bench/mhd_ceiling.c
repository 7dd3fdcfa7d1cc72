/* The HTTP ceiling and the durable floor: a minimal libmicrohttpd server,
 * started with the same threading flags as optd's http/http.c (internal
 * polling thread, epoll via MHD_USE_AUTO, a pool of 4 threads, suspend and
 * resume), that reads each request's body and answers it.
 *
 * Ceiling (default): a fixed 20-byte JSON reply. No parsing, no storage:
 * whatever optd spends beyond this is its own work.
 *
 * Floor (--floor FILE): what a durable step cannot do without (issue 14).
 * Each request is suspended and handed to one worker thread ("floor-writer"),
 * which takes every request queued so far as one group, appends 12 KB per
 * request (the body, then filler: the size of a 1,000-element Adam state) to
 * a ring file preallocated and synced at start, with one pwrite and one
 * fdatasync per group, then resumes them; each gets a 4,000-byte reply (the
 * params of 1,000 float32). --record and --reply change the sizes.
 *
 * Usage: mhd_ceiling [--port P] [--threads N] [--floor FILE [--record B]
 *                    [--reply B] [--ring-mb M]]
 * Prints "listening on PORT" (port 0 picks a free one) and serves until
 * SIGTERM/SIGINT; the floor then prints {"groups": G, "records": R} on
 * stderr. */
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "http/http.h" /* HTTP_CONN_MEMORY: optd's pool per connection */

static const char reply[] = "{\"ok\":true,\"step\":1}"; /* 20 bytes */
static struct MHD_Response *resp;
static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

/* ---- The floor's worker ------------------------------------------------------ */

/* One request of the floor: made on the first call, queued for the worker
 * once its body is in, answered after the worker resumed it, freed then. */
typedef struct floor_req {
    struct MHD_Connection *conn;
    struct floor_req *next;
    size_t len; /* body bytes kept in rec (at most record size) */
    int state;  /* 0 reading, 1 queued, 2 durable */
    unsigned char rec[];
} floor_req;

static struct {
    int fd;
    size_t record, reply_bytes, ring; /* bytes */
    off_t off;                        /* next append in the ring */
    unsigned char *group;             /* the group's bytes, record * max_group */
    size_t max_group;                 /* requests per group buffer */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    floor_req *head, *tail;
    int quit;
    unsigned long groups, records;
} fl = {.fd = -1,
        .record = 12000,
        .reply_bytes = 4000,
        .ring = 64u << 20,
        .mu = PTHREAD_MUTEX_INITIALIZER,
        .cv = PTHREAD_COND_INITIALIZER};

/* Writes n records (one group) at the ring's next offset, wrapping to the
 * start when they do not fit, with one pwrite and one fdatasync. */
static int floor_append(size_t n)
{
    size_t bytes = n * fl.record;
    if ((size_t)fl.off + bytes > fl.ring)
        fl.off = 0;
    for (size_t done = 0; done < bytes;) {
        ssize_t w = pwrite(fl.fd, fl.group + done, bytes - done, fl.off + (off_t)done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            perror("mhd_ceiling: pwrite");
            return -1;
        }
        done += (size_t)w;
    }
    if (fdatasync(fl.fd) != 0) {
        perror("mhd_ceiling: fdatasync");
        return -1;
    }
    fl.off += (off_t)bytes;
    return 0;
}

/* Takes every queued request as one group: their records go to the ring,
 * then each connection is resumed to send its reply. */
static void *floor_worker(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&fl.mu);
    for (;;) {
        while (!fl.head && !fl.quit)
            pthread_cond_wait(&fl.cv, &fl.mu);
        if (!fl.head)
            break;
        floor_req *batch = fl.head;
        fl.head = fl.tail = NULL;
        pthread_mutex_unlock(&fl.mu);
        while (batch) {
            floor_req *r = batch, *end = batch;
            size_t n = 0;
            for (; end && n < fl.max_group; end = end->next, n++) {
                memcpy(fl.group + n * fl.record, end->rec, end->len);
                memset(fl.group + n * fl.record + end->len, 0x5a, fl.record - end->len);
            }
            if (floor_append(n) != 0)
                exit(1);
            fl.groups++;
            fl.records += n;
            for (; r != end; r = batch) {
                batch = r->next;
                pthread_mutex_lock(&fl.mu);
                r->state = 2;
                pthread_mutex_unlock(&fl.mu);
                MHD_resume_connection(r->conn);
            }
            batch = end;
        }
        pthread_mutex_lock(&fl.mu);
    }
    pthread_mutex_unlock(&fl.mu);
    return NULL;
}

static int floor_open(const char *path, size_t ring_mb)
{
    fl.ring = ring_mb << 20;
    fl.ring -= fl.ring % fl.record;
    /* A group holds at most one request per connection; 1,024 is the limit. */
    fl.max_group = 1024;
    fl.group = malloc(fl.max_group * fl.record);
    fl.fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (!fl.group || fl.fd < 0) {
        perror("mhd_ceiling: floor file");
        return -1;
    }
    /* Preallocated and synced once, so an append changes no metadata. */
    int rc = posix_fallocate(fl.fd, 0, (off_t)fl.ring);
    if (rc != 0 || fdatasync(fl.fd) != 0) {
        fprintf(stderr, "mhd_ceiling: cannot preallocate %s: %s\n", path, strerror(rc ? rc : errno));
        return -1;
    }
    return 0;
}

static enum MHD_Result floor_request(struct MHD_Connection *c, const char *upload_data, size_t *upload_data_size,
                                     void **req)
{
    floor_req *r = *req;
    if (!r) { /* first call: headers only */
        r = calloc(1, sizeof *r + fl.record);
        if (!r)
            return MHD_NO;
        r->conn = c;
        *req = r;
        return MHD_YES;
    }
    if (*upload_data_size) { /* a piece of the body: kept, up to one record */
        size_t take = *upload_data_size < fl.record - r->len ? *upload_data_size : fl.record - r->len;
        memcpy(r->rec + r->len, upload_data, take);
        r->len += take;
        *upload_data_size = 0;
        return MHD_YES;
    }
    pthread_mutex_lock(&fl.mu);
    int state = r->state;
    if (state == 0) {
        r->state = 1;
        if (fl.tail)
            fl.tail->next = r;
        else
            fl.head = r;
        fl.tail = r;
        /* Suspended before the worker can resume it: the lock orders both. */
        MHD_suspend_connection(c);
        pthread_cond_signal(&fl.cv);
    }
    pthread_mutex_unlock(&fl.mu);
    if (state == 0 || state == 1)
        return MHD_YES;
    free(r);
    *req = NULL;
    return MHD_queue_response(c, MHD_HTTP_OK, resp);
}

/* ---- The server ------------------------------------------------------------- */

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size, void **req)
{
    static int first;
    (void)url;
    (void)method;
    (void)version;
    if (cls)
        return floor_request(c, upload_data, upload_data_size, req);
    if (!*req) { /* first call: headers only */
        *req = &first;
        return MHD_YES;
    }
    if (*upload_data_size) { /* a piece of the body: consume it */
        *upload_data_size = 0;
        return MHD_YES;
    }
    return MHD_queue_response(c, MHD_HTTP_OK, resp);
}

int main(int argc, char **argv)
{
    unsigned port = 0, threads = 4;
    const char *floor_path = NULL;
    size_t ring_mb = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port"))
            port = (unsigned)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            threads = (unsigned)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--floor"))
            floor_path = argv[i + 1];
        else if (!strcmp(argv[i], "--record"))
            fl.record = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--reply"))
            fl.reply_bytes = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--ring-mb"))
            ring_mb = (size_t)atol(argv[i + 1]);
    }
    pthread_t worker;
    unsigned char *params = NULL;
    if (floor_path) {
        if (fl.record < 1 || ring_mb < 1 || floor_open(floor_path, ring_mb) != 0)
            return 1;
        params = calloc(1, fl.reply_bytes + 1);
        if (!params)
            return 1;
        resp = MHD_create_response_from_buffer(fl.reply_bytes, params, MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(resp, "Content-Type", "application/octet-stream");
        if (pthread_create(&worker, NULL, floor_worker, NULL) != 0)
            return 1;
        (void)pthread_setname_np(worker, "floor-writer");
    } else {
        resp = MHD_create_response_from_buffer(sizeof reply - 1, (void *)reply, MHD_RESPMEM_PERSISTENT);
        MHD_add_response_header(resp, "Content-Type", "application/json");
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | (floor_path ? MHD_ALLOW_SUSPEND_RESUME : 0);
    struct MHD_Daemon *d =
        MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_request, floor_path ? &fl : NULL,
                         MHD_OPTION_CONNECTION_LIMIT, 1024u, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_CONN_MEMORY,
                         threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END, threads, MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "mhd_ceiling: cannot start on port %u\n", port);
        return 1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    printf("listening on %u\n", info ? (unsigned)info->port : port);
    fflush(stdout);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    while (!stop)
        pause();
    /* The worker serves until MHD has stopped: a request it holds must be
     * resumed for MHD to close its connection. */
    MHD_stop_daemon(d);
    if (floor_path) {
        pthread_mutex_lock(&fl.mu);
        fl.quit = 1;
        pthread_cond_signal(&fl.cv);
        pthread_mutex_unlock(&fl.mu);
        pthread_join(worker, NULL);
        fprintf(stderr, "{\"groups\": %lu, \"records\": %lu}\n", fl.groups, fl.records);
        close(fl.fd);
        free(fl.group);
    }
    MHD_destroy_response(resp);
    free(params);
    return 0;
}
