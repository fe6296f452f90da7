import NIOCore

/// Constants of the peer protocol: the TCP protocol hosts of a cluster speak to each other
/// (handshake, gossip, log shipping, sync). Format: `docs/peer-protocol.md`.
public enum PeerWire {
    /// The protocol version a host sends in its hello and challenge. Hosts of other versions are
    /// refused: every host of a cluster runs the same one (2: `fetch` carries the asker's epoch,
    /// `fetchError` has `staleSource`).
    public static let version: UInt16 = 2
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

/// Writes the fields of a frame, little-endian.
extension ByteBuffer {
    mutating func writeField<T: FixedWidthInteger>(_ value: T) {
        writeInteger(value, endianness: .little)
    }

    /// Encoding cannot fail, so a string over the limit (only free-text reasons get near it) is
    /// cut at a character boundary rather than producing a frame the peer would reject.
    mutating func writeField(_ value: String) {
        var utf8 = Array(value.utf8)
        if utf8.count > PeerWire.maxStringBytes {
            var end = PeerWire.maxStringBytes
            // Back up over continuation bytes (10xxxxxx) to the start of a scalar.
            while end > 0 && utf8[end] & 0xC0 == 0x80 { end -= 1 }
            utf8.removeSubrange(end...)
        }
        writeField(UInt16(utf8.count))
        writeBytes(utf8)
    }

    mutating func writeField(_ blob: [UInt8]) {
        writeField(UInt32(blob.count))
        writeBytes(blob)
    }
}

/// Reads the fields of one message body, naming the message in its errors.
struct WireReader {
    /// The body after the type byte.
    var body: ByteBuffer
    let message: String

    init(body: ByteBuffer, message: String) {
        self.body = body
        self.body.moveReaderIndex(forwardBy: 1)
        self.message = message
    }

    var remaining: Int { body.readableBytes }

    func truncated(_ field: String) -> PeerProtocolError {
        PeerProtocolError("message '\(message)' truncated in field '\(field)'")
    }

    mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(PeerProtocolError) -> T {
        guard let value = body.readInteger(endianness: .little, as: T.self) else { throw truncated(field) }
        return value
    }

    mutating func string(_ field: String) throws(PeerProtocolError) -> String {
        let length = Int(try integer(UInt16.self, field))
        guard length <= PeerWire.maxStringBytes else {
            throw PeerProtocolError(
                "message '\(message)' field '\(field)' is \(length) bytes, more than the \(PeerWire.maxStringBytes)-byte limit for strings"
            )
        }
        guard let utf8 = body.readSlice(length: length) else { throw truncated(field) }
        guard let text = String(validating: utf8.readableBytesView, as: UTF8.self) else {
            throw PeerProtocolError("message '\(message)' field '\(field)' is not valid UTF-8")
        }
        return text
    }

    /// A length-prefixed field as a slice of the frame: bulk bytes are not copied.
    mutating func payload(_ field: String) throws(PeerProtocolError) -> ByteBuffer {
        let length = Int(try integer(UInt32.self, field))
        guard let bytes = body.readSlice(length: length) else { throw truncated(field) }
        return bytes
    }

    mutating func blob(_ field: String) throws(PeerProtocolError) -> [UInt8] {
        Array(try payload(field).readableBytesView)
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
