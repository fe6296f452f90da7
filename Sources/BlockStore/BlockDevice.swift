import CLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How data-device I/O goes through the kernel.
public enum CacheMode: String, Sendable, CaseIterable {
    /// Through the page cache (reads of hot data come from memory, as with nbdkit and qemu-nbd).
    case buffered
    /// O_DIRECT for aligned requests; unaligned ones use a second, buffered descriptor.
    case direct
}

/// What tells two paths of the same storage apart from different storage: a file's inode, or a
/// block device's device number (a device has as many nodes and links as udev and LVM give it).
public enum DeviceIdentity: Hashable, Sendable {
    case file(device: UInt64, inode: UInt64)
    case blockDevice(UInt64)

    init(_ info: stat) {
        self = info.st_mode & S_IFMT == S_IFBLK ? .blockDevice(UInt64(info.st_rdev)) : .file(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
    }

    /// The identity of what `path` names now (following links).
    public init(path: String) throws(SystemError) {
        var info = stat()
        _ = try Syscall.retrying("stat", path) { stat(path, &info) }
        self.init(info)
    }
}

/// The local storage of one export: a regular file (sparse is fine) or a block device.
///
/// Holds a buffered descriptor, plus an O_DIRECT descriptor in direct mode. Both refer to the same
/// inode, so one fdatasync covers writes made through either.
public final class BlockDevice: Sendable {
    public enum Kind: String, Sendable {
        case regularFile = "file"
        case blockDevice = "block device"
    }

    public let path: String
    public let kind: Kind
    public let identity: DeviceIdentity
    /// The device's capacity as last read: at open, and again by `refreshSize` after it grew (an
    /// LV extended while open). Everything that bounds I/O by the device reads it here.
    public var size: UInt64 { capacity.load(ordering: .relaxed) }
    private let capacity: Atomic<UInt64>
    public let readOnly: Bool
    public let cacheMode: CacheMode
    /// Used for buffered I/O, fallocate, lseek and fdatasync.
    public let bufferedFD: Int32
    /// Used for aligned I/O in direct mode.
    public let directFD: Int32?
    /// Offset and length alignment an O_DIRECT request needs.
    public let directOffsetAlignment: UInt64
    /// Memory alignment an O_DIRECT buffer needs.
    public let directMemoryAlignment: Int

    public init(path: String, readOnly: Bool = false, cacheMode: CacheMode = .buffered) throws(SystemError) {
        let access = readOnly ? O_RDONLY : O_RDWR
        let fd = try Syscall.retrying("open", path) { open(path, access | O_CLOEXEC) }
        var info = stat()
        do {
            _ = try Syscall.retrying("fstat", path) { fstat(fd, &info) }
        } catch {
            close(fd)
            throw error
        }
        let type = info.st_mode & S_IFMT
        self.identity = DeviceIdentity(info)
        var size: UInt64 = 0
        var logicalSector: UInt32 = 512
        switch type {
        case S_IFREG:
            self.kind = .regularFile
            size = UInt64(info.st_size)
        case S_IFBLK:
            self.kind = .blockDevice
            do {
                try Syscall.check("BLKGETSIZE64", path, clinux_block_device_size(fd, &size))
                try Syscall.check("BLKSSZGET", path, clinux_block_device_logical_sector(fd, &logicalSector))
            } catch {
                close(fd)
                throw error
            }
        default:
            close(fd)
            throw SystemError("open", "\(path) (not a regular file or block device)", errno: EINVAL)
        }

        var directFD: Int32?
        var memoryAlignment = 4096
        var offsetAlignment = UInt64(max(logicalSector, 512))
        if cacheMode == .direct {
            do {
                let dfd = try Syscall.retrying("open O_DIRECT", path) { open(path, access | O_CLOEXEC | CLINUX_O_DIRECT) }
                directFD = dfd
                var memory: UInt32 = 0
                var offset: UInt32 = 0
                if clinux_dio_alignment(dfd, &memory, &offset) == 0 {
                    memoryAlignment = Int(max(memory, 1))
                    offsetAlignment = UInt64(offset)
                } else if kind == .regularFile {
                    // Without STATX_DIOALIGN, page alignment is safe on every filesystem we know.
                    offsetAlignment = 4096
                }
            } catch {
                close(fd)
                throw error
            }
        }
        self.path = path
        self.capacity = Atomic(size)
        self.readOnly = readOnly
        self.cacheMode = cacheMode
        self.bufferedFD = fd
        self.directFD = directFD
        self.directMemoryAlignment = memoryAlignment
        self.directOffsetAlignment = offsetAlignment
        var cached: UInt64 = 0
        self.canQueryPageCache = clinux_cached_pages(fd, 0, 1, &cached) == 0
    }

    /// Whether the kernel answers `isCached` (cachestat, Linux 6.5).
    public let canQueryPageCache: Bool

    /// Whether every page of `[offset, offset+length)` is in the page cache now, so sending it from
    /// there (sendfile) will not wait for the disk. False when the kernel cannot tell.
    public func isCached(offset: UInt64, length: Int) -> Bool {
        guard canQueryPageCache, length > 0, offset + UInt64(length) <= size else { return false }
        let first = offset / Self.pageSize
        let last = (offset + UInt64(length) - 1) / Self.pageSize
        var cached: UInt64 = 0
        guard clinux_cached_pages(bufferedFD, offset, UInt64(length), &cached) == 0 else { return false }
        return cached == last - first + 1
    }

    private static let pageSize = UInt64(sysconf(Int32(_SC_PAGESIZE)))

    /// Reads the capacity again (a block device's size as the kernel has it now, a file's length)
    /// and returns it.
    @discardableResult
    public func refreshSize() throws(SystemError) -> UInt64 {
        let end = try Syscall.retrying("lseek", path) { lseek(bufferedFD, 0, SEEK_END) }
        capacity.store(UInt64(end), ordering: .relaxed)
        return UInt64(end)
    }

    deinit {
        close(bufferedFD)
        if let directFD { close(directFD) }
    }

    /// The descriptor for a data transfer at `offset` of `length` bytes whose buffer starts at
    /// `address`: the O_DIRECT one when everything is aligned, else the buffered one.
    @inline(__always)
    public func descriptor(offset: UInt64, length: Int, address: UnsafeRawPointer?) -> Int32 {
        guard let directFD else { return bufferedFD }
        let mask = directOffsetAlignment - 1
        if offset & mask == 0, UInt64(length) & mask == 0,
            let address, Int(bitPattern: address) % directMemoryAlignment == 0
        {
            return directFD
        }
        return bufferedFD
    }

    /// Allocation of `[offset, offset+length)` as runs of data and holes (SEEK_DATA/SEEK_HOLE).
    /// Block devices report everything as data. At most `maxRuns` runs are returned; the last may
    /// end before `offset+length`.
    public func allocationRuns(offset: UInt64, length: UInt64, maxRuns: Int) -> [AllocationRun] {
        let end = min(offset + length, size)
        guard kind == .regularFile, offset < end else {
            return [AllocationRun(length: end - offset, isHole: false)]
        }
        var runs: [AllocationRun] = []
        var position = offset
        while position < end, runs.count < maxRuns {
            let data = lseek(bufferedFD, off_t(position), CLINUX_SEEK_DATA)
            if data < 0 {
                // ENXIO: no data after `position`; anything else: report data, which is always safe.
                let isHole = errno == ENXIO
                runs.append(AllocationRun(length: end - position, isHole: isHole))
                break
            }
            if UInt64(data) > position {
                runs.append(AllocationRun(length: min(UInt64(data), end) - position, isHole: true))
                position = min(UInt64(data), end)
                continue
            }
            let hole = lseek(bufferedFD, off_t(position), CLINUX_SEEK_HOLE)
            let dataEnd = hole < 0 ? end : min(UInt64(hole), end)
            runs.append(AllocationRun(length: dataEnd - position, isHole: false))
            position = dataEnd
        }
        return runs
    }

    /// Starts writing `[offset, offset+length)` back without waiting: a bulk writer (an initial
    /// sync) keeps its dirty pages few instead of leaving gigabytes for the flusher.
    public func startWriteback(offset: UInt64, length: UInt64) throws(SystemError) {
        try Syscall.check("sync_file_range", path, clinux_start_writeback(bufferedFD, offset, length))
    }

    /// Waits until `[offset, offset+length)` is written back, then drops it from the page cache:
    /// a bulk copy leaves the host's cache to its guests, and its next pages are recycled ones.
    /// Not a durability point (no journal commit, no cache flush): that is `sync`.
    public func releaseCache(offset: UInt64, length: UInt64) throws(SystemError) {
        try Syscall.check("sync_file_range", path, clinux_wait_writeback(bufferedFD, offset, length))
        let result = posix_fadvise(bufferedFD, off_t(offset), off_t(length), POSIX_FADV_DONTNEED)
        try Syscall.check("posix_fadvise", path, -result)
    }

    /// Asks the kernel to read `[offset, offset+length)` ahead (NBD_CMD_CACHE).
    public func prefetch(offset: UInt64, length: UInt64) {
        _ = posix_fadvise(bufferedFD, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)
    }
}

/// A run of a data device that is either allocated (data) or a hole (reads as zeroes).
public struct AllocationRun: Sendable, Equatable {
    public var length: UInt64
    public var isHole: Bool

    public init(length: UInt64, isHole: Bool) {
        self.length = length
        self.isHole = isHole
    }
}
