import BlockStore
import ControlProtocol
import NBDProtocol
import Testing

@testable import Daemon

#if canImport(Glibc)
import Glibc
#endif

/// resize across two marsd in this process (peer links on loopback): the secondary cannot grow a
/// plain file itself and says so, the primary waits for it (across restarts of both); once its device has room it copies
/// the new tail (old bytes on the primary's side, zeroes on its own: only the copy makes them
/// equal), the primary raises the size, and writes beyond the old end reach the secondary.
/// In DaemonTests' serialized suite: `send` blocks a thread of the concurrency pool while the
/// in-process marsd answers on the others, so two such suites at once can starve them.
extension DaemonTests {
    static let oldSize: UInt64 = 8 << 20
    static let newSize: UInt64 = 16 << 20

    /// Polls `condition` every 100 ms for `seconds` at most.
    func eventually(_ seconds: Int, _ condition: () throws -> Bool) async throws -> Bool {
        for _ in 0..<(seconds * 10) {
            if try condition() { return true }
            try await Task.sleep(for: .milliseconds(100))
        }
        return try condition()
    }

    func vm1(_ harness: DaemonHarness) throws -> ResourceStatus? {
        try harness.send(ControlRequest(command: .view)).status?.resources.first { $0.name == "vm1" }
    }

    @Test func theTailIsCopiedBeforeTheSizeGoesUp() async throws {
        let primary = DaemonHarness()
        let secondary = DaemonHarness()
        defer {
            primary.remove()
            secondary.remove()
        }
        let port = Int.random(in: 20000..<60000)
        try await primary.start(peer: "127.0.0.1:\(port)")
        try await secondary.start(peer: "127.0.0.1:\(port + 1)")
        let token = try #require(try primary.send(ControlRequest(command: .createCluster, host: "alpha")).token)
        #expect(try secondary.send(ControlRequest(command: .joinCluster, host: "beta", token: token, peer: "127.0.0.1:\(port)")).error == nil)
        let primaryImage = primary.image("vm1.img", size: Int(Self.oldSize))
        #expect(try primary.send(ControlRequest(command: .createResource, name: "vm1", device: primaryImage)).error == nil)
        var client = try TestClient.connected(primary.nbd, export: "vm1")
        let head = pattern(65536, seed: 3)
        #expect(try client.write(head, at: 1 << 20, flags: .fua) == 0)

        let secondaryImage = secondary.image("vm1.img", size: Int(Self.oldSize))
        let joined = try await eventually(20) {
            try secondary.send(ControlRequest(command: .joinResource, name: "vm1", device: secondaryImage)).error == nil
        }
        try #require(joined, "the secondary could not join")
        #expect(try secondary.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60)).error == nil)

        // Old bytes where the primary's device grows.
        #expect(truncate(primaryImage, off_t(Self.newSize)) == 0)
        let junk = pattern(Int(Self.newSize - Self.oldSize), seed: 11)
        try POSIXFile(device: try BlockDevice(path: primaryImage)).write(junk, at: Self.oldSize)

        let asked = try primary.send(ControlRequest(command: .resize, name: "vm1", size: Self.newSize))
        #expect(asked.error == nil && asked.message?.contains("waiting for beta") == true, "\(asked)")
        // A plain file cannot be grown by marsd: the secondary says what to do, and the size stays.
        let named = try await eventually(20) { try vm1(primary)?.resize?.contains("grow it to 16777216") == true }
        #expect(named, "\((try? vm1(primary))??.resize ?? "no resize shown")")
        #expect(try vm1(primary)?.size == Self.oldSize)
        #expect(try client.write([1], at: Self.oldSize) == UInt32(NBDError.noSpace.rawValue), "nobody writes the tail before it is copied")

        // Resizing to the current size cancels it; asking again brings it back.
        let cancelled = try primary.send(ControlRequest(command: .resize, name: "vm1", size: Self.oldSize))
        #expect(cancelled.message?.contains("the pending resize to 16777216 bytes is cancelled") == true, "\(cancelled)")
        #expect(try vm1(primary)?.resize == nil)
        #expect(try primary.send(ControlRequest(command: .resize, name: "vm1", size: Self.newSize)).error == nil)

        // Both restart while it is pending, the secondary first: it goes on from what they stored.
        try await secondary.stop()
        try await primary.stop()
        try await secondary.start(peer: "127.0.0.1:\(port + 1)")
        try await primary.start(peer: "127.0.0.1:\(port)")
        client = try TestClient.connected(primary.nbd, export: "vm1")
        #expect(try vm1(primary)?.resize?.contains("to 16777216 bytes, waiting for beta") == true)

        // A host that joins now is refused (its sync would not know the tail), and nothing is left of it.
        let third = DaemonHarness()
        defer { third.remove() }
        try await third.start(peer: "127.0.0.1:\(port + 2)")
        #expect(try third.send(ControlRequest(command: .joinCluster, host: "gamma", token: token, peer: "127.0.0.1:\(port)")).error == nil)
        let thirdImage = third.image("vm1.img", size: Int(Self.oldSize))
        let refused = try await eventually(20) {
            try third.send(ControlRequest(command: .joinResource, name: "vm1", device: thirdImage)).error?.contains(
                "resource vm1 is being resized to 16777216 bytes: join it once that is done") == true
        }
        #expect(refused)
        #expect(try third.send(ControlRequest(command: .view)).status?.resources.isEmpty == true)
        try await third.stop()

        #expect(truncate(secondaryImage, off_t(Self.newSize)) == 0)
        let raised = try await eventually(30) { try vm1(primary)?.size == Self.newSize }
        #expect(raised, "\((try? vm1(primary))??.resize ?? "no resize shown")")
        #expect(try vm1(primary)?.resize == nil)
        #expect(try await eventually(10) { try vm1(secondary)?.size == Self.newSize })

        let tail = pattern(65536, seed: 4)
        #expect(try client.write(tail, at: Self.newSize - 65536, flags: .fua) == 0)
        #expect(try secondary.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60)).error == nil)
        #expect(try primary.send(ControlRequest(command: .down, name: "vm1")).error == nil)
        #expect(try secondary.send(ControlRequest(command: .down, name: "vm1")).error == nil)
        let onPrimary = try POSIXFile(device: try BlockDevice(path: primaryImage)).read(count: Int(Self.newSize), at: 0)
        let onSecondary = try POSIXFile(device: try BlockDevice(path: secondaryImage)).read(count: Int(Self.newSize), at: 0)
        // Compared as Bools: a failure message listing 16 MiB of bytes takes minutes to render.
        let written = Array(onPrimary[Int(Self.newSize) - 65536..<Int(Self.newSize)]) == tail
        let copied = Array(onSecondary[Int(Self.oldSize)..<Int(Self.newSize)]) == Array(junk[0..<Int(Self.newSize - Self.oldSize) - 65536]) + tail
        let equal = onPrimary == onSecondary
        #expect(written, "the write beyond the old end is on the primary's device")
        #expect(copied, "the secondary's tail holds the primary's old bytes (copied) and the new write (replayed)")
        #expect(equal, "the secondary's device equals the primary's")
        try await secondary.stop()
        try await primary.stop()
    }
}
