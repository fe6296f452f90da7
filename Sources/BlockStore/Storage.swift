import CLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A file the log engine reads and writes with blocking calls on its own threads: a log segment,
/// the position file, or a data device. `sync` is the durability point: what was written before it
/// survives a power loss, what was not may be lost (see `SimulatedDisk`).
public protocol StorageFile: AnyObject, Sendable {
    var name: String { get }
    func size() throws(SystemError) -> UInt64
    /// Reads up to `buffer.count` bytes at `offset`; fewer only at the end of the file.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int
    /// Writes all of `buffers`, one after another, starting at `offset`.
    func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(SystemError)
    /// fdatasync.
    func sync() throws(SystemError)
    func truncate(to size: UInt64) throws(SystemError)
    /// Reserves `length` bytes from offset 0 without changing the size, so appends within them cannot
    /// fail for lack of space. A filesystem that cannot preallocate is not an error.
    func preallocate(_ length: UInt64) throws(SystemError)
    /// Makes `[offset, offset+length)` read as zeroes: deallocated (`keepAllocated` false) or
    /// allocated zeroes; falls back to writing zeroes where the device cannot do either.
    func zero(offset: UInt64, length: UInt64, keepAllocated: Bool) throws(SystemError)
    /// Starts writing `[offset, offset+length)` back without waiting (a hint: the next `sync` has
    /// less left to wait for). Files without a page cache ignore it.
    func startWriteback(offset: UInt64, length: UInt64)
}

extension StorageFile {
    public func startWriteback(offset: UInt64, length: UInt64) {}

    /// Writes zeroes over `[offset, offset+length)` from the shared block of zeroes: written blocks,
    /// where `zero` may leave unwritten extents. Between blocks, stops when `proceed` returns false;
    /// returns whether the whole range was written.
    @discardableResult
    public func writeZeroes(offset: UInt64, length: UInt64, while proceed: () -> Bool = { true }) throws(SystemError) -> Bool {
        let zeroes = ZeroBlock.shared
        var position = offset
        while position < offset + length {
            guard proceed() else { return false }
            let count = Int(min(UInt64(zeroes.size), offset + length - position))
            try write([UnsafeRawBufferPointer(start: zeroes.address, count: count)], at: position)
            position += UInt64(count)
        }
        return true
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(SystemError) {
        try write(bytes[...], at: offset)
    }

    public func write(_ bytes: ArraySlice<UInt8>, at offset: UInt64) throws(SystemError) {
        var result: Result<Void, SystemError> = .success(())
        bytes.withUnsafeBytes { buffer in
            result = Result { () throws(SystemError) in try write([buffer], at: offset) }
        }
        try result.get()
    }

    /// Reads exactly `count` bytes, or fewer at the end of the file.
    public func read(count: Int, at offset: UInt64) throws(SystemError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var result: Result<Int, SystemError> = .success(0)
        bytes.withUnsafeMutableBytes { buffer in
            result = Result { () throws(SystemError) in try read(into: buffer, at: offset) }
        }
        bytes.removeLast(count - (try result.get()))
        return bytes
    }
}

extension StorageDirectory {
    public func open(_ name: String, create: Bool) throws(SystemError) -> any StorageFile {
        try open(name, create: create, direct: false)
    }
}

/// What direct I/O asks of a write: offset, length and buffer address multiples of this. 4096
/// covers every logical block size Linux filesystems and disks use.
public enum StorageAlignment {
    public static let direct = 4096

    /// `size` rounded up to a multiple of `direct`.
    public static func roundUp<Size: BinaryInteger>(_ size: Size) -> Size {
        let alignment = Size(direct)
        return (size + alignment - 1) / alignment * alignment
    }
}

/// A directory of storage files: a resource's directory under the daemon's root.
public protocol StorageDirectory: Sendable {
    var path: String { get }
    func list() throws(SystemError) -> [String]
    /// Opens `name`; with `create`, makes it if missing. The new name is durable only after `sync()`.
    /// `direct`: writes bypass the page cache (O_DIRECT) where the filesystem allows it, and must
    /// then be `StorageAlignment.direct`-aligned in offset, length and memory.
    func open(_ name: String, create: Bool, direct: Bool) throws(SystemError) -> any StorageFile
    func remove(_ name: String) throws(SystemError)
    /// Atomically replaces `to` by `from`.
    func rename(_ from: String, to: String) throws(SystemError)
    /// Makes created, removed and renamed names durable (fsync of the directory).
    func sync() throws(SystemError)
}

/// A real file, through its descriptor.
public final class POSIXFile: StorageFile {
    public let name: String
    private let fd: Int32
    /// The device whose buffered descriptor this file uses; held so the descriptor stays open as
    /// long as the file does. Nil: the file owns its descriptor.
    private let device: BlockDevice?

    /// The data device `device`, through its buffered descriptor.
    public init(device: BlockDevice) {
        self.fd = device.bufferedFD
        self.name = device.path
        self.device = device
    }

    init(owning fd: Int32, name: String) {
        self.fd = fd
        self.name = name
        self.device = nil
    }

    /// IOV_MAX on Linux.
    private static let maxVectors = 1024

    deinit {
        if device == nil { Glibc.close(fd) }
    }

    public func size() throws(SystemError) -> UInt64 {
        let end = try Syscall.retrying("lseek", name) { lseek(fd, 0, SEEK_END) }
        return UInt64(end)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        var done = 0
        while done < buffer.count {
            let got = try Syscall.retrying("read", name) {
                pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if got == 0 { break }
            done += got
        }
        return done
    }

    public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(SystemError) {
        var position = off_t(offset)
        var index = 0
        var skip = 0  // bytes of buffers[index] already written
        while index < buffers.count {
            let batch = min(buffers.count - index, Self.maxVectors)
            let written = try withUnsafeTemporaryAllocation(of: iovec.self, capacity: batch) { (vectors) throws(SystemError) -> Int in
                for slot in 0..<batch {
                    let buffer = buffers[index + slot]
                    let from = slot == 0 ? skip : 0
                    vectors[slot] = iovec(
                        iov_base: UnsafeMutableRawPointer(mutating: buffer.baseAddress.map { $0 + from }),
                        iov_len: buffer.count - from
                    )
                }
                return try Syscall.retrying("write", name) { pwritev(fd, vectors.baseAddress!, Int32(batch), position) }
            }
            if written == 0 { throw SystemError("write", name, errno: EIO) }
            position += off_t(written)
            var remaining = written
            while remaining > 0, index < buffers.count {
                let left = buffers[index].count - skip
                if remaining >= left {
                    remaining -= left
                    index += 1
                    skip = 0
                } else {
                    skip += remaining
                    remaining = 0
                }
            }
            while index < buffers.count, buffers[index].count == skip {
                index += 1
                skip = 0
            }
        }
    }

    public func sync() throws(SystemError) {
        _ = try Syscall.retrying("fdatasync", name) { fdatasync(fd) }
    }

    public func startWriteback(offset: UInt64, length: UInt64) {
        // A hint: a failure here shows at the next sync, which is the durability point.
        _ = clinux_start_writeback(fd, offset, length)
    }

    public func truncate(to size: UInt64) throws(SystemError) {
        _ = try Syscall.retrying("ftruncate", name) { ftruncate(fd, off_t(size)) }
    }

    public func preallocate(_ length: UInt64) throws(SystemError) {
        guard length > 0 else { return }
        let result = clinux_fallocate(fd, CLINUX_FALLOC_FL_KEEP_SIZE, 0, length)
        if result == -EOPNOTSUPP { return }
        try Syscall.check("fallocate", name, result)
    }

    public func zero(offset: UInt64, length: UInt64, keepAllocated: Bool) throws(SystemError) {
        guard length > 0 else { return }
        let modes = keepAllocated ? [FallocateMode.zeroRange] : [FallocateMode.punchHole, FallocateMode.zeroRange]
        for mode in modes {
            let result = clinux_fallocate(fd, mode, offset, length)
            if result == 0 { return }
            if result != -EOPNOTSUPP && result != -EINVAL && result != -ENODEV { try Syscall.check("fallocate", name, result) }
        }
        try writeZeroes(offset: offset, length: length)
    }
}

/// A real directory.
public struct POSIXDirectory: StorageDirectory {
    public let path: String

    /// Opens `path`, creating it (mode 0700) when `create` is set and it is missing.
    public init(path: String, create: Bool = false) throws(SystemError) {
        if create, mkdir(path, 0o700) != 0, errno != EEXIST {
            throw SystemError("mkdir", path, errno: errno)
        }
        var info = stat()
        _ = try Syscall.retrying("stat", path) { stat(path, &info) }
        guard info.st_mode & S_IFMT == S_IFDIR else { throw SystemError("open", "\(path) (not a directory)", errno: ENOTDIR) }
        self.path = path
    }

    public func list() throws(SystemError) -> [String] {
        guard let stream = opendir(path) else { throw SystemError("opendir", path, errno: errno) }
        defer { closedir(stream) }
        var names: [String] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// With `direct`, a filesystem without O_DIRECT (tmpfs) gets a buffered descriptor instead.
    public func open(_ name: String, create: Bool, direct: Bool) throws(SystemError) -> any StorageFile {
        let full = path + "/" + name
        let flags = O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0)
        if direct {
            let fd = Glibc.open(full, flags | CLINUX_O_DIRECT, 0o600)
            if fd >= 0 { return POSIXFile(owning: fd, name: full) }
            if errno != EINVAL { throw SystemError("open", full, errno: errno) }
        }
        let fd = try Syscall.retrying("open", full) { Glibc.open(full, flags, 0o600) }
        return POSIXFile(owning: fd, name: full)
    }

    public func remove(_ name: String) throws(SystemError) {
        let full = path + "/" + name
        _ = try Syscall.retrying("unlink", full) { unlink(full) }
    }

    public func rename(_ from: String, to: String) throws(SystemError) {
        _ = try Syscall.retrying("rename", "\(path)/\(from)") { Glibc.rename(path + "/" + from, path + "/" + to) }
    }

    /// Removes the directory itself, which must be empty.
    public func removeDirectory() throws(SystemError) {
        _ = try Syscall.retrying("rmdir", path) { rmdir(path) }
    }

    public func sync() throws(SystemError) {
        let fd = try Syscall.retrying("open", path) { Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        defer { Glibc.close(fd) }
        _ = try Syscall.retrying("fsync", path) { fsync(fd) }
    }
}

/// An exclusive lock on a file (flock), held until `release`, until this value is gone or until
/// the process ends: one daemon per root directory. The file holds the holder's process id, for
/// the message another process shows when it finds the lock taken.
public final class FileLock: Sendable {
    private let fd: Mutex<Int32?>

    private init(fd: Int32) { self.fd = Mutex(fd) }

    deinit { release() }

    /// Gives the lock up now, not whenever the last reference goes (a daemon that has stopped
    /// lets the next one take its root at once).
    public func release() {
        if let fd = fd.withLock({ held in defer { held = nil }; return held }) { Glibc.close(fd) }
    }

    /// Takes the lock on `path` (created if missing), or returns the holder's process id (0 if
    /// unknown) when another process has it.
    public static func acquire(_ path: String) throws(SystemError) -> Result<FileLock, HeldBy> {
        let fd = try Syscall.retrying("open", path) { Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            defer { Glibc.close(fd) }
            guard code == EWOULDBLOCK else { throw SystemError("flock", path, errno: code) }
            var bytes = [UInt8](repeating: 0, count: 32)
            let count = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
            let digits = bytes.prefix(max(0, count)).prefix { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
            return .failure(HeldBy(pid: Int32(String(decoding: digits, as: UTF8.self)) ?? 0))
        }
        let lock = FileLock(fd: fd)
        let pid = Array("\(getpid())\n".utf8)
        _ = try Syscall.retrying("ftruncate", path) { ftruncate(fd, 0) }
        let written = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        if written < 0 { throw SystemError("pwrite", path, errno: errno) }
        return .success(lock)
    }

    public struct HeldBy: Error, Sendable {
        public let pid: Int32
    }
}
