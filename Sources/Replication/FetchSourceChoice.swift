/// A member a replica's log can be fetched from, as the daemon knows it.
public struct FetchSource: Sendable, Equatable {
    public var host: String
    public var address: PeerAddress
    /// The member's history epoch as gossiped; for the designated primary (the first source) the
    /// designated epoch. nil where gossip does not say: such a source is never left out for it.
    public var epoch: UInt64?

    public init(host: String, address: PeerAddress, epoch: UInt64? = nil) {
        self.host = host
        self.address = address
        self.epoch = epoch
    }
}

/// Which source a `ReplicaFetcher` asks next, as a value: the sources (the designated primary
/// first) and the answers of earlier links in, a choice out; no sockets or clocks inside.
///
/// - The primary first; a source that fails moves the choice on to the next one.
/// - A source that answered `staleSource` (its history is at an older epoch than this log's) is
///   not asked again until the designation changes, or until every source has said so.
/// - `segmentGone` from one source (the primary too: during a handover the old primary still has
///   segments the new one dropped) makes the others be asked; only when none has the bytes, and
///   none that could be reached, does the replica need a sync.
public struct FetchSourceChoice: Sendable, Equatable {
    /// The host whose failure moves the choice on: the next choice is the source after it.
    private var movedOnFrom: String?
    /// Hosts that answered `staleSource` since the designation changed.
    private(set) var stale: Set<String> = []
    /// Hosts that do not have the bytes at this log's end (they said `segmentGone`, or could not be
    /// reached while others were asked for them); empty once bytes arrive.
    private(set) var lacking: Set<String> = []

    public init() {}

    /// The designated primary, and the members at its epoch or later (a member gossiping an older
    /// epoch holds a deposed history: its records would be refused anyway).
    public static func eligible(_ sources: [FetchSource]) -> [FetchSource] {
        guard let designated = sources.first else { return [] }
        return [designated] + sources.dropFirst().filter { source in
            guard let epoch = source.epoch, let designatedEpoch = designated.epoch else { return true }
            return epoch >= designatedEpoch
        }
    }

    /// The source to ask now, nil when every eligible one answered `staleSource` (they are then
    /// asked again next time: the designation may be about to change).
    public mutating func choose(from sources: [FetchSource]) -> FetchSource? {
        let eligible = Self.eligible(sources)
        var open = eligible.filter { !stale.contains($0.host) && !lacking.contains($0.host) }
        if open.isEmpty, !stale.isEmpty {
            stale = []
            return nil
        }
        if let from = movedOnFrom, let position = eligible.firstIndex(where: { $0.host == from }) {
            // The first open source after the one that failed, wrapping around to the primary.
            let after = eligible[(position + 1)...] + eligible[...position]
            open = after.filter { source in open.contains { $0.host == source.host } }
        }
        return open.first
    }

    /// The link to `host` failed (unreachable, silent, or it gave up): try the next source. Returns
    /// true when that leaves no eligible source that may have the bytes this log needs.
    public mutating func failed(_ host: String, among sources: [FetchSource]) -> Bool {
        movedOnFrom = host
        guard !lacking.isEmpty else { return false }
        lacking.insert(host)
        return nobodyHasIt(among: sources)
    }

    /// `host` no longer has the segment this log needs. Returns true when no eligible source has
    /// it: only a sync brings the replica back.
    public mutating func segmentGone(from host: String, among sources: [FetchSource]) -> Bool {
        movedOnFrom = host
        lacking.insert(host)
        return nobodyHasIt(among: sources)
    }

    /// `host`'s history is at an older epoch than this log's. Returns true when others were
    /// asked already and none has the bytes this log needs.
    public mutating func staleSource(_ host: String, among sources: [FetchSource]) -> Bool {
        movedOnFrom = host
        stale.insert(host)
        return !lacking.isEmpty && nobodyHasIt(among: sources)
    }

    /// Bytes arrived: the log's end moved, so whoever lacked the old one may have the new one.
    public mutating func progressed() {
        if !lacking.isEmpty { lacking = [] }
    }

    /// Back to the primary (after a detour to another member, or when the designation changed).
    public mutating func restartAtPrimary() {
        movedOnFrom = nil
    }

    /// The designated primary changed: every source may answer differently now.
    public mutating func designationChanged() {
        self = FetchSourceChoice()
    }

    private func nobodyHasIt(among sources: [FetchSource]) -> Bool {
        let eligible = Self.eligible(sources)
        return !eligible.isEmpty && eligible.allSatisfy { lacking.contains($0.host) || stale.contains($0.host) }
    }
}
