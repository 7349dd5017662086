/* A full disk for tests that cannot mount a small file system (no user namespaces, no root).

Preloaded into a process (LD_PRELOAD), it lets writes to files under $FULL_DISK_DIR succeed until
$FULL_DISK_BYTES bytes have been written there, and then answers each one as a full disk does:
-1 with errno ENOSPC. Every writer in the process goes through it (Python's files, tensorstore's
C++), since they all call these C library functions, and statvfs() under that folder reports what
is left of the budget as the space free. Space that is freed is not given back: the budget only
shrinks, which is all a test of "the disk fills during a save" needs.

Built by tests/train/test_faults.py with `cc -shared -fPIC`; used only there.
*/
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static long long budget = -1; /* bytes still writable under the folder; -1 until read from the environment */

/* Whether the (absolute, resolved) path is $FULL_DISK_DIR or inside it. */
static int inside(const char *path) {
    const char *folder = getenv("FULL_DISK_DIR");
    if (folder == NULL)
        return 0;
    size_t len = strlen(folder);
    return strncmp(path, folder, len) == 0 && (path[len] == '/' || path[len] == '\0');
}

static int under_folder(int fd) {
    char link[64], path[4096];
    if (fd < 0)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return 0;
    path[n] = '\0';
    return inside(path);
}

static long long budget_left(void) {
    if (__atomic_load_n(&budget, __ATOMIC_SEQ_CST) < 0) {
        const char *bytes = getenv("FULL_DISK_BYTES");
        long long start = bytes ? atoll(bytes) : 0, unset = -1;
        __atomic_compare_exchange_n(&budget, &unset, start, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    return __atomic_load_n(&budget, __ATOMIC_SEQ_CST);
}

/* Take n bytes from the budget; 0 (and errno ENOSPC) when they do not fit. */
static int room_for(int fd, size_t n) {
    if (n == 0 || !under_folder(fd))
        return 1;
    long long left = budget_left();
    while (left >= (long long)n) {
        if (__atomic_compare_exchange_n(&budget, &left, left - (long long)n, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 1;
    }
    __atomic_store_n(&budget, 0, __ATOMIC_SEQ_CST); /* full: nothing fits any more, not even a smaller write */
    errno = ENOSPC;
    return 0;
}

static size_t total(const struct iovec *iov, int count) {
    size_t n = 0;
    for (int i = 0; i < count; i++)
        n += iov[i].iov_len;
    return n;
}

#define REAL(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

ssize_t write(int fd, const void *buf, size_t n) {
    return room_for(fd, n) ? REAL(write)(fd, buf, n) : -1;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t offset) {
    return room_for(fd, n) ? REAL(pwrite)(fd, buf, n, offset) : -1;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t offset) {
    return room_for(fd, n) ? REAL(pwrite64)(fd, buf, n, offset) : -1;
}

ssize_t writev(int fd, const struct iovec *iov, int count) {
    return room_for(fd, total(iov, count)) ? REAL(writev)(fd, iov, count) : -1;
}

ssize_t pwritev(int fd, const struct iovec *iov, int count, off_t offset) {
    return room_for(fd, total(iov, count)) ? REAL(pwritev)(fd, iov, count, offset) : -1;
}

int statvfs(const char *path, struct statvfs *buf) {
    char resolved[4096];
    int result = REAL(statvfs)(path, buf);
    if (result == 0 && realpath(path, resolved) != NULL && inside(resolved) && buf->f_frsize > 0)
        buf->f_bavail = buf->f_bfree = (fsblkcnt_t)(budget_left() / (long long)buf->f_frsize);
    return result;
}

int statvfs64(const char *path, struct statvfs64 *buf) {
    char resolved[4096];
    int result = REAL(statvfs64)(path, buf);
    if (result == 0 && realpath(path, resolved) != NULL && inside(resolved) && buf->f_frsize > 0)
        buf->f_bavail = buf->f_bfree = (fsblkcnt64_t)(budget_left() / (long long)buf->f_frsize);
    return result;
}
