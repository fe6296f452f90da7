import Cluster
import TestSupport
import Testing

@Suite("History timeline")
struct HistoryTimelineTests {
    static func timeline(_ starts: [(UInt64, String, UInt64)], end: UInt64) -> HistoryTimeline {
        HistoryTimeline(starts: starts.map { EpochStart(epoch: $0.0, origin: $0.1, lsn: $0.2) }, end: end)
    }

    @Test func aPlannedHandoverIsOneHistory() {
        // alpha sealed epoch 3 at 800; beta started epoch 4 there; alpha (a replica now) ends at the seal.
        let alpha = Self.timeline([(1, "alpha", 0), (3, "alpha", 400)], end: 800)
        let beta = Self.timeline([(1, "alpha", 0), (3, "alpha", 400), (4, "beta", 800)], end: 1200)
        #expect(HistoryTimeline.forkLSN(alpha, beta) == nil)
        #expect(HistoryTimeline.forkLSN(beta, alpha) == nil)
    }

    @Test func aZombieThatWroteOnForksWhereTheNewEpochStarts() {
        let zombie = Self.timeline([(1, "alpha", 0), (3, "alpha", 400)], end: 900)
        let beta = Self.timeline([(1, "alpha", 0), (3, "alpha", 400), (4, "beta", 800)], end: 1200)
        #expect(HistoryTimeline.forkLSN(zombie, beta) == 800)
        #expect(HistoryTimeline.forkLSN(beta, zombie) == 800)
    }

    /// Two forced promotions at one epoch differ only in the origin.
    @Test func theSameEpochByAnotherOriginIsAFork() {
        let beta = Self.timeline([(1, "alpha", 0), (4, "beta", 500)], end: 900)
        let gamma = Self.timeline([(1, "alpha", 0), (4, "gamma", 500)], end: 700)
        #expect(HistoryTimeline.forkLSN(beta, gamma) == 500)
    }

    @Test func onlyTheNewestStartsAreKept() {
        var timeline = HistoryTimeline(starts: [], end: 0)
        for epoch in 1...20 { timeline.begin(EpochStart(epoch: UInt64(epoch), origin: "alpha", lsn: UInt64(epoch) * 100)) }
        #expect(timeline.starts.count == HistoryTimeline.gossipedStarts)
        #expect(timeline.starts.first?.epoch == 5)
        #expect(timeline.end == 2000)
        #expect(timeline.writer(at: 450) == nil, "older than the timeline reaches")
        #expect(timeline.writer(at: 1999)?.epoch == 19)
    }

    /// Random trees of histories against a per-LSN comparison: a shared trunk, then each side
    /// appends epochs of its own (or none) and ends somewhere.
    @Test func forkLSNMatchesBruteForce() {
        let seed = TestSeed.make("forkLSNMatchesBruteForce")
        var random = SplitMix64(state: seed)
        let hosts = ["alpha", "beta", "gamma"]
        func extend(_ starts: inout [EpochStart], count: Int, from lsn: inout UInt64) {
            for _ in 0..<count {
                lsn += random.next() % 40
                let epoch = (starts.last?.epoch ?? 0) + 1 + random.next() % 2
                starts.append(EpochStart(epoch: epoch, origin: hosts[Int(random.next() % 3)], lsn: lsn))
            }
        }
        for round in 0..<5000 {
            var trunk: [EpochStart] = []
            var lsn: UInt64 = 0
            extend(&trunk, count: 1 + Int(random.next() % 5), from: &lsn)
            var sides: [HistoryTimeline] = []
            for _ in 0..<2 {
                var starts = trunk
                var sideLSN = lsn
                extend(&starts, count: Int(random.next() % 4), from: &sideLSN)
                sides.append(HistoryTimeline(starts: starts, end: sideLSN + random.next() % 40))
            }
            let (a, b) = (sides[0], sides[1])
            let expected = (0..<min(a.end, b.end)).first { lsn in
                let left = a.starts.last { $0.lsn <= lsn }
                let right = b.starts.last { $0.lsn <= lsn }
                return left?.epoch != right?.epoch || left?.origin != right?.origin
            }
            #expect(HistoryTimeline.forkLSN(a, b) == expected, "round \(round), seed \(seed): \(a) vs \(b)")
            #expect(HistoryTimeline.forkLSN(b, a) == expected, "symmetric, round \(round), seed \(seed)")
        }
    }
}
