/* eio_shim: an LD_PRELOAD library that makes storage I/O fail with EIO on
 * demand, for tests/faults. While the control file exists, the calls it names
 * fail; remove the file and they work again. The control file is
 * $OPTD_EIO_CONTROL, or /tmp/optd-eio-<pid> when that is unset. Its content
 * picks what fails (default "ws"):
 *   w  pwrite, pwrite64, write and writev on regular files (never sockets,
 *      pipes or terminals, so the daemon can still answer and log)
 *   s  fsync and fdatasync
 *   r  pread and pread64 on regular files
 * Optionally followed by a space and a path substring: only files whose
 * /proc/self/fd link contains it fail (e.g. "w -wal").
 * Each failed call increments the counter in <control>.count (best effort),
 * so a test can tell the fault was hit. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef ssize_t (*pwrite64_fn)(int, const void *, size_t, off64_t);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*writev_fn)(int, const struct iovec *, int);
typedef ssize_t (*pread_fn)(int, void *, size_t, off_t);
typedef ssize_t (*pread64_fn)(int, void *, size_t, off64_t);
typedef int (*sync_fn)(int);

static const char *control_path(void)
{
    static char path[512];
    if (!path[0]) {
        const char *e = getenv("OPTD_EIO_CONTROL");
        if (e && *e)
            snprintf(path, sizeof path, "%s", e);
        else
            snprintf(path, sizeof path, "/tmp/optd-eio-%d", (int)getpid());
    }
    return path;
}

/* Whether a call of kind k ('w', 's' or 'r') on fd must fail now. Uses raw
 * syscalls that are not interposed here (open/read of the control file). */
static int should_fail(char k, int fd)
{
    char spec[256];
    int cfd = open(control_path(), O_RDONLY | O_CLOEXEC);
    if (cfd < 0)
        return 0;
    ssize_t n = read(cfd, spec, sizeof spec - 1);
    close(cfd);
    spec[n > 0 ? n : 0] = '\0';
    char *nl = strchr(spec, '\n');
    if (nl)
        *nl = '\0';
    const char *kinds = spec[0] && spec[0] != ' ' ? spec : "ws";
    const char *sp = strchr(spec, ' ');
    size_t klen = sp ? (size_t)(sp - spec) : strlen(spec);
    if (!spec[0] || spec[0] == ' ')
        klen = 2;
    if (!memchr(kinds, k, klen))
        return 0;
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode))
        return 0;
    if (sp && sp[1]) {
        char link[64], target[512];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t t = readlink(link, target, sizeof target - 1);
        if (t < 0)
            return 0;
        target[t] = '\0';
        if (!strstr(target, sp + 1))
            return 0;
    }
    /* Count the hit. */
    char cpath[600];
    snprintf(cpath, sizeof cpath, "%s.count", control_path());
    int f = open(cpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (f >= 0) {
        static write_fn real_write;
        if (!real_write)
            real_write = (write_fn)dlsym(RTLD_NEXT, "write");
        if (real_write(f, &k, 1) < 0) {
            /* a lost count only weakens a test's message */
        }
        close(f);
    }
    return 1;
}


/* Declares real_<name>, the next definition of name (libc's). */
#define REAL(name, type)                                                                                             \
    static type real_##name;                                                                                         \
    if (!real_##name)                                                                                                \
    real_##name = (type)dlsym(RTLD_NEXT, #name)

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    REAL(pwrite, pwrite_fn);
    if (should_fail('w', fd))
        return errno = EIO, -1;
    return real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    REAL(pwrite64, pwrite64_fn);
    if (should_fail('w', fd))
        return errno = EIO, -1;
    return real_pwrite64(fd, buf, n, off);
}

ssize_t write(int fd, const void *buf, size_t n)
{
    REAL(write, write_fn);
    if (fd > 2 && should_fail('w', fd))
        return errno = EIO, -1;
    return real_write(fd, buf, n);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    REAL(writev, writev_fn);
    if (fd > 2 && should_fail('w', fd))
        return errno = EIO, -1;
    return real_writev(fd, iov, cnt);
}

ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
    REAL(pread, pread_fn);
    if (should_fail('r', fd))
        return errno = EIO, -1;
    return real_pread(fd, buf, n, off);
}

ssize_t pread64(int fd, void *buf, size_t n, off64_t off)
{
    REAL(pread64, pread64_fn);
    if (should_fail('r', fd))
        return errno = EIO, -1;
    return real_pread64(fd, buf, n, off);
}

int fsync(int fd)
{
    REAL(fsync, sync_fn);
    if (should_fail('s', fd))
        return errno = EIO, -1;
    return real_fsync(fd);
}

int fdatasync(int fd)
{
    REAL(fdatasync, sync_fn);
    if (should_fail('s', fd))
        return errno = EIO, -1;
    return real_fdatasync(fd);
}
