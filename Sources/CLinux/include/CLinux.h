#ifndef CLINUX_H
#define CLINUX_H

// Linux facilities Swift cannot reach through its Glibc module: constants that need _GNU_SOURCE
// (O_DIRECT, FALLOC_FL_*, SEEK_DATA, RWF_DSYNC), the variadic ioctl, and statx's DIO alignment.

#include <stdint.h>

extern const int CLINUX_O_DIRECT;
extern const int CLINUX_FALLOC_FL_KEEP_SIZE;
extern const int CLINUX_FALLOC_FL_PUNCH_HOLE;
extern const int CLINUX_FALLOC_FL_ZERO_RANGE;
extern const int CLINUX_SEEK_DATA;
extern const int CLINUX_SEEK_HOLE;
extern const int CLINUX_RWF_DSYNC;

/// Size in bytes of the block device open on `fd` (BLKGETSIZE64). Returns 0 or -errno.
int clinux_block_device_size(int fd, uint64_t *size);

/// Logical sector size of the block device open on `fd` (BLKSSZGET). Returns 0 or -errno.
int clinux_block_device_logical_sector(int fd, uint32_t *size);

/// O_DIRECT alignment for the file open on `fd` (statx STATX_DIOALIGN). Returns 0 with both set,
/// -EOPNOTSUPP when the kernel or filesystem does not report it, or -errno.
int clinux_dio_alignment(int fd, uint32_t *memory_align, uint32_t *offset_align);

/// fallocate(2), wrapped so Swift does not depend on _GNU_SOURCE. Returns 0 or -errno.
int clinux_fallocate(int fd, int mode, uint64_t offset, uint64_t length);

/// sync_file_range(2) starting writeback of a range without waiting. Returns 0 or -errno.
int clinux_start_writeback(int fd, uint64_t offset, uint64_t length);

/// sync_file_range(2) waiting until a range is written back (no metadata, no cache flush: not a
/// durability point). Returns 0 or -errno.
int clinux_wait_writeback(int fd, uint64_t offset, uint64_t length);

/// How many of the pages in [offset, offset + length) of the file open on `fd` are in the page
/// cache (cachestat(2), Linux 6.5). Returns 0, -ENOSYS where the kernel lacks it, or -errno.
int clinux_cached_pages(int fd, uint64_t offset, uint64_t length, uint64_t *cached);

/// A non-blocking, close-on-exec eventfd. Returns the fd or -errno.
int clinux_eventfd(void);

/// Keeps large request buffers (up to 64 MiB) in the heap instead of fresh mmaps, so a buffer
/// freed after one request is reused by the next without page faults.
void clinux_keep_large_allocations_in_heap(void);
/// malloc_trim(0): hands free heap memory of every arena back to the kernel.
void clinux_release_free_memory(void);

/// Names the calling thread (shown by top -H and perf); at most 15 bytes are kept.
void clinux_set_thread_name(const char *name);

#endif
