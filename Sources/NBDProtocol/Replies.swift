import NIOCore

/// Encoders for transmission-phase replies. Each writes into a caller-provided buffer so the
/// hot path can reserve the header in front of read data and send one buffer.
public enum ReplyEncoder {
    public static let simpleHeaderSize = 16
    public static let chunkHeaderSize = 20
    /// The bytes in front of READ data: a simple header, or a chunk header plus the offset.
    public static func readHeaderSize(structured: Bool) -> Int {
        structured ? chunkHeaderSize + 8 : simpleHeaderSize
    }

    public static func writeSimple(_ out: inout ByteBuffer, cookie: UInt64, error: NBDError?) {
        out.writeInteger(NBDMagic.simpleReply)
        out.writeInteger(error?.rawValue ?? 0)
        out.writeInteger(cookie)
    }

    public static func writeChunkHeader(
        _ out: inout ByteBuffer, cookie: UInt64, type: NBDChunkType, done: Bool, length: Int
    ) {
        out.writeInteger(NBDMagic.structuredReply)
        out.writeInteger(done ? NBDReplyFlag.done : 0)
        out.writeInteger(type.rawValue)
        out.writeInteger(cookie)
        out.writeInteger(UInt32(length))
    }

    /// The header in front of READ data of `length` bytes.
    public static func writeReadHeader(
        _ out: inout ByteBuffer, structured: Bool, cookie: UInt64, offset: UInt64, length: Int
    ) {
        if structured {
            writeChunkHeader(&out, cookie: cookie, type: .offsetData, done: true, length: 8 + length)
            out.writeInteger(offset)
        } else {
            writeSimple(&out, cookie: cookie, error: nil)
        }
    }

    /// An error reply: an error chunk with a message under structured replies, else a simple reply.
    public static func writeError(
        _ out: inout ByteBuffer, structured: Bool, cookie: UInt64, error: NBDError, message: String
    ) {
        guard structured else {
            writeSimple(&out, cookie: cookie, error: error)
            return
        }
        let bytes = message.utf8.prefix(NBDLimits.maxString)
        writeChunkHeader(&out, cookie: cookie, type: .error, done: true, length: 6 + bytes.count)
        out.writeInteger(error.rawValue)
        out.writeInteger(UInt16(bytes.count))
        out.writeBytes(bytes)
    }

    /// A success reply for a command without data.
    public static func writeDone(_ out: inout ByteBuffer, cookie: UInt64) {
        writeSimple(&out, cookie: cookie, error: nil)
    }

    /// One BLOCK_STATUS chunk (the last chunk of the reply) for context `contextID`.
    public static func writeBlockStatus(
        _ out: inout ByteBuffer, cookie: UInt64, contextID: UInt32, extents: [Extent]
    ) {
        writeChunkHeader(&out, cookie: cookie, type: .blockStatus, done: true, length: 4 + 8 * extents.count)
        out.writeInteger(contextID)
        for extent in extents {
            out.writeInteger(extent.length)
            out.writeInteger(extent.flags)
        }
    }
}

/// One descriptor of a BLOCK_STATUS reply.
public struct Extent: Sendable, Equatable {
    public var length: UInt32
    public var flags: UInt32

    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// Maps an errno from the data device to the NBD error a client sees (one place, as in nbdkit).
public func nbdError(errno code: Int32, fastZeroRequested: Bool = false) -> NBDError {
    switch code {
    case 1 /* EPERM */, 30 /* EROFS */: return .permission
    case 28 /* ENOSPC */, 122 /* EDQUOT */, 27 /* EFBIG */: return .noSpace
    case 12 /* ENOMEM */: return .noMemory
    case 22 /* EINVAL */: return .invalid
    case 75 /* EOVERFLOW */: return .overflow
    case 95 /* EOPNOTSUPP */: return fastZeroRequested ? .notSupported : .invalid
    case 108 /* ESHUTDOWN */: return .shutdown
    default: return .io
    }
}
