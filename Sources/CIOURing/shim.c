#include <errno.h>
#include <liburing.h>
#include <stdlib.h>

#include "CIOURing.h"

struct curing {
    struct io_uring ring;
};

curing_t *curing_create(unsigned entries, int *err) {
    curing_t *r = calloc(1, sizeof(*r));
    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    int rc = io_uring_queue_init(entries, &r->ring, 0);
    if (rc < 0) {
        free(r);
        *err = rc;
        return NULL;
    }
    *err = 0;
    return r;
}

void curing_destroy(curing_t *r) {
    if (!r) return;
    io_uring_queue_exit(&r->ring);
    free(r);
}

int curing_register_eventfd(curing_t *r, int eventfd) { return io_uring_register_eventfd(&r->ring, eventfd); }

unsigned curing_sq_space_left(curing_t *r) { return io_uring_sq_space_left(&r->ring); }

int curing_prep_read(curing_t *r, int fd, void *buf, unsigned n, uint64_t off, uint64_t ud) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_read(sqe, fd, buf, n, off);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

int curing_prep_write(curing_t *r, int fd, const void *buf, unsigned n, uint64_t off, int rw_flags, uint64_t ud) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_write(sqe, fd, buf, n, off);
    sqe->rw_flags = rw_flags;
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

int curing_prep_writev(curing_t *r, int fd, const void *iov, unsigned nr, uint64_t off, int rw_flags, uint64_t ud) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_writev(sqe, fd, (const struct iovec *)iov, nr, off);
    sqe->rw_flags = rw_flags;
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

int curing_prep_fdatasync(curing_t *r, int fd, uint64_t ud) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

int curing_prep_fallocate(curing_t *r, int fd, int mode, uint64_t off, uint64_t len, uint64_t ud) {
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    io_uring_prep_fallocate(sqe, fd, mode, off, len);
    io_uring_sqe_set_data64(sqe, ud);
    return 0;
}

int curing_submit(curing_t *r) { return io_uring_submit(&r->ring); }

unsigned curing_reap(curing_t *r, uint64_t *ud, int32_t *res, unsigned max) {
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (n == max) break;
        ud[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return n;
}
