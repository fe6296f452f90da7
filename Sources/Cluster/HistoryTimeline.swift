/// The epochs of a resource's log history as a member gossips them (docs/handover.md §5.1): where
/// each epoch starts and who wrote it, and where the history ends. Two members' timelines give
/// the LSN where their histories fork, without reading either log (the history digest checks it
/// before a repair).
public struct HistoryTimeline: Codable, Sendable, Equatable {
    /// How many epoch starts a member gossips: its newest ones.
    public static let gossipedStarts = 16

    /// Oldest first, by LSN (an epoch that wrote nothing starts where the next one does).
    public private(set) var starts: [EpochStart]
    /// The end of the history (a primary's durable end, a replica's fetched end).
    public var end: UInt64

    public init(starts: [EpochStart], end: UInt64) {
        self.starts = Array(starts.suffix(Self.gossipedStarts))
        self.end = end
    }

    /// A new epoch starts at `lsn` (a promotion): it is the newest start, older ones beyond the
    /// gossiped count are dropped.
    public mutating func begin(_ start: EpochStart) {
        starts.append(start)
        if starts.count > Self.gossipedStarts { starts.removeFirst(starts.count - Self.gossipedStarts) }
        end = max(end, start.lsn)
    }

    /// The epoch that wrote the history at `lsn`, if the timeline reaches back that far.
    public func writer(at lsn: UInt64) -> EpochStart? {
        starts.last { $0.lsn <= lsn }
    }

    /// The first LSN where `a` and `b` hold different histories: another epoch, or the same epoch
    /// by another origin, wrote there. nil when one is a prefix of the other (a side that ends
    /// where the other's new epoch starts wrote nothing after it: no split brain). Positions
    /// older than either timeline reaches are taken as shared.
    public static func forkLSN(_ a: HistoryTimeline, _ b: HistoryTimeline) -> UInt64? {
        let shared = min(a.end, b.end)
        let known = max(a.starts.first?.lsn ?? 0, b.starts.first?.lsn ?? 0)
        let candidates = Set((a.starts + b.starts).map { max($0.lsn, known) }).filter { $0 < shared }.sorted()
        return candidates.first { lsn in
            let (left, right) = (a.writer(at: lsn), b.writer(at: lsn))
            return left?.epoch != right?.epoch || left?.origin != right?.origin
        }
    }
}
