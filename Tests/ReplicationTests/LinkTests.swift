import BlockStore
import Logging
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

/// A temporary directory with a primary's log and device, and replicas'.
final class TwoHosts: @unchecked Sendable {
    let path: String
    let primary: LogEngine
    let primaryDevice: BlockDevice
    /// Further primaries' logs (of another history), shut down with the first.
    private let others = Mutex<[LogEngine]>([])
    static let size: UInt64 = 4 << 20

    init(segmentSize: UInt64 = 256 << 10) throws {
        var template = Array("/tmp/mars-link-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw ReplicationError("mkdtemp failed") }
        path = String(cString: made)
        (primary, primaryDevice) = try Self.makePrimary(in: path, host: "alpha", epoch: 1, segmentSize: segmentSize)
        try POSIXDirectory(path: path).open("replica.img", create: true).truncate(to: Self.size)
    }

    private static func makePrimary(in path: String, host: String, epoch: UInt64, segmentSize: UInt64) throws -> (LogEngine, BlockDevice) {
        let directory = try POSIXDirectory(path: path + "/\(host)-log", create: true)
        try POSIXDirectory(path: path).open("\(host).img", create: true).truncate(to: Self.size)
        var configuration = LogEngineConfiguration(host: host)
        configuration.segmentSize = segmentSize
        configuration.spaceLimit = 128 << 20
        try LogEngine.create(in: directory, configuration: configuration, epoch: epoch)
        let device = try BlockDevice(path: path + "/\(host).img")
        let log = try LogEngine.open(
            directory: directory, device: POSIXFile(device: device), deviceSize: Self.size, configuration: configuration
        )
        return (log, device)
    }

    /// Another primary's log, with a history of its own from `epoch` on (a newer primary's).
    func openPrimary(host: String, epoch: UInt64) throws -> LogEngine {
        let (log, _) = try Self.makePrimary(in: path, host: host, epoch: epoch, segmentSize: 256 << 10)
        others.withLock { $0.append(log) }
        return log
    }

    /// A replica on `host`, its log and device in files of that name.
    func openReplica(on host: String = "replica", startLSN: UInt64, epoch: UInt64) throws -> ReplicaLog {
        let directory = try POSIXDirectory(path: path + "/\(host)-log", create: true)
        try POSIXDirectory(path: path).open("\(host).img", create: true).truncate(to: Self.size)
        try ReplicaLog.create(in: directory, startLSN: startLSN, epoch: epoch)
        let device = try BlockDevice(path: path + "/\(host).img")
        return try ReplicaLog.open(directory: directory, device: POSIXFile(device: device), deviceSize: Self.size, replayPaused: false)
    }

    /// The device of `host`'s replica (or primary).
    func deviceBytes(of host: String = "replica") throws -> [UInt8] {
        try POSIXDirectory(path: path).open("\(host).img", create: false).read(count: Int(Self.size), at: 0)
    }

    func cleanUp() {
        primary.shutdown()
        for log in others.withLock({ $0 }) { log.shutdown() }
        _ = system("rm -rf '\(path)'")
    }
}

/// Serves one resource from a log, as the daemon does: a primary's, or a secondary's (which
/// serves fetches only).
final class OneResource: PeerRequestHandler {
    let source: any ShippingSource
    let fetchedBy = Mutex<[String: UInt64]>([:])
    /// Every `staleSourceSeen`: (resource, epoch, asker).
    let staleSeen = Mutex<[String]>([])

    init(log: any ShippingSource, device: BlockDevice? = nil) {
        self.source = log
        self.device = device
    }

    func primaryLog(of resource: String) -> LogEngine? { resource == "vm1" ? source as? LogEngine : nil }
    func fetchSource(of resource: String) -> (any ShippingSource)? { resource == "vm1" ? source : nil }
    func size(of resource: String) -> UInt64? { resource == "vm1" ? TwoHosts.size : nil }
    func dataDevice(of resource: String) -> BlockDevice? { device }
    let device: BlockDevice?
    func gossip(_ entries: [UInt8], from peer: PeerIdentity) -> [UInt8] { entries }
    func fetched(_ resource: String, by peer: PeerIdentity, upTo lsn: UInt64) {
        fetchedBy.withLock { $0[peer.host] = lsn }
        (source as? LogEngine)?.setRetention(lsn, for: peer.host)
    }
    func syncStarting(_ resource: String, by peer: PeerIdentity) {}
    func staleSourceSeen(_ resource: String, epoch: UInt64, by peer: PeerIdentity) {
        staleSeen.withLock { $0.append("\(resource) \(epoch) \(peer.host)") }
    }
}

final class Acks: LogCompletionTarget {
    let done = Mutex(0)
    func logCompleted(_ completions: [LogCompletion]) { done.withLock { $0 += completions.count } }
}

@Suite(.serialized) struct LinkTests {
    static let secret = [UInt8](repeating: 7, count: 32)
    static func credentials(_ host: String, secret: [UInt8] = LinkTests.secret) -> PeerCredentials {
        PeerCredentials(cluster: "c0ffee", secret: secret, local: PeerIdentity(host: host, hostID: host + "-id"))
    }

    /// Writes on the primary reach the replica's device through a real peer link: the stream
    /// follows the tail across segment rotations, acknowledgements hold the primary's log, and the
    /// replica's device ends equal to the primary's.
    @Test func writesReachTheReplicaAcrossSegments() async throws {
        let seed = TestSeed.make("writesReachTheReplicaAcrossSegments")
        var random = SplitMix64(state: seed)
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let handler = OneResource(log: hosts.primary)
        let server = try await PeerServer.start(serving: handler)
        let start = hosts.primary.beginSyncHold(for: "beta")
        let replica = try hosts.openReplica(startLSN: start.lsn, epoch: start.epoch)
        let fetcher = ReplicaFetcher(
            resource: "vm1", log: replica, firstSegment: start.segment,
            sources: { [FetchSource(host: "alpha", address: server.address)] }, group: server.group, pool: NIOThreadPool.singleton,
            credentials: { Self.credentials("beta") }, logger: server.logger
        )
        fetcher.start()
        var expected = [UInt8](repeating: 0, count: Int(TwoHosts.size))
        let durable = Self.writeRandomly(300, to: hosts.primary, using: &random, expected: &expected)
        for _ in 0..<2000 where replica.status.replayedLSN < durable { try await Task.sleep(for: .milliseconds(10)) }
        #expect(replica.status.replayedLSN == durable, "seed \(seed)")
        #expect(hosts.primary.shippingSnapshot().segments.last!.name.sequence > 2, "the writes crossed segments")
        try await fetcher.stop().get()
        replica.shutdown()
        let device = try hosts.deviceBytes()
        let firstDifference = device.indices.first { device[$0] != expected[$0] }
        #expect(firstDifference == nil, "first difference at byte \(firstDifference ?? 0) (seed \(seed))")
        #expect(handler.fetchedBy.withLock { $0["beta"] } == durable)
        try await server.stop()
    }

    /// A replica acknowledges whole records only, so the primary serves at least the largest
    /// record and a chunk beyond the acknowledged position, whatever window the replica asks for
    /// (a smaller window never opens again after a record larger than it).
    @Test func theWindowHoldsTheLargestRecord() async throws {
        let sent = try await bytesSentUnacknowledged(megabytes: 40, segmentSize: 30 << 20, window: 1 << 20)
        let largest = UInt64(LogRecordLayout.recordSize(payload: LogRecordLayout.maxPayload))
        #expect(sent > largest, "\(sent) bytes sent before the first acknowledgement")
    }

    /// Bytes of a segment the stream has moved past count towards the window until acknowledged:
    /// segments smaller than the window do not each open a window of their own.
    @Test func theWindowSpansSegmentEnds() async throws {
        let sent = try await bytesSentUnacknowledged(megabytes: 60, segmentSize: 4 << 20, window: 40 << 20)
        #expect(sent > 36 << 20 && sent <= 40 << 20, "\(sent) bytes sent across segments of 4 MiB before the first acknowledgement")
    }

    /// A peer that asks the primary for a segment another host wrote at that place of the history
    /// has forked from it: the primary says so at once (it used to wait for that segment forever).
    @Test func aSegmentOfAnotherHistoryIsAFork() async throws {
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let server = try await PeerServer.start(serving: OneResource(log: hosts.primary))
        let link = try await server.connect(as: Self.credentials("beta"))
        let refusal = Mutex<FetchError?>(nil)
        try await link.eventLoop.submit {
            link.onMessage = { message in
                if case .fetchError(let error) = message { refusal.withLock { $0 = error } }
            }
        }.get()
        let ours = hosts.primary.shippingSnapshot().segments[0].name
        let theirs = try #require(SegmentName(sequence: ours.sequence, host: "gamma"))
        link.send(.fetch(FetchRequest(resource: "vm1", segment: theirs.fileName, offset: 64, window: 40 << 20, epoch: 1)))
        for _ in 0..<100 where refusal.withLock({ $0 }) == nil { try await Task.sleep(for: .milliseconds(50)) }
        let error = try #require(refusal.withLock { $0 }, "no answer to a fetch of \(theirs)")
        #expect(error.errorCode == .forked && error.reason.contains(ours.fileName), "\(error)")
        link.close()
        try await server.stop()
    }

    /// Submits `count` random writes of 0.5-8 KiB and a flush to `log`, and records them in
    /// `expected` (the device they make); returns the log's end after them.
    static func writeRandomly(_ count: Int, to log: LogEngine, using random: inout SplitMix64, expected: inout [UInt8]) -> UInt64 {
        let acks = Acks()
        for token in 0..<count {
            let length = Int(random.next() % 16 + 1) * 512
            let offset = Int(random.next() % (TwoHosts.size - UInt64(length)) / 512) * 512
            let byte = UInt8(truncatingIfNeeded: random.next() | 1)
            let payload = [UInt8](repeating: byte, count: length)
            expected.replaceSubrange(offset..<(offset + length), with: payload)
            _ = log.submit(offset: UInt64(offset), change: .write(payload), fua: false, target: acks, token: token)
        }
        _ = log.flush(target: acks, token: count)
        return log.status.appendedLSN
    }

    /// What a fetch that is never acknowledged receives of a log of `megabytes` 1 MiB writes, once
    /// the stream has stopped at its window.
    private func bytesSentUnacknowledged(megabytes: Int, segmentSize: UInt64, window: UInt64) async throws -> UInt64 {
        let hosts = try TwoHosts(segmentSize: segmentSize)
        defer { hosts.cleanUp() }
        // As the daemon does for a member: without it writeback retires (and recycles) the segment
        // being read.
        hosts.primary.setRetention(0, for: "beta")
        let acks = Acks()
        for token in 0..<megabytes {
            _ = hosts.primary.submit(offset: 0, change: .write([UInt8](repeating: UInt8(token), count: 1 << 20)), fua: false, target: acks, token: token)
        }
        _ = hosts.primary.flush(target: acks, token: 1000)
        let appended = hosts.primary.status.appendedLSN
        for _ in 0..<1000 where hosts.primary.status.durableLSN < appended { try await Task.sleep(for: .milliseconds(10)) }
        let server = try await PeerServer.start(serving: OneResource(log: hosts.primary))
        let link = try await server.connect(as: Self.credentials("beta"))
        let received = Mutex<UInt64>(0)
        try await link.eventLoop.submit {
            link.onMessage = { message in
                if case .segmentData(let data) = message { received.withLock { $0 += UInt64(data.bytes.readableBytes) } }
            }
        }.get()
        let first = hosts.primary.shippingSnapshot().segments[0].name.fileName
        link.send(.fetch(FetchRequest(resource: "vm1", segment: first, offset: 0, window: window, epoch: 1)))
        var last: UInt64 = 0
        var quiet = 0
        for _ in 0..<200 where quiet < 10 {
            try await Task.sleep(for: .milliseconds(100))
            let now = received.withLock { $0 }
            quiet = now == last ? quiet + 1 : 0
            last = now
        }
        link.close()
        try await server.stop()
        return received.withLock { $0 }
    }

    /// The initial sync copies exactly what differs: random data, zero chunks, holes on either side,
    /// chunks already equal; afterwards the replica's device equals the primary's.
    @Test func syncCopiesWhatDiffers() async throws {
        let seed = TestSeed.make("syncCopiesWhatDiffers")
        var random = SplitMix64(state: seed)
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let root = try POSIXDirectory(path: hosts.path)
        let primaryFile = try root.open("alpha.img", create: false)
        let replicaFile = try root.open("replica.img", create: false)
        let chunk = SyncChunk.size
        var same = 0
        for index in 0..<Int(TwoHosts.size) / chunk {
            let offset = UInt64(index * chunk)
            let bytes = (0..<chunk).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            switch random.next() % 6 {
            case 0: try primaryFile.write(bytes, at: offset)  // data the replica lacks
            case 1: try replicaFile.write(bytes, at: offset)  // data the primary does not have (a hole there)
            case 2:  // equal on both sides
                try primaryFile.write(bytes, at: offset)
                try replicaFile.write(bytes, at: offset)
                same += 1
            case 3:  // written zeroes on the primary, data on the replica
                try primaryFile.write([UInt8](repeating: 0, count: chunk), at: offset)
                try replicaFile.write(bytes, at: offset)
            case 4: try primaryFile.write(bytes, at: offset + UInt64(chunk / 2) - 4096)  // straddles chunks
            default: break  // holes on both sides
            }
        }
        try primaryFile.sync()
        let server = try await PeerServer.start(serving: OneResource(log: hosts.primary, device: hosts.primaryDevice))
        let link = try await server.connect(as: Self.credentials("beta"))
        let client = SyncClient(
            resource: "vm1", device: try BlockDevice(path: hosts.path + "/replica.img"), size: TwoHosts.size, start: 0,
            loop: link.eventLoop, pool: NIOThreadPool.singleton, logger: server.logger
        ) { _ in }
        try await client.run(over: link).get()
        let status = client.status
        #expect(status.done)
        #expect(status.bytesSent <= TwoHosts.size - UInt64(same * chunk), "chunks equal on both sides are not sent (seed \(seed))")
        let primary = try primaryFile.read(count: Int(TwoHosts.size), at: 0)
        let replica = try replicaFile.read(count: Int(TwoHosts.size), at: 0)
        // (A failing comparison of two 4 MiB arrays would make Swift Testing print them.)
        let firstDifference = primary.indices.first { primary[$0] != replica[$0] }
        #expect(firstDifference == nil, "first difference at byte \(firstDifference ?? 0) (seed \(seed))")
        link.close()
        try await server.stop()
    }

    /// Peers reach each other over IPv6 as over IPv4.
    @Test func linksWorkOverIPv6() async throws {
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let server = try await PeerServer.start(serving: OneResource(log: hosts.primary), on: "::1")
        var credentials = Self.credentials("beta")
        credentials.sourceHost = "::1"
        let link = try await server.connect(as: credentials, to: try PeerAddress(parsing: "[::1]:\(server.address.port)"))
        #expect(link.remote.host == "alpha")
        link.close()
        try await server.stop()
    }

    /// A peer with the wrong secret never gets a fetch answered, and the listener goes on serving.
    @Test func aWrongSecretIsRefused() async throws {
        let hosts = try TwoHosts()
        defer { hosts.cleanUp() }
        let server = try await PeerServer.start(serving: OneResource(log: hosts.primary))
        let wrong = Self.credentials("mallory", secret: [UInt8](repeating: 8, count: 32))
        await #expect(throws: (any Error).self) {
            _ = try await server.connect(as: wrong)
        }
        let link = try await server.connect(as: Self.credentials("beta"))
        #expect(link.remote.host == "alpha")
        link.close()
        try await server.stop()
    }
}

/// A primary's log served on a peer port of its own, as marsd serves it, as "alpha".
struct PeerServer {
    let group: MultiThreadedEventLoopGroup
    let listener: PeerListener
    let address: PeerAddress
    let logger: Logger

    static func start(serving handler: OneResource, as name: String = "alpha", on host: String = "127.0.0.1") async throws -> PeerServer {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let logger = Logger(label: "test")
        let listener = try await PeerListener.start(
            on: PeerAddress(host: host, port: 0), group: group, credentials: { LinkTests.credentials(name) }, logger: logger
        ) { link in PeerSession.serve(link, handler: handler, pool: .singleton, logger: logger) }
        let port = try #require(listener.port)
        return PeerServer(group: group, listener: listener, address: PeerAddress(host: host, port: port), logger: logger)
    }

    func connect(as credentials: PeerCredentials, to address: PeerAddress? = nil) async throws -> PeerLink {
        try await PeerLink.connect(to: address ?? self.address, group: group, credentials: credentials, logger: logger).get()
    }

    func stop() async throws {
        await listener.stop()
        try await group.shutdownGracefully()
    }
}
