import Cluster
import FoundationEssentials
import Testing

private func decode<T: Decodable>(_ type: T.Type, _ json: String) throws -> T {
    try JSONDecoder().decode(type, from: Data(json.utf8))
}

private func json(_ value: some Encodable) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

/// The resource keys and values of the gossip (docs/handover.md §1.1): the fields added for
/// handover are optional, so what old hosts wrote (and still write) decodes, and they read ours.
@Suite("Resource entries")
struct ResourceEntriesTests {
    /// Values as a host before handover wrote them (also what cluster-metadata.json holds).
    static let oldResource = #"{"primary":"alpha","size":4194304}"#
    static let oldMember = #"{"disk":"UpToDate","fetchedLSN":4096,"replayedLSN":4096,"replication":"Replicating","role":"secondary","updated":1700000000000}"#

    @Test func oldEntriesDecodeWithEpochOne() throws {
        let resource = try decode(ResourceEntry.self, Self.oldResource)
        #expect(resource == ResourceEntry(size: 4 << 20, primary: "alpha", epoch: 1))
        let member = try decode(MemberEntry.self, Self.oldMember)
        #expect(member.role == "secondary" && member.fetchedLSN == 4096)
        #expect(member.epoch == nil && member.epochs == nil && member.inUse == nil)
        #expect(member.handover == nil && member.fenced == nil && member.fork == nil)
    }

    /// What an old host's decoder (the same struct without the new fields) reads of a new entry:
    /// its fields are all there, the new ones are extra keys it ignores.
    struct OldMemberEntry: Codable, Equatable {
        var role: String
        var disk: String
        var replication: String
        var fetchedLSN: UInt64
        var replayedLSN: UInt64
        var updated: UInt64
        var readySize: UInt64?
        var resizeProblem: String?
    }

    struct OldResourceEntry: Codable, Equatable {
        var size: UInt64
        var primary: String
        var wanted: UInt64?
    }

    @Test func newEntriesRoundTripAndOldHostsReadThem() throws {
        let member = MemberEntry(
            role: "handingOver", disk: "UpToDate", replication: "Replicating", fetchedLSN: 8192, replayedLSN: 4096, updated: 7,
            epoch: 3, epochs: [EpochStart(epoch: 1, origin: "alpha", lsn: 0), EpochStart(epoch: 3, origin: "beta", lsn: 4096)],
            inUse: ["1 NBD connection from 10.0.0.5"],
            handover: HandoverState(id: 42, to: "beta", state: .sealed, finalLSN: 8192, finalSegment: "log-000000002-alpha", detached: true),
            fenced: FenceRecord(epoch: 4, by: "gamma", forkLSN: 4096), fork: ForkState(lsn: 4096, with: "gamma")
        )
        let text = try json(member)
        #expect(try decode(MemberEntry.self, text) == member)
        let old = try decode(OldMemberEntry.self, text)
        #expect(old == OldMemberEntry(role: "handingOver", disk: "UpToDate", replication: "Replicating", fetchedLSN: 8192, replayedLSN: 4096, updated: 7))

        let resource = ResourceEntry(size: 1 << 20, primary: "beta", wanted: 2 << 20, epoch: 4)
        let resourceText = try json(resource)
        #expect(try decode(ResourceEntry.self, resourceText) == resource)
        #expect(try decode(OldResourceEntry.self, resourceText) == OldResourceEntry(size: 1 << 20, primary: "beta", wanted: 2 << 20))

        let wanted = WantedPrimary(host: "beta", epoch: 4, id: .max, from: "alpha")
        #expect(try decode(WantedPrimary.self, try json(wanted)) == wanted)
        // A member entry without the new fields writes none of them: old hosts see the same JSON as before.
        #expect(try json(try decode(MemberEntry.self, Self.oldMember)) == Self.oldMember)
    }

    @Test func badValuesAreRefused() {
        #expect(throws: (any Error).self) { try decode(ResourceEntry.self, #"{"primary":"alpha"}"#) }
        #expect(throws: (any Error).self) { try decode(ResourceEntry.self, #"{"primary":"alpha","size":1,"epoch":-1}"#) }
        #expect(throws: (any Error).self) { try decode(WantedPrimary.self, #"{"host":"beta","epoch":2,"id":1,"from":"alpha"}"#) }
        #expect(throws: (any Error).self) {
            try decode(HandoverState.self, #"{"id":1,"to":"beta","state":"sleeping"}"#)
        }
    }

    @Test func keys() {
        #expect(MetadataKeys.resource("vm1") == "resource/vm1")
        #expect(MetadataKeys.member("vm1", "beta") == "resource/vm1/member/beta")
        #expect(MetadataKeys.wantedPrimary("vm1") == "resource/vm1/wanted-primary")
        #expect(MetadataKeys.needsSync("vm1", "beta") == "resource/vm1/needs-sync/beta")
        #expect(MetadataKeys.host("beta") == "host/beta")
    }

    /// Which changes wake the role machines: the designation, the wanted primary, and a member's
    /// role fields; not positions, not other keys, not an unchanged value.
    @Test func roleKeyChanges() throws {
        let member = try decode(MemberEntry.self, Self.oldMember)
        var moved = member
        moved.fetchedLSN += 4096
        moved.updated += 1
        var sealed = member
        sealed.handover = HandoverState(id: 1, to: "beta", state: .sealed, finalLSN: 4096)
        var fenced = member
        fenced.fenced = FenceRecord(epoch: 2, by: "beta")
        var newEpoch = member
        newEpoch.epoch = 2
        var newRole = member
        newRole.role = "primary"
        let key = MetadataKeys.member("vm1", "alpha")
        let changed = { (old: String?, new: String?) in MetadataKeys.resourceWithChangedRole(key: key, old: old, new: new) }

        #expect(MetadataKeys.resourceWithChangedRole(key: "resource/vm1", old: nil, new: Self.oldResource) == "vm1")
        #expect(MetadataKeys.resourceWithChangedRole(key: "resource/vm1/wanted-primary", old: "{}", new: nil) == "vm1")
        #expect(MetadataKeys.resourceWithChangedRole(key: "resource/vm1", old: Self.oldResource, new: Self.oldResource) == nil)
        #expect(changed(Self.oldMember, try json(moved)) == nil)
        for role in [sealed, fenced, newEpoch, newRole] { #expect(changed(Self.oldMember, try json(role)) == "vm1") }
        #expect(changed(nil, Self.oldMember) == "vm1")
        #expect(changed(Self.oldMember, nil) == "vm1")
        #expect(MetadataKeys.resourceWithChangedRole(key: "resource/vm1/needs-sync/beta", old: nil, new: "x") == nil)
        #expect(MetadataKeys.resourceWithChangedRole(key: "host/beta", old: nil, new: "x") == nil)
        #expect(MetadataKeys.resourceWithChangedRole(key: "resource//member/x", old: nil, new: "x") == nil)
        #expect(MetadataKeys.resourceWithChangedRole(key: "resource/vm1/member/beta/extra", old: nil, new: "x") == nil)
    }
}
