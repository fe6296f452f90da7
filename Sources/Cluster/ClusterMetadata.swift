import FoundationEssentials

/// A Lamport-style timestamp: wall-clock milliseconds where they run ahead, the writer's host
/// name to order writes made in the same millisecond. Ordered by (time, host).
public struct LogicalClock: Comparable, Codable, Sendable, Hashable {
    public var time: UInt64
    public var host: String

    public init(time: UInt64, host: String) {
        self.time = time
        self.host = host
    }

    public static func < (lhs: LogicalClock, rhs: LogicalClock) -> Bool {
        (lhs.time, lhs.host) < (rhs.time, rhs.host)
    }
}

/// One key of the cluster metadata as last written; the writer is `clock.host`.
public struct MetadataEntry: Codable, Sendable, Equatable {
    public static let maxKeyBytes = 512
    public static let maxValueBytes = 64 << 10

    public var key: String
    /// nil is a tombstone: the key was deleted, and the deletion must win over older values.
    public var value: String?
    public var clock: LogicalClock

    public init(key: String, value: String?, clock: LogicalClock) {
        self.key = key
        self.value = value
        self.clock = clock
    }

    /// Whether this entry replaces `other` for the same key. Equal clocks (only possible if a host
    /// lost its state and reused a time) are decided by the value, so merging stays order-free.
    func supersedes(_ other: MetadataEntry) -> Bool {
        if clock != other.clock { return clock > other.clock }
        switch (value, other.value) {
        case (let mine?, let theirs?): return mine > theirs
        case (.some, nil): return true
        case (nil, _): return false
        }
    }
}

/// What a merge did.
public struct MergeResult: Sendable, Equatable {
    /// Incoming entries that replaced the stored one (or were new), in input order.
    public var changed: [MetadataEntry]
    /// Incoming entries dated too far in the future to trust, ignored.
    public var rejected: [MetadataEntry]

    public init(changed: [MetadataEntry] = [], rejected: [MetadataEntry] = []) {
        self.changed = changed
        self.rejected = rejected
    }
}

/// A gossip blob that cannot be used.
public struct ClusterMetadataError: Error, Equatable, CustomStringConvertible {
    public let reason: String

    public init(_ reason: String) {
        self.reason = reason
    }

    public var description: String { reason }
}

/// The metadata every host of a cluster shares (members, resources, who is primary...), spread by
/// gossip. Each key holds its newest write; merging is commutative, associative and idempotent, so
/// hosts that have seen the same writes agree, whatever order and however often they got them.
public struct ClusterMetadata: Codable, Sendable, Equatable {
    /// Entries dated more than this far ahead of our wall clock come from a broken clock: taking
    /// them would let that host's writes win for as long, and drag every clock forward.
    public static let maxFutureSkew: UInt64 = 30 * 24 * 3600 * 1000

    public private(set) var entries: [String: MetadataEntry] = [:]
    /// The highest time seen, so a local write always wins over everything already known.
    public private(set) var clock: UInt64 = 0

    public init() {}

    /// A local write (value nil deletes); `now` is the wall clock in milliseconds.
    @discardableResult
    public mutating func set(_ key: String, _ value: String?, by host: String, now: UInt64) -> MetadataEntry {
        let time = max(clock == .max ? .max : clock + 1, now)
        let entry = MetadataEntry(key: key, value: value, clock: LogicalClock(time: time, host: host))
        entries[key] = entry
        clock = time
        return entry
    }

    /// The value of `key`; nil if it was never set or was deleted.
    public func value(_ key: String) -> String? {
        entries[key]?.value
    }

    /// Entries (tombstones included) whose key starts with `prefix`, sorted by key.
    public func entries(withPrefix prefix: String) -> [MetadataEntry] {
        entries.values.filter { $0.key.hasPrefix(prefix) }.sorted { $0.key < $1.key }
    }

    /// Takes each incoming entry that is newer than the stored one for its key.
    @discardableResult
    public mutating func merge(_ incoming: [MetadataEntry], now: UInt64) -> MergeResult {
        var result = MergeResult()
        let (limit, overflow) = now.addingReportingOverflow(Self.maxFutureSkew)
        for entry in incoming {
            if !overflow && entry.clock.time > limit {
                result.rejected.append(entry)
                continue
            }
            clock = max(clock, entry.clock.time)
            if let stored = entries[entry.key], !entry.supersedes(stored) { continue }
            entries[entry.key] = entry
            result.changed.append(entry)
        }
        return result
    }

    /// All entries as a gossip blob (JSON, sorted by key).
    public func encoded() throws -> [UInt8] {
        try Self.encode(entries.values.sorted { $0.key < $1.key })
    }

    /// Some entries (e.g. a merge's changes) as a gossip blob.
    public static func encode(_ entries: [MetadataEntry]) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Array(try encoder.encode(entries))
    }

    /// The entries of a gossip blob, each checked against the key and value limits.
    public static func decode(_ bytes: [UInt8]) throws(ClusterMetadataError) -> [MetadataEntry] {
        let entries: [MetadataEntry]
        do {
            entries = try JSONDecoder().decode([MetadataEntry].self, from: Data(bytes))
        } catch {
            throw ClusterMetadataError("gossip entries of \(bytes.count) bytes are not a JSON array of entries: \(Self.describe(error))")
        }
        for entry in entries {
            let keyBytes = entry.key.utf8.count
            guard keyBytes >= 1 && keyBytes <= MetadataEntry.maxKeyBytes else {
                throw ClusterMetadataError(
                    "gossip entry key of \(keyBytes) bytes is outside 1...\(MetadataEntry.maxKeyBytes): '\(entry.key.prefix(64))'"
                )
            }
            if let value = entry.value, value.utf8.count > MetadataEntry.maxValueBytes {
                throw ClusterMetadataError(
                    "gossip entry '\(entry.key)' has a value of \(value.utf8.count) bytes, more than the \(MetadataEntry.maxValueBytes)-byte limit"
                )
            }
        }
        return entries
    }

    /// DecodingError's own description is a wall of context; name the path and the problem.
    private static func describe(_ error: any Error) -> String {
        guard let decodingError = error as? DecodingError else { return String(describing: error) }
        func path(_ context: DecodingError.Context) -> String {
            let components = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return components.isEmpty ? "" : " at \(components)"
        }
        switch decodingError {
        case .dataCorrupted(let context): return context.debugDescription + path(context)
        case .keyNotFound(let key, let context): return "missing '\(key.stringValue)'" + path(context)
        case .typeMismatch(_, let context), .valueNotFound(_, let context): return context.debugDescription + path(context)
        @unknown default: return String(describing: error)
        }
    }
}

// MARK: - Keys and values of resources (docs/handover.md §1.1)

/// The metadata keys of resources, in one place (the daemon and the role machine both use them).
public enum MetadataKeys {
    public static func host(_ host: String) -> String { "host/" + host }
    /// `ResourceEntry`, written by the designated primary.
    public static func resource(_ resource: String) -> String { "resource/" + resource }
    /// `MemberEntry`, written by that member.
    public static func member(_ resource: String, _ host: String) -> String { "resource/\(resource)/member/\(host)" }
    public static func memberPrefix(_ resource: String) -> String { "resource/\(resource)/member/" }
    /// `WantedPrimary`, written by the host that asks to become primary.
    public static func wantedPrimary(_ resource: String) -> String { "resource/\(resource)/wanted-primary" }
    /// Set by a primary that let `host` go (retention cap): only a new sync brings it back.
    public static func needsSync(_ resource: String, _ host: String) -> String { "resource/\(resource)/needs-sync/\(host)" }

    /// The resource whose roles a change of `key` from `old` to `new` (JSON values, nil: absent or
    /// deleted) may change: the designation, the wanted primary, or a member's role fields
    /// (`MemberEntry.sameRole`). nil when the change cannot matter to a role machine.
    public static func resourceWithChangedRole(key: String, old: String?, new: String?) -> String? {
        let parts = key.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count >= 2, parts[0] == "resource", !parts[1].isEmpty, old != new else { return nil }
        let resource = String(parts[1])
        if parts.count == 2 || (parts.count == 3 && parts[2] == "wanted-primary") { return resource }
        guard parts.count == 4, parts[2] == "member" else { return nil }
        let decoder = JSONDecoder()
        let before = old.flatMap { try? decoder.decode(MemberEntry.self, from: Data($0.utf8)) }
        let after = new.flatMap { try? decoder.decode(MemberEntry.self, from: Data($0.utf8)) }
        switch (before, after) {
        case (let before?, let after?): return before.sameRole(as: after) ? nil : resource
        default: return resource
        }
    }
}

/// A resource as the cluster knows it (`resource/<name>`, written by its designated primary when
/// it becomes primary).
public struct ResourceEntry: Codable, Sendable, Equatable {
    /// The logical size: what the primary serves and every member replays within (ResourceSize).
    public var size: UInt64
    /// The designated primary; "" after `marsadm secondary` on the primary (nobody).
    public var primary: String
    /// The size a resize asks for, until the primary settles it (nil: no resize pending).
    public var wanted: UInt64?
    /// The designated primary's epoch: the cluster's authority for fencing. Entries written before
    /// handover existed have none, and mean 1 (every resource was created at epoch 1).
    public var epoch: UInt64

    public init(size: UInt64, primary: String, wanted: UInt64? = nil, epoch: UInt64 = 1) {
        self.size = size
        self.primary = primary
        self.wanted = wanted
        self.epoch = epoch
    }

    private enum CodingKeys: String, CodingKey { case size, primary, wanted, epoch }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        size = try container.decode(UInt64.self, forKey: .size)
        primary = try container.decode(String.self, forKey: .primary)
        wanted = try container.decodeIfPresent(UInt64.self, forKey: .wanted)
        epoch = try container.decodeIfPresent(UInt64.self, forKey: .epoch) ?? 1
    }
}

/// A request to become primary (`resource/<name>/wanted-primary`, written by the host it names:
/// `marsadm primary` runs there). Deleted (a tombstone) once the request is done or withdrawn.
public struct WantedPrimary: Codable, Sendable, Equatable {
    public var host: String
    /// The epoch the new primary will have: the designated epoch + 1.
    public var epoch: UInt64
    /// `--force`: no handover, the old primary is fenced when it learns of the epoch.
    public var force: Bool
    /// Random, chosen by the requester: the old primary's answer (`HandoverState.id`) names it.
    public var id: UInt64
    /// The primary the requester takes over from.
    public var from: String

    public init(host: String, epoch: UInt64, force: Bool = false, id: UInt64, from: String) {
        self.host = host
        self.epoch = epoch
        self.force = force
        self.id = id
        self.from = from
    }
}

/// Where an epoch of a resource's history starts: `origin` wrote from `lsn` on at `epoch`.
public struct EpochStart: Codable, Sendable, Hashable {
    public var epoch: UInt64
    public var origin: String
    public var lsn: UInt64

    public init(epoch: UInt64, origin: String, lsn: UInt64) {
        self.epoch = epoch
        self.origin = origin
        self.lsn = lsn
    }
}

/// The old primary's answer to a `WantedPrimary` (in its `MemberEntry`).
public struct HandoverState: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable {
        /// It will not hand over; `reason` says why and what to do.
        case refused
        /// Its export is closed and the seal is being written.
        case draining
        /// Its log ends with the seal at `finalLSN`, in `finalSegment`.
        case sealed
    }

    /// The request's id (`WantedPrimary.id`).
    public var id: UInt64
    /// The requester.
    public var to: String
    public var state: State
    /// The epoch promised to the requester (draining, sealed): a later request must ask above it.
    public var nextEpoch: UInt64?
    public var reason: String?
    public var finalLSN: UInt64?
    public var finalSegment: String?
    /// The old primary detached a kernel device of the resource to hand over: the new primary
    /// attaches one (a guest on the device moves with it).
    public var detached: Bool?

    public init(
        id: UInt64, to: String, state: State, nextEpoch: UInt64? = nil, reason: String? = nil, finalLSN: UInt64? = nil,
        finalSegment: String? = nil, detached: Bool? = nil
    ) {
        self.id = id
        self.to = to
        self.state = state
        self.nextEpoch = nextEpoch
        self.reason = reason
        self.finalLSN = finalLSN
        self.finalSegment = finalSegment
        self.detached = detached
    }
}

/// A primary that learned of a newer epoch and stopped admitting writes (invariant 5).
public struct FenceRecord: Codable, Sendable, Equatable {
    /// The newer epoch it learned of.
    public var epoch: UInt64
    /// The host primary at that epoch.
    public var by: String
    /// Where its history forks from the new primary's, once known.
    public var forkLSN: UInt64?

    public init(epoch: UInt64, by: String, forkLSN: UInt64? = nil) {
        self.epoch = epoch
        self.by = by
        self.forkLSN = forkLSN
    }
}

/// A fork found between this member's history and another host's (split brain).
public struct ForkState: Codable, Sendable, Equatable {
    /// The first LSN where the histories differ, when known.
    public var lsn: UInt64?
    /// The other host.
    public var with: String

    public init(lsn: UInt64?, with: String) {
        self.lsn = lsn
        self.with = with
    }
}

/// A member's state of a resource (`resource/<name>/member/<host>`, owned by that host): what view
/// shows for other hosts, what the primary's log retention follows, and its part in a handover.
/// Every field added since the first version is optional, so old entries and old peers' entries
/// decode, and old peers read the new ones (unknown keys are ignored).
public struct MemberEntry: Codable, Sendable, Equatable {
    /// "primary", "secondary", or a state of the role machine in between (`LocalRole.viewName`).
    public var role: String
    public var disk: String
    public var replication: String
    /// Primary: the durable end of its log. Secondary: the end of its local log.
    public var fetchedLSN: UInt64
    public var replayedLSN: UInt64
    /// Wall-clock ms of this state.
    public var updated: UInt64
    /// How far this member's data device has the capacity and the primary's content, during a
    /// resize (ResourceSize.ready); nil when no resize is pending.
    public var readySize: UInt64?
    /// Why this member cannot get ready for a pending resize (lvextend refused, say).
    public var resizeProblem: String?
    /// The epoch of this member's history at its end.
    public var epoch: UInt64?
    /// The last epoch starts of its history (HistoryTimeline, at most 16), oldest first.
    public var epochs: [EpochStart]?
    /// What keeps the resource busy here (device users, NBD connections), for a handover's fast refusal.
    public var inUse: [String]?
    /// As old primary: its answer to a request to become primary.
    public var handover: HandoverState?
    public var fenced: FenceRecord?
    public var fork: ForkState?

    public init(
        role: String, disk: String, replication: String, fetchedLSN: UInt64, replayedLSN: UInt64, updated: UInt64,
        readySize: UInt64? = nil, resizeProblem: String? = nil, epoch: UInt64? = nil, epochs: [EpochStart]? = nil,
        inUse: [String]? = nil, handover: HandoverState? = nil, fenced: FenceRecord? = nil, fork: ForkState? = nil
    ) {
        self.role = role
        self.disk = disk
        self.replication = replication
        self.fetchedLSN = fetchedLSN
        self.replayedLSN = replayedLSN
        self.updated = updated
        self.readySize = readySize
        self.resizeProblem = resizeProblem
        self.epoch = epoch
        self.epochs = epochs
        self.inUse = inUse
        self.handover = handover
        self.fenced = fenced
        self.fork = fork
    }

    /// Equal but for the timestamp: nothing worth a gossip changed.
    public func sameState(as other: MemberEntry) -> Bool {
        var other = other
        other.updated = updated
        return self == other
    }

    /// Equal in what role machines act on (role, epoch, handover answer, fence).
    public func sameRole(as other: MemberEntry) -> Bool {
        role == other.role && epoch == other.epoch && handover == other.handover && fenced == other.fenced
    }
}
