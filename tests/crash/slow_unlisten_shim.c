/* slow_unlisten_shim: an LD_PRELOAD library that widens one race of
 * libmicrohttpd 0.9.75 so a test can hit it every time. When the process's
 * main thread removes a listening socket from an epoll set (what
 * MHD_quiesce_daemon does for each worker thread), the removal waits
 * $OPTD_UNLISTEN_DELAY_MS (default 300) first. A worker thread that wakes
 * meanwhile sees the daemon quiesced and removes the socket itself; the main
 * thread's removal then fails with ENOENT, which MHD_quiesce_daemon does not
 * tolerate: MHD_PANIC, abort(), a shutdown that exits on SIGABRT. Without the
 * delay that window is a few instructions wide: one CI run in many. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef int (*epoll_ctl_fn)(int, int, int, struct epoll_event *);

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    static epoll_ctl_fn real;
    int listening = 0;
    socklen_t len = sizeof listening;
    if (!real)
        real = (epoll_ctl_fn)dlsym(RTLD_NEXT, "epoll_ctl");
    if (op == EPOLL_CTL_DEL && gettid() == getpid() &&
        getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening) {
        const char *e = getenv("OPTD_UNLISTEN_DELAY_MS");
        long ms = e ? atol(e) : 300;
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    return real(epfd, op, fd, ev);
}
