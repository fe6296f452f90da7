import BlockStore
import NBDProtocol
import NIOCore
import Testing

@testable import NBDServer

#if canImport(Glibc)
import Glibc
#endif

/// GO for `name`; the option reply type and message of the first non-INFO reply (ACK: nil message).
private func go(_ client: TestClient, _ name: String) throws -> (type: NBDOptionReply?, message: String) {
    try client.option(.go, be32(UInt32(name.utf8.count)) + Array(name.utf8) + [0, 0])
    while true {
        let reply = try client.readOptionReply()
        if reply.type == NBDOptionReply.info.rawValue { continue }
        return (NBDOptionReply(rawValue: reply.type), String(decoding: reply.payload, as: UTF8.self))
    }
}

private func greeted(_ socketPath: String) throws -> TestClient {
    let client = try TestClient(socketPath: socketPath)
    _ = try client.receive(18)
    try client.send(be32(3))
    return client
}

/// The handshake of a connection that arrives while a resource recovers (ResourceManager marks it
/// pending in the export table): it waits for the export, and is served, instead of being refused.
@Suite("Handshakes that wait for a recovering export", .serialized)
struct PendingExportServerTests {
    /// A client whose GO names a pending export is served as soon as the export is added, and its
    /// requests work; before, it got ERR_UNKNOWN "no export named 'vm1'" at once.
    @Test func handshakeCompletesOnceTheExportIsAdded() async throws {
        let harness = try await ServerHarness()
        let exports = harness.server.exports
        exports.expect("vm1")
        let socketPath = harness.socketPath
        let started = ContinuousClock.now
        let client = Task { try await onThread { try TestClient.connected(socketPath, export: "vm1") } }
        try await Task.sleep(for: .milliseconds(300))
        let device = try BlockDevice(path: harness.imagePath)
        #expect(exports.add(ServedExport(name: "vm1", device: device, size: 1 << 20)))
        let connected = try await client.value
        #expect(ContinuousClock.now - started >= .milliseconds(250), "the handshake did not wait")
        #expect(connected.exportSize == 1 << 20)
        let data = pattern(4096, seed: 21)
        #expect(try connected.write(data, at: 8192) == 0)
        #expect(try connected.read(4096, at: 8192) == data)
        await harness.stop()
    }

    /// When the wait passes, the client hears that the export is recovering, and the connection
    /// stays in the handshake: its next option is answered.
    @Test func theWaitTimesOutWithAMessage() async throws {
        let harness = try await ServerHarness { $0.limits.recoveryWait = .milliseconds(300) }
        harness.server.exports.expect("vm1")
        let client = try greeted(harness.socketPath)
        let reply = try go(client, "vm1")
        #expect(reply.type == .errUnknown)
        #expect(reply.message == "export 'vm1' is still recovering; try again")
        #expect(try go(client, "disk").type == .ack)
        await harness.stop()
    }

    /// A pending entry that is given up (recovery failed) answers the waiting client with the reason.
    @Test func aGivenUpExportAnswersWithTheReason() async throws {
        let harness = try await ServerHarness()
        let exports = harness.server.exports
        exports.expect("vm1")
        let socketPath = harness.socketPath
        let reply = Task { try await onThread { try go(try greeted(socketPath), "vm1") } }
        try await Task.sleep(for: .milliseconds(200))
        exports.giveUp("vm1", reason: "resource vm1 failed to recover: corrupt record")
        let answer = try await reply.value
        #expect(answer.type == .errUnknown)
        #expect(answer.message == "no export named 'vm1': resource vm1 failed to recover: corrupt record")
        await harness.stop()
    }

    /// Several clients wait for the same export, on different event loops; the handshake timeout
    /// does not cut a wait short.
    @Test func manyWaitersAndTheHandshakeTimeout() async throws {
        let harness = try await ServerHarness { $0.limits.handshakeTimeout = .milliseconds(200) }
        let exports = harness.server.exports
        exports.expect("vm1")
        let socketPath = harness.socketPath
        let clients = (0..<6).map { index in Task { try await onThread { try TestClient.connected(socketPath, export: "vm1", structured: index % 2 == 0) } } }
        try await Task.sleep(for: .milliseconds(500))
        exports.add(ServedExport(name: "vm1", device: try BlockDevice(path: harness.imagePath)))
        for client in clients {
            let connected = try await client.value
            #expect(try connected.command(.flush) == 0)
        }
        await harness.stop()
    }
}

private final class Job {
    let run: () -> Void
    init(_ run: @escaping () -> Void) { self.run = run }
}

/// Runs a blocking client on a thread of its own: blocking calls on the cooperative pool (two
/// threads on a two-core machine) would stall the test that is meant to unblock them.
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    return try await withCheckedThrowingContinuation { continuation in
        let job = Unmanaged.passRetained(Job { continuation.resume(with: Result { try body() }) })
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue().run()
            return nil
        }, job.toOpaque())
        precondition(rc == 0, "pthread_create failed")
        pthread_detach(thread)
    }
}

/// Handed from the task that connected it to the test, which uses it alone from then on.
extension TestClient: @unchecked Sendable {}
