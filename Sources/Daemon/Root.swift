import BlockStore
import Cluster
import FoundationEssentials
import PeerProtocol
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

/// This host's membership: written once by create-cluster (`<root>/cluster.json`).
struct ClusterIdentity: Codable, Equatable {
    static let fileName = "cluster.json"
    var version = 1
    var cluster: String
    var host: String
    /// Stable across renames and re-installs of the same root: peers tell hosts apart by it.
    var hostID: String?
    /// The cluster secret (hex) peers prove they know; the join token carries it. 0600, like the root.
    var secret: String?

    init(token: JoinToken, host: String, hostID: String) {
        self.cluster = token.cluster
        self.host = host
        self.hostID = hostID
        // The token's own hex form: its last part.
        self.secret = String(token.text.split(separator: "-").last!)
    }

    /// The join token of this cluster (nil for an identity written before tokens existed).
    var token: JoinToken? {
        secret.flatMap { try? JoinToken(parsing: "mars1-\(cluster)-\($0)") }
    }
}

/// What a resource is on this host (`<root>/resource-<name>/resource.json`). Positions live in the
/// log directory beside it (docs/log-format.md).
struct ResourceConfig: Codable, Equatable {
    static let fileName = "resource.json"
    var version = 1
    var name: String
    var device: String
    var size: UInt64
    var role: String
    /// "up" or "down": restored at every start.
    var wanted: String
    var createdEpoch: UInt64
    /// A replica's initial sync: where it started, how far the copy got, where it must replay to.
    var sync: SyncRecord?
    var fetchPaused: Bool?
    var replayPaused: Bool?
    var syncPaused: Bool?
    /// The index N of the kernel's /dev/nbdN serving this resource (marsadm attach); a restart of
    /// marsd reconnects it.
    var attachedDevice: Int32?
    /// The volume group of the data device when marsd made it as a logical volume (--lvm), so
    /// leave-resource --remove-lv may remove it.
    var volumeGroup: String?
    /// A secondary's data device equals the primary's (up to replay) below this offset; nil: the
    /// size. Beyond the size when a resize copied the new tail ahead of the primary raising it.
    var syncedSize: UInt64?
    /// A role change under way (docs/handover.md §2): a restart resumes it from here.
    var transition: RoleTransition?
    /// This host was primary and learnt of a newer one: it admits no writes.
    var fenced: FenceRecord?
}

/// The persisted state of a replica's initial sync (resumable after a restart of either side).
struct SyncRecord: Codable, Equatable {
    /// The primary's writeback position when the sync began: replay starts here.
    var startLSN: UInt64
    var startSegment: String
    var epoch: UInt64
    /// Every byte before it is copied.
    var offset: UInt64
    /// The primary's durable end when the copy finished: the replica is consistent once replay passes it.
    var endLSN: UInt64?
}

enum Names {
    static func validateResource(_ name: String) throws {
        if let refusal = SafeName.refusal(name, kind: "resource") { throw DaemonError(refusal) }
    }

    static func validateHost(_ name: String) throws {
        if let refusal = SafeName.refusal(name, kind: "host") { throw DaemonError(refusal + " (give --host)") }
    }

    static func resourceDirectory(_ name: String) -> String { "resource-" + name }
}

/// Small JSON state files, replaced atomically and durably (temporary file, fdatasync, rename,
/// directory fsync), so a crash leaves either the old or the new version.
enum StateFile {
    static func write<T: Encodable>(_ value: T, named name: String, in directory: any StorageDirectory) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        let bytes = Array(try encoder.encode(value)) + [0x0A]
        let temporary = name + ".tmp"
        let file = try directory.open(temporary, create: true)
        try file.truncate(to: 0)
        try file.write(bytes, at: 0)
        try file.sync()
        try directory.rename(temporary, to: name)
        try directory.sync()
    }

    static func read<T: Decodable>(_ type: T.Type, named name: String, in directory: any StorageDirectory) throws -> T? {
        let file: any StorageFile
        do {
            file = try directory.open(name, create: false)
        } catch {
            if error.errno == ENOENT { return nil }
            throw error
        }
        let size = try file.size()
        guard size <= 1 << 20 else { throw DaemonError("\(directory.path)/\(name) is larger than 1 MiB: not a swift-mars state file") }
        let bytes = try file.read(count: Int(size), at: 0)
        do {
            return try JSONDecoder().decode(type, from: Data(bytes))
        } catch {
            throw DaemonError("\(directory.path)/\(name) is unreadable (\(error)); restore it from a backup")
        }
    }
}

/// A random identifier for a new cluster.
func randomIdentifier() -> String {
    var generator = SystemRandomNumberGenerator()
    return (0..<2).map { _ in
        let value = generator.next()
        let text = String(value, radix: 16)
        return String(repeating: "0", count: 16 - text.count) + text
    }.joined()
}
