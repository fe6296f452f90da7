import CLinux
import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Data-device I/O with pread/pwrite/fdatasync/fallocate on worker threads: the fallback where
/// io_uring is unavailable (disabled by sysctl, seccomp, old kernels), or when forced.
///
/// Workers post results into a locked list and signal the eventfd once per empty-to-non-empty
/// transition, so the owning thread reaps them in batches just as with io_uring.
public final class ThreadPoolIOQueue: IOQueue, @unchecked Sendable {
    public let completionFD: Int32
    public var engineName: String { "threads" }
    private var batch: [(IOOperation, UInt64)] = []
    private let completions = Mutex<[(UInt64, Int32)]>([])
    private let workers = DispatchQueue(label: "marsd.io", qos: .userInitiated, attributes: .concurrent)

    public init() throws(SystemError) {
        completionFD = try makeEventFD()
    }

    deinit {
        close(completionFD)
    }

    public func enqueue(_ operation: IOOperation, tag: UInt64) {
        batch.append((operation, tag))
    }

    public func submit() {
        for (operation, tag) in batch {
            workers.async { [self] in
                let result = Self.execute(operation)
                let wasEmpty = completions.withLock { list in
                    list.append((tag, result))
                    return list.count == 1
                }
                if wasEmpty {
                    var one: UInt64 = 1
                    _ = write(completionFD, &one, 8)
                }
            }
        }
        batch.removeAll(keepingCapacity: true)
    }

    @discardableResult
    public func reap(_ body: (UInt64, Int32) -> Void) -> Int {
        let ready = completions.withLock { list in
            let taken = list
            list.removeAll(keepingCapacity: true)
            return taken
        }
        for (tag, result) in ready { body(tag, result) }
        return ready.count
    }

    /// Runs one operation synchronously; loops over short transfers like io_uring's kernel side.
    public static func execute(_ operation: IOOperation) -> Int32 {
        switch operation {
        case .read(let fd, let buffer, let count, let offset):
            return transfer(count) { done in pread(fd, buffer + done, count - done, off_t(offset) + off_t(done)) }
        case .write(let fd, let buffer, let count, let offset, let durable):
            let written = transfer(count) { done in
                pwrite(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            }
            if written >= 0, durable, fdatasync(fd) != 0 { return -errno }
            return written
        case .writev(let fd, let iovecs, let count, let offset, let durable):
            // One call; a short count is reported and the caller continues with the rest.
            var written = pwritev(fd, iovecs, Int32(count), off_t(offset))
            while written < 0 && errno == EINTR { written = pwritev(fd, iovecs, Int32(count), off_t(offset)) }
            if written < 0 { return -errno }
            if durable, fdatasync(fd) != 0 { return -errno }
            return Int32(written)
        case .fdatasync(let fd):
            while fdatasync(fd) != 0 {
                if errno != EINTR { return -errno }
            }
            return 0
        case .fallocate(let fd, let mode, let offset, let length):
            return clinux_fallocate(fd, mode, offset, length)
        }
    }

    private static func transfer(_ count: Int, _ step: (Int) -> Int) -> Int32 {
        var done = 0
        while done < count {
            let n = step(done)
            if n < 0 {
                if errno == EINTR { continue }
                return -errno
            }
            if n == 0 { break }  // End of file: report the short count.
            done += n
        }
        return Int32(done)
    }
}
