/* The HTTP ceiling: a minimal libmicrohttpd server, started with the same
 * threading flags as optd's http/http.c (internal polling thread, epoll via
 * MHD_USE_AUTO, a pool of 4 threads), that reads each request's body and
 * answers a fixed 20-byte JSON. No parsing, no storage: whatever optd spends
 * beyond this is its own work.
 *
 * Usage: mhd_ceiling [--port P] [--threads N]; prints "listening on PORT"
 * (port 0 picks a free one) and serves until SIGTERM/SIGINT. */
#include <microhttpd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char reply[] = "{\"ok\":true,\"step\":1}"; /* 20 bytes */
static struct MHD_Response *resp;
static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **req)
{
    static int first;
    (void)cls;
    (void)url;
    (void)method;
    (void)version;
    (void)upload_data;
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
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--port"))
            port = (unsigned)atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            threads = (unsigned)atoi(argv[i + 1]);
    }
    resp = MHD_create_response_from_buffer(sizeof reply - 1, (void *)reply, MHD_RESPMEM_PERSISTENT);
    MHD_add_response_header(resp, "Content-Type", "application/json");
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO;
    struct MHD_Daemon *d = MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, NULL, MHD_OPTION_CONNECTION_LIMIT, 1024u,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)64 * 1024, threads > 1 ? MHD_OPTION_THREAD_POOL_SIZE : MHD_OPTION_END,
        threads, MHD_OPTION_END);
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
    MHD_stop_daemon(d);
    MHD_destroy_response(resp);
    return 0;
}
