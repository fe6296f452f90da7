import BlockStore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Switches a test flips to steer `ControlledFile`s: hold writes back (to fill the log and the
/// pending map), or fail them with an errno (a broken device, a full filesystem).
public final class FileControl: Sendable {
    public let blocked = Mutex(false)
    public let failure = Mutex<Int32?>(nil)
    /// Fails fdatasync (writes still go through).
    public let syncFailure = Mutex<Int32?>(nil)
    /// Fails the fsync of a `ControlledDirectory` (renames and new files still happen).
    public let directorySyncFailure = Mutex<Int32?>(nil)

    public init() {}

    /// Waits while blocked; throws the failure if one is set.
    public func admit(_ name: String) throws(SystemError) {
        while true {
            if let errno = failure.withLock({ $0 }) { throw SystemError("write", name, errno: errno) }
            if !blocked.withLock({ $0 }) { return }
            usleep(1000)
        }
    }
}

/// A file whose writes a `FileControl` steers; `onWrite` sees every write that goes through.
public final class ControlledFile: StorageFile {
    public let inner: any StorageFile
    public let control: FileControl
    public let onWrite: @Sendable ([UnsafeRawBufferPointer], UInt64) -> Void

    public init(
        _ inner: any StorageFile, control: FileControl = FileControl(),
        onWrite: @escaping @Sendable ([UnsafeRawBufferPointer], UInt64) -> Void = { _, _ in }
    ) {
        self.inner = inner
        self.control = control
        self.onWrite = onWrite
    }

    public var name: String { inner.name }
    public func size() throws(SystemError) -> UInt64 { try inner.size() }
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        try inner.read(into: buffer, at: offset)
    }
    public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(SystemError) {
        try control.admit(name)
        onWrite(buffers, offset)
        try inner.write(buffers, at: offset)
    }
    public func sync() throws(SystemError) {
        if let errno = control.syncFailure.withLock({ $0 }) { throw SystemError("fdatasync", name, errno: errno) }
        try inner.sync()
    }
    public func truncate(to size: UInt64) throws(SystemError) { try inner.truncate(to: size) }
    public func preallocate(_ length: UInt64) throws(SystemError) { try inner.preallocate(length) }
    public func zero(offset: UInt64, length: UInt64, keepAllocated: Bool) throws(SystemError) {
        try control.admit(name)
        try inner.zero(offset: offset, length: length, keepAllocated: keepAllocated)
    }
}

/// A directory whose files are all steered by one `FileControl`.
public struct ControlledDirectory: StorageDirectory {
    public let inner: any StorageDirectory
    public let control: FileControl

    public init(inner: any StorageDirectory, control: FileControl) {
        self.inner = inner
        self.control = control
    }

    public var path: String { inner.path }
    public func list() throws(SystemError) -> [String] { try inner.list() }
    public func open(_ name: String, create: Bool, direct: Bool) throws(SystemError) -> any StorageFile {
        ControlledFile(try inner.open(name, create: create, direct: direct), control: control)
    }
    public func remove(_ name: String) throws(SystemError) { try inner.remove(name) }
    public func rename(_ from: String, to: String) throws(SystemError) { try inner.rename(from, to: to) }
    public func sync() throws(SystemError) {
        if let errno = control.directorySyncFailure.withLock({ $0 }) { throw SystemError("fsync", path, errno: errno) }
        try inner.sync()
    }
}
