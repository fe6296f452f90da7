/// Constants of the peer protocol: the TCP protocol hosts of a cluster speak to each other
/// (handshake, gossip, log shipping, sync). Format: `docs/peer-protocol.md`.
public enum PeerWire {
    /// The protocol version a host sends in its hello and challenge.
    public static let version: UInt16 = 1
    public static let defaultPort = 7777
    /// The largest frame body (type byte and fields) either side sends or accepts.
    public static let maxFrameBody = 4 << 20
    /// The largest string field, in UTF-8 bytes.
    public static let maxStringBytes = 4096
    /// Nonces and HMAC-SHA256 proofs of the handshake.
    public static let nonceBytes = 32
    public static let proofBytes = 32
    /// A sync compare digest, and how many one request may carry.
    public static let digestBytes = 16
    public static let maxDigestsPerCompare = 1024
}

/// A frame or message that breaks the protocol; the connection cannot go on after it.
public struct PeerProtocolError: Error, Equatable, CustomStringConvertible {
    public let reason: String

    public init(_ reason: String) {
        self.reason = reason
    }

    public var description: String { reason }
}

/// Appends little-endian fields to a byte array.
struct WireWriter {
    var bytes: [UInt8]

    mutating func integer<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Encoding cannot fail, so a string over the limit (only free-text reasons get near it) is
    /// cut at a character boundary rather than producing a frame the peer would reject.
    mutating func string(_ value: String) {
        var utf8 = Array(value.utf8)
        if utf8.count > PeerWire.maxStringBytes {
            var end = PeerWire.maxStringBytes
            // Back up over continuation bytes (10xxxxxx) to the start of a scalar.
            while end > 0 && utf8[end] & 0xC0 == 0x80 { end -= 1 }
            utf8.removeSubrange(end...)
        }
        integer(UInt16(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    mutating func blob(_ value: [UInt8]) {
        integer(UInt32(value.count))
        bytes.append(contentsOf: value)
    }
}

/// Reads the fields of one message body, naming the message in its errors.
struct WireReader {
    let body: [UInt8]
    var index: Int
    let message: String

    init(body: [UInt8], message: String) {
        self.body = body
        self.index = 1  // after the type byte
        self.message = message
    }

    var remaining: Int { body.count - index }

    func truncated(_ field: String) -> PeerProtocolError {
        PeerProtocolError("message '\(message)' truncated in field '\(field)'")
    }

    mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(PeerProtocolError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw truncated(field) }
        var value: T = 0
        for offset in 0..<size {
            value |= T(body[index + offset]) << (8 * offset)
        }
        index += size
        return value
    }

    mutating func string(_ field: String) throws(PeerProtocolError) -> String {
        let length = Int(try integer(UInt16.self, field))
        guard length <= PeerWire.maxStringBytes else {
            throw PeerProtocolError(
                "message '\(message)' field '\(field)' is \(length) bytes, more than the \(PeerWire.maxStringBytes)-byte limit for strings"
            )
        }
        guard remaining >= length else { throw truncated(field) }
        let utf8 = body[index..<index + length]
        index += length
        guard let text = String(validating: utf8, as: UTF8.self) else {
            throw PeerProtocolError("message '\(message)' field '\(field)' is not valid UTF-8")
        }
        return text
    }

    mutating func blob(_ field: String) throws(PeerProtocolError) -> [UInt8] {
        let length = Int(try integer(UInt32.self, field))
        guard remaining >= length else { throw truncated(field) }
        let bytes = Array(body[index..<index + length])
        index += length
        return bytes
    }

    /// A blob that must have exactly `count` bytes (nonces, proofs, digests).
    mutating func fixedBlob(_ field: String, count: Int) throws(PeerProtocolError) -> [UInt8] {
        let bytes = try blob(field)
        guard bytes.count == count else {
            throw PeerProtocolError("message '\(message)' field '\(field)' is \(bytes.count) bytes, not \(count)")
        }
        return bytes
    }

    func finish() throws(PeerProtocolError) {
        guard remaining == 0 else {
            throw PeerProtocolError("message '\(message)' has \(remaining) trailing bytes")
        }
    }
}
