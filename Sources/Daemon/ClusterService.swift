import BlockStore
import Cluster
import FoundationEssentials
import Logging
import NIOCore
import PeerProtocol
import Replication
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A host's entry in the cluster metadata (`host/<name>`, owned by that host).
struct HostEntry: Codable, Equatable {
    var address: String
    var hostID: String
}

/// The cluster metadata of this host: persisted under the root, spread by gossip with every other
/// member every couple of seconds (each key owned by one host, newer logical clock wins).
final class ClusterService: Sendable {
    static let fileName = "cluster-metadata.json"
    static let gossipInterval: Duration = .seconds(2)

    private let root: any StorageDirectory
    private let logger: Logger
    private let metadata: Mutex<ClusterMetadata>

    init(root: any StorageDirectory, logger: Logger) throws {
        self.root = root
        self.logger = logger
        let stored = try StateFile.read(ClusterMetadata.self, named: Self.fileName, in: root) ?? ClusterMetadata()
        metadata = Mutex(stored)
    }

    // MARK: - Keys

    static func hostKey(_ host: String) -> String { MetadataKeys.host(host) }
    static func resourceKey(_ resource: String) -> String { MetadataKeys.resource(resource) }
    static func memberKey(_ resource: String, _ host: String) -> String { MetadataKeys.member(resource, host) }
    static func wantedPrimaryKey(_ resource: String) -> String { MetadataKeys.wantedPrimary(resource) }
    /// Set by a primary that let `host` go (retention cap): only a new sync brings it back.
    static func needsSyncKey(_ resource: String, _ host: String) -> String { MetadataKeys.needsSync(resource, host) }

    /// Whether `key` was deleted (a tombstone), as opposed to never known.
    func isDeleted(_ key: String) -> Bool {
        metadata.withLock { metadata in metadata.entries[key].map { $0.value == nil } ?? false }
    }

    /// Keys under `prefix` that hold a value.
    func keys(withPrefix prefix: String) -> [String] {
        metadata.withLock { $0.entries(withPrefix: prefix).filter { $0.value != nil }.map(\.key) }
    }

    /// Forgets everything (leave-cluster): the file goes too.
    func reset() throws {
        metadata.withLock { $0 = ClusterMetadata() }
        do {
            try root.remove(Self.fileName)
        } catch {
            if error.errno != ENOENT { throw error }
        }
        try root.sync()
    }

    func value<T: Decodable>(_ type: T.Type, _ key: String) -> T? {
        guard let text = metadata.withLock({ $0.value(key) }) else { return nil }
        return try? JSONDecoder().decode(type, from: Data(text.utf8))
    }

    func hosts() -> [String: HostEntry] {
        var result: [String: HostEntry] = [:]
        for entry in metadata.withLock({ $0.entries(withPrefix: "host/") }) {
            guard let value = entry.value, let host = try? JSONDecoder().decode(HostEntry.self, from: Data(value.utf8)) else { continue }
            result[String(entry.key.dropFirst("host/".count))] = host
        }
        return result
    }

    func members(of resource: String) -> [String: MemberEntry] {
        let prefix = MetadataKeys.memberPrefix(resource)
        var result: [String: MemberEntry] = [:]
        for entry in metadata.withLock({ $0.entries(withPrefix: prefix) }) {
            guard let value = entry.value, let member = try? JSONDecoder().decode(MemberEntry.self, from: Data(value.utf8)) else { continue }
            result[String(entry.key.dropFirst(prefix.count))] = member
        }
        return result
    }

    /// Writes a key this host owns (unchanged values are not written again: no needless gossip).
    func set<T: Encodable>(_ key: String, _ value: T?, by host: String) {
        let text: String? = value.flatMap { value in
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            return (try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) }
        }
        let changed = metadata.withLock { metadata -> Bool in
            guard metadata.value(key) != text || (text == nil && metadata.entries[key] == nil) else { return false }
            _ = metadata.set(key, text, by: host, now: wallClockMilliseconds())
            return true
        }
        if changed { persist() }
    }

    /// One writer at a time, each writing the newest state: concurrent writes shared the temporary
    /// file (a rename failed) and could put an older snapshot over a newer one.
    private let writing = Mutex(())

    private func persist() {
        writing.withLock { _ in
            let snapshot = metadata.withLock { $0 }
            do {
                try StateFile.write(snapshot, named: Self.fileName, in: root)
            } catch {
                logger.error("cannot store the cluster metadata: \(error)")
            }
        }
    }

    // MARK: - Gossip

    /// A peer's gossip: merge it, answer with ours.
    func receiveGossip(_ bytes: [UInt8], from peer: PeerIdentity) -> [UInt8] {
        merge(bytes, from: peer.host)
        return (try? metadata.withLock { try $0.encoded() }) ?? []
    }

    private let roleKeysChanged = Mutex<(@Sendable (_ resources: [String]) -> Void)?>(nil)

    /// Called after a merge changed a key the role machines act on (`MetadataKeys.resourceWithChangedRole`),
    /// with the resources concerned (sorted), so the daemon re-evaluates them at once.
    var onRoleKeysChanged: (@Sendable (_ resources: [String]) -> Void)? {
        get { roleKeysChanged.withLock { $0 } }
        set { roleKeysChanged.withLock { $0 = newValue } }
    }

    private func merge(_ bytes: [UInt8], from peer: String) {
        let incoming: [MetadataEntry]
        do {
            incoming = try ClusterMetadata.decode(bytes)
        } catch {
            logger.warning("gossip from \(peer) is unreadable: \(error)")
            return
        }
        let (result, resources) = metadata.withLock { metadata in
            // The values before the merge, of the entries that may replace them (in a steady
            // state almost none: a peer sends back what we have).
            var before: [String: String?] = [:]
            for entry in incoming where metadata.entries[entry.key]?.clock != entry.clock && before[entry.key] == nil {
                before[entry.key] = .some(metadata.value(entry.key))
            }
            let result = metadata.merge(incoming, now: wallClockMilliseconds())
            let resources = Set(result.changed.compactMap { entry in
                MetadataKeys.resourceWithChangedRole(key: entry.key, old: before[entry.key] ?? nil, new: entry.value)
            })
            return (result, resources.sorted())
        }
        if !result.rejected.isEmpty {
            logger.warning("gossip from \(peer): ignored \(result.rejected.count) entries dated more than 30 days ahead (check the clocks)")
        }
        if !result.changed.isEmpty { persist() }
        if !resources.isEmpty { onRoleKeysChanged?(resources) }
    }

    /// One exchange with the peer at `address`: our metadata there, theirs back.
    func exchange(with address: PeerAddress, group: any EventLoopGroup, credentials: PeerCredentials) async throws {
        let link = try await PeerLink.connect(to: address, group: group, credentials: credentials, logger: logger).get()
        let reply = link.eventLoop.makePromise(of: [UInt8].self)
        link.eventLoop.execute {
            link.onMessage = { message in
                if case .gossip(let entries) = message { reply.succeed(entries) } else { reply.fail(ReplicationError("unexpected \(message.name)")) }
            }
            link.onClose = { reply.fail(ReplicationError("peer \(address) closed the link before answering the gossip")) }
        }
        let ours = try metadata.withLock { try $0.encoded() }
        link.send(.gossip(entries: ours))
        let timeout = link.eventLoop.scheduleTask(in: .seconds(10)) { reply.fail(ReplicationError("peer \(address) did not answer the gossip")) }
        defer {
            timeout.cancel()
            link.close()
        }
        merge(try await reply.futureResult.get(), from: link.remote.host)
    }

    /// Gossips with every other known host, each once, all at the same time: a host out of reach
    /// (a connect timeout) does not hold up the exchanges with the others.
    func gossipRound(group: any EventLoopGroup, credentials: PeerCredentials) async {
        await push(to: Array(hosts().keys), group: group, credentials: credentials)
    }

    /// Gossips with `peers` now instead of at the next round (after a role key was written, so a
    /// handover step costs one exchange, docs/handover.md §1.4); unknown hosts and this host are
    /// skipped, the exchanges run at the same time and return when all ended.
    func push(to peers: [String], group: any EventLoopGroup, credentials: PeerCredentials) async {
        let known = hosts()
        await withTaskGroup(of: Void.self) { tasks in
            for host in Set(peers) where host != credentials.local.host {
                guard let entry = known[host], let address = try? PeerAddress(parsing: entry.address) else { continue }
                tasks.addTask {
                    do {
                        try await self.exchange(with: address, group: group, credentials: credentials)
                    } catch {
                        self.logger.debug("gossip with \(host) at \(address): \(error)")
                    }
                }
            }
        }
    }
}
