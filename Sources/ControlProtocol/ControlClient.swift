#if canImport(Glibc)
import Glibc
#endif

/// Why marsadm could not talk to marsd.
public struct ControlClientError: Error, CustomStringConvertible {
    public var description: String
}

/// A blocking client for the control socket: connect, send one request, read one reply.
public enum ControlClient {
    public static func send(_ request: ControlRequest, to path: String) throws -> ControlResponse {
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
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            reply += chunk[0..<n]
            guard reply.count <= ControlCodec.maxMessageSize else {
                throw ControlClientError(description: "marsd's reply exceeds \(ControlCodec.maxMessageSize) bytes")
            }
        }
        guard let end = reply.firstIndex(of: 0x0A) else {
            throw ControlClientError(description: "marsd closed the control connection without a reply")
        }
        return try ControlCodec.decode(ControlResponse.self, from: reply[..<end])
    }

    private static func lastError() -> String {
        String(cString: strerror(errno))
    }
}
