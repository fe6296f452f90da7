import NIOCore
import Testing

@testable import NBDProtocol

/// A handshake naming an export that is still coming (a resource recovering after a restart) waits
/// for it instead of being told that it does not exist.
@Suite("Handshake with pending exports")
struct PendingExportTests {
    let pendingCatalog = ExportCatalog([disk], pending: ["vm1"])
    let vm1 = ExportDescriptor(name: "vm1", description: "resource", size: 8192, readOnly: false)

    private func start(_ options: [ByteBuffer]) -> (HandshakeStateMachine, [HandshakeAction], ByteBuffer) {
        var machine = HandshakeStateMachine(catalog: pendingCatalog)
        var input = clientFlags()
        for var o in options { input.writeBuffer(&o) }
        let actions = drive(&machine, &input)
        return (machine, actions, input)
    }

    /// GO, INFO, EXPORT_NAME and both meta-context options wait on a pending name; nothing is
    /// answered and nothing after the option is consumed until the export is decided.
    @Test(arguments: [NBDOption.go, .info, .exportName, .setMetaContext, .listMetaContext])
    func optionsNamingAPendingExportWait(option code: NBDOption) {
        let payload: [UInt8] =
            switch code {
            case .exportName: Array("vm1".utf8)
            case .setMetaContext, .listMetaContext: metaPayload("vm1", queries: [allocationContextName])
            default: infoPayload("vm1")
            }
        let structured = option(.structuredReply)
        let (_, actions, rest) = start([structured, option(code, payload), option(.list)])
        #expect(actions.last == .awaitExport(name: "vm1"))
        #expect(rest.readableBytes == 16, "the LIST behind the waiting option stays unread")
    }

    /// Once the export is served, the waiting GO completes as if it had been there all along.
    @Test func goCompletesWhenTheExportArrives() {
        var (machine, actions, _) = start([option(.go, infoPayload("vm1"))])
        #expect(actions.last == .awaitExport(name: "vm1"))
        let action = machine.resume(catalog: ExportCatalog([disk, vm1]))
        guard case .startTransmission(let bytes, let session) = action else { Issue.record("expected transmission, got \(action)"); return }
        #expect(session.export == vm1)
        #expect(parseReplies(bytes).last?.typeName == .ack)
    }

    /// A pending entry given up (recovery failed) answers with the reason, not a bare "no export".
    @Test func aGivenUpExportIsRefusedWithTheReason() {
        var (machine, _, _) = start([option(.go, infoPayload("vm1"))])
        let action = machine.resume(catalog: ExportCatalog([disk], unavailable: ["vm1": "resource vm1 failed to recover: boom"]))
        guard case .send(let bytes) = action else { Issue.record("expected an error reply, got \(action)"); return }
        let reply = parseReplies(bytes)
        #expect(reply.map(\.typeName) == [.errUnknown])
        #expect(String(decoding: reply[0].payload, as: UTF8.self) == "no export named 'vm1': resource vm1 failed to recover: boom")
    }

    /// When the wait ends without a decision the client hears that the export is recovering, and
    /// the handshake goes on (the next option is answered).
    @Test func theWaitEndsWithAClearError() {
        var (machine, _, rest) = start([option(.go, infoPayload("vm1")), option(.go, infoPayload("disk"))])
        guard case .send(let bytes) = machine.stopWaiting() else { Issue.record("expected an error reply"); return }
        let reply = parseReplies(bytes)
        #expect(reply.map(\.typeName) == [.errUnknown])
        #expect(String(decoding: reply[0].payload, as: UTF8.self) == "export 'vm1' is still recovering; try again")
        guard case .startTransmission(_, let session) = machine.receive(&rest) else { Issue.record("the next option was not answered"); return }
        #expect(session.export == disk)
    }

    /// EXPORT_NAME cannot carry an error: a wait that ends without the export closes.
    @Test func exportNameClosesWhenTheWaitEnds() {
        var (machine, _, _) = start([option(.exportName, Array("vm1".utf8))])
        guard case .close(let reason) = machine.stopWaiting() else { Issue.record("expected close"); return }
        #expect(reason.contains("still recovering"))
    }

    /// Names that are served or unknown are answered at once; the empty name means the only
    /// resource even while it is pending.
    @Test func onlyPendingNamesWait() {
        let (_, actions, _) = start([option(.go, infoPayload("disk"))])
        guard case .startTransmission = actions.last else { Issue.record("a served export waited"); return }
        let (_, unknown, _) = start([option(.go, infoPayload("nope"))])
        #expect(sent(unknown).map(\.typeName) == [.errUnknown])
        #expect(ExportCatalog([], pending: ["vm1"]).pendingName("") == "vm1")
        #expect(ExportCatalog([disk], pending: ["vm1"]).lookup("") == nil, "two exports once vm1 is up: no default")
    }

    /// A down or failed resource keeps today's answer, with the reason in the message.
    @Test func downResourceNamesTheReason() {
        var machine = HandshakeStateMachine(catalog: ExportCatalog([disk], unavailable: ["vm1": "resource vm1 is down"]))
        var input = clientFlags()
        var go = option(.go, infoPayload("vm1"))
        input.writeBuffer(&go)
        let replies = sent(drive(&machine, &input))
        #expect(replies.map(\.typeName) == [.errUnknown])
        #expect(String(decoding: replies[0].payload, as: UTF8.self).hasSuffix("resource vm1 is down"))
    }

    private func sent(_ actions: [HandshakeAction]) -> [OptionReply] {
        actions.flatMap { action -> [OptionReply] in
            if case .send(let bytes) = action { return parseReplies(bytes) }
            return []
        }
    }
}
