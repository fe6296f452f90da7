/// Splits a byte stream into messages. Feed it what the socket delivers with `append`, then call
/// `next()` until it returns nil.
///
/// A frame's length is checked as soon as its 4-byte prefix is there, so a peer cannot make us
/// wait for (and buffer) an oversized body. Consumed bytes are dropped as the buffer is reused,
/// so it holds at most the unconsumed input. After an error the stream cannot be resynchronized:
/// every later `next()` throws the same error.
public struct PeerFrameDecoder: Sendable {
    private var buffer: [UInt8] = []
    /// Where the first unconsumed byte is in `buffer`.
    private var readIndex = 0
    private var failure: PeerProtocolError?

    public init() {}

    /// Bytes received but not yet returned as messages.
    public var bufferedByteCount: Int { buffer.count - readIndex }

    public mutating func append(_ bytes: some Collection<UInt8>) {
        compact()
        buffer.append(contentsOf: bytes)
    }

    /// The next whole message, or nil until more bytes arrive.
    public mutating func next() throws(PeerProtocolError) -> PeerMessage? {
        if let failure { throw failure }
        do {
            let message = try decodeNext()
            if message == nil { compact() }
            return message
        } catch {
            failure = error
            throw error
        }
    }

    private mutating func decodeNext() throws(PeerProtocolError) -> PeerMessage? {
        guard bufferedByteCount >= 4 else { return nil }
        var length = 0
        for offset in 0..<4 {
            length |= Int(buffer[readIndex + offset]) << (8 * offset)
        }
        guard length <= PeerWire.maxFrameBody else {
            throw PeerProtocolError("frame of \(length) bytes exceeds the \(PeerWire.maxFrameBody)-byte limit")
        }
        guard length > 0 else { throw PeerProtocolError("empty frame body (no message type)") }
        guard bufferedByteCount >= 4 + length else { return nil }
        let bodyStart = readIndex + 4
        let body = Array(buffer[bodyStart..<bodyStart + length])
        readIndex = bodyStart + length
        return try PeerMessage.decode(body: body)
    }

    /// Drops consumed bytes once they are at least half the buffer: amortized O(1) per byte, and
    /// the buffer never holds more than twice the unconsumed input.
    private mutating func compact() {
        if readIndex == buffer.count {
            buffer.removeAll(keepingCapacity: buffer.capacity <= 2 * (PeerWire.maxFrameBody + 4))
            readIndex = 0
        } else if readIndex > 0 && readIndex >= buffer.count - readIndex {
            buffer.removeSubrange(0..<readIndex)
            readIndex = 0
        }
    }
}
