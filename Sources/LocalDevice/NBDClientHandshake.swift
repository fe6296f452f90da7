import BlockStore
import NBDProtocol

#if canImport(Glibc)
import Glibc
#endif

/// What the server says about an export at the end of the handshake.
public struct NegotiatedExport: Sendable, Equatable {
    public var size: UInt64
    public var transmissionFlags: UInt16
}

/// The client side of the NBD handshake (fixed newstyle, NBD_OPT_GO), done here so the kernel's
/// NBD client can take over the socket in transmission phase: the kernel does no handshake.
public enum NBDClientHandshake {
    /// Connects to the Unix socket at `path` and negotiates `export`. Returns the connected socket
    /// (the caller owns it) and what the server advertised. Each read and write waits at most
    /// `timeoutSeconds`; the timeouts are cleared before returning, as the kernel keeps the socket.
    public static func connect(unixSocket path: String, export: String, timeoutSeconds: Int = 30) throws -> (Int32, NegotiatedExport) {
        let fd = try Syscall.retrying("socket", path) { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        do {
            try setTimeout(fd, seconds: timeoutSeconds, path: path)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
                throw HandshakeError("the socket path \(path) is longer than a Unix socket path may be")
            }
            withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
            _ = try Syscall.retrying("connect to", path) {
                withUnsafePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
                }
            }
            let negotiated = try negotiate(fd, export: export, peer: path)
            try setTimeout(fd, seconds: 0, path: path)
            return (fd, negotiated)
        } catch {
            close(fd)
            throw error
        }
    }

    /// The handshake on a connected socket.
    static func negotiate(_ fd: Int32, export: String, peer: String) throws -> NegotiatedExport {
        var wire = Wire(fd: fd, peer: peer)
        guard try wire.readU64() == NBDMagic.greeting, try wire.readU64() == NBDMagic.option else {
            throw HandshakeError("\(peer) is not a newstyle NBD server")
        }
        let serverFlags = try wire.readU16()
        guard serverFlags & NBDHandshakeFlag.fixedNewstyle != 0 else { throw HandshakeError("\(peer) does not offer fixed newstyle negotiation") }
        var clientFlags = NBDClientFlag.fixedNewstyle
        if serverFlags & NBDHandshakeFlag.noZeroes != 0 { clientFlags |= NBDClientFlag.noZeroes }
        var request = Bytes()
        request.u32(clientFlags)
        let name = Array(export.utf8)
        request.u64(NBDMagic.option)
        request.u32(NBDOption.go.rawValue)
        request.u32(UInt32(4 + name.count + 2))
        request.u32(UInt32(name.count))
        request.bytes += name
        request.u16(0)  // no information requests: NBD_INFO_EXPORT always comes
        try wire.write(request.bytes)
        var negotiated: NegotiatedExport?
        while true {
            guard try wire.readU64() == NBDMagic.optionReply else { throw HandshakeError("\(peer) sent a malformed option reply") }
            _ = try wire.readU32()
            let type = try wire.readU32()
            let length = try wire.readU32()
            guard length <= 65536 else { throw HandshakeError("\(peer) sent an option reply of \(length) bytes") }
            let data = try wire.read(Int(length))
            if type == NBDOptionReply.ack.rawValue {
                guard let negotiated else { throw HandshakeError("\(peer) ended the negotiation of \(export) without the export's size") }
                return negotiated
            }
            if type & 0x8000_0000 != 0 {
                let message = String(decoding: data, as: UTF8.self)
                throw HandshakeError("marsd refused export \(export): \(message.isEmpty ? "error \(type)" : message)")
            }
            if type == NBDOptionReply.info.rawValue, data.count >= 12, data[0] == 0, data[1] == UInt8(NBDInfoType.export.rawValue) {
                let size = data[2..<10].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                let flags = UInt16(data[10]) << 8 | UInt16(data[11])
                negotiated = NegotiatedExport(size: size, transmissionFlags: flags)
            }
        }
    }

    private static func setTimeout(_ fd: Int32, seconds: Int, path: String) throws {
        for option in [SO_RCVTIMEO, SO_SNDTIMEO] {
            _ = try withUnsafePointer(to: timeval(tv_sec: seconds, tv_usec: 0)) { value in
                try Syscall.retrying("setsockopt on", path) { setsockopt(fd, SOL_SOCKET, option, value, socklen_t(MemoryLayout<timeval>.size)) }
            }
        }
    }
}

public struct HandshakeError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Big-endian fields on a blocking socket.
private struct Wire {
    let fd: Int32
    let peer: String

    mutating func read(_ count: Int) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = try buffer.withUnsafeMutableBytes { target in
                let start = target.baseAddress! + done
                let wanted = count - done
                do {
                    return try Syscall.retrying("read from", peer) { Glibc.read(fd, start, wanted) }
                } catch let error as SystemError where error.errno == EAGAIN {
                    throw HandshakeError("\(peer) did not answer the NBD handshake in time")
                }
            }
            guard n > 0 else { throw HandshakeError("\(peer) closed the connection during the NBD handshake") }
            done += n
        }
        return buffer
    }

    mutating func readU16() throws -> UInt16 { try read(2).reduce(0) { $0 << 8 | UInt16($1) } }
    mutating func readU32() throws -> UInt32 { try read(4).reduce(0) { $0 << 8 | UInt32($1) } }
    mutating func readU64() throws -> UInt64 { try read(8).reduce(0) { $0 << 8 | UInt64($1) } }

    func write(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let offset = done
            done += try bytes.withUnsafeBytes { source in
                try Syscall.retrying("write to", peer) { Glibc.write(fd, source.baseAddress! + offset, source.count - offset) }
            }
        }
    }
}

private struct Bytes {
    var bytes: [UInt8] = []
    mutating func u16(_ value: UInt16) { bytes += [UInt8(value >> 8), UInt8(value & 0xff)] }
    mutating func u32(_ value: UInt32) { for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(value >> UInt32(shift) & 0xff)) } }
    mutating func u64(_ value: UInt64) { for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(value >> UInt64(shift) & 0xff)) } }
}
