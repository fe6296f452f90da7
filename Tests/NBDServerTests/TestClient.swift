import NBDProtocol

#if canImport(Glibc)
import Glibc
#endif

struct ClientError: Error, CustomStringConvertible {
    var description: String
}

/// A minimal blocking NBD client over a Unix socket or TCP, for driving the server in-process, including
/// with malformed input that a real client library refuses to send.
final class TestClient {
    let fd: Int32
    private(set) var exportSize: UInt64 = 0
    private(set) var flags = NBDTransmissionFlags()

    init(socketPath: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(socketPath.utf8)
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            throw ClientError(description: "connect \(socketPath): errno \(errno)")
        }
        setReceiveTimeout()
    }

    /// Connects over TCP to 127.0.0.1:`tcpPort`.
    init(tcpPort: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(tcpPort).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            throw ClientError(description: "connect 127.0.0.1:\(tcpPort): errno \(errno)")
        }
        setReceiveTimeout()
    }

    private func setReceiveTimeout() {
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    /// Connects and negotiates with GO; optionally structured replies and base:allocation.
    static func connected(_ socketPath: String, export: String = "disk", structured: Bool = false) throws -> TestClient {
        let client = try TestClient(socketPath: socketPath)
        try client.handshake(export: export, structured: structured)
        return client
    }

    /// Connects over TCP and negotiates with GO.
    static func connected(tcpPort: Int, export: String = "disk", structured: Bool = false) throws -> TestClient {
        let client = try TestClient(tcpPort: tcpPort)
        try client.handshake(export: export, structured: structured)
        return client
    }

    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw ClientError(description: "send: errno \(errno)") }
            sent += n
        }
    }

    func receive(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes[got...].withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw ClientError(description: n == 0 ? "closed by server" : "recv: errno \(errno)") }
            got += n
        }
        return bytes
    }

    /// True when the server closed the connection (EOF) within the receive timeout.
    func isClosedByServer() -> Bool {
        var byte: UInt8 = 0
        while true {
            let n = recv(fd, &byte, 1, 0)
            if n < 0 && errno == EINTR { continue }
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
    }

    func handshake(export: String, structured: Bool) throws {
        let greeting = try receive(18)
        guard be64(greeting, 0) == NBDMagic.greeting else { throw ClientError(description: "bad greeting") }
        try send(be32(3))
        if structured {
            try option(.structuredReply, [])
            try expectAck()
            let query = Array(allocationContextName.utf8)
            try option(.setMetaContext, be32(UInt32(export.utf8.count)) + Array(export.utf8) + be32(1) + be32(UInt32(query.count)) + query)
            while try readOptionReply().type != NBDOptionReply.ack.rawValue {}
        }
        try option(.go, be32(UInt32(export.utf8.count)) + Array(export.utf8) + [0, 0])
        while true {
            let reply = try readOptionReply()
            if reply.type == NBDOptionReply.ack.rawValue { break }
            guard reply.type == NBDOptionReply.info.rawValue else {
                throw ClientError(description: "GO failed with reply type \(reply.type)")
            }
            if be16(reply.payload, 0) == NBDInfoType.export.rawValue {
                exportSize = be64(reply.payload, 2)
                flags = NBDTransmissionFlags(rawValue: be16(reply.payload, 10))
            }
        }
    }

    func option(_ option: NBDOption, _ payload: [UInt8]) throws {
        try send(be64(NBDMagic.option) + be32(option.rawValue) + be32(UInt32(payload.count)) + payload)
    }

    func readOptionReply() throws -> (type: UInt32, payload: [UInt8]) {
        let header = try receive(20)
        let length = Int(be32(header, 16))
        return (be32(header, 12), try receive(length))
    }

    private func expectAck() throws {
        let reply = try readOptionReply()
        guard reply.type == NBDOptionReply.ack.rawValue else { throw ClientError(description: "expected ACK, got \(reply.type)") }
    }

    func requestBytes(_ command: NBDCommand, flags: NBDCommandFlags = [], cookie: UInt64 = 1, offset: UInt64 = 0, length: UInt32 = 0) -> [UInt8] {
        be32(NBDMagic.request) + be16(flags.rawValue) + be16(command.rawValue) + be64(cookie) + be64(offset) + be32(length)
    }

    /// Reads one simple reply; returns (error, cookie).
    func simpleReply() throws -> (error: UInt32, cookie: UInt64) {
        let header = try receive(16)
        guard be32(header, 0) == NBDMagic.simpleReply else { throw ClientError(description: "not a simple reply") }
        return (be32(header, 4), be64(header, 8))
    }

    func write(_ data: [UInt8], at offset: UInt64, flags: NBDCommandFlags = [], cookie: UInt64 = 1) throws -> UInt32 {
        try send(requestBytes(.write, flags: flags, cookie: cookie, offset: offset, length: UInt32(data.count)) + data)
        return try simpleReply().error
    }

    func read(_ length: Int, at offset: UInt64, cookie: UInt64 = 1) throws -> [UInt8] {
        try send(requestBytes(.read, cookie: cookie, offset: offset, length: UInt32(length)))
        let reply = try simpleReply()
        guard reply.error == 0 else { throw ClientError(description: "read failed with error \(reply.error)") }
        return try receive(length)
    }

    func command(_ command: NBDCommand, flags: NBDCommandFlags = [], offset: UInt64 = 0, length: UInt32 = 0) throws -> UInt32 {
        try send(requestBytes(command, flags: flags, offset: offset, length: length))
        return try simpleReply().error
    }
}

func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (24 - 8 * $0)) & 0xFF) } }
func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> (56 - 8 * UInt64($0))) & 0xFF) } }
func be16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
func be32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(b[at + $1]) } }
func be64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(b[at + $1]) } }
