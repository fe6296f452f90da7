import CIOURing

#if canImport(Glibc)
import Glibc
#endif

/// Data-device I/O through one io_uring, owned by one thread.
///
/// Submission and reaping both happen on the owning thread, so there is no lock and no thread hop
/// per request; the kernel signals the registered eventfd for every completion.
public final class URingIOQueue: IOQueue {
    private let ring: OpaquePointer
    public let completionFD: Int32
    public var engineName: String { "io_uring" }
    /// Completions reaped while making room to submit, handed out by the next `reap`.
    private var held: [(UInt64, Int32)] = []
    private var unsubmitted = 0

    public init(entries: UInt32 = 256) throws(SystemError) {
        var err: Int32 = 0
        guard let ring = curing_create(entries, &err) else {
            throw SystemError("io_uring_queue_init", "\(entries) entries", errno: -err)
        }
        self.ring = ring
        do {
            completionFD = try makeEventFD()
        } catch {
            curing_destroy(ring)
            throw error
        }
        let rc = curing_register_eventfd(ring, completionFD)
        if rc < 0 {
            curing_destroy(ring)
            close(completionFD)
            throw SystemError("io_uring_register_eventfd", "completion notifier", errno: -rc)
        }
    }

    deinit {
        curing_destroy(ring)
        close(completionFD)
    }

    public func enqueue(_ operation: IOOperation, tag: UInt64) {
        while prepare(operation, tag: tag) == -EBUSY {
            submit()  // The submission queue is full: hand it to the kernel and retry.
        }
        unsubmitted += 1
    }

    private func prepare(_ operation: IOOperation, tag: UInt64) -> Int32 {
        switch operation {
        case .read(let fd, let buffer, let count, let offset):
            return curing_prep_read(ring, fd, buffer, UInt32(count), offset, tag)
        case .write(let fd, let buffer, let count, let offset, let durable):
            return curing_prep_write(ring, fd, buffer, UInt32(count), offset, durable ? RWF_DSYNC_FLAG : 0, tag)
        case .writev(let fd, let iovecs, let count, let offset, let durable):
            return curing_prep_writev(ring, fd, iovecs, UInt32(count), offset, durable ? RWF_DSYNC_FLAG : 0, tag)
        case .fdatasync(let fd):
            return curing_prep_fdatasync(ring, fd, tag)
        case .fallocate(let fd, let mode, let offset, let length):
            return curing_prep_fallocate(ring, fd, mode, offset, length, tag)
        }
    }

    public func submit() {
        while unsubmitted > 0 {
            let rc = curing_submit(ring)
            if rc >= 0 {
                unsubmitted -= Int(rc)
                if rc == 0 { break }
                continue
            }
            switch -rc {
            case EINTR:
                continue
            case EAGAIN, EBUSY:
                // The completion queue is full: take completions off it, then submit again.
                reapIntoHeld()
            default:
                preconditionFailure("io_uring_submit failed: errno \(-rc)")
            }
        }
    }

    private func reapIntoHeld() {
        _ = reapRing { held.append(($0, $1)) }
    }

    @discardableResult
    public func reap(_ body: (UInt64, Int32) -> Void) -> Int {
        var count = 0
        if !held.isEmpty {
            let batch = held
            held.removeAll(keepingCapacity: true)
            for (tag, result) in batch { body(tag, result) }
            count += batch.count
        }
        return count + reapRing(body)
    }

    private func reapRing(_ body: (UInt64, Int32) -> Void) -> Int {
        let batchSize = 64
        var total = 0
        withUnsafeTemporaryAllocation(of: UInt64.self, capacity: batchSize) { tags in
            withUnsafeTemporaryAllocation(of: Int32.self, capacity: batchSize) { results in
                while true {
                    let n = Int(curing_reap(ring, tags.baseAddress!, results.baseAddress!, UInt32(batchSize)))
                    for i in 0..<n { body(tags[i], results[i]) }
                    total += n
                    if n < batchSize { break }
                }
            }
        }
        return total
    }
}

import CLinux

private let RWF_DSYNC_FLAG = CLINUX_RWF_DSYNC
