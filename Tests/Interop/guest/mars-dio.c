/*
 * mars-dio: O_DIRECT block-device I/O for the swift-mars guest test.
 *
 * busybox dd silently drops O_DIRECT when a write fails with EINVAL (its
 * buffers are not aligned), so the guest cannot rely on it to produce
 * requests of exactly one logical block. This helper uses page-aligned
 * buffers and fails loudly instead of falling back.
 *
 *   mars-dio write DEV OFFSET CHUNK FILE    write FILE at OFFSET, one
 *                                           pwrite(O_DIRECT) per CHUNK bytes
 *   mars-dio zero  DEV OFFSET CHUNK LENGTH  write LENGTH zero bytes likewise
 *   mars-dio read  DEV OFFSET CHUNK LENGTH OUTFILE
 *                                           pread(O_DIRECT) per CHUNK bytes
 *
 * OFFSET, CHUNK and lengths must be multiples of the logical block size.
 * Built on the host by run-guest-tests.sh (gcc -static) into the initramfs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *what)
{
    fprintf(stderr, "mars-dio: %s: %s\n", what, strerror(errno));
    exit(1);
}

static long long num(const char *s)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || *end || v < 0) {
        fprintf(stderr, "mars-dio: bad number '%s'\n", s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: mars-dio write|zero|read DEV OFFSET CHUNK FILE|LENGTH [OUT]\n");
        return 2;
    }
    const char *mode = argv[1];
    long long off = num(argv[3]);
    long long chunk = num(argv[4]);
    if (chunk <= 0 || chunk > (64 << 20)) {
        fprintf(stderr, "mars-dio: bad chunk size\n");
        return 2;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, (size_t)chunk))
        die("posix_memalign");
    memset(buf, 0, (size_t)chunk);

    if (!strcmp(mode, "write") || !strcmp(mode, "zero")) {
        int in = -1;
        long long len;
        if (!strcmp(mode, "write")) {
            struct stat st;
            in = open(argv[5], O_RDONLY);
            if (in < 0 || fstat(in, &st))
                die(argv[5]);
            len = st.st_size;
        } else {
            len = num(argv[5]);
        }
        int fd = open(argv[2], O_WRONLY | O_DIRECT);
        if (fd < 0)
            die(argv[2]);
        for (long long done = 0; done < len;) {
            size_t n = (size_t)(len - done < chunk ? len - done : chunk);
            if (in >= 0) {
                size_t got = 0;
                while (got < n) {
                    ssize_t r = read(in, (char *)buf + got, n - got);
                    if (r <= 0)
                        die("read input");
                    got += (size_t)r;
                }
            }
            ssize_t w = pwrite(fd, buf, n, off + done);
            if (w != (ssize_t)n) {
                if (w >= 0)
                    errno = EIO;
                die("pwrite");
            }
            done += (long long)n;
        }
        if (fsync(fd))
            die("fsync");
        close(fd);
        return 0;
    }
    if (!strcmp(mode, "read") && argc >= 7) {
        long long len = num(argv[5]);
        int fd = open(argv[2], O_RDONLY | O_DIRECT);
        if (fd < 0)
            die(argv[2]);
        int out = open(argv[6], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (out < 0)
            die(argv[6]);
        for (long long done = 0; done < len;) {
            size_t n = (size_t)(len - done < chunk ? len - done : chunk);
            ssize_t r = pread(fd, buf, n, off + done);
            if (r != (ssize_t)n) {
                if (r >= 0)
                    errno = EIO;
                die("pread");
            }
            if (write(out, buf, n) != (ssize_t)n)
                die("write output");
            done += (long long)n;
        }
        close(out);
        close(fd);
        return 0;
    }
    fprintf(stderr, "mars-dio: unknown mode '%s'\n", mode);
    return 2;
}
