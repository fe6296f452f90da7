import BlockStore
import ControlProtocol
import NBDProtocol
import Testing

@testable import Daemon

#if canImport(Glibc)
import Glibc
#endif

/// Planned handover (`marsadm primary`) across three marsd in this process (peer links on
/// loopback): refused while the old primary's export has a client, then the old primary seals,
/// the new one replays to the seal and continues the history at the next epoch, the old primary
/// and the third host follow it; and back. In DaemonTests' serialized suite (see ResizeTests).
extension DaemonTests {
    func resource(_ harness: DaemonHarness, _ name: String = "vm1") throws -> ResourceStatus? {
        try harness.send(ControlRequest(command: .view)).status?.resources.first { $0.name == name }
    }

    /// Hangs up `client` and waits until `harness` counts no connection to vm1's export.
    func hangUp(_ client: TestClient, on harness: DaemonHarness) async throws {
        shutdown(client.fd, Int32(SHUT_RDWR))
        let gone = try await eventually(10) {
            try harness.send(ControlRequest(command: .view)).status?.exports.first { $0.name == "vm1" }?.activeConnections ?? 0 == 0
        }
        try #require(gone, "the server still counts the connection")
    }

    /// Starts alpha and beta on two consecutive peer ports, makes them a cluster, creates vm1 on
    /// alpha on an image of `size` bytes and joins beta, UpToDate. Returns the images and alpha's port.
    func startPair(_ hosts: [DaemonHarness], size: Int) async throws -> (images: [String], port: Int) {
        let (alpha, beta) = (hosts[0], hosts[1])
        let port = Int.random(in: 20000..<60000)
        for (index, host) in hosts.enumerated() { try await host.start(peer: "127.0.0.1:\(port + index)") }
        let token = try #require(try alpha.send(ControlRequest(command: .createCluster, host: "alpha")).token)
        #expect(try beta.send(ControlRequest(command: .joinCluster, host: "beta", token: token, peer: "127.0.0.1:\(port)")).error == nil)
        let images = hosts.map { $0.image("vm1.img", size: size) }
        #expect(try alpha.send(ControlRequest(command: .createResource, name: "vm1", device: images[0])).error == nil)
        let joined = try await eventually(20) { try beta.send(ControlRequest(command: .joinResource, name: "vm1", device: images[1])).error == nil }
        try #require(joined, "beta could not join")
        #expect(try beta.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60)).error == nil)
        return (images, port)
    }

    @Test func plannedHandoverKeepsEveryAcknowledgedWrite() async throws {
        let hosts = [DaemonHarness(), DaemonHarness(), DaemonHarness()]
        let (alpha, beta, gamma) = (hosts[0], hosts[1], hosts[2])
        defer { for host in hosts { host.remove() } }
        let port = Int.random(in: 20000..<60000)
        for (index, host) in hosts.enumerated() { try await host.start(peer: "127.0.0.1:\(port + index)") }
        let token = try #require(try alpha.send(ControlRequest(command: .createCluster, host: "alpha")).token)
        for (host, name) in [(beta, "beta"), (gamma, "gamma")] {
            #expect(try host.send(ControlRequest(command: .joinCluster, host: name, token: token, peer: "127.0.0.1:\(port)")).error == nil)
        }
        let size = 8 << 20
        let images = hosts.map { $0.image("vm1.img", size: size) }
        #expect(try alpha.send(ControlRequest(command: .createResource, name: "vm1", device: images[0])).error == nil)
        var client = try TestClient.connected(alpha.nbd, export: "vm1")
        let first = pattern(65536, seed: 21)
        #expect(try client.write(first, at: 1 << 20) == 0)
        for (host, image) in [(beta, images[1]), (gamma, images[2])] {
            let joined = try await eventually(20) { try host.send(ControlRequest(command: .joinResource, name: "vm1", device: image)).error == nil }
            try #require(joined, "a secondary could not join")
            #expect(try host.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60)).error == nil)
        }
        // Acknowledged without FUA or FLUSH: the seal must carry it over all the same.
        let second = pattern(65536, seed: 22)
        #expect(try client.write(second, at: 3 << 20) == 0)

        // The primary's export has a client: refused, and nothing changes.
        let refused = try beta.send(ControlRequest(command: .primary, name: "vm1", timeout: 30))
        #expect(refused.error?.contains("alpha refused the handover of vm1") == true, "\(refused)")
        #expect(refused.error?.contains("1 NBD connection") == true, "\(refused)")
        #expect(try resource(alpha)?.role == "primary")
        #expect(try resource(beta)?.role == "secondary")
        #expect(try client.write(second, at: 4 << 20) == 0, "the old primary still serves after a refusal")

        // On the primary itself: nothing to do.
        let already = try alpha.send(ControlRequest(command: .primary, name: "vm1", timeout: 30))
        #expect(already.message?.contains("already primary") == true, "\(already)")

        try await hangUp(client, on: alpha)
        let handedOver = try beta.send(ControlRequest(command: .primary, name: "vm1", timeout: 60))
        #expect(handedOver.message?.contains("vm1 is primary on this host at epoch 2") == true, "\(handedOver)")
        #expect(try resource(beta)?.role == "primary")
        #expect(try resource(beta)?.log?.epoch == 2)

        // The new primary serves what the old one acknowledged, and takes writes.
        client = try TestClient.connected(beta.nbd, export: "vm1")
        #expect(try client.read(65536, at: 1 << 20) == first)
        #expect(try client.read(65536, at: 3 << 20) == second)
        let third = pattern(65536, seed: 23)
        #expect(try client.write(third, at: 5 << 20, flags: .fua) == 0)

        // The old primary is a secondary of the new one, and says who serves the resource now.
        #expect(try alpha.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60, until: .secondary)).error == nil)
        #expect(try resource(alpha)?.role == "secondary")
        #expect(throws: (any Error).self, "the old primary serves no more") { try TestClient.connected(alpha.nbd, export: "vm1") }
        for host in [alpha, gamma] {
            let upToDate = try host.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60))
            #expect(upToDate.error == nil, "\(upToDate)")
        }

        // And back: alpha continues the history at epoch 3.
        try await hangUp(client, on: beta)
        let back = try alpha.send(ControlRequest(command: .primary, name: "vm1", timeout: 60))
        #expect(back.message?.contains("vm1 is primary on this host at epoch 3") == true, "\(back)")
        client = try TestClient.connected(alpha.nbd, export: "vm1")
        #expect(try client.read(65536, at: 5 << 20) == third)
        let fourth = pattern(65536, seed: 24)
        #expect(try client.write(fourth, at: 6 << 20, flags: .fua) == 0)
        try await hangUp(client, on: alpha)
        for host in [beta, gamma] {
            let upToDate = try host.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60))
            #expect(upToDate.error == nil, "\(upToDate)")
        }
        for host in hosts { #expect(try host.send(ControlRequest(command: .down, name: "vm1")).error == nil) }
        let devices = try images.map { try POSIXFile(device: try BlockDevice(path: $0)).read(count: size, at: 0) }
        // Compared as Bools: a failure message listing 8 MiB of bytes takes minutes to render.
        let (written, betaEqual, gammaEqual) = (Array(devices[0][(6 << 20)..<(6 << 20) + 65536]) == fourth, devices[1] == devices[0], devices[2] == devices[0])
        #expect(written)
        #expect(betaEqual, "beta's device equals alpha's")
        #expect(gammaEqual, "gamma's device equals alpha's")
        for host in hosts { try await host.stop() }
    }

    /// A request to a primary that cannot answer (its resource is down) times out saying what it
    /// waits for, stays (view shows it), and is withdrawn with `marsadm secondary`; the old
    /// primary, up again, keeps its role.
    @Test func aWaitingRequestTimesOutStaysAndIsWithdrawn() async throws {
        let hosts = [DaemonHarness(), DaemonHarness()]
        let (alpha, beta) = (hosts[0], hosts[1])
        defer { for host in hosts { host.remove() } }
        _ = try await startPair(hosts, size: 4 << 20)
        #expect(try alpha.send(ControlRequest(command: .down, name: "vm1")).error == nil)

        let timedOut = try beta.send(ControlRequest(command: .primary, name: "vm1", timeout: 1))
        #expect(timedOut.error?.contains("alpha (primary of vm1, epoch 1) has not sealed vm1 yet") == true, "\(timedOut)")
        #expect(timedOut.error?.contains("The request stays") == true, "\(timedOut)")
        #expect(try resource(beta)?.transition?.contains("becoming primary (epoch 2): waiting for alpha to seal its log") == true)
        let leave = try beta.send(ControlRequest(command: .leaveResource, name: "vm1"))
        #expect(leave.error?.contains("vm1 is in a handover on this host") == true, "\(leave)")
        #expect(leave.error?.contains("or withdraw the request with 'marsadm secondary vm1', then leave it") == true, "\(leave)")
        #expect(try beta.send(ControlRequest(command: .invalidate, name: "vm1")).error?.contains("then sync it again") == true)
        let withdrawn = try beta.send(ControlRequest(command: .secondary, name: "vm1"))
        #expect(withdrawn.message?.contains("withdrew this host's request to become primary of vm1") == true, "\(withdrawn)")
        #expect(try resource(beta)?.transition == nil)

        #expect(try alpha.send(ControlRequest(command: .up, name: "vm1")).error == nil)
        try await Task.sleep(for: .seconds(1))
        #expect(try resource(alpha)?.role == "primary")
        #expect(try resource(alpha)?.log?.epoch == 1, "no handover happened")
        let client = try TestClient.connected(alpha.nbd, export: "vm1")
        #expect(try client.write(pattern(4096, seed: 5), at: 0, flags: .fua) == 0)
        for host in hosts { try await host.stop() }
    }

    /// The request outlives a restart of the host that made it, and the old primary seals while
    /// that host is down: when it is back, it replays to the seal and takes over (docs/handover.md
    /// §3.1, "A and B both down for long").
    @Test func aRequestSurvivesARestartAndCompletesWhenTheOldPrimarySeals() async throws {
        let hosts = [DaemonHarness(), DaemonHarness()]
        let (alpha, beta) = (hosts[0], hosts[1])
        defer { for host in hosts { host.remove() } }
        let size = 4 << 20
        let (images, port) = try await startPair(hosts, size: size)
        let written = pattern(65536, seed: 31)
        var client = try TestClient.connected(alpha.nbd, export: "vm1")
        #expect(try client.write(written, at: 1 << 20) == 0)
        try await hangUp(client, on: alpha)
        #expect(try alpha.send(ControlRequest(command: .down, name: "vm1")).error == nil)

        let waiting = try beta.send(ControlRequest(command: .primary, name: "vm1", timeout: 1))
        #expect(waiting.error?.contains("The request stays") == true, "\(waiting)")
        try await beta.stop()
        // The old primary comes back, finds the request and seals for beta, which is down.
        #expect(try alpha.send(ControlRequest(command: .up, name: "vm1")).error == nil)
        let sealed = try await eventually(20) { try resource(alpha)?.transition?.contains("handed over to beta") == true }
        #expect(sealed, "\((try? resource(alpha))??.transition ?? "no transition")")
        #expect(throws: (any Error).self, "a sealed primary serves no more") { try TestClient.connected(alpha.nbd, export: "vm1") }

        try await beta.start(peer: "127.0.0.1:\(port + 1)")
        let promoted = try beta.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60, until: .primary))
        #expect(promoted.error == nil, "\(promoted)")
        #expect(try resource(beta)?.log?.epoch == 2)
        #expect(try alpha.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60, until: .secondary)).error == nil)
        client = try TestClient.connected(beta.nbd, export: "vm1")
        #expect(try client.read(65536, at: 1 << 20) == written)
        let after = pattern(65536, seed: 32)
        #expect(try client.write(after, at: 2 << 20, flags: .fua) == 0)
        try await hangUp(client, on: beta)
        #expect(try alpha.send(ControlRequest(command: .waitResource, name: "vm1", timeout: 60)).error == nil)
        for host in hosts { #expect(try host.send(ControlRequest(command: .down, name: "vm1")).error == nil) }
        let devices = try images.map { try POSIXFile(device: try BlockDevice(path: $0)).read(count: size, at: 0) }
        let equal = devices[0] == devices[1]
        #expect(equal, "alpha's device equals beta's")
        for host in hosts { try await host.stop() }
    }
}

