#if canImport(Glibc)
import Glibc
#endif

/// Why marsadm could not talk to marsd.
public struct ControlClientError: Error, CustomStringConvertible {
    public var description: String
}

/// A blocking client for the control socket: connect, send one request, read one reply.
public enum ControlClient {
    /// Sends `request` to the control socket at `path` and waits at most `timeout` for the reply
    /// (a socket that is not marsd's, or a marsd that hangs, must not hang marsadm too).
    public static func send(_ request: ControlRequest, to path: String, timeout: Duration) throws -> ControlResponse {
        let deadline = ContinuousClock.now + timeout
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ControlClientError(description: "cannot create a socket: \(lastError())") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw ControlClientError(description: "control socket path is too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard connected == 0 else {
            throw ControlClientError(
                description: "cannot reach marsd at \(path): \(lastError()). Is marsd running, and is --control the same path?"
            )
        }
        let line = try ControlCodec.encodeLine(request)
        var sent = 0
        while sent < line.count {
            let n = line[sent...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard n > 0 else { throw ControlClientError(description: "sending to marsd failed: \(lastError())") }
            sent += n
        }
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while !reply.contains(0x0A) {
            guard waitReadable(fd, until: deadline) else {
                throw ControlClientError(
                    description: "no reply from \(path) within \(timeout). Is it marsd's control socket (marsd --control), "
                        + "not an NBD socket? If marsd is busy, the command may still complete: check with 'marsadm view', "
                        + "or allow more time with --timeout"
                )
            }
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            reply += chunk[0..<n]
            guard reply.count <= ControlCodec.maxMessageSize else {
                throw ControlClientError(description: "marsd's reply exceeds \(ControlCodec.maxMessageSize) bytes")
            }
        }
        guard let end = reply.firstIndex(of: 0x0A) else {
            throw ControlClientError(
                description: "\(path) closed the connection without a reply. Is it marsd's control socket (marsd --control)? "
                    + "If so, marsd's log says why"
            )
        }
        do {
            return try ControlCodec.decode(ControlResponse.self, from: reply[..<end])
        } catch {
            throw ControlClientError(
                description: "\(path) answered with something that is not a marsd control reply (\(error)). "
                    + "Is it marsd's control socket (marsd --control), and are marsd and marsadm the same version?"
            )
        }
    }

    /// Waits until `fd` has bytes to read (or end of file); false once `deadline` has passed.
    private static func waitReadable(_ fd: Int32, until deadline: ContinuousClock.Instant) -> Bool {
        while true {
            let left = ContinuousClock.now.duration(to: deadline)
            guard left > .zero else { return false }
            let (seconds, attoseconds) = left.components
            let milliseconds = Int32(clamping: seconds * 1000 + attoseconds / 1_000_000_000_000_000 + 1)
            var descriptor = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptor, 1, milliseconds)
            if ready > 0 { return true }
            if ready < 0 && errno != EINTR { return true }  // let read() report the error
        }
    }

    private static func lastError() -> String {
        String(cString: strerror(errno))
    }
}
