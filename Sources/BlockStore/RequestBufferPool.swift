import CLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Memory of request and reply buffers: payloads of 32 KiB and more are kept for reuse in size
/// classes instead of going back to malloc.
///
/// Why: a burst of large frees lets a thread's malloc arena grow a free top over the trim threshold,
/// and glibc then hands it back to the kernel (madvise) at once; the next requests fault every page
/// in again and the kernel zeroes it. With 1 MiB reads over TCP that cost a third of the loop's time
/// (issue 18). Kept buffers are already mapped, so a request in a steady stream touches no new page.
///
/// Layout: every block starts with a header word that says how to free it. Pooled and page-aligned
/// blocks keep the header in a page of their own in front of the data, so their data starts on a
/// page boundary (O_DIRECT reads and writes need that); small blocks keep it in 16 bytes in front.
///
/// Idle buffers go back to malloc when `releaseIdle()` finds they stayed unused for a whole interval
/// (the daemon calls it every couple of seconds), and beyond `idleLimit` bytes at once.
public final class RequestBufferPool: Sendable {
    /// The pool of every NBD connection's buffers.
    public static let shared = RequestBufferPool(idleLimit: 64 << 20)

    /// Payloads larger than this are pooled.
    public static let smallestPooled = 32 << 10
    /// Size classes: class k holds `(64 KiB << k) + pageSize` bytes, so a power-of-two payload plus a
    /// reply header (or an O_DIRECT buffer's leading page) fits the class of its payload.
    static let classCount = 11  // 64 KiB ... 64 MiB
    static let pageSize = 4096
    /// Free bytes kept at most; more are given back to malloc at once.
    public let idleLimit: Int

    private static let headerSize = 16
    private static let smallKind = -1
    private static let unpooledPageKind = -2

    struct State: ~Copyable {
        /// Addresses of free buffers by class (addresses: pointers are not Sendable across the lock).
        var free = [[UInt]](repeating: [], count: classCount)
        /// The fewest free buffers of each class since the last `releaseIdle()`: that many were not needed.
        var lowWater = [Int](repeating: 0, count: classCount)
        var idleBytes = 0
        var reused = 0
        var created = 0
    }

    private let state = Mutex(State())

    public init(idleLimit: Int) {
        self.idleLimit = idleLimit
    }

    deinit {
        state.withLock { state in
            for address in state.free.joined() { free(UnsafeMutableRawPointer(bitPattern: address)! - Self.pageSize) }
        }
    }

    /// The bytes a buffer of the class holds.
    public static func capacity(ofClass index: Int) -> Int { (64 << 10) << index + pageSize }

    public static func sizeClass(for size: Int) -> Int? {
        guard size > smallestPooled else { return nil }
        var index = 0
        while index < classCount {
            if size <= capacity(ofClass: index) { return index }
            index += 1
        }
        return nil
    }

    /// `size` bytes, on a page boundary if `pageAligned` or if the size is pooled; nil when out of memory.
    public func allocate(_ size: Int, pageAligned: Bool) -> UnsafeMutableRawPointer? {
        if let index = Self.sizeClass(for: size) {
            let kept = state.withLock { state -> UInt? in
                guard let address = state.free[index].popLast() else {
                    state.created += 1
                    return nil
                }
                state.lowWater[index] = min(state.lowWater[index], state.free[index].count)
                state.idleBytes -= Self.capacity(ofClass: index)
                state.reused += 1
                return address
            }
            if let kept { return UnsafeMutableRawPointer(bitPattern: kept) }
            return Self.allocatePaged(Self.capacity(ofClass: index), kind: index)
        }
        if pageAligned || size > Self.smallestPooled {
            return Self.allocatePaged(size, kind: Self.unpooledPageKind)
        }
        guard let base = malloc(size + Self.headerSize) else { return nil }
        base.storeBytes(of: Self.smallKind, as: Int.self)
        return base + Self.headerSize
    }

    private static func allocatePaged(_ size: Int, kind: Int) -> UnsafeMutableRawPointer? {
        var base: UnsafeMutableRawPointer?
        guard posix_memalign(&base, pageSize, pageSize + max(size, 1)) == 0, let base else { return nil }
        let data = base + pageSize
        (data - headerSize).storeBytes(of: kind, as: Int.self)
        return data
    }

    private static func kind(of data: UnsafeMutableRawPointer) -> Int {
        (data - headerSize).load(as: Int.self)
    }

    /// Takes back a block from `allocate`; pooled sizes are kept for the next request.
    public func deallocate(_ data: UnsafeMutableRawPointer) {
        let kind = Self.kind(of: data)
        if kind == Self.smallKind {
            return free(data - Self.headerSize)
        }
        if kind >= 0 {
            let kept = state.withLock { state -> Bool in
                guard state.idleBytes + Self.capacity(ofClass: kind) <= idleLimit else { return false }
                state.free[kind].append(UInt(bitPattern: data))
                state.idleBytes += Self.capacity(ofClass: kind)
                return true
            }
            if kept { return }
        }
        free(data - Self.pageSize)
    }

    /// Resizes a block from `allocate`, keeping its first `min(oldSize, newSize)` bytes and its alignment.
    public func reallocate(_ data: UnsafeMutableRawPointer?, oldSize: Int, newSize: Int) -> UnsafeMutableRawPointer? {
        guard let data else { return allocate(newSize, pageAligned: false) }
        let kind = Self.kind(of: data)
        if kind >= 0, newSize <= Self.capacity(ofClass: kind) { return data }
        guard let resized = allocate(newSize, pageAligned: kind != Self.smallKind) else { return nil }
        resized.copyMemory(from: data, byteCount: min(oldSize, newSize))
        deallocate(data)
        return resized
    }

    /// Gives back to malloc the buffers that no request needed since the last call.
    public func releaseIdle() {
        let unused = state.withLock { state -> [UInt] in
            var unused: [UInt] = []
            for index in 0..<Self.classCount {
                let count = state.lowWater[index]
                unused += state.free[index].prefix(count)
                state.free[index].removeFirst(count)
                state.idleBytes -= count * Self.capacity(ofClass: index)
                state.lowWater[index] = state.free[index].count
            }
            return unused
        }
        for address in unused { free(UnsafeMutableRawPointer(bitPattern: address)! - Self.pageSize) }
    }

    public struct Statistics: Equatable, Sendable {
        /// Buffers handed out again from the pool, and buffers that had to be allocated.
        public var reused: Int
        public var created: Int
        /// Bytes of free buffers the pool keeps.
        public var idleBytes: Int
    }

    public var statistics: Statistics {
        state.withLock { Statistics(reused: $0.reused, created: $0.created, idleBytes: $0.idleBytes) }
    }
}
