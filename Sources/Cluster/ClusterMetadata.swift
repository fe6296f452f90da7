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
