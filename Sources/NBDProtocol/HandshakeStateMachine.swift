import NIOCore

/// What a connection learns in the handshake and keeps for the transmission phase.
public struct NegotiatedSession: Sendable, Equatable {
    public var export: ExportDescriptor
    public var structuredReplies: Bool
    /// The id the client selected `base:allocation` under, if it did.
    public var allocationContextID: UInt32?

    public var transmissionFlags: NBDTransmissionFlags {
        export.transmissionFlags(structuredReplies: structuredReplies)
    }
}

/// What the I/O glue must do after feeding bytes to the handshake.
public enum HandshakeAction: Equatable {
    /// Nothing complete yet: read more bytes.
    case needMoreData
    /// Send these bytes and keep feeding input.
    case send(ByteBuffer)
    /// Send these bytes, then close the connection (the client aborted).
    case sendAndClose(ByteBuffer)
    /// Close at once: the client broke a rule the spec makes a MUST, or exceeded a limit.
    case close(reason: String)
    /// Send these bytes and switch to the transmission phase.
    case startTransmission(ByteBuffer, NegotiatedSession)
    /// The option names an export that is still coming (a resource recovering): read no more input
    /// and answer nothing until the catalog changes (`resume(catalog:)`) or the wait times out
    /// (`stopWaiting()`).
    case awaitExport(name: String)
}

/// Limits that stop a client from making the server buffer or loop without bound.
public struct HandshakeLimits: Sendable {
    /// Options up to this size are buffered and parsed; larger ones are discarded as they arrive.
    public var maxBufferedOption: Int = 64 << 10
    /// Options larger than this end the connection (the spec's DoS clause).
    public var maxOptionLength: UInt32 = 16 << 20
    /// Options per connection before it is closed.
    public var maxOptions: Int = 256

    public init() {}
}

/// The fixed-newstyle handshake as a value: bytes in, actions out, no I/O.
///
/// The server speaks first (`greeting()`), then the client's flags and options are fed in with
/// `receive(_:)` until an action ends the handshake. The machine consumes exactly the bytes it
/// understood, so leftover bytes (pipelined requests) stay in the caller's buffer.
public struct HandshakeStateMachine {
    private enum State {
        case awaitingClientFlags
        case awaitingOption
        /// Discarding the payload of an oversized option, then answering it with `reply`.
        case discarding(option: UInt32, remaining: UInt32)
        /// An option naming a pending export, kept to be handled once that export is decided.
        case awaitingExport(option: UInt32, payload: ByteBuffer, name: String)
        case finished
    }

    private var catalog: ExportCatalog
    private let limits: HandshakeLimits
    private var state: State = .awaitingClientFlags
    private var noZeroes = false
    private var structuredReplies = false
    private var optionsSeen = 0
    /// The export name and id of the last successful SET_META_CONTEXT selecting base:allocation.
    private var allocationSelection: (export: String, id: UInt32)?
    private let allocator = ByteBufferAllocator()

    public init(catalog: ExportCatalog, limits: HandshakeLimits = HandshakeLimits()) {
        self.catalog = catalog
        self.limits = limits
    }

    /// The 18 bytes the server sends on connect.
    public func greeting() -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 18)
        buffer.writeInteger(NBDMagic.greeting)
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(NBDHandshakeFlag.fixedNewstyle | NBDHandshakeFlag.noZeroes)
        return buffer
    }

    /// Consumes what it can from `input` and says what to do next. Call again after `.send` until
    /// it returns `.needMoreData` or ends the handshake.
    public mutating func receive(_ input: inout ByteBuffer) -> HandshakeAction {
        switch state {
        case .awaitingClientFlags:
            guard let flags = input.readInteger(as: UInt32.self) else { return .needMoreData }
            if flags & ~NBDClientFlag.known != 0 {
                state = .finished
                return .close(reason: "client sent unknown handshake flags 0x\(String(flags, radix: 16))")
            }
            if flags & NBDClientFlag.fixedNewstyle == 0 {
                state = .finished
                return .close(reason: "client does not support fixed newstyle negotiation")
            }
            noZeroes = flags & NBDClientFlag.noZeroes != 0
            state = .awaitingOption
            return receive(&input)

        case .discarding(let option, let remaining):
            let n = min(Int(remaining), input.readableBytes)
            input.moveReaderIndex(forwardBy: n)
            let left = remaining - UInt32(n)
            guard left == 0 else {
                state = .discarding(option: option, remaining: left)
                return .needMoreData
            }
            state = .awaitingOption
            if NBDOption(rawValue: option) == nil {
                return .send(error(.errUnsupported, option: option, "option \(option) is not supported"))
            }
            return .send(error(.errTooBig, option: option, "option \(option) is too large"))

        case .awaitingOption:
            guard let header = input.getOptionHeader() else { return .needMoreData }
            guard header.magic == NBDMagic.option else {
                state = .finished
                return .close(reason: "bad option magic 0x\(String(header.magic, radix: 16))")
            }
            optionsSeen += 1
            if optionsSeen > limits.maxOptions {
                state = .finished
                return .close(reason: "more than \(limits.maxOptions) options in one handshake")
            }
            if header.length > limits.maxOptionLength {
                state = .finished
                return .close(reason: "option \(header.option) claims \(header.length) bytes")
            }
            if header.length > limits.maxBufferedOption {
                if header.option == NBDOption.exportName.rawValue {
                    state = .finished
                    return .close(reason: "EXPORT_NAME of \(header.length) bytes")
                }
                input.moveReaderIndex(forwardBy: 16)
                state = .discarding(option: header.option, remaining: header.length)
                return receive(&input)
            }
            guard input.readableBytes >= 16 + Int(header.length) else { return .needMoreData }
            input.moveReaderIndex(forwardBy: 16)
            let payload = input.readSlice(length: Int(header.length))!
            return handle(option: header.option, payload: payload)

        case .finished, .awaitingExport:
            return .needMoreData
        }
    }

    /// Handles the option that waited for a pending export, with the exports as they are now: the
    /// export is served, or it is not (the usual error, with the reason), or it is still pending
    /// (`awaitExport` again).
    public mutating func resume(catalog: ExportCatalog) -> HandshakeAction {
        self.catalog = catalog
        guard case .awaitingExport(let option, let payload, _) = state else { return .needMoreData }
        state = .awaitingOption
        return handle(option: option, payload: payload)
    }

    /// Gives up waiting for a pending export: the option fails with a message that says the export
    /// is recovering (EXPORT_NAME cannot carry an error, so that connection closes).
    public mutating func stopWaiting() -> HandshakeAction {
        guard case .awaitingExport(let option, _, let name) = state else { return .needMoreData }
        let message = "export '\(name)' is still recovering; try again"
        if option == NBDOption.exportName.rawValue {
            state = .finished
            return .close(reason: "EXPORT_NAME for '\(name)': \(message)")
        }
        state = .awaitingOption
        return .send(error(.errUnknown, option: option, message))
    }

    /// The export an option names, when it names one that is pending.
    private func pendingExport(option: NBDOption, payload: ByteBuffer) -> String? {
        guard !catalog.pending.isEmpty else { return nil }
        var payload = payload
        let name: String?
        switch option {
        case .exportName:
            name = payload.readValidatedString(length: payload.readableBytes)
        case .info, .go, .listMetaContext, .setMetaContext:
            name = payload.readInteger(as: UInt32.self).flatMap { length in
                Int(length) <= payload.readableBytes ? payload.readValidatedString(length: Int(length)) : nil
            }
        default:
            name = nil
        }
        return name.flatMap { catalog.pendingName($0) }
    }

    // MARK: - Options

    private mutating func handle(option code: UInt32, payload: ByteBuffer) -> HandshakeAction {
        guard let option = NBDOption(rawValue: code) else {
            return .send(error(.errUnsupported, option: code, "option \(code) is not supported"))
        }
        if let name = pendingExport(option: option, payload: payload) {
            state = .awaitingExport(option: code, payload: payload, name: name)
            return .awaitExport(name: name)
        }
        switch option {
        case .exportName:
            return exportName(payload)
        case .abort:
            state = .finished
            return .sendAndClose(reply(.ack, option: code))
        case .list:
            return list(payload)
        case .startTLS:
            if payload.readableBytes != 0 {
                return .send(error(.errInvalid, option: code, "STARTTLS carries no data"))
            }
            return .send(error(.errPolicy, option: code, "TLS is not supported by this marsd; connect without TLS"))
        case .info, .go:
            return infoOrGo(option, payload)
        case .structuredReply:
            if payload.readableBytes != 0 {
                return .send(error(.errInvalid, option: code, "STRUCTURED_REPLY carries no data"))
            }
            if structuredReplies {
                return .send(error(.errInvalid, option: code, "structured replies are already negotiated"))
            }
            structuredReplies = true
            return .send(reply(.ack, option: code))
        case .listMetaContext, .setMetaContext:
            return metaContext(option, payload)
        case .peekExport, .extendedHeaders:
            return .send(error(.errUnsupported, option: code, "option \(code) is not supported"))
        }
    }

    private mutating func exportName(_ payload: ByteBuffer) -> HandshakeAction {
        var payload = payload
        state = .finished
        guard let name = payload.readValidatedString(length: payload.readableBytes) else {
            return .close(reason: "EXPORT_NAME with an invalid name")
        }
        guard let export = catalog.lookup(name) else {
            // No error can be sent in reply to EXPORT_NAME: the spec requires closing.
            return .close(reason: "EXPORT_NAME: \(catalog.missingMessage(name))")
        }
        let session = session(for: export)
        var out = allocator.buffer(capacity: 134)
        out.writeInteger(export.size)
        out.writeInteger(session.transmissionFlags.rawValue)
        if !noZeroes { out.writeRepeatingByte(0, count: 124) }
        return .startTransmission(out, session)
    }

    private func list(_ payload: ByteBuffer) -> HandshakeAction {
        let code = NBDOption.list.rawValue
        if payload.readableBytes != 0 {
            return .send(error(.errInvalid, option: code, "LIST carries no data"))
        }
        var out = allocator.buffer(capacity: 64)
        for export in catalog.exports {
            let name = Array(export.name.utf8)
            writeReplyHeader(&out, .server, option: code, length: 4 + name.count)
            out.writeInteger(UInt32(name.count))
            out.writeBytes(name)
        }
        writeReplyHeader(&out, .ack, option: code, length: 0)
        return .send(out)
    }

    private mutating func infoOrGo(_ option: NBDOption, _ payload: ByteBuffer) -> HandshakeAction {
        let code = option.rawValue
        var payload = payload
        guard let nameLength = payload.readInteger(as: UInt32.self),
            Int(nameLength) <= payload.readableBytes - 2
        else {
            return .send(error(.errInvalid, option: code, "malformed \(option): name length exceeds the option"))
        }
        guard let name = payload.readValidatedString(length: Int(nameLength)) else {
            return .send(error(.errInvalid, option: code, "export name is not valid UTF-8 without NUL"))
        }
        guard let count = payload.readInteger(as: UInt16.self), payload.readableBytes == Int(count) * 2 else {
            return .send(error(.errInvalid, option: code, "malformed \(option): information request count"))
        }
        var requested = Set<UInt16>()
        for _ in 0..<count { requested.insert(payload.readInteger(as: UInt16.self)!) }

        guard let export = catalog.lookup(name) else {
            return .send(error(.errUnknown, option: code, catalog.missingMessage(name)))
        }
        var session = session(for: export)
        if option == .go, let selection = allocationSelection, selection.export != name {
            // A meta context selection belongs to the export it was made for.
            session.allocationContextID = nil
        }

        var out = allocator.buffer(capacity: 128)
        writeReplyHeader(&out, .info, option: code, length: 12)
        out.writeInteger(NBDInfoType.export.rawValue)
        out.writeInteger(export.size)
        out.writeInteger(session.transmissionFlags.rawValue)
        if requested.contains(NBDInfoType.name.rawValue) {
            let bytes = Array(export.name.utf8)
            writeReplyHeader(&out, .info, option: code, length: 2 + bytes.count)
            out.writeInteger(NBDInfoType.name.rawValue)
            out.writeBytes(bytes)
        }
        if requested.contains(NBDInfoType.description.rawValue) {
            let bytes = Array(export.description.utf8.prefix(NBDLimits.maxString))
            writeReplyHeader(&out, .info, option: code, length: 2 + bytes.count)
            out.writeInteger(NBDInfoType.description.rawValue)
            out.writeBytes(bytes)
        }
        // Block sizes are always sent: clients that did not ask ignore them, and the defaults hold anyway.
        writeReplyHeader(&out, .info, option: code, length: 14)
        out.writeInteger(NBDInfoType.blockSize.rawValue)
        out.writeInteger(NBDLimits.minimumBlockSize)
        out.writeInteger(NBDLimits.preferredBlockSize)
        out.writeInteger(NBDLimits.advertisedMaxPayload)
        writeReplyHeader(&out, .ack, option: code, length: 0)

        if option == .go {
            state = .finished
            return .startTransmission(out, session)
        }
        return .send(out)
    }

    private mutating func metaContext(_ option: NBDOption, _ payload: ByteBuffer) -> HandshakeAction {
        let code = option.rawValue
        let isSet = option == .setMetaContext
        if isSet { allocationSelection = nil }  // SET replaces the selection even when it fails.
        guard structuredReplies else {
            return .send(error(.errInvalid, option: code, "negotiate structured replies before meta contexts"))
        }
        var payload = payload
        guard let nameLength = payload.readInteger(as: UInt32.self), Int(nameLength) <= payload.readableBytes,
            let name = payload.readValidatedString(length: Int(nameLength)),
            let count = payload.readInteger(as: UInt32.self)
        else {
            return .send(error(.errInvalid, option: code, "malformed \(option)"))
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = payload.readInteger(as: UInt32.self), Int(length) <= payload.readableBytes,
                let query = payload.readValidatedString(length: Int(length))
            else {
                return .send(error(.errInvalid, option: code, "malformed query in \(option)"))
            }
            queries.append(query)
        }
        guard payload.readableBytes == 0 else {
            return .send(error(.errInvalid, option: code, "trailing bytes after the queries of \(option)"))
        }
        guard catalog.lookup(name) != nil else {
            return .send(error(.errUnknown, option: code, catalog.missingMessage(name)))
        }
        let matches: Bool
        if isSet {
            matches = queries.contains(allocationContextName)
        } else {
            matches = queries.isEmpty || queries.contains(allocationContextName) || queries.contains("base:")
        }
        var out = allocator.buffer(capacity: 64)
        if matches {
            let id: UInt32 = isSet ? 1 : 0
            let bytes = Array(allocationContextName.utf8)
            writeReplyHeader(&out, .metaContext, option: code, length: 4 + bytes.count)
            out.writeInteger(id)
            out.writeBytes(bytes)
            if isSet { allocationSelection = (name, id) }
        }
        writeReplyHeader(&out, .ack, option: code, length: 0)
        return .send(out)
    }

    private func session(for export: ExportDescriptor) -> NegotiatedSession {
        NegotiatedSession(
            export: export,
            structuredReplies: structuredReplies,
            allocationContextID: allocationSelection.flatMap { lookupMatches($0.export, export) ? $0.id : nil }
        )
    }

    private func lookupMatches(_ name: String, _ export: ExportDescriptor) -> Bool {
        catalog.lookup(name)?.name == export.name
    }

    // MARK: - Encoding

    private func writeReplyHeader(_ out: inout ByteBuffer, _ type: NBDOptionReply, option: UInt32, length: Int) {
        out.writeInteger(NBDMagic.optionReply)
        out.writeInteger(option)
        out.writeInteger(type.rawValue)
        out.writeInteger(UInt32(length))
    }

    private func reply(_ type: NBDOptionReply, option: UInt32) -> ByteBuffer {
        var out = allocator.buffer(capacity: 20)
        writeReplyHeader(&out, type, option: option, length: 0)
        return out
    }

    private func error(_ type: NBDOptionReply, option: UInt32, _ message: String) -> ByteBuffer {
        let bytes = Array(message.utf8)
        var out = allocator.buffer(capacity: 20 + bytes.count)
        writeReplyHeader(&out, type, option: option, length: bytes.count)
        out.writeBytes(bytes)
        return out
    }
}

extension ByteBuffer {
    fileprivate func getOptionHeader() -> (magic: UInt64, option: UInt32, length: UInt32)? {
        guard let magic = getInteger(at: readerIndex, as: UInt64.self),
            let option = getInteger(at: readerIndex + 8, as: UInt32.self),
            let length = getInteger(at: readerIndex + 12, as: UInt32.self)
        else { return nil }
        return (magic, option, length)
    }

    /// Reads a protocol string: at most 4096 bytes of UTF-8 without NUL.
    fileprivate mutating func readValidatedString(length: Int) -> String? {
        guard length >= 0, length <= NBDLimits.maxString, let bytes = readBytes(length: length),
            !bytes.contains(0)
        else { return nil }
        return String(validating: bytes, as: UTF8.self)
    }
}
