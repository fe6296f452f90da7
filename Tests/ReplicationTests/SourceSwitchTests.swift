import LogEngine
import NIOCore
import NIOPosix
import PeerProtocol
import Replication
import Synchronization
import Testing
import TestSupport
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

/// Fetching across a change of the designated primary, from members that still hold what the
/// primary dropped, and past sources of an older epoch (docs/handover.md §3, H8/H9, §4.2).
extension LinkTests {
    /// Polls `condition` every 10 ms until it holds or `seconds` pass; returns whether it held.
    static func eventually(_ seconds: Int = 20, _ condition: () -> Bool) async throws -> Bool {
        for _ in 0..<(seconds * 100) where !condition() { try await Task.sleep(for: .milliseconds(10)) }
        return condition()
    }

    /// A host of protocol version 1 (a marsd before fetch carried an epoch) is refused at its hello
    /// with the reason naming both versions and the host to upgrade; the listener serves on.
    @Test func aVersion1HostIsRefusedOnThePeerPort() async throws {
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let server = try await PeerServer.start(serving: OneResource(log: hosts.primary))
        let hello = PeerMessage.hello(PeerHello(version: 1, cluster: "c0ffee", host: "beta", hostID: "beta-id", nonce: [UInt8](repeating: 1, count: 32)))
        let answer = try Self.exchangeRaw(hello.encodedFrame(), port: server.address.port)
        var decoder = PeerFrameDecoder()
        decoder.append(answer)
        let refusal = try decoder.next()
        #expect(refusal == .refused(reason: "alpha speaks peer protocol version 2, beta version 1: all hosts of a cluster must run the same version; upgrade marsd on beta"))
        let link = try await server.connect(as: Self.credentials("beta"))
        #expect(link.remote.host == "alpha")
        link.close()
        try await server.stop()
    }

    /// Sends `bytes` to 127.0.0.1:`port` over a plain socket and returns all it gets until the
    /// other side closes (5 s at most).
    static func exchangeRaw(_ bytes: [UInt8], port: Int) throws -> [UInt8] {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ReplicationError("socket failed: errno \(errno)") }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { throw ReplicationError("connect to port \(port) failed: errno \(errno)") }
        guard write(fd, bytes, bytes.count) == bytes.count else { throw ReplicationError("write failed: errno \(errno)") }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = read(fd, &buffer, buffer.count)
            if count <= 0 { return received }
            received += buffer[..<count]
        }
    }

    /// A fetcher of `log` on `host`, starting at `start`'s segment, asking `sources()`.
    static func fetcher(
        on host: String, log: ReplicaLog, start: SegmentName, via server: PeerServer, sources: @escaping ReplicaFetcher.SourceLookup
    ) -> ReplicaFetcher {
        ReplicaFetcher(
            resource: "vm1", log: log, firstSegment: start, sources: sources, group: server.group, pool: NIOThreadPool.singleton,
            credentials: { Self.credentials(host) }, logger: server.logger
        )
    }

    /// The designation moves from alpha to beta, which has fetched alpha's history and goes on with
    /// more: gamma drops its link to alpha and continues from beta at its log's exact end, with no
    /// gap, nothing fetched twice and no sync.
    @Test func aNewDesignatedPrimaryIsFetchedFromWhereTheLogEnds() async throws {
        let seed = TestSeed.make("aNewDesignatedPrimaryIsFetchedFromWhereTheLogEnds")
        var random = SplitMix64(state: seed)
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let alpha = OneResource(log: hosts.primary)
        let alphaForBeta = try await PeerServer.start(serving: alpha)
        let alphaForGamma = try await PeerServer.start(serving: alpha)
        let start = hosts.primary.beginSyncHold(for: "beta")
        _ = hosts.primary.beginSyncHold(for: "gamma")
        let betaLog = try hosts.openReplica(on: "beta", startLSN: start.lsn, epoch: start.epoch)
        betaLog.setRetentionHolds(["gamma": start.lsn])
        let beta = OneResource(log: betaLog)
        let betaServer = try await PeerServer.start(serving: beta, as: "beta")
        let betaFetcher = Self.fetcher(on: "beta", log: betaLog, start: start.segment, via: alphaForBeta) {
            [FetchSource(host: "alpha", address: alphaForBeta.address)]
        }
        let gammaLog = try hosts.openReplica(on: "gamma", startLSN: start.lsn, epoch: start.epoch)
        let designated = Mutex([FetchSource(host: "alpha", address: alphaForGamma.address, epoch: 1)])
        let gammaFetcher = Self.fetcher(on: "gamma", log: gammaLog, start: start.segment, via: alphaForGamma) {
            designated.withLock { $0 }
        }
        betaFetcher.start()
        gammaFetcher.start()
        var expected = [UInt8](repeating: 0, count: Int(TwoHosts.size))
        let first = Self.writeRandomly(150, to: hosts.primary, using: &random, expected: &expected)
        #expect(try await Self.eventually { gammaLog.status.replayedLSN == first && betaLog.status.fetchedLSN == first }, "seed \(seed)")

        designated.withLock { $0 = [FetchSource(host: "beta", address: betaServer.address, epoch: 1)] }
        gammaFetcher.sourcesChanged()
        // At once, not after the 10 s a detour to another member may last.
        let switched = try await Self.eventually(3) { gammaFetcher.status.source == "beta" && gammaFetcher.status.link == FetchState.Link.connected }
        #expect(switched, "gamma still fetches from \(gammaFetcher.status.source ?? "nobody")")
        let end = Self.writeRandomly(150, to: hosts.primary, using: &random, expected: &expected)
        #expect(try await Self.eventually { gammaLog.status.replayedLSN == end }, "gamma at \(gammaLog.status.replayedLSN) of \(end) (seed \(seed))")
        let status = gammaFetcher.status
        #expect(!status.needsSync && !status.forked && gammaLog.status.fork == nil, "\(String(describing: status))")
        #expect(beta.fetchedBy.withLock { $0["gamma"] } == end, "gamma fetched the rest from beta")
        #expect(alpha.fetchedBy.withLock { $0["gamma"] } == first, "nothing after the switch from alpha")

        try await gammaFetcher.stop().get()
        try await betaFetcher.stop().get()
        gammaLog.shutdown()
        betaLog.shutdown()
        let device = try hosts.deviceBytes(of: "gamma")
        let firstDifference = device.indices.first { device[$0] != expected[$0] }
        #expect(firstDifference == nil, "first difference at byte \(firstDifference ?? 0) (seed \(seed))")
        for server in [betaServer, alphaForGamma, alphaForBeta] { try await server.stop() }
    }

    /// The primary answers segmentGone for segments it retired, but beta still has them (as an old
    /// primary does during a handover): gamma fetches them from beta and needs no sync. delta,
    /// whose sources both lack them, needs one, and its view names whom it asked.
    @Test func aSegmentThePrimaryDroppedComesFromAnotherMember() async throws {
        let seed = TestSeed.make("aSegmentThePrimaryDroppedComesFromAnotherMember")
        var random = SplitMix64(state: seed)
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let alpha = OneResource(log: hosts.primary)
        let alphaServer = try await PeerServer.start(serving: alpha)
        let start = hosts.primary.beginSyncHold(for: "beta")
        let betaLog = try hosts.openReplica(on: "beta", startLSN: start.lsn, epoch: start.epoch)
        betaLog.setRetentionHolds(["gamma": start.lsn])
        let betaFetcher = Self.fetcher(on: "beta", log: betaLog, start: start.segment, via: alphaServer) {
            [FetchSource(host: "alpha", address: alphaServer.address)]
        }
        betaFetcher.start()
        var expected = [UInt8](repeating: 0, count: Int(TwoHosts.size))
        let end = Self.writeRandomly(400, to: hosts.primary, using: &random, expected: &expected)
        let retired = try await Self.eventually {
            betaLog.status.fetchedLSN == end && hosts.primary.shippingSnapshot().segments[0].name.sequence > start.segment.sequence
        }
        #expect(retired, "alpha kept \(start.segment) (seed \(seed))")
        let betaServer = try await PeerServer.start(serving: OneResource(log: betaLog), as: "beta")

        let gammaLog = try hosts.openReplica(on: "gamma", startLSN: start.lsn, epoch: start.epoch)
        let gammaFetcher = Self.fetcher(on: "gamma", log: gammaLog, start: start.segment, via: alphaServer) {
            [FetchSource(host: "alpha", address: alphaServer.address), FetchSource(host: "beta", address: betaServer.address)]
        }
        gammaFetcher.start()
        #expect(try await Self.eventually { gammaLog.status.replayedLSN == end }, "gamma at \(gammaLog.status.replayedLSN) of \(end): \(String(describing: gammaFetcher.status))")
        #expect(!gammaFetcher.status.needsSync)

        let alphaAgain = try await PeerServer.start(serving: alpha, as: "epsilon")
        let deltaLog = try hosts.openReplica(on: "delta", startLSN: start.lsn, epoch: start.epoch)
        let deltaFetcher = Self.fetcher(on: "delta", log: deltaLog, start: start.segment, via: alphaServer) {
            [FetchSource(host: "alpha", address: alphaServer.address), FetchSource(host: "epsilon", address: alphaAgain.address)]
        }
        deltaFetcher.start()
        #expect(try await Self.eventually { deltaFetcher.status.needsSync }, "\(String(describing: deltaFetcher.status))")
        let problem = deltaFetcher.status.problem ?? ""
        #expect(problem.contains("asked alpha, epsilon") && problem.contains("no longer in this host's log"), "\(problem)")

        for fetcher in [deltaFetcher, gammaFetcher, betaFetcher] { try await fetcher.stop().get() }
        for log in [deltaLog, gammaLog, betaLog] { log.shutdown() }
        let device = try hosts.deviceBytes(of: "gamma")
        let firstDifference = device.indices.first { device[$0] != expected[$0] }
        #expect(firstDifference == nil, "first difference at byte \(firstDifference ?? 0) (seed \(seed))")
        for server in [alphaAgain, betaServer, alphaServer] { try await server.stop() }
    }

    /// alpha's history is at epoch 1, beta's (a newer primary's) at 2. A fetch at epoch 2 is
    /// answered staleSource by alpha, whose hook hears of it (a deposed primary fences itself on
    /// it); a fetcher that still lists alpha first leaves it for beta and does not ask it again.
    @Test func aSourceAtAnOlderEpochIsLeftForTheNext() async throws {
        let seed = TestSeed.make("aSourceAtAnOlderEpochIsLeftForTheNext")
        var random = SplitMix64(state: seed)
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let beta = try hosts.openPrimary(host: "beta", epoch: 2)
        let alpha = OneResource(log: hosts.primary)
        let alphaServer = try await PeerServer.start(serving: alpha)
        let betaServer = try await PeerServer.start(serving: OneResource(log: beta), as: "beta")

        let link = try await alphaServer.connect(as: Self.credentials("gamma"))
        let refusal = Mutex<FetchError?>(nil)
        try await link.eventLoop.submit {
            link.onMessage = { message in
                if case .fetchError(let error) = message { refusal.withLock { $0 = error } }
            }
        }.get()
        let alphaSegment = hosts.primary.shippingSnapshot().segments[0].name.fileName
        link.send(.fetch(FetchRequest(resource: "vm1", segment: alphaSegment, offset: 64, window: 40 << 20, epoch: 2)))
        #expect(try await Self.eventually(5) { refusal.withLock { $0 } != nil })
        let error = try #require(refusal.withLock { $0 })
        #expect(error.errorCode == .staleSource && error.reason.contains("at epoch 1") && error.reason.contains("gamma's at epoch 2"), "\(error)")
        #expect(alpha.staleSeen.withLock { $0 } == ["vm1 2 gamma"])
        link.close()

        let start = beta.beginSyncHold(for: "gamma")
        let gammaLog = try hosts.openReplica(on: "gamma", startLSN: start.lsn, epoch: start.epoch)
        let gammaFetcher = Self.fetcher(on: "gamma", log: gammaLog, start: start.segment, via: alphaServer) {
            [FetchSource(host: "alpha", address: alphaServer.address), FetchSource(host: "beta", address: betaServer.address)]
        }
        gammaFetcher.start()
        var expected = [UInt8](repeating: 0, count: Int(TwoHosts.size))
        let end = Self.writeRandomly(100, to: beta, using: &random, expected: &expected)
        #expect(try await Self.eventually { gammaLog.status.replayedLSN == end }, "gamma at \(gammaLog.status.replayedLSN) of \(end): \(String(describing: gammaFetcher.status))")
        #expect(gammaFetcher.status.source == "beta" && !gammaFetcher.status.forked && !gammaFetcher.status.needsSync, "\(String(describing: gammaFetcher.status))")
        #expect(alpha.staleSeen.withLock { $0 } == ["vm1 2 gamma", "vm1 2 gamma"], "alpha was asked once by the fetcher")

        try await gammaFetcher.stop().get()
        gammaLog.shutdown()
        let device = try hosts.deviceBytes(of: "gamma")
        let firstDifference = device.indices.first { device[$0] != expected[$0] }
        #expect(firstDifference == nil, "first difference at byte \(firstDifference ?? 0) (seed \(seed))")
        for server in [betaServer, alphaServer] { try await server.stop() }
    }
}
