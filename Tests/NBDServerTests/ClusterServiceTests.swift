import BlockStore
import Cluster
import LogEngine
import Logging
import NIOCore
import NIOPosix
import PeerProtocol
import Replication
import Synchronization
import Testing

@testable import Daemon

#if canImport(Glibc)
import Glibc
#endif

/// One host's ClusterService behind a peer port on loopback, answering gossip as marsd does.
final class GossipHost: PeerRequestHandler, @unchecked Sendable {
    static let secret = [UInt8](repeating: 9, count: 32)
    let name: String
    let path: String
    let service: ClusterService
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let logger = Logger(label: "gossip-test")
    var listener: PeerListener!
    var address: String { "127.0.0.1:\(listener.port!)" }
    var credentials: PeerCredentials {
        PeerCredentials(cluster: "c0ffee", secret: Self.secret, local: PeerIdentity(host: name, hostID: name + "-id"))
    }
    /// What `onRoleKeysChanged` reported, in order.
    let roleChanges = Mutex<[[String]]>([])

    init(_ name: String) async throws {
        self.name = name
        var template = Array("/tmp/mars-gossip-XXXXXX".utf8CString)
        path = String(cString: mkdtemp(&template)!)
        service = try ClusterService(root: POSIXDirectory(path: path), logger: logger)
        service.onRoleKeysChanged = { [weak self] resources in self?.roleChanges.withLock { $0.append(resources) } }
        let credentials = credentials
        listener = try await PeerListener.start(on: PeerAddress(host: "127.0.0.1", port: 0), group: group, credentials: { credentials }, logger: logger) {
            [self] link in PeerSession.serve(link, handler: self, pool: .singleton, logger: self.logger)
        }
    }

    /// Makes `peer` known here, as its host key would after a join.
    func knows(_ peer: GossipHost) {
        service.set(ClusterService.hostKey(peer.name), HostEntry(address: peer.address, hostID: peer.name + "-id"), by: peer.name)
    }

    func push(to peers: [String]) async {
        await service.push(to: peers, group: group, credentials: credentials)
    }

    func stop() async throws {
        await listener.stop()
        try await group.shutdownGracefully()
        _ = system("rm -rf '\(path)'")
    }

    func primaryLog(of resource: String) -> LogEngine? { nil }
    func fetchSource(of resource: String) -> (any ShippingSource)? { nil }
    func size(of resource: String) -> UInt64? { nil }
    func dataDevice(of resource: String) -> BlockDevice? { nil }
    func gossip(_ entries: [UInt8], from peer: PeerIdentity) -> [UInt8] { service.receiveGossip(entries, from: peer) }
    func fetched(_ resource: String, by peer: PeerIdentity, upTo lsn: UInt64) {}
    func syncStarting(_ resource: String, by peer: PeerIdentity) {}
    func staleSourceSeen(_ resource: String, epoch: UInt64, by peer: PeerIdentity) {}
}

/// ClusterService.push and onRoleKeysChanged (docs/handover.md §1.4): two services on port 0.
@Suite(.serialized) struct ClusterServiceTests {
    static let member = MemberEntry(role: "secondary", disk: "UpToDate", replication: "Replicating", fetchedLSN: 4096, replayedLSN: 4096, updated: 1)

    /// A push is one exchange, at once: the value is on the other host when it returns, both
    /// ways, and that host's machine is told which resource's role keys changed.
    @Test func aPushExchangesAtOnceAndWakesTheRoles() async throws {
        let alpha = try await GossipHost("alpha")
        let beta = try await GossipHost("beta")
        alpha.knows(beta)
        let wanted = WantedPrimary(host: "alpha", epoch: 2, id: 77, from: "beta")
        alpha.service.set(ClusterService.wantedPrimaryKey("vm1"), wanted, by: "alpha")
        beta.service.set(ClusterService.memberKey("vm1", "beta"), Self.member, by: "beta")

        await alpha.push(to: ["beta", "alpha", "nobody"])
        #expect(beta.service.value(WantedPrimary.self, ClusterService.wantedPrimaryKey("vm1")) == wanted)
        #expect(alpha.service.value(MemberEntry.self, ClusterService.memberKey("vm1", "beta")) == Self.member)
        #expect(beta.roleChanges.withLock { $0 } == [["vm1"]])
        #expect(alpha.roleChanges.withLock { $0 } == [["vm1"]], "a new member entry concerns the roles")

        // Positions alone do not wake anyone; a handover answer does.
        var moved = Self.member
        moved.fetchedLSN = 8192
        beta.service.set(ClusterService.memberKey("vm1", "beta"), moved, by: "beta")
        await alpha.push(to: ["beta"])
        #expect(alpha.service.value(MemberEntry.self, ClusterService.memberKey("vm1", "beta")) == moved)
        #expect(alpha.roleChanges.withLock { $0.count } == 1)
        var answering = moved
        answering.handover = HandoverState(id: 77, to: "alpha", state: .refused, reason: "in use")
        beta.service.set(ClusterService.memberKey("vm1", "beta"), answering, by: "beta")
        await alpha.push(to: ["beta"])
        #expect(alpha.roleChanges.withLock { $0.last } == ["vm1"])
        #expect(alpha.roleChanges.withLock { $0.count } == 2)
        // Nothing new: no callback.
        await alpha.push(to: ["beta"])
        #expect(alpha.roleChanges.withLock { $0.count } == 2)
        #expect(beta.roleChanges.withLock { $0.count } == 1)

        try await alpha.stop()
        try await beta.stop()
    }

    /// A host out of reach does not hold up the others, and the push still returns.
    @Test func anUnreachableHostDoesNotHoldUpThePush() async throws {
        let alpha = try await GossipHost("alpha")
        let beta = try await GossipHost("beta")
        let gone = try await GossipHost("gamma")
        alpha.knows(beta)
        alpha.knows(gone)
        try await gone.stop()
        alpha.service.set(ClusterService.resourceKey("vm1"), ResourceEntry(size: 1 << 20, primary: "alpha", epoch: 3), by: "alpha")
        await alpha.push(to: ["gamma", "beta"])
        #expect(beta.service.value(ResourceEntry.self, ClusterService.resourceKey("vm1"))?.epoch == 3)
        #expect(beta.roleChanges.withLock { $0 } == [["vm1"]])
        try await alpha.stop()
        try await beta.stop()
    }
}
