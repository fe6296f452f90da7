#if canImport(Glibc)
import Glibc
#endif

/// A failed system call on a data device: which call, on what, and the errno.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
    public var operation: String
    public var subject: String
    public var errno: Int32

    public init(_ operation: String, _ subject: String, errno: Int32) {
        self.operation = operation
        self.subject = subject
        self.errno = errno
    }

    public var description: String {
        "\(operation) \(subject): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// Each system call the storage layer (and LocalDevice) makes, wrapped once: EINTR retried, errno
/// turned into a typed error. EBADF and EFAULT are programmer errors and trap.
public enum Syscall {
    @inline(never)
    public static func retrying<T: BinaryInteger>(
        _ operation: String, _ subject: @autoclosure () -> String, _ body: () -> T
    ) throws(SystemError) -> T {
        while true {
            let result = body()
            if result >= 0 { return result }
            let code = Glibc.errno
            if code == EINTR { continue }
            precondition(code != EBADF && code != EFAULT, "\(operation) \(subject()): errno \(code) is a programming error")
            throw SystemError(operation, subject(), errno: code)
        }
    }

    /// For the shims that return -errno instead of setting errno.
    public static func check(_ operation: String, _ subject: @autoclosure () -> String, _ result: Int32) throws(SystemError) {
        if result < 0 { throw SystemError(operation, subject(), errno: -result) }
    }
}
