#ifndef CIOURING_H
#define CIOURING_H

// The Swift-facing view of liburing. It deliberately does not include <liburing.h>: that header
// defines _XOPEN_SOURCE/_GNU_SOURCE, which changes glibc's fd_set and makes this module clash with
// Swift's Glibc module. The ring is opaque; every liburing static-inline helper is called in shim.c.

#include <stdint.h>

typedef struct curing curing_t;

/// Creates a ring with `entries` submission slots. Returns NULL and sets *err to -errno on failure.
curing_t *curing_create(unsigned entries, int *err);
void curing_destroy(curing_t *ring);

/// Makes the kernel signal `eventfd` whenever a completion is posted. Returns 0 or -errno.
int curing_register_eventfd(curing_t *ring, int eventfd);

/// Free submission slots.
unsigned curing_sq_space_left(curing_t *ring);

/// Each prep returns 0, or -EBUSY when the submission queue is full. `rw_flags` takes RWF_* values.
int curing_prep_read(curing_t *ring, int fd, void *buf, unsigned nbytes, uint64_t offset, uint64_t user_data);
int curing_prep_write(curing_t *ring, int fd, const void *buf, unsigned nbytes, uint64_t offset,
                      int rw_flags, uint64_t user_data);
/// `iov` points to `nr` struct iovec (opaque here so this header needs no <sys/uio.h>).
int curing_prep_writev(curing_t *ring, int fd, const void *iov, unsigned nr, uint64_t offset, int rw_flags,
                       uint64_t user_data);
int curing_prep_fdatasync(curing_t *ring, int fd, uint64_t user_data);
int curing_prep_fallocate(curing_t *ring, int fd, int mode, uint64_t offset, uint64_t length, uint64_t user_data);

/// Submits everything prepared. Returns the number submitted or -errno.
int curing_submit(curing_t *ring);

/// Copies up to `max` ready completions without blocking; returns how many.
unsigned curing_reap(curing_t *ring, uint64_t *user_data, int32_t *res, unsigned max);

#endif
