import Cluster
import Testing

@Suite("The size rule of a resource (resize)")
struct ResourceSizeTests {
    @Test func growingIsAllowedShrinkingOnlyForced() throws {
        #expect(try ResourceSize.change(of: "vm1", from: 64 << 20, to: 128 << 20, force: false) == .grow)
        #expect(try ResourceSize.change(of: "vm1", from: 64 << 20, to: 64 << 20, force: false) == .unchanged)
        #expect(try ResourceSize.change(of: "vm1", from: 64 << 20, to: 32 << 20, force: true) == .shrink)
        let refusal = #expect(throws: ResizeRefusal.self) { try ResourceSize.change(of: "vm1", from: 64 << 20, to: 32 << 20, force: false) }
        // What happened, to what, and what to do next.
        #expect(refusal?.description.contains("resource vm1 has 67108864 bytes") == true)
        #expect(refusal?.description.contains("--force") == true)
        #expect(throws: ResizeRefusal.self) { try ResourceSize.change(of: "vm1", from: 64 << 20, to: 0, force: true) }
    }

    /// The size goes up only once every member (the primary included) is ready for the whole of it.
    @Test func theSizeIsRaisedOnlyWhenEveryMemberIsReady() {
        let current: UInt64 = 64 << 20
        let wanted: UInt64 = 128 << 20
        #expect(ResourceSize.settle(current: current, wanted: wanted, ready: ["alpha": wanted]) == .settled(wanted))
        #expect(
            ResourceSize.settle(current: current, wanted: wanted, ready: ["alpha": wanted + 4096, "beta": wanted, "gamma": wanted - 1])
                == .waiting(for: ["gamma"])
        )
        #expect(
            ResourceSize.settle(current: current, wanted: wanted, ready: ["alpha": current, "beta": 0, "gamma": wanted])
                == .waiting(for: ["alpha", "beta"])
        )
        // A forced shrink needs nobody: every device holds the smaller size already.
        #expect(ResourceSize.settle(current: current, wanted: 32 << 20, ready: ["beta": 0]) == .settled(32 << 20))
    }

    /// A secondary grows its device first, then copies the tail, then is ready.
    @Test func aMemberGrowsThenCopiesTheTail() {
        let logical: UInt64 = 64 << 20
        let wanted: UInt64 = 128 << 20
        #expect(ResourceSize.memberStep(logical: logical, wanted: nil, capacity: logical, synced: logical) == .nothing)
        #expect(ResourceSize.memberStep(logical: logical, wanted: wanted, capacity: logical, synced: logical) == .grow(to: wanted))
        #expect(
            ResourceSize.memberStep(logical: logical, wanted: wanted, capacity: wanted + 4096, synced: logical)
                == .copyTail(from: logical, to: wanted)
        )
        // A copy interrupted half-way goes on from where it got.
        #expect(
            ResourceSize.memberStep(logical: logical, wanted: wanted, capacity: wanted, synced: logical + (16 << 20))
                == .copyTail(from: logical + (16 << 20), to: wanted)
        )
        #expect(ResourceSize.memberStep(logical: logical, wanted: wanted, capacity: wanted, synced: wanted) == .nothing)
        // After a forced shrink and a grow back, the bytes below what was synced need no copy.
        #expect(ResourceSize.memberStep(logical: 32 << 20, wanted: logical, capacity: logical, synced: logical) == .nothing)
        #expect(ResourceSize.memberStep(logical: logical, wanted: 32 << 20, capacity: logical, synced: logical) == .nothing)
        #expect(ResourceSize.ready(capacity: wanted, synced: logical) == logical)
        #expect(ResourceSize.ready(capacity: logical, synced: wanted) == logical)
    }
}
