import NIOCore

/// A request header as it arrives (28 bytes, compact form).
public struct RequestHeader: Sendable, Equatable {
    public var flags: NBDCommandFlags
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    public init(flags: NBDCommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public static let size = 28
}

/// A request that passed validation and may be dispatched.
public struct Request: Equatable {
    public var command: NBDCommand
    public var flags: NBDCommandFlags
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// The payload of a WRITE.
    public var payload: ByteBuffer?
}

/// What the transmission-phase parser found at the head of the input.
public enum ParsedRequest: Equatable {
    /// Not a whole request yet.
    case needMoreData
    case request(Request)
    /// A well-framed request that must be answered with an error (any payload was consumed).
    case reject(cookie: UInt64, command: UInt16, NBDError, message: String)
    /// Reply with this error, then close: the framing cannot be trusted any more.
    case rejectAndClose(cookie: UInt64, command: UInt16, NBDError, message: String)
    /// Close at once without a reply (bad magic: there is no cookie to answer).
    case close(reason: String)
    /// A WRITE header (consumed) whose payload of `header.length` bytes is still arriving. The caller
    /// gathers the payload without copying it, then calls `finishWrite(_:)`. Only returned for
    /// payloads of at least `gatherPayloadsFrom` bytes.
    case writeHeader(RequestHeader)
}

/// Parses and validates requests of one connection, nbdkit-style: every check before dispatch,
/// in a fixed order (command, flags, read-only, range), each failure with its spec error.
public struct RequestParser {
    public let session: NegotiatedSession
    /// WRITE payloads of at least this many bytes that are not complete yet are handed to the caller
    /// to gather (`.writeHeader`) instead of being waited for in one buffer.
    public var gatherPayloadsFrom: Int
    /// The export's size when a request is checked: a resize may have changed it since the
    /// handshake (default: the negotiated size).
    public let exportSize: @Sendable () -> UInt64

    public init(session: NegotiatedSession, gatherPayloadsFrom: Int = .max, exportSize: (@Sendable () -> UInt64)? = nil) {
        self.session = session
        self.gatherPayloadsFrom = gatherPayloadsFrom
        let negotiated = session.export.size
        self.exportSize = exportSize ?? { negotiated }
    }

    /// Takes one request off the front of `input` when it is complete (a WRITE with its payload).
    public func parse(_ input: inout ByteBuffer) -> ParsedRequest {
        guard input.readableBytes >= RequestHeader.size else { return .needMoreData }
        let start = input.readerIndex
        let magic = input.getInteger(at: start, as: UInt32.self)!
        guard magic == NBDMagic.request else {
            return .close(reason: "bad request magic 0x\(String(magic, radix: 16))")
        }
        let header = RequestHeader(
            flags: NBDCommandFlags(rawValue: input.getInteger(at: start + 4, as: UInt16.self)!),
            type: input.getInteger(at: start + 6, as: UInt16.self)!,
            cookie: input.getInteger(at: start + 8, as: UInt64.self)!,
            offset: input.getInteger(at: start + 16, as: UInt64.self)!,
            length: input.getInteger(at: start + 24, as: UInt32.self)!
        )
        var payload: ByteBuffer?
        if header.type == NBDCommand.write.rawValue {
            guard header.length <= NBDLimits.acceptedMaxPayload else {
                input.moveReaderIndex(forwardBy: RequestHeader.size)
                return .rejectAndClose(
                    cookie: header.cookie, command: header.type, .invalid,
                    message: "WRITE of \(header.length) bytes exceeds the largest payload accepted, \(NBDLimits.acceptedMaxPayload) bytes; split it"
                )
            }
            guard input.readableBytes >= RequestHeader.size + Int(header.length) else {
                if Int(header.length) >= gatherPayloadsFrom {
                    input.moveReaderIndex(forwardBy: RequestHeader.size)
                    return .writeHeader(header)
                }
                return .needMoreData
            }
            input.moveReaderIndex(forwardBy: RequestHeader.size)
            payload = input.readSlice(length: Int(header.length))
        } else {
            input.moveReaderIndex(forwardBy: RequestHeader.size)
        }
        if let (error, message) = validate(header) {
            return .reject(cookie: header.cookie, command: header.type, error, message: message)
        }
        return .request(
            Request(
                command: NBDCommand(rawValue: header.type)!, flags: header.flags, cookie: header.cookie,
                offset: header.offset, length: header.length, payload: payload
            )
        )
    }

    /// Validates a WRITE whose payload the caller gathered after `.writeHeader`; the returned request
    /// carries no payload.
    public func finishWrite(_ header: RequestHeader) -> ParsedRequest {
        if let (error, message) = validate(header) {
            return .reject(cookie: header.cookie, command: header.type, error, message: message)
        }
        return .request(
            Request(command: .write, flags: header.flags, cookie: header.cookie, offset: header.offset, length: header.length, payload: nil)
        )
    }

    /// The error a request must be answered with, or nil when it may be dispatched.
    public func validate(_ header: RequestHeader) -> (NBDError, String)? {
        guard let command = NBDCommand(rawValue: header.type) else {
            return (.invalid, "unknown command \(header.type)")
        }
        let flags = header.flags
        let known: NBDCommandFlags = [.fua, .noHole, .doNotFragment, .requestOne, .fastZero]
        if !flags.subtracting(known).isEmpty {
            return (.invalid, "\(command): unknown flags 0x\(String(flags.rawValue, radix: 16))")
        }
        if flags.contains(.noHole) && command != .writeZeroes {
            return (.invalid, "\(command): NO_HOLE is only valid with WRITE_ZEROES")
        }
        if flags.contains(.fastZero) && (command != .writeZeroes || session.export.readOnly) {
            return (.invalid, "\(command): FAST_ZERO is only valid with WRITE_ZEROES")
        }
        if flags.contains(.requestOne) && command != .blockStatus {
            return (.invalid, "\(command): REQ_ONE is only valid with BLOCK_STATUS")
        }
        if flags.contains(.doNotFragment) && (command != .read || !session.structuredReplies) {
            return (.invalid, "\(command): DF is only valid with READ after structured replies")
        }
        let writes = command == .write || command == .trim || command == .writeZeroes
        if writes && session.export.readOnly {
            return (.permission, "\(command): export '\(session.export.name)' is read-only")
        }
        switch command {
        case .disconnect, .flush:
            if header.offset != 0 || header.length != 0 {
                return (.invalid, "\(command): offset and length must be 0")
            }
            return nil
        case .read, .write, .trim, .writeZeroes, .cache, .blockStatus:
            break
        }
        if header.length == 0 {
            return (.invalid, "\(command): zero length")
        }
        let (end, overflow) = header.offset.addingReportingOverflow(UInt64(header.length))
        let size = exportSize()
        if overflow || end > size {
            let error: NBDError = (command == .write || command == .writeZeroes) ? .noSpace : .invalid
            return (
                error,
                "\(command): range \(header.offset)+\(header.length) is beyond the end of the export (\(size) bytes)"
            )
        }
        if command == .read && header.length > NBDLimits.acceptedMaxPayload {
            return (.invalid, "READ of \(header.length) bytes exceeds the largest payload accepted, \(NBDLimits.acceptedMaxPayload) bytes; split it")
        }
        if command == .blockStatus && (!session.structuredReplies || session.allocationContextID == nil) {
            return (.invalid, "BLOCK_STATUS needs structured replies and a selected meta context")
        }
        return nil
    }
}
