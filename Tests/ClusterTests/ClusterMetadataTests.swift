import Cluster
import Glibc
import TestSupport
import Testing

/// A property test's generator, seeded by `TestSeed` (MARS_TEST_SEED replays a failure).
func seededGenerator(_ test: String = #function) -> SplitMix64 {
    SplitMix64(state: TestSeed.make(test))
}

func entry(_ key: String, _ value: String?, _ time: UInt64, _ host: String) -> MetadataEntry {
    MetadataEntry(key: key, value: value, clock: LogicalClock(time: time, host: host))
}

@Suite("Cluster metadata")
struct ClusterMetadataTests {
    static let now: UInt64 = 1_700_000_000_000

    @Test func clockOrder() {
        #expect(LogicalClock(time: 1, host: "zeta") < LogicalClock(time: 2, host: "alpha"))
        #expect(LogicalClock(time: 2, host: "alpha") < LogicalClock(time: 2, host: "beta"))
        #expect(!(LogicalClock(time: 2, host: "beta") < LogicalClock(time: 2, host: "beta")))
    }

    @Test func localWrites() {
        var metadata = ClusterMetadata()
        let first = metadata.set("resource/vm1/primary", "alpha", by: "alpha", now: Self.now)
        #expect(first.clock == LogicalClock(time: Self.now, host: "alpha"))
        // A wall clock that stands still or goes back still gives later writes later times.
        let second = metadata.set("resource/vm1/primary", "beta", by: "alpha", now: Self.now - 5000)
        #expect(second.clock.time == Self.now + 1)
        #expect(metadata.clock == Self.now + 1)
        #expect(metadata.value("resource/vm1/primary") == "beta")
        metadata.set("resource/vm1/primary", nil, by: "alpha", now: Self.now + 100)
        #expect(metadata.value("resource/vm1/primary") == nil)
        #expect(metadata.entries["resource/vm1/primary"]?.value == nil)
        #expect(metadata.value("never") == nil)
    }

    @Test func prefixQuerySortedWithTombstones() {
        var metadata = ClusterMetadata()
        metadata.set("host/gamma", "3", by: "a", now: 1)
        metadata.set("host/alpha", "1", by: "a", now: 2)
        metadata.set("hostile", "x", by: "a", now: 3)
        metadata.set("host/beta", nil, by: "a", now: 4)
        metadata.set("resource/vm1", "r", by: "a", now: 5)
        #expect(metadata.entries(withPrefix: "host/").map(\.key) == ["host/alpha", "host/beta", "host/gamma"])
        #expect(metadata.entries(withPrefix: "").count == 5)
    }

    @Test func newerWinsOlderIsIgnored() {
        var metadata = ClusterMetadata()
        let newer = entry("k", "new", 20, "alpha")
        let older = entry("k", "old", 10, "beta")
        #expect(metadata.merge([newer], now: Self.now) == MergeResult(changed: [newer]))
        #expect(metadata.merge([older], now: Self.now) == MergeResult())
        #expect(metadata.value("k") == "new")
        #expect(metadata.clock == 20)
        // A local write after the merge is newer than everything seen.
        #expect(metadata.set("k", "local", by: "gamma", now: 5).clock.time == 21)
    }

    @Test func tieBrokenByHostName() {
        let a = entry("k", "from alpha", 10, "alpha")
        let b = entry("k", "from beta", 10, "beta")
        var first = ClusterMetadata()
        first.merge([a, b], now: Self.now)
        var second = ClusterMetadata()
        second.merge([b, a], now: Self.now)
        #expect(first.value("k") == "from beta")
        #expect(first == second)
    }

    @Test func tombstonesWinWhenNewer() {
        var metadata = ClusterMetadata()
        metadata.merge([entry("k", "v", 10, "alpha")], now: Self.now)
        let delete = entry("k", nil, 11, "beta")
        #expect(metadata.merge([delete], now: Self.now).changed == [delete])
        #expect(metadata.value("k") == nil)
        // An older write arriving late does not bring the key back.
        #expect(metadata.merge([entry("k", "zombie", 10, "gamma")], now: Self.now).changed.isEmpty)
        #expect(metadata.value("k") == nil)
        // And an older tombstone does not delete a newer value.
        metadata.merge([entry("j", "v", 20, "alpha")], now: Self.now)
        #expect(metadata.merge([entry("j", nil, 19, "alpha")], now: Self.now).changed.isEmpty)
        #expect(metadata.value("j") == "v")
    }

    @Test func futureDatedEntriesRejected() {
        var metadata = ClusterMetadata()
        let limit = Self.now + ClusterMetadata.maxFutureSkew
        let broken = entry("k", "from the future", limit + 1, "broken")
        let edge = entry("j", "just within", limit, "alpha")
        let result = metadata.merge([broken, edge], now: Self.now)
        #expect(result == MergeResult(changed: [edge], rejected: [broken]))
        #expect(metadata.value("k") == nil)
        #expect(metadata.clock == limit)
        // Once our wall clock catches up, the entry is accepted.
        #expect(metadata.merge([broken], now: Self.now + 1).changed == [broken])
        // A clock near UInt64.max does not wrap the limit.
        var fresh = ClusterMetadata()
        #expect(fresh.merge([entry("k", "v", .max, "x")], now: 0).rejected.count == 1)
        #expect(fresh.clock == 0)
    }

    @Test func equalClocksDecidedByValue() {
        // Only a host that lost its state can reuse a clock; merging must still be order-free.
        let a = entry("k", "a", 10, "alpha")
        let b = entry("k", "b", 10, "alpha")
        let deleted = entry("k", nil, 10, "alpha")
        var first = ClusterMetadata()
        first.merge([a, b, deleted], now: Self.now)
        var second = ClusterMetadata()
        second.merge([deleted, b, a], now: Self.now)
        #expect(first == second)
        #expect(first.value("k") == "b")
    }

    /// Three hosts write (and now and then gossip) at random; replicas that receive the same
    /// writes in any order, batching or repetition end up equal.
    @Test func mergeIsCommutativeAssociativeIdempotent() {
        var g = seededGenerator()
        for _ in 0..<50 {
            let hosts = ["alpha", "beta", "gamma"]
            var replicas = hosts.map { _ in ClusterMetadata() }
            var written: [MetadataEntry] = []
            var wallClock: UInt64 = Self.now
            for _ in 0..<Int.random(in: 1...150, using: &g) {
                wallClock += UInt64.random(in: 0...3, using: &g)  // often the same millisecond
                let writer = Int.random(in: 0..<3, using: &g)
                if Int.random(in: 0..<5, using: &g) == 0 {
                    let source = Int.random(in: 0..<3, using: &g)
                    replicas[writer].merge(Array(replicas[source].entries.values), now: wallClock)
                    continue
                }
                let key = "key\(Int.random(in: 0..<6, using: &g))"
                let value: String? = Int.random(in: 0..<4, using: &g) == 0 ? nil : "v\(UInt8.random(in: 0...255, using: &g))"
                // Hosts' wall clocks disagree by up to a second.
                let skew = UInt64(writer) * UInt64.random(in: 0...1000, using: &g)
                written.append(replicas[writer].set(key, value, by: hosts[writer], now: wallClock + skew))
            }

            var inOrder = ClusterMetadata()
            inOrder.merge(written, now: wallClock)

            var shuffled = ClusterMetadata()
            var remaining = (written + written.filter { _ in Bool.random(using: &g) }).shuffled(using: &g)
            while !remaining.isEmpty {
                let batch = Int.random(in: 1...remaining.count, using: &g)
                shuffled.merge(Array(remaining.prefix(batch)), now: wallClock)
                remaining.removeFirst(batch)
            }

            // (X ∪ Y) built from two overlapping halves, merged state into state.
            let split = written.map { _ in Int.random(in: 0..<3, using: &g) }  // 0: X, 1: Y, 2: both
            var x = ClusterMetadata()
            var y = ClusterMetadata()
            x.merge(zip(written, split).filter { $0.1 != 1 }.map(\.0).shuffled(using: &g), now: wallClock)
            y.merge(zip(written, split).filter { $0.1 != 0 }.map(\.0).shuffled(using: &g), now: wallClock)
            var xy = x
            xy.merge(Array(y.entries.values), now: wallClock)
            var yx = y
            yx.merge(Array(x.entries.values), now: wallClock)

            #expect(shuffled == inOrder)
            #expect(xy == inOrder)
            #expect(yx == inOrder)
            var again = inOrder
            #expect(again.merge(written.shuffled(using: &g), now: wallClock).changed.isEmpty)
            #expect(again == inOrder)
            // Each key holds its newest write.
            for (key, stored) in inOrder.entries {
                #expect(stored.clock == written.filter { $0.key == key }.map(\.clock).max())
            }
        }
    }
}

@Suite("Gossip encoding")
struct GossipEncodingTests {
    @Test func roundTrip() throws {
        var metadata = ClusterMetadata()
        metadata.set("host/alpha", "{\"address\":\"10.0.0.1:7777\"}", by: "alpha", now: 100)
        metadata.set("host/beta", nil, by: "alpha", now: 101)
        metadata.set("ünïcode/日本", "🚀", by: "bëta", now: .max - 1)
        let blob = try metadata.encoded()
        let decoded = try ClusterMetadata.decode(blob)
        #expect(decoded.map(\.key) == ["host/alpha", "host/beta", "ünïcode/日本"])
        var copy = ClusterMetadata()
        copy.merge(decoded, now: .max - 1)
        #expect(copy == metadata)
        #expect(try ClusterMetadata.decode(try ClusterMetadata.encode([])) == [])
    }

    @Test(arguments: ["", "not json", "{}", "[1]", "[{\"key\":\"k\"}]", "[{\"key\":\"k\",\"clock\":{\"time\":-1,\"host\":\"a\"}}]", "[{\"key\":5,\"clock\":{\"time\":1,\"host\":\"a\"}}]"])
    func malformedRejected(_ text: String) {
        do {
            let entries = try ClusterMetadata.decode(Array(text.utf8))
            Issue.record("'\(text)' decoded as \(entries)")
        } catch {
            #expect(error.reason.hasPrefix("gossip entries of \(text.utf8.count) bytes are not a JSON array of entries: "))
        }
    }

    @Test func missingFieldIsNamed() {
        #expect(throws: ClusterMetadataError("gossip entries of 13 bytes are not a JSON array of entries: missing 'clock' at [0]")) {
            try ClusterMetadata.decode(Array("[{\"key\":\"k\"}]".utf8))
        }
    }

    @Test func keyAndValueLimits() throws {
        func blob(key: String, value: String?) throws -> [UInt8] {
            try ClusterMetadata.encode([entry(key, value, 1, "alpha")])
        }
        let longestKey = String(repeating: "k", count: 512)
        let largestValue = String(repeating: "v", count: 64 << 10)
        #expect(try ClusterMetadata.decode(try blob(key: longestKey, value: largestValue)).count == 1)
        #expect(throws: ClusterMetadataError("gossip entry key of 0 bytes is outside 1...512: ''")) {
            try ClusterMetadata.decode(try blob(key: "", value: "v"))
        }
        #expect(throws: ClusterMetadataError.self) { try ClusterMetadata.decode(try blob(key: longestKey + "k", value: "v")) }
        #expect(throws: ClusterMetadataError("gossip entry 'k' has a value of 65537 bytes, more than the 65536-byte limit")) {
            try ClusterMetadata.decode(try blob(key: "k", value: largestValue + "v"))
        }
        // Limits count UTF-8 bytes, not characters.
        #expect(throws: ClusterMetadataError.self) {
            try ClusterMetadata.decode(try blob(key: String(repeating: "é", count: 257), value: nil))
        }
    }
}
