#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <malloc.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "CLinux.h"

const int CLINUX_O_DIRECT = O_DIRECT;
const int CLINUX_FALLOC_FL_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int CLINUX_FALLOC_FL_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int CLINUX_FALLOC_FL_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const int CLINUX_SEEK_DATA = SEEK_DATA;
const int CLINUX_SEEK_HOLE = SEEK_HOLE;
const int CLINUX_RWF_DSYNC = RWF_DSYNC;

int clinux_block_device_size(int fd, uint64_t *size) {
    return ioctl(fd, BLKGETSIZE64, size) == 0 ? 0 : -errno;
}

int clinux_block_device_logical_sector(int fd, uint32_t *size) {
    int s = 0;
    if (ioctl(fd, BLKSSZGET, &s) != 0) return -errno;
    *size = (uint32_t)s;
    return 0;
}

int clinux_dio_alignment(int fd, uint32_t *memory_align, uint32_t *offset_align) {
#ifdef STATX_DIOALIGN
    struct statx stx;
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) != 0) return -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_offset_align == 0) return -EOPNOTSUPP;
    *memory_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 0;
#else
    (void)fd; (void)memory_align; (void)offset_align;
    return -EOPNOTSUPP;
#endif
}

int clinux_fallocate(int fd, int mode, uint64_t offset, uint64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length) == 0 ? 0 : -errno;
}

int clinux_start_writeback(int fd, uint64_t offset, uint64_t length) {
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE) == 0 ? 0 : -errno;
}

int clinux_wait_writeback(int fd, uint64_t offset, uint64_t length) {
    unsigned flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    return sync_file_range(fd, (off_t)offset, (off_t)length, flags) == 0 ? 0 : -errno;
}

#ifndef __NR_cachestat
#define __NR_cachestat 451  // The same number on every architecture (added in 6.5 to the generic table).
#endif

// The kernel's uapi structs (linux/mman.h from 6.5); declared here so older headers build.
struct clinux_cachestat_range { uint64_t off; uint64_t len; };
struct clinux_cachestat {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

int clinux_cached_pages(int fd, uint64_t offset, uint64_t length, uint64_t *cached) {
    struct clinux_cachestat_range range = { offset, length };
    struct clinux_cachestat stat;
    if (syscall(__NR_cachestat, fd, &range, &stat, 0) != 0) return -errno;
    *cached = stat.nr_cache;
    return 0;
}

int clinux_eventfd(void) {
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return fd >= 0 ? fd : -errno;
}

void clinux_keep_large_allocations_in_heap(void) {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    /* An arena whose buffers were all freed (a resource's writes written back) gives back its top at
       once, not at the next malloc_trim: another thread's arena does not reuse it. */
    mallopt(M_TRIM_THRESHOLD, 16 << 20);
}

void clinux_release_free_memory(void) {
    malloc_trim(0);
}

void clinux_set_thread_name(const char *name) {
    char truncated[16];
    strncpy(truncated, name, sizeof truncated - 1);
    truncated[sizeof truncated - 1] = 0;
    pthread_setname_np(pthread_self(), truncated);
}
