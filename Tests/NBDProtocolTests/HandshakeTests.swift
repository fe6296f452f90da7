import NIOCore
import Testing

@testable import NBDProtocol

@Suite("Handshake state machine")
struct HandshakeTests {
    let catalog = ExportCatalog([disk, backup])

    private func negotiated(_ options: [ByteBuffer], flags: UInt32 = 3) -> (actions: [HandshakeAction], rest: ByteBuffer) {
        var machine = HandshakeStateMachine(catalog: catalog)
        var input = clientFlags(flags)
        for var o in options { input.writeBuffer(&o) }
        return (drive(&machine, &input), input)
    }

    private func sent(_ actions: [HandshakeAction]) -> [OptionReply] {
        actions.flatMap { action -> [OptionReply] in
            switch action {
            case .send(let bytes), .sendAndClose(let bytes): return parseReplies(bytes)
            case .startTransmission(let bytes, _): return parseReplies(bytes)
            default: return []
            }
        }
    }

    /// The greeting is NBDMAGIC, IHAVEOPT and exactly the FIXED_NEWSTYLE and NO_ZEROES flags.
    @Test func greeting() {
        let machine = HandshakeStateMachine(catalog: catalog)
        var bytes = machine.greeting()
        #expect(bytes.readInteger(as: UInt64.self) == NBDMagic.greeting)
        #expect(bytes.readInteger(as: UInt64.self) == NBDMagic.option)
        #expect(bytes.readInteger(as: UInt16.self) == 3)
        #expect(bytes.readableBytes == 0)
    }

    /// Unknown client flags are a MUST-close.
    @Test func unknownClientFlagsClose() {
        let (actions, _) = negotiated([], flags: 0x8000_0001)
        guard case .close = actions.last else { Issue.record("expected close, got \(actions)"); return }
    }

    /// A client without fixed newstyle cannot be served by a fixed-newstyle-only server.
    @Test func clientWithoutFixedNewstyleCloses() {
        let (actions, _) = negotiated([], flags: 0)
        guard case .close = actions.last else { Issue.record("expected close"); return }
    }

    /// A truncated greeting reply waits for more input instead of acting.
    @Test func truncatedClientFlagsWait() {
        var machine = HandshakeStateMachine(catalog: catalog)
        var input = ByteBuffer(bytes: [0, 0])
        #expect(machine.receive(&input) == .needMoreData)
        #expect(input.readableBytes == 2)
    }

    /// Bad option magic means framing is lost: hard disconnect.
    @Test func badOptionMagicCloses() {
        let (actions, _) = negotiated([option(NBDOption.list.rawValue, magic: 0xDEAD_BEEF)])
        guard case .close = actions.last else { Issue.record("expected close"); return }
    }

    /// A giant option length is refused without buffering it.
    @Test func giantOptionLengthCloses() {
        var o = ByteBuffer()
        o.writeInteger(NBDMagic.option)
        o.writeInteger(UInt32(0x1234))
        o.writeInteger(UInt32.max)
        let (actions, _) = negotiated([o])
        guard case .close = actions.last else { Issue.record("expected close"); return }
    }

    /// An unknown option is answered with ERR_UNSUP and the next option still works (Baseline).
    @Test func unknownOptionThenList() {
        let (actions, _) = negotiated([option(0x1234, [1, 2, 3, 4, 5, 6, 7, 8]), option(.list)])
        let replies = sent(actions)
        #expect(replies.first?.typeName == .errUnsupported)
        #expect(replies.first?.option == 0x1234)
        #expect(replies.dropFirst().map(\.typeName) == [.server, .server, .ack])
    }

    /// An oversized unknown option is discarded as it streams in, then answered with ERR_UNSUP.
    @Test func oversizedUnknownOptionIsDiscarded() {
        let big = [UInt8](repeating: 0xAA, count: 100_000)
        var machine = HandshakeStateMachine(catalog: catalog)
        var input = clientFlags()
        var o = option(0x99, big)
        var actions: [HandshakeAction] = []
        // Feed it in pieces, as a socket would.
        while o.readableBytes > 0 {
            var piece = o.readSlice(length: min(7000, o.readableBytes))!
            input.writeBuffer(&piece)
            actions += drive(&machine, &input)
        }
        var list = option(.list)
        input.writeBuffer(&list)
        actions += drive(&machine, &input)
        let replies = sent(actions)
        #expect(replies.map(\.typeName) == [.errUnsupported, .server, .server, .ack])
    }

    /// A known option larger than the buffering limit gets ERR_TOO_BIG.
    @Test func oversizedKnownOptionIsTooBig() {
        let (actions, _) = negotiated([option(.info, [UInt8](repeating: 0, count: 70_000))])
        #expect(sent(actions).map(\.typeName) == [.errTooBig])
    }

    /// LIST with data is invalid; LIST without lists every export then ACKs.
    @Test func list() {
        let (actions, _) = negotiated([option(.list, [0, 0, 0, 0]), option(.list)])
        let replies = sent(actions)
        #expect(replies.map(\.typeName) == [.errInvalid, .server, .server, .ack])
        var first = ByteBuffer(bytes: replies[1].payload)
        let length = first.readInteger(as: UInt32.self)!
        #expect(first.readString(length: Int(length)) == "disk")
    }

    /// NOTLS server: STARTTLS is refused with ERR_POLICY and never ERR_TLS_REQD.
    @Test func startTLSIsRefused() {
        let (actions, _) = negotiated([option(.startTLS), option(.startTLS, [1])])
        #expect(sent(actions).map(\.typeName) == [.errPolicy, .errInvalid])
    }

    /// ABORT gets an ACK, then the connection closes.
    @Test func abort() {
        let (actions, _) = negotiated([option(.abort)])
        guard case .sendAndClose(let bytes) = actions.last else { Issue.record("expected sendAndClose"); return }
        #expect(parseReplies(bytes).map(\.typeName) == [.ack])
    }

    /// GO for a missing export is ERR_UNKNOWN, without INFO replies before it.
    @Test func goUnknownExport() {
        let (actions, _) = negotiated([option(.go, infoPayload("nope"))])
        #expect(sent(actions).map(\.typeName) == [.errUnknown])
    }

    /// A name length that runs past the option is ERR_INVALID.
    @Test func goInconsistentLength() {
        var payload = ByteBuffer()
        payload.writeInteger(UInt32(1000))
        payload.writeString("disk")
        let (actions, _) = negotiated([option(.go, Array(payload.readableBytesView))])
        #expect(sent(actions).map(\.typeName) == [.errInvalid])
    }

    /// A NUL inside the export name is ERR_INVALID.
    @Test func goNulInName() {
        let (actions, _) = negotiated([option(.go, infoPayload("a\0b"))])
        #expect(sent(actions).map(\.typeName) == [.errInvalid])
    }

    /// An odd number of bytes for information requests is ERR_INVALID.
    @Test func goBadRequestCount() {
        var payload = infoPayload("disk", requests: [.name])
        payload.append(0)
        let (actions, _) = negotiated([option(.go, payload)])
        #expect(sent(actions).map(\.typeName) == [.errInvalid])
    }

    /// INFO then GO report the same size and flags; GO starts transmission with the right session.
    @Test func infoAndGoAgree() throws {
        let (actions, rest) = negotiated([
            option(.info, infoPayload("disk", requests: [.name, .description, .blockSize])),
            option(.go, infoPayload("disk", requests: [.name, .description, .blockSize])),
        ])
        guard case .startTransmission(let goBytes, let session) = actions.last else {
            Issue.record("expected transmission, got \(actions)")
            return
        }
        guard case .send(let infoBytes) = actions.first else { Issue.record("expected INFO reply"); return }
        let info = parseReplies(infoBytes)
        let go = parseReplies(goBytes)
        #expect(info.map(\.payload) == go.map(\.payload))
        #expect(go.map(\.typeName) == [.info, .info, .info, .info, .ack])
        var export = ByteBuffer(bytes: go[0].payload)
        #expect(export.readInteger(as: UInt16.self) == NBDInfoType.export.rawValue)
        #expect(export.readInteger(as: UInt64.self) == disk.size)
        let flags = NBDTransmissionFlags(rawValue: export.readInteger(as: UInt16.self)!)
        #expect(flags.contains([.hasFlags, .sendFlush, .sendFUA, .canMultiConn, .sendTrim, .sendWriteZeroes]))
        #expect(!flags.contains(.sendDF))  // No structured replies negotiated.
        #expect(session.export == disk)
        #expect(rest.readableBytes == 0)
        var blockSize = ByteBuffer(bytes: go[3].payload)
        #expect(blockSize.readInteger(as: UInt16.self) == NBDInfoType.blockSize.rawValue)
        #expect(blockSize.readInteger(as: UInt32.self) == 1)
        #expect(blockSize.readInteger(as: UInt32.self) == 4096)
        #expect(blockSize.readInteger(as: UInt32.self) == 32 << 20)
    }

    /// EXPORT_NAME: size, flags and 124 zero bytes unless NO_ZEROES was agreed.
    @Test(arguments: [UInt32(1), UInt32(3)])
    func exportName(clientFlags flags: UInt32) {
        let (actions, _) = negotiated([option(.exportName, Array("disk".utf8))], flags: flags)
        guard case .startTransmission(let bytes, _) = actions.last else { Issue.record("expected transmission"); return }
        #expect(bytes.readableBytes == (flags == 3 ? 10 : 134))
    }

    /// EXPORT_NAME of an unknown export cannot be answered: the connection closes.
    @Test func exportNameUnknownCloses() {
        let (actions, _) = negotiated([option(.exportName, Array("nope".utf8))])
        guard case .close = actions.last else { Issue.record("expected close"); return }
    }

    /// The empty name is the default export only when there is exactly one export.
    @Test func defaultExport() {
        #expect(ExportCatalog([disk]).lookup("") == disk)
        #expect(ExportCatalog([disk, backup]).lookup("") == nil)
    }

    /// STRUCTURED_REPLY: data is invalid, a repeat is invalid, DF is advertised only after it.
    @Test func structuredReply() {
        let (actions, _) = negotiated([
            option(.structuredReply, [1]), option(.structuredReply), option(.structuredReply),
            option(.go, infoPayload("disk")),
        ])
        #expect(sent(actions).prefix(3).map(\.typeName) == [.errInvalid, .ack, .errInvalid])
        guard case .startTransmission(_, let session) = actions.last else { Issue.record("expected transmission"); return }
        #expect(session.structuredReplies)
        #expect(session.transmissionFlags.contains(.sendDF))
    }

    /// Meta contexts need structured replies first.
    @Test func setMetaContextWithoutStructuredReplies() {
        let (actions, _) = negotiated([option(.setMetaContext, metaPayload("disk", queries: [allocationContextName]))])
        #expect(sent(actions).map(\.typeName) == [.errInvalid])
    }

    /// SET selects base:allocation for the GO that follows; LIST with no queries lists it with id 0.
    @Test func metaContexts() {
        let (actions, _) = negotiated([
            option(.structuredReply),
            option(.listMetaContext, metaPayload("disk", queries: [])),
            option(.setMetaContext, metaPayload("disk", queries: ["x-unknown:thing", allocationContextName])),
            option(.go, infoPayload("disk")),
        ])
        let replies = sent(actions)
        #expect(replies.map(\.typeName) == [.ack, .metaContext, .ack, .metaContext, .ack, .info, .info, .ack])
        #expect(Array(replies[1].payload.prefix(4)) == [0, 0, 0, 0])
        guard case .startTransmission(_, let session) = actions.last else { Issue.record("expected transmission"); return }
        #expect(session.allocationContextID == 1)
    }

    /// A selection made for another export does not carry over to GO.
    @Test func metaContextForOtherExportIsDropped() {
        let (actions, _) = negotiated([
            option(.structuredReply),
            option(.setMetaContext, metaPayload("backup", queries: [allocationContextName])),
            option(.go, infoPayload("disk")),
        ])
        guard case .startTransmission(_, let session) = actions.last else { Issue.record("expected transmission"); return }
        #expect(session.allocationContextID == nil)
    }

    /// A query running past the option is ERR_INVALID.
    @Test func malformedMetaQuery() {
        var payload = metaPayload("disk", queries: [allocationContextName])
        payload.removeLast(3)
        let (actions, _) = negotiated([option(.structuredReply), option(.listMetaContext, payload)])
        #expect(sent(actions).map(\.typeName) == [.ack, .errInvalid])
    }

    /// Read-only exports advertise READ_ONLY and no write-type commands.
    @Test func readOnlyFlags() {
        let flags = backup.transmissionFlags(structuredReplies: false)
        #expect(flags.contains(.readOnly))
        #expect(!flags.contains(.sendTrim) && !flags.contains(.sendWriteZeroes) && !flags.contains(.sendFastZero))
    }

    /// A flood of options ends the connection instead of looping forever.
    @Test func optionFloodCloses() {
        let (actions, _) = negotiated(Array(repeating: option(0x4242), count: 300))
        guard case .close = actions.last else { Issue.record("expected close"); return }
        #expect(actions.count == 257)
    }

    /// Bytes after GO (pipelined requests) are left for the transmission phase.
    @Test func pipelinedBytesAreLeftOver() {
        var go = option(.go, infoPayload("disk"))
        go.writeBytes([1, 2, 3])
        let (_, rest) = negotiated([go])
        #expect(Array(rest.readableBytesView) == [1, 2, 3])
    }

    /// Feeding the same session one byte at a time gives the same replies as all at once.
    @Test func byteAtATimeEqualsWhole() {
        let options = [option(0x77, [9, 9]), option(.structuredReply), option(.list), option(.go, infoPayload("disk"))]
        let (whole, _) = negotiated(options)
        var all = clientFlags()
        for var o in options { all.writeBuffer(&o) }
        var machine = HandshakeStateMachine(catalog: catalog)
        var input = ByteBuffer()
        var actions: [HandshakeAction] = []
        while let byte = all.readInteger(as: UInt8.self) {
            input.writeInteger(byte)
            actions += drive(&machine, &input).filter { $0 != .needMoreData }
        }
        #expect(actions == whole.filter { $0 != .needMoreData })
    }
}
