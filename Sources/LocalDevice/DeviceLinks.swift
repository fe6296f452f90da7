import BlockStore

#if canImport(Glibc)
import Glibc
#endif

/// The stable names of attached resources: `<directory>/<resource>` (/dev/mars/NAME) is a
/// symlink to the kernel device (/dev/nbdN) that serves it.
public struct DeviceLinks: Sendable {
    public let directory: String

    public init(directory: String = "/dev/mars") {
        self.directory = directory
    }

    public func path(of resource: String) -> String { directory + "/" + resource }

    /// Points the link of `resource` at `target`, replacing an older link atomically.
    public func create(_ resource: String, target: String) throws(SystemError) {
        if mkdir(directory, 0o755) != 0, errno != EEXIST { throw SystemError("mkdir", directory, errno: errno) }
        let temporary = path(of: ".\(resource).new")
        unlink(temporary)
        _ = try Syscall.retrying("symlink", temporary) { symlink(target, temporary) }
        _ = try Syscall.retrying("rename", temporary) { rename(temporary, path(of: resource)) }
    }

    /// Removes the link of `resource`; a link that is already gone is fine.
    public func remove(_ resource: String) throws(SystemError) {
        if unlink(path(of: resource)) != 0, errno != ENOENT { throw SystemError("unlink", path(of: resource), errno: errno) }
    }

    /// Where the link of `resource` points, nil when there is none.
    public func target(of resource: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(path(of: resource), &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
