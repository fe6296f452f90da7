import NIOCore

/// Splits a byte stream into messages. Feed it what the socket delivers with `append`, then call
/// `next()` until it returns nil.
///
/// A frame's length is checked as soon as its 4-byte prefix is there, so a peer cannot make us
/// wait for (and buffer) an oversized body. The bulk bytes of a message are a slice of the
/// received bytes, not a copy: each byte is copied at most once to gather a frame that arrived in
/// pieces, and the bytes of a frame that began in an earlier buffer at most once more. After an
/// error the stream cannot be resynchronized: every later `next()` throws the same error.
public struct PeerFrameDecoder: Sendable {
    /// Received and not yet returned as messages (from its reader index).
    private var buffer = ByteBuffer()
    private var failure: PeerProtocolError?

    public init() {}

    /// Bytes received but not yet returned as messages.
    public var bufferedByteCount: Int { buffer.readableBytes }

    public mutating func append(_ incoming: ByteBuffer) {
        guard buffer.readableBytes > 0 else {
            buffer = incoming
            return
        }
        var incoming = incoming
        let needed = max(buffer.readableBytes + incoming.readableBytes, pendingFrameBytes)
        // Consumed bytes in front (a frame taken from this storage, which its messages may still
        // hold) or too little room: the unconsumed rest moves to storage sized for the whole
        // frame, so gathering it costs one copy and no regrowth.
        if buffer.readerIndex > 0 || buffer.capacity - buffer.readerIndex < needed {
            var gathered = ByteBufferAllocator().buffer(capacity: needed)
            gathered.writeBuffer(&buffer)
            buffer = gathered
        }
        buffer.writeBuffer(&incoming)
    }

    public mutating func append(_ bytes: some Collection<UInt8>) {
        append(ByteBuffer(bytes: bytes))
    }

    /// The next whole message, or nil until more bytes arrive.
    public mutating func next() throws(PeerProtocolError) -> PeerMessage? {
        if let failure { throw failure }
        do {
            return try decodeNext()
        } catch {
            failure = error
            throw error
        }
    }

    /// The body length of the frame at the front, once its 4-byte prefix is there.
    private var frontBodyLength: Int? {
        buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self).map(Int.init)
    }

    /// The size of the frame at the front (length prefix included), once its prefix is there.
    private var pendingFrameBytes: Int { frontBodyLength.map { 4 + min($0, PeerWire.maxFrameBody) } ?? 0 }

    private mutating func decodeNext() throws(PeerProtocolError) -> PeerMessage? {
        guard let length = frontBodyLength else { return nil }
        guard length <= PeerWire.maxFrameBody else {
            throw PeerProtocolError("frame of \(length) bytes exceeds the \(PeerWire.maxFrameBody)-byte limit")
        }
        guard length > 0 else { throw PeerProtocolError("empty frame body (no message type)") }
        guard buffer.readableBytes >= 4 + length else { return nil }
        buffer.moveReaderIndex(forwardBy: 4)
        let body = buffer.readSlice(length: length)!
        // Nothing left: let go of the storage, which now belongs to the messages taken from it.
        if buffer.readableBytes == 0 { buffer = ByteBuffer() }
        return try PeerMessage.decode(body: body)
    }
}
