import CLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One data-device operation. Results follow io_uring: bytes transferred (or 0) on success, -errno
/// on failure.
///
/// The pointers are raw on purpose: the caller keeps each buffer alive, unmoved, until the
/// operation's completion has been reaped. That is what makes the type safe to hand to the kernel
/// or to a worker thread, hence `@unchecked Sendable`.
public enum IOOperation: @unchecked Sendable {
    case read(fd: Int32, buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64)
    /// `durable` asks for the data to be on stable storage when the write completes (RWF_DSYNC).
    case write(fd: Int32, buffer: UnsafeRawPointer, count: Int, offset: UInt64, durable: Bool)
    /// A gathered write from `count` iovecs (each buffer kept alive like the others).
    case writev(fd: Int32, iovecs: UnsafePointer<iovec>, count: Int, offset: UInt64, durable: Bool)
    case fdatasync(fd: Int32)
    case fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64)
}

/// A queue of data-device operations owned by one thread (an event loop).
///
/// Operations are enqueued, then submitted in a batch; completions are reaped in batches on the same
/// thread after `completionFD` (an eventfd) becomes readable. Nothing here is thread-safe except
/// what the implementation does internally.
public protocol IOQueue: AnyObject {
    /// An eventfd that becomes readable when completions wait to be reaped.
    var completionFD: Int32 { get }
    /// A short name for logs and status ("io_uring", "threads").
    var engineName: String { get }
    func enqueue(_ operation: IOOperation, tag: UInt64)
    /// Hands every enqueued operation to the kernel or the workers.
    func submit()
    /// Calls `body(tag, result)` for every completion ready now; returns how many.
    @discardableResult
    func reap(_ body: (UInt64, Int32) -> Void) -> Int
}

/// Which engine runs data-device I/O.
public enum IOEngine: String, Sendable, CaseIterable {
    /// io_uring when the kernel allows it, else threads.
    case auto
    case uring
    /// pread/pwrite/fdatasync on worker threads.
    case posix

    /// Creates the queue for one event loop; `ringEntries` sizes an io_uring.
    public func makeQueue(ringEntries: UInt32 = 256) throws(SystemError) -> any IOQueue {
        switch self {
        case .uring:
            return try URingIOQueue(entries: ringEntries)
        case .posix:
            return try ThreadPoolIOQueue()
        case .auto:
            if let queue = try? URingIOQueue(entries: ringEntries) { return queue }
            return try ThreadPoolIOQueue()
        }
    }
}

func makeEventFD() throws(SystemError) -> Int32 {
    let fd = clinux_eventfd()
    try Syscall.check("eventfd", "completion notifier", fd)
    return fd
}

/// Consumes an eventfd's counter so it stops being readable.
public func drainEventFD(_ fd: Int32) {
    var value: UInt64 = 0
    _ = read(fd, &value, 8)
}

/// fallocate modes the NBD commands map to. KEEP_SIZE: never change the size of a file export.
public enum FallocateMode {
    /// TRIM, and WRITE_ZEROES that may leave a hole.
    public static let punchHole: Int32 = CLINUX_FALLOC_FL_PUNCH_HOLE | CLINUX_FALLOC_FL_KEEP_SIZE
    /// WRITE_ZEROES with NO_HOLE: allocated, reads as zeroes.
    public static let zeroRange: Int32 = CLINUX_FALLOC_FL_ZERO_RANGE | CLINUX_FALLOC_FL_KEEP_SIZE
}

/// A page-aligned block of zeroes that writes of zeroes point at when fallocate cannot zero a range.
public struct ZeroBlock: @unchecked Sendable {
    public let address: UnsafeRawPointer
    public let size: Int

    /// One huge page: a zero-filled spare or range costs one pinned page per 2 MiB written.
    public static let shared: ZeroBlock = {
        let memory = DirectIOMemory.allocate(DirectIOMemory.hugePageSize)
        // Written once, so the pages exist (anonymous memory is zeroed; reads alone would map the shared zero page).
        memory.initializeMemory(as: UInt8.self, repeating: 0)
        return ZeroBlock(address: UnsafeRawPointer(memory.baseAddress!), size: memory.count)
    }()
}

/// Makes malloc keep buffers of up to 64 MiB in the heap. Request buffers (up to 32 MiB) are then
/// reused from one request to the next instead of being mmapped and page-faulted each time.
public func keepRequestBuffersInHeap() {
    clinux_keep_large_allocations_in_heap()
}

/// Returns request buffers the pool kept unused since the last call to malloc, and free heap memory
/// of every malloc arena to the kernel. Each thread that allocated has an arena, and an arena keeps
/// freed memory below its top, and up to 16 MiB at its top, for reuse: a quiet daemon gives it back
/// this way (peak RSS of a primary serving writes, fetches and a sync: 316 -> 87 MiB when
/// trimmed, BENCHMARKS.md).
public func releaseFreeMemory() {
    RequestBufferPool.shared.releaseIdle()
    clinux_release_free_memory()
}
