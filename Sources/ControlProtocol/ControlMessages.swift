import FoundationEssentials

/// The version marsd and marsadm report.
public let marsVersion = "0.1.0"

/// A request on marsd's control socket: one JSON object on one line.
public struct ControlRequest: Codable, Sendable, Equatable {
    public enum Command: String, Codable, Sendable {
        /// Status of the daemon, its resources and every export.
        case view
        /// Makes this host the first member of a new cluster (`host` names it).
        case createCluster = "create-cluster"
        /// Creates resource `name` on data device `device`, with this host as its primary.
        case createResource = "create-resource"
        /// Brings resource `name` up (its export opens) and keeps it up across restarts.
        case up
        /// Takes resource `name` down: the export closes, the log is written back.
        case down
        /// Joins the cluster of `token` through the member at `peer`, as `host`.
        case joinCluster = "join-cluster"
        /// Makes this host a replica of resource `name` on data device `device` (initial sync, then fetch and replay).
        case joinResource = "join-resource"
        case pauseFetch = "pause-fetch"
        case resumeFetch = "resume-fetch"
        case pauseReplay = "pause-replay"
        case resumeReplay = "resume-replay"
        /// Replies once this host's replica of `name` is UpToDate (`timeout` seconds at most).
        case waitResource = "wait-resource"
        case pauseSync = "pause-sync"
        case resumeSync = "resume-sync"
        /// Stops being a member of resource `name` (a secondary): its local log goes, the device stays.
        case leaveResource = "leave-resource"
        /// Removes resource `name` from the cluster (on its primary, once it is the last member).
        case deleteResource = "delete-resource"
        /// Throws this replica's state of `name` away and syncs it again from the primary (repair, NeedsSync).
        case invalidate
        /// Removes this host from its cluster (no resources may be left on it).
        case leaveCluster = "leave-cluster"
        /// Connects the kernel's NBD client to resource `name`'s export and links /dev/mars/NAME to it.
        case attach
        /// Disconnects /dev/mars/NAME (refused while it is in use, unless `force`).
        case detach
        /// Gives resource `name` `size` bytes (on its primary; growing, or shrinking with `force`).
        case resize
        /// Makes this host the primary of resource `name`: a planned handover from the current
        /// primary (it seals its log, this host replays to the seal and continues the history).
        case primary
        /// Withdraws this host's pending request to become primary of `name`.
        case secondary
    }

    /// What wait-resource waits for.
    public enum WaitTarget: String, Codable, Sendable, CaseIterable {
        /// This host's replica replayed what the primary had made durable when the wait began.
        case uptodate
        /// This host is the resource's primary and serves its export.
        case primary
        /// This host is a secondary that fetches from a designated primary.
        case secondary
    }

    public var command: Command
    public var name: String?
    public var device: String?
    public var host: String?
    public var token: String?
    public var peer: String?
    public var timeout: Double?
    /// detach, down: go on although the resource's local device is in use. resize: shrink.
    public var force: Bool?
    /// create-resource, join-resource: make the data device as a logical volume NAME in this volume group.
    public var volumeGroup: String?
    /// create-resource with `volumeGroup`: the logical volume's size in bytes. resize: the new size.
    public var size: UInt64?
    /// leave-resource: remove the logical volume made by --lvm too.
    public var removeVolume: Bool?
    /// wait-resource: what to wait for (nil: uptodate).
    public var until: WaitTarget?
    /// primary: hand over although a member is syncing (its sync starts again from the new primary).
    public var ignoreSync: Bool?
    /// primary: attach /dev/mars/NAME on this host once it is primary.
    public var attach: Bool?

    public init(
        command: Command, name: String? = nil, device: String? = nil, host: String? = nil, token: String? = nil, peer: String? = nil,
        timeout: Double? = nil, force: Bool? = nil, volumeGroup: String? = nil, size: UInt64? = nil, removeVolume: Bool? = nil,
        until: WaitTarget? = nil, ignoreSync: Bool? = nil, attach: Bool? = nil
    ) {
        self.until = until
        self.ignoreSync = ignoreSync
        self.attach = attach
        self.force = force
        self.volumeGroup = volumeGroup
        self.size = size
        self.removeVolume = removeVolume
        self.command = command
        self.name = name
        self.device = device
        self.host = host
        self.token = token
        self.peer = peer
        self.timeout = timeout
    }
}

/// The reply: one JSON object on one line, then the daemon closes the connection.
public struct ControlResponse: Codable, Sendable, Equatable {
    public var error: String?
    /// What a command did, in a sentence.
    public var message: String?
    /// marsd's state once the command is done: in every reply without an error.
    public var status: DaemonStatus?
    /// create-cluster: the token other hosts join with.
    public var token: String?

    public init(error: String? = nil, message: String? = nil, status: DaemonStatus? = nil, token: String? = nil) {
        self.error = error
        self.message = message
        self.status = status
        self.token = token
    }
}

public struct DaemonStatus: Codable, Sendable, Equatable {
    public var version: String
    public var pid: Int32
    public var ioEngine: String
    public var listeners: [String]
    /// The root directory holding the cluster identity and the resources.
    public var root: String?
    /// This host's name in the cluster; nil before create-cluster.
    public var host: String?
    public var cluster: String?
    /// The hosts of the cluster and their peer addresses, as the gossip knows them.
    public var members: [MemberHost]?
    public var resources: [ResourceStatus]
    public var exports: [ExportStatus]

    public init(
        version: String, pid: Int32, ioEngine: String, listeners: [String], root: String? = nil, host: String? = nil,
        cluster: String? = nil, members: [MemberHost]? = nil, resources: [ResourceStatus] = [], exports: [ExportStatus]
    ) {
        self.members = members
        self.version = version
        self.pid = pid
        self.ioEngine = ioEngine
        self.listeners = listeners
        self.root = root
        self.host = host
        self.cluster = cluster
        self.resources = resources
        self.exports = exports
    }
}

public struct MemberHost: Codable, Sendable, Equatable {
    public var host: String
    public var address: String
    public init(host: String, address: String) {
        self.host = host
        self.address = address
    }
}

/// A resource's replication as this host sees it: its own replica, and every member's state.
public struct ReplicationStatus: Codable, Sendable, Equatable {
    /// UpToDate, Outdated, Inconsistent, SplitBrain, ...
    public var disk: String
    /// Replicating, Syncing, Replaying, PausedFetch, PausedReplay, PrimaryUnreachable, NeedsSync, ...
    public var replication: String
    public var primary: String?
    public var fetchedLSN: UInt64?
    public var replayedLSN: UInt64?
    /// The primary's durable end as last heard, and how far this replica's replay is behind it.
    public var primaryDurableLSN: UInt64?
    public var lagBytes: UInt64?
    public var lagSeconds: Double?
    public var syncOffset: UInt64?
    public var syncSize: UInt64?
    public var syncBytesSent: UInt64?
    /// The host this replica fetches from: the primary, or another member that has the bytes.
    public var fetchSource: String?
    public var problem: String?
    public var members: [MemberStatus]

    public init(
        disk: String, replication: String, primary: String? = nil, fetchedLSN: UInt64? = nil, replayedLSN: UInt64? = nil,
        primaryDurableLSN: UInt64? = nil, lagBytes: UInt64? = nil, lagSeconds: Double? = nil, syncOffset: UInt64? = nil,
        syncSize: UInt64? = nil, syncBytesSent: UInt64? = nil, fetchSource: String? = nil, problem: String? = nil,
        members: [MemberStatus] = []
    ) {
        self.fetchSource = fetchSource
        self.disk = disk
        self.replication = replication
        self.primary = primary
        self.fetchedLSN = fetchedLSN
        self.replayedLSN = replayedLSN
        self.primaryDurableLSN = primaryDurableLSN
        self.lagBytes = lagBytes
        self.lagSeconds = lagSeconds
        self.syncOffset = syncOffset
        self.syncSize = syncSize
        self.syncBytesSent = syncBytesSent
        self.problem = problem
        self.members = members
    }
}

/// One member of a resource, from the gossip.
public struct MemberStatus: Codable, Sendable, Equatable {
    public var host: String
    public var role: String
    public var disk: String
    public var replication: String
    public var fetchedLSN: UInt64
    public var replayedLSN: UInt64
    /// Seconds since that host last said it.
    public var age: Double

    public init(host: String, role: String, disk: String, replication: String, fetchedLSN: UInt64, replayedLSN: UInt64, age: Double) {
        self.host = host
        self.role = role
        self.disk = disk
        self.replication = replication
        self.fetchedLSN = fetchedLSN
        self.replayedLSN = replayedLSN
        self.age = age
    }
}

/// One resource on this host.
public struct ResourceStatus: Codable, Sendable, Equatable {
    public var name: String
    public var device: String
    public var size: UInt64
    /// "primary" or "secondary".
    public var role: String
    /// What the operator asked for: "up" or "down".
    public var wanted: String
    /// What is: "up", "recovering" (coming up: clients that connect wait for it), "down", or
    /// "failed" (see `error`).
    public var state: String
    public var error: String?
    public var log: LogStatus?
    public var replication: ReplicationStatus?
    /// The local block device serving the resource (marsadm attach): "/dev/mars/NAME -> /dev/nbdN".
    public var attached: String?
    /// A resize not settled yet: the size it wants and what it waits for.
    public var resize: String?
    /// A role change under way here (a handover), in words: what it waits for.
    public var transition: String?

    public init(
        name: String, device: String, size: UInt64, role: String, wanted: String, state: String, error: String? = nil, log: LogStatus? = nil,
        replication: ReplicationStatus? = nil, attached: String? = nil, resize: String? = nil
    ) {
        self.attached = attached
        self.resize = resize
        self.replication = replication
        self.name = name
        self.device = device
        self.size = size
        self.role = role
        self.wanted = wanted
        self.state = state
        self.error = error
        self.log = log
    }
}

/// Positions and sizes of a resource's transaction log.
public struct LogStatus: Codable, Sendable, Equatable {
    public var epoch: UInt64
    public var appendedLSN: UInt64
    public var durableLSN: UInt64
    public var writebackLSN: UInt64
    public var pendingChanges: Int
    public var pendingBytes: Int
    public var waitingWrites: Int
    public var logBytes: UInt64
    public var spaceLimit: UInt64
    public var segments: Int
    public var currentSegment: String
    public var groupCommits: Int
    public var failure: String?

    public init(
        epoch: UInt64, appendedLSN: UInt64, durableLSN: UInt64, writebackLSN: UInt64, pendingChanges: Int, pendingBytes: Int,
        waitingWrites: Int, logBytes: UInt64, spaceLimit: UInt64, segments: Int, currentSegment: String, groupCommits: Int,
        failure: String?
    ) {
        self.epoch = epoch
        self.appendedLSN = appendedLSN
        self.durableLSN = durableLSN
        self.writebackLSN = writebackLSN
        self.pendingChanges = pendingChanges
        self.pendingBytes = pendingBytes
        self.waitingWrites = waitingWrites
        self.logBytes = logBytes
        self.spaceLimit = spaceLimit
        self.segments = segments
        self.currentSegment = currentSegment
        self.groupCommits = groupCommits
        self.failure = failure
    }
}

public struct ExportStatus: Codable, Sendable, Equatable {
    public var name: String
    public var device: String
    public var kind: String
    public var size: UInt64
    public var readOnly: Bool
    public var cacheMode: String
    public var activeConnections: Int
    public var totalConnections: Int
    public var requests: Int
    public var bytesRead: Int
    public var bytesWritten: Int
    public var errors: Int

    public init(
        name: String, device: String, kind: String, size: UInt64, readOnly: Bool, cacheMode: String,
        activeConnections: Int, totalConnections: Int, requests: Int, bytesRead: Int, bytesWritten: Int, errors: Int
    ) {
        self.name = name
        self.device = device
        self.kind = kind
        self.size = size
        self.readOnly = readOnly
        self.cacheMode = cacheMode
        self.activeConnections = activeConnections
        self.totalConnections = totalConnections
        self.requests = requests
        self.bytesRead = bytesRead
        self.bytesWritten = bytesWritten
        self.errors = errors
    }
}

/// Encoding shared by both ends: compact JSON, one message per line.
public enum ControlCodec {
    public static let maxMessageSize = 1 << 20

    public static func encodeLine<T: Encodable>(_ value: T) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(value)) + [0x0A]
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: some Collection<UInt8>) throws -> T {
        try JSONDecoder().decode(type, from: Data(bytes))
    }

    public static func prettyJSON<T: Encodable>(_ value: T) throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }
}
