import LogEngine
import PeerProtocol
@testable import Replication
import Testing
import TransactionLog

/// Which member a replica fetches from (`FetchSourceChoice`), and what a source answers for a
/// segment it does not hold (`FetchStream.missing`): pure values, no sockets.
@Suite struct FetchSourceChoiceTests {
    static func source(_ host: String, epoch: UInt64? = nil) -> FetchSource {
        FetchSource(host: host, address: PeerAddress(host: "127.0.0.1", port: 7777), epoch: epoch)
    }
    static let three = [source("alpha"), source("beta"), source("gamma")]

    @Test func thePrimaryFirstAndAFailureMovesOnWrappingAround() {
        var choice = FetchSourceChoice()
        #expect(choice.choose(from: Self.three)?.host == "alpha")
        #expect(choice.failed("alpha", among: Self.three) == false)
        #expect(choice.choose(from: Self.three)?.host == "beta")
        _ = choice.failed("beta", among: Self.three)
        #expect(choice.choose(from: Self.three)?.host == "gamma")
        _ = choice.failed("gamma", among: Self.three)
        #expect(choice.choose(from: Self.three)?.host == "alpha")
        _ = choice.failed("beta", among: Self.three)
        choice.restartAtPrimary()
        #expect(choice.choose(from: Self.three)?.host == "alpha")
    }

    /// A segmentGone from the primary is no sync yet: the others are asked, and only when none has
    /// it (or can be reached while asked) does the replica need a sync.
    @Test func segmentGoneAsksTheOthersBeforeASync() {
        var choice = FetchSourceChoice()
        #expect(choice.segmentGone(from: "alpha", among: Self.three) == false)
        #expect(choice.choose(from: Self.three)?.host == "beta")
        #expect(choice.failed("beta", among: Self.three) == false, "beta unreachable: gamma is left")
        #expect(choice.choose(from: Self.three)?.host == "gamma")
        #expect(choice.segmentGone(from: "gamma", among: Self.three) == true)
        #expect(choice.lacking == ["alpha", "beta", "gamma"])

        var single = FetchSourceChoice()
        #expect(single.segmentGone(from: "alpha", among: [Self.source("alpha")]) == true, "the primary alone: a sync at once, as before")
    }

    /// Bytes that arrived move the log's end: whoever lacked the old one is asked again.
    @Test func progressForgetsWhoLackedIt() {
        var choice = FetchSourceChoice()
        _ = choice.segmentGone(from: "alpha", among: Self.three)
        choice.progressed()
        #expect(choice.lacking.isEmpty)
        #expect(choice.segmentGone(from: "beta", among: Self.three) == false)
        #expect(choice.failed("gamma", among: Self.three) == false, "alpha may have the new end")
        #expect(choice.choose(from: Self.three)?.host == "alpha")
    }

    /// A source at an older epoch is not asked again until the designation changes; when every
    /// source said so, none is chosen once and then all are asked again.
    @Test func staleSourcesAreLeftOut() {
        var choice = FetchSourceChoice()
        #expect(choice.staleSource("alpha", among: Self.three) == false)
        #expect(choice.choose(from: Self.three)?.host == "beta")
        _ = choice.failed("beta", among: Self.three)
        #expect(choice.choose(from: Self.three)?.host == "gamma")
        choice.restartAtPrimary()
        #expect(choice.choose(from: Self.three)?.host == "beta", "the stale primary is skipped")
        _ = choice.staleSource("beta", among: Self.three)
        _ = choice.staleSource("gamma", among: Self.three)
        #expect(choice.choose(from: Self.three) == nil)
        #expect(choice.choose(from: Self.three)?.host != nil, "asked again after a round without any")
        choice.designationChanged()
        _ = choice.staleSource("alpha", among: Self.three)
        choice.designationChanged()
        #expect(choice.choose(from: Self.three)?.host == "alpha" && choice.stale.isEmpty)
    }

    /// While hunting for a segment, a stale answer counts as not having it.
    @Test func staleWhileHuntingCanEndInASync() {
        var choice = FetchSourceChoice()
        _ = choice.segmentGone(from: "alpha", among: Array(Self.three.prefix(2)))
        #expect(choice.staleSource("beta", among: Array(Self.three.prefix(2))) == true)
    }

    /// Members gossiping an epoch below the designated one hold a deposed history: left out. A
    /// member or designation without an epoch is never left out for it.
    @Test func membersOfAnOlderEpochAreLeftOut() {
        let sources = [Self.source("beta", epoch: 4), Self.source("alpha", epoch: 3), Self.source("gamma", epoch: 4),
                       Self.source("delta"), Self.source("eps", epoch: 5)]
        #expect(FetchSourceChoice.eligible(sources).map(\.host) == ["beta", "gamma", "delta", "eps"])
        var choice = FetchSourceChoice()
        _ = choice.failed("beta", among: sources)
        #expect(choice.choose(from: sources)?.host == "gamma")
        let unknown = [Self.source("beta"), Self.source("alpha", epoch: 3)]
        #expect(FetchSourceChoice.eligible(unknown).map(\.host) == ["beta", "alpha"])
        #expect(FetchSourceChoice.eligible([]).isEmpty)
    }

    // MARK: - What a source answers for a segment it does not hold

    static func snapshot(_ names: [(UInt64, String)]) -> ShippingSnapshot {
        let segments = names.enumerated().map { index, name in
            ShippingSnapshot.Segment(name: SegmentName(sequence: name.0, host: name.1)!, firstLSN: UInt64(index) << 20)
        }
        return ShippingSnapshot(segments: segments, durableLSN: 5 << 20, appendedLSN: 5 << 20, epoch: 2)
    }

    static func answer(_ sequence: UInt64, _ host: String, _ snapshot: ShippingSnapshot, primary: Bool) -> (FetchErrorCode, String)? {
        FetchStream.missing(SegmentName(sequence: sequence, host: host)!, in: snapshot, primary: primary, asker: "gamma")
    }

    /// Below the oldest: gone. The same sequence of another origin, or a sequence between two
    /// segments here: a fork (a secondary says segmentGone, so the asker tries the primary).
    /// Beyond the newest: it may come, so the stream waits.
    @Test func aMissingSegmentIsGoneForkedOrAwaited() throws {
        let log = Self.snapshot([(4, "alpha"), (5, "alpha"), (7, "beta"), (8, "beta")])
        #expect(Self.answer(3, "alpha", log, primary: true)?.0 == .segmentGone)
        #expect(Self.answer(9, "beta", log, primary: true) == nil)
        #expect(Self.answer(9, "gamma", log, primary: true) == nil)

        let same = try #require(Self.answer(5, "gamma", log, primary: true))
        #expect(same.0 == .forked && same.1 == "gamma asked for log-000000005-gamma, but this host's log has log-000000005-alpha there")
        let newest = try #require(Self.answer(8, "alpha", log, primary: true))
        #expect(newest.0 == .forked && newest.1.contains("log-000000008-beta there"))
        let between = try #require(Self.answer(6, "alpha", log, primary: true))
        #expect(between.0 == .forked)
        #expect(between.1 == "gamma asked for log-000000006-alpha, but this host's log goes from log-000000005-alpha on to log-000000007-beta")

        #expect(Self.answer(6, "alpha", log, primary: false)?.0 == .segmentGone)
        #expect(Self.answer(5, "gamma", log, primary: false)?.0 == .segmentGone)
        #expect(Self.answer(1, "alpha", Self.snapshot([]), primary: true) == nil, "an empty log waits")
    }
}
