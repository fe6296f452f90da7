import Cluster
import Testing

/// Inputs of the role machine for resource vm1 on alpha (primary at epoch 3), beta and gamma.
enum Fixture {
    static let now: UInt64 = 1_700_000_000_000
    static let id: UInt64 = 0xBEEF
    static let sealLSN: UInt64 = 81920
    static let sealSegment = "log-000000007-alpha"

    static func member(_ role: String, epoch: UInt64 = 3, handover: HandoverState? = nil) -> MemberEntry {
        MemberEntry(role: role, disk: "UpToDate", replication: "Replicating", fetchedLSN: 65536, replayedLSN: 65536, updated: now - 2000,
                    epoch: epoch, handover: handover)
    }

    static var members: [String: MemberEntry] {
        ["alpha": member("primary"), "beta": member("secondary"), "gamma": member("secondary")]
    }

    static func inputs(
        _ me: String, _ local: LocalRole, log: LogFacts = LogFacts(epoch: 3, endLSN: 65536, replayedLSN: 65536),
        designated: ResourceEntry? = ResourceEntry(size: 1 << 20, primary: "alpha", epoch: 3), wanted: WantedPrimary? = nil,
        members: [String: MemberEntry] = Fixture.members, command: RoleCommand? = nil, now: UInt64 = Fixture.now
    ) -> RoleInputs {
        RoleInputs(resource: "vm1", me: me, now: now, local: local, log: log, designated: designated, wanted: wanted, members: members, command: command)
    }

    static let primary = LocalRole(role: .primary)
    static let secondary = LocalRole(role: .secondary)
    static let request = WantedPrimary(host: "beta", epoch: 4, id: id, from: "alpha")
    static let ask = RoleCommand.primary(id: id, timeout: 300_000, ignoreSync: false, attach: false)

    static func becoming(_ phase: RoleTransition.Phase, finalLSN: UInt64? = nil, nextEpoch: UInt64 = 4) -> LocalRole {
        LocalRole(
            role: .secondary,
            transition: RoleTransition(kind: .becomingPrimary, peer: "alpha", id: id, epoch: 3, nextEpoch: nextEpoch, phase: phase, finalLSN: finalLSN,
                                       finalSegment: finalLSN.map { _ in sealSegment })
        )
    }

    static func handingOver(_ phase: RoleTransition.Phase) -> LocalRole {
        let sealed = phase == .sealed
        return LocalRole(
            role: sealed ? .secondary : .primary,
            transition: RoleTransition(kind: .handingOver, peer: "beta", id: id, epoch: 3, nextEpoch: 4, phase: phase,
                                       finalLSN: sealed ? sealLSN : nil, finalSegment: sealed ? sealSegment : nil)
        )
    }

    static var sealedAnswer: HandoverState {
        HandoverState(id: id, to: "beta", state: .sealed, nextEpoch: 4, finalLSN: sealLSN, finalSegment: sealSegment)
    }

    /// The member entries as beta sees them once alpha sealed.
    static var sealedMembers: [String: MemberEntry] {
        var members = Self.members
        members["alpha"] = member("secondary", handover: sealedAnswer)
        members["beta"] = member("becomingPrimary")
        return members
    }

    /// beta after it asked: its request is waiting, as after `ask`.
    static func askingMachine() -> RoleMachine {
        var machine = RoleMachine()
        _ = machine.step(inputs("beta", secondary, command: ask))
        return machine
    }
}

extension RoleAction {
    var published: MemberEntry? { if case .publish(let entry) = self { entry } else { nil } }
    var error: String? { if case .finish(_, .failure(let error)) = self { error.description } else { nil } }
    var success: String? { if case .finish(_, .success(let text)) = self { text } else { nil } }
}

@Suite("Role machine: planned handover")
struct RoleMachineTests {
    typealias F = Fixture

    // MARK: H1: the request and its preconditions

    @Test func aRequestPersistsItsTransitionThenAsks() {
        var machine = RoleMachine()
        let actions = machine.step(F.inputs("beta", F.secondary, command: F.ask))
        #expect(actions == [.persist(F.becoming(.waitingForSeal)), .setWanted(F.request), .push(to: ["alpha", "gamma"])])
        #expect(machine.waiting == [F.id: F.now + 300_000])
    }

    /// P1-P6 and the old primary's gossiped use: each refusal names the fix, and nothing is written.
    @Test(arguments: [
        ("down", "vm1 is down on this host: 'marsadm up vm1' first"),
        ("unsynced", "vm1 has no complete copy on this host yet (its initial sync is running): wait ('marsadm wait-resource vm1 --until uptodate'), then run 'marsadm primary vm1' again"),
        ("fork", "vm1 is in split brain here: repair first (marsadm view vm1)"),
        ("needsSync", "vm1 needs a new sync on this host (its primary let it go): 'marsadm invalidate vm1' first"),
        ("fetchPaused", "fetch of vm1 is paused on this host: 'marsadm resume-fetch vm1' first"),
        ("replayPaused", "replay of vm1 is paused on this host: 'marsadm resume-replay vm1' first"),
        ("noPrimary", "vm1 has no primary to take over from, so there is nothing to hand over: 'marsadm primary vm1 --force' makes this host primary with what it has"),
        ("nobody", "vm1 has no primary to take over from, so there is nothing to hand over: 'marsadm primary vm1 --force' makes this host primary with what it has"),
        ("designatedMe", "vm1 is being made primary on this host already (epoch 3): 'marsadm wait-resource vm1 --until primary'"),
        ("syncing", "gamma is syncing vm1: a handover would restart its sync. Wait ('marsadm wait-resource vm1 --until uptodate' there) or add --ignore-sync"),
        ("splitBrain", "gamma reports a split brain of vm1: repair it first (marsadm view vm1 there)"),
    ])
    func preconditionsRefuseWithTheFix(_ condition: String, _ message: String) {
        var inputs = F.inputs("beta", F.secondary, command: F.ask)
        switch condition {
        case "down": inputs.log.down = true
        case "unsynced": inputs.log.synced = false
        case "fork": inputs.log.fork = ForkState(lsn: 4096, with: "alpha")
        case "needsSync": inputs.log.needsSync = true
        case "fetchPaused": inputs.log.fetchPaused = true
        case "replayPaused": inputs.log.replayPaused = true
        case "noPrimary": inputs.designated = nil
        case "nobody": inputs.designated?.primary = ""
        case "designatedMe": inputs.designated?.primary = "beta"
        case "syncing": inputs.members["gamma"]?.replication = "Syncing"
        case "splitBrain": inputs.members["gamma"]?.fork = ForkState(lsn: nil, with: "alpha")
        default: Issue.record("unknown condition \(condition)")
        }
        var machine = RoleMachine()
        #expect(machine.step(inputs) == [.finish(commandID: F.id, result: .failure(RoleError(message)))])
        #expect(machine.waiting.isEmpty)
    }

    /// This host's own gossiped entry may still say Syncing a moment after its sync ended: its
    /// log facts decide for itself.
    @Test func theOwnGossipedEntryDoesNotRefuse() {
        var inputs = F.inputs("beta", F.secondary, command: F.ask)
        inputs.members["beta"]?.replication = "Syncing"
        inputs.members["beta"]?.disk = "SplitBrain"
        var machine = RoleMachine()
        let actions = machine.step(inputs)
        #expect(actions.contains { if case .setWanted(let wanted?) = $0 { wanted.host == "beta" } else { false } }, "\(actions)")
    }

    /// The old primary's gossiped use may be a round old: the request goes out, and the old
    /// primary, which sees its own use, decides (P7).
    @Test func theRequesterLeavesTheUseCheckToTheOldPrimary() {
        var inputs = F.inputs("beta", F.secondary, command: F.ask)
        inputs.members["alpha"]?.inUse = ["/dev/mars/vm1 (/dev/nbd0) is mounted on /srv"]
        var machine = RoleMachine()
        let actions = machine.step(inputs)
        #expect(actions.contains { if case .setWanted(let wanted?) = $0 { wanted.host == "beta" } else { false } }, "\(actions)")
        #expect(machine.waiting.keys.contains(F.id))
    }

    @Test func ignoreSyncAsksDespiteASyncingMember() {
        var inputs = F.inputs("beta", F.secondary, command: .primary(id: F.id, timeout: 1000, ignoreSync: true, attach: true))
        inputs.members["gamma"]?.replication = "PausedSync"
        var machine = RoleMachine()
        var expected = F.becoming(.waitingForSeal)
        expected.transition?.attach = true
        #expect(machine.step(inputs).first == .persist(expected))
    }

    @Test func onThePrimaryItIsAlreadyDone() {
        var machine = RoleMachine()
        #expect(machine.step(F.inputs("alpha", F.primary, command: F.ask)) == [.finish(commandID: F.id, result: .success("vm1 is already primary on this host (epoch 3)"))])
    }

    /// A restart between the transition and the key (§3.1): the key is written again, same id.
    @Test func aLostRequestKeyIsWrittenAgain() {
        var machine = RoleMachine()
        #expect(machine.step(F.inputs("beta", F.becoming(.waitingForSeal))) == [.setWanted(F.request), .push(to: ["alpha", "gamma"])])
        #expect(machine.step(F.inputs("beta", F.becoming(.waitingForSeal), wanted: F.request)) == [])
    }

    // MARK: H2-H5: the old primary

    @Test(arguments: ["use", "failure", "down"])
    func theOldPrimaryRefusesAndSaysWhy(_ problem: String) {
        var inputs = F.inputs("alpha", F.primary, wanted: F.request)
        let reason: String
        switch problem {
        case "use":
            inputs.use = ["/dev/nbd0 is mounted on /srv"]
            reason = "alpha refused the handover of vm1: /dev/nbd0 is mounted on /srv. Stop the guest/unmount there, then run 'marsadm primary vm1' again"
        case "failure":
            inputs.log.failure = "log segment write failed: EIO"
            reason = "alpha refused the handover of vm1: its log failed (log segment write failed: EIO); 'marsadm primary vm1 --force' on beta takes over with what beta has"
        default:
            inputs.log.down = true
            reason = "alpha refused the handover of vm1: it is going down there; 'marsadm up vm1' on alpha, then run 'marsadm primary vm1' again"
        }
        var machine = RoleMachine()
        let actions = machine.step(inputs)
        #expect(actions.count == 2 && actions.last == .push(to: ["beta"]))
        #expect(actions.first?.published?.handover == HandoverState(id: F.id, to: "beta", state: .refused, reason: reason))
        #expect(actions.first?.published?.role == "primary")
        // Level-triggered: once gossiped, the same inputs ask for nothing more.
        inputs.members["alpha"] = actions.first?.published
        #expect(machine.step(inputs) == [])
        // Final for that request, even once the problem is gone: its requester gives up on it.
        inputs.use = []
        inputs.log.failure = nil
        inputs.log.down = false
        #expect(machine.step(inputs) == [])
    }

    @Test func theOldPrimaryClosesDetachesAndSeals() {
        var inputs = F.inputs("alpha", F.primary, wanted: F.request)
        inputs.attached = true
        var machine = RoleMachine()
        let actions = machine.step(inputs)
        var closing = F.handingOver(.closing)
        closing.transition?.attach = true
        #expect(actions.count == 5)
        #expect(actions.first == .persist(closing))
        #expect(actions[1].published?.handover == HandoverState(id: F.id, to: "beta", state: .draining, nextEpoch: 4))
        #expect(actions[1].published?.role == "handingOver")
        #expect(Array(actions.dropFirst(2)) == [.detachDevice, .closeExport(reason: "vm1 is being handed over to beta"), .seal(nextEpoch: 4)])
    }

    /// A request for an epoch it has already, or for another primary, is not its business.
    @Test func staleOrForeignRequestsAreIgnored() {
        var machine = RoleMachine()
        var stale = F.request
        stale.epoch = 3
        var foreign = F.request
        foreign.from = "gamma"
        for wanted in [stale, foreign] { #expect(machine.step(F.inputs("alpha", F.primary, wanted: wanted)) == []) }
    }

    /// A restart between closing and a durable seal: the export stays closed and it seals again.
    @Test func closingResumesTheSeal() {
        var machine = RoleMachine()
        var inputs = F.inputs("alpha", F.handingOver(.closing), wanted: F.request)
        inputs.members["alpha"]?.role = "handingOver"
        #expect(machine.step(inputs) == [.detachDevice, .closeExport(reason: "vm1 is being handed over to beta"), .seal(nextEpoch: 4)])
    }

    /// The detach refused because a user appeared since the check: nothing changed, refuse.
    @Test func aUserAppearingWhileClosingEndsTheHandover() {
        var machine = RoleMachine()
        var inputs = F.inputs("alpha", F.handingOver(.closing), wanted: F.request)
        inputs.use = ["/dev/nbd0 is open by qemu-system-x86 (pid 4242)"]
        let actions = machine.step(inputs)
        #expect(Array(actions.prefix(2)) == [.persist(F.primary), .openExport])
        #expect(actions[2].published?.handover?.state == .refused)
        #expect(actions[2].published?.handover?.reason?.hasPrefix("alpha refused the handover of vm1: /dev/nbd0 is open by qemu") == true)
        #expect(actions.last == .push(to: ["beta"]))
    }

    @Test func aDurableSealConvertsAndAnswers() {
        var machine = RoleMachine()
        var inputs = F.inputs("alpha", F.handingOver(.closing), wanted: F.request)
        inputs.log.sealedAt = F.sealLSN
        inputs.log.sealSegment = F.sealSegment
        let actions = machine.step(inputs)
        #expect(Array(actions.prefix(2)) == [.persist(F.handingOver(.sealed)), .convertToReplica(finalLSN: F.sealLSN, segment: F.sealSegment, epoch: 3)])
        #expect(actions[2].published?.handover == F.sealedAnswer)
        #expect(actions[2].published?.role == "secondary")
        #expect(actions.last == .push(to: ["beta"]))
    }

    /// H8: the sealed host fetches once the designation names the new primary.
    @Test func theSealedHostFollowsTheNewPrimary() {
        var machine = RoleMachine()
        var members = F.sealedMembers
        members["alpha"]?.role = "secondary"
        let designated = ResourceEntry(size: 1 << 20, primary: "beta", epoch: 4)
        #expect(machine.step(F.inputs("alpha", F.handingOver(.sealed), designated: F.inputs("x", F.primary).designated, wanted: F.request, members: members)) == [])
        let actions = machine.step(F.inputs("alpha", F.handingOver(.sealed), designated: designated, members: members))
        #expect(Array(actions.prefix(2)) == [.persist(F.secondary), .startFetch])
        #expect(actions.last?.published?.handover == nil)
    }

    // MARK: H6-H7: the new primary

    @Test func theSealStartsTheReplayAndTheReplayThePromotion() {
        var machine = F.askingMachine()
        var inputs = F.inputs("beta", F.becoming(.waitingForSeal), wanted: F.request, members: F.sealedMembers)
        inputs.log.endLSN = 73728
        inputs.log.replayedLSN = 73728
        #expect(machine.step(inputs) == [.persist(F.becoming(.replaying, finalLSN: F.sealLSN))])
        inputs.local = F.becoming(.replaying, finalLSN: F.sealLSN)
        inputs.log.endLSN = F.sealLSN
        inputs.log.sealedAt = F.sealLSN
        #expect(machine.step(inputs) == [], "fetched the seal, replay not there yet")
        inputs.log.replayedLSN = F.sealLSN
        let actions = machine.step(inputs)
        #expect(Array(actions.prefix(6)) == [
            .persist(F.becoming(.promoting, finalLSN: F.sealLSN)), .stopFetch, .promote(epoch: 4), .setDesignated(epoch: 4), .openExport,
            .persist(F.primary),
        ])
        #expect(actions[6] == .setWanted(nil))
        #expect(actions[7].published?.role == "primary" && actions[7].published?.epoch == 4)
        #expect(actions[8] == .push(to: ["alpha", "gamma"]))
        #expect(actions[9] == .finish(commandID: F.id, result: .success("vm1 is primary on this host at epoch 4 from LSN 81920")))
        #expect(machine.waiting.isEmpty)
    }

    /// A seal the old primary made for another request is not this one's to replay to.
    @Test func aSealForAnotherRequestIsNotOurs() {
        var members = F.sealedMembers
        members["alpha"]?.handover?.id = 7
        members["alpha"]?.handover?.nextEpoch = 3
        let inputs = F.inputs("beta", F.becoming(.waitingForSeal), log: LogFacts(epoch: 3, endLSN: F.sealLSN, replayedLSN: F.sealLSN, sealedAt: F.sealLSN), wanted: F.request, members: members)
        #expect(RoleMachine().stepped(inputs) == [])
    }

    /// A promotion never starts below the seal: a replay short of it, or a log without the seal, waits.
    @Test func noPromotionBelowTheSeal() {
        var machine = RoleMachine()
        var inputs = F.inputs("beta", F.becoming(.replaying, finalLSN: F.sealLSN), wanted: F.request, members: F.sealedMembers)
        inputs.log.endLSN = F.sealLSN
        inputs.log.replayedLSN = F.sealLSN - 4096
        inputs.log.sealedAt = F.sealLSN
        #expect(machine.step(inputs) == [])
        inputs.log.replayedLSN = F.sealLSN
        inputs.log.sealedAt = nil
        #expect(machine.step(inputs) == [])
    }

    /// A device the old primary detached is attached on the new one, after its role is stored as
    /// primary (the daemon gives only a primary a local device).
    @Test func aDetachedDeviceMovesWithThePrimary() {
        var machine = RoleMachine()
        var members = F.sealedMembers
        members["alpha"]?.handover?.detached = true
        var inputs = F.inputs("beta", F.becoming(.waitingForSeal), log: LogFacts(epoch: 3, endLSN: F.sealLSN, replayedLSN: F.sealLSN, sealedAt: F.sealLSN), wanted: F.request, members: members)
        let actions = machine.step(inputs)
        var replaying = F.becoming(.replaying, finalLSN: F.sealLSN)
        replaying.transition?.attach = true
        #expect(actions.first == .persist(replaying))
        let attachAt = actions.firstIndex(of: .attachDevice)
        let primaryAt = actions.firstIndex(of: .persist(LocalRole(role: .primary)))
        #expect(attachAt != nil && primaryAt != nil && primaryAt! < attachAt!, "\(actions)")
        inputs.local = F.secondary
        #expect(!RoleMachine().stepped(inputs).contains(.attachDevice))
    }

    @Test func aHistoryPastTheSealIsAFork() {
        var machine = F.askingMachine()
        var inputs = F.inputs("beta", F.becoming(.replaying, finalLSN: F.sealLSN), wanted: F.request, members: F.sealedMembers)
        inputs.log.endLSN = F.sealLSN + 4096
        let actions = machine.step(inputs)
        #expect(Array(actions.prefix(3)) == [.persist(F.secondary), .setWanted(nil), .push(to: ["alpha", "gamma"])])
        #expect(actions.last?.error == "this host's log of vm1 goes on past the seal of alpha at LSN 81920 (to 86016): the histories fork; see 'marsadm view vm1'")
    }

    /// A restart in promoting (§3.1) finishes the promotion; `promote` is idempotent in the driver.
    @Test func promotingResumes() {
        var machine = RoleMachine()
        let actions = machine.step(F.inputs("beta", F.becoming(.promoting, finalLSN: F.sealLSN), wanted: F.request, members: F.sealedMembers))
        #expect(Array(actions.prefix(4)) == [.stopFetch, .promote(epoch: 4), .setDesignated(epoch: 4), .openExport])
    }

    /// A restart after resource.json but before resource/N: the designation must name it at its epoch.
    @Test func aPrimaryWritesTheDesignationAtItsEpoch() {
        var machine = RoleMachine()
        var members = F.members
        members["beta"] = F.member("primary", epoch: 4)
        let inputs = F.inputs("beta", F.primary, log: LogFacts(epoch: 4, endLSN: 90000, replayedLSN: 90000), wanted: F.request, members: members)
        #expect(machine.step(inputs) == [.setDesignated(epoch: 4), .push(to: ["alpha", "gamma"])])
    }

    // MARK: Ends other than a promotion

    @Test func aRefusalEndsTheRequest() {
        var machine = F.askingMachine()
        var members = F.members
        members["alpha"]?.handover = HandoverState(id: F.id, to: "beta", state: .refused, reason: "alpha refused the handover of vm1: in use")
        let actions = machine.step(F.inputs("beta", F.becoming(.waitingForSeal), wanted: F.request, members: members))
        #expect(actions == [
            .persist(F.secondary), .setWanted(nil), .push(to: ["alpha", "gamma"]),
            .finish(commandID: F.id, result: .failure(RoleError("alpha refused the handover of vm1: in use"))),
        ])
        // A refusal of another request is not ours.
        members["alpha"]?.handover?.id = 7
        #expect(RoleMachine().stepped(F.inputs("beta", F.becoming(.waitingForSeal), wanted: F.request, members: members)) == [])
    }

    @Test func anotherRequestWins() {
        var machine = F.askingMachine()
        let gamma = WantedPrimary(host: "gamma", epoch: 4, id: 9, from: "alpha")
        let actions = machine.step(F.inputs("beta", F.becoming(.replaying, finalLSN: F.sealLSN), wanted: gamma, members: F.sealedMembers))
        #expect(actions == [
            .persist(F.secondary),
            .finish(commandID: F.id, result: .failure(RoleError("gamma asked to become primary of vm1 after this host; its request wins. Nothing changed here"))),
        ])
    }

    @Test func aMovedDesignationEndsTheRequest() {
        var machine = RoleMachine()
        let designated = ResourceEntry(size: 1 << 20, primary: "alpha", epoch: 5)
        var machineWaiting = F.askingMachine()
        let actions = machineWaiting.step(F.inputs("beta", F.becoming(.waitingForSeal), designated: designated, wanted: F.request))
        #expect(Array(actions.prefix(3)) == [.persist(F.secondary), .setWanted(nil), .push(to: ["alpha", "gamma"])])
        #expect(actions.last?.error == "the primary of vm1 changed to alpha (epoch 5) while this host waited; nothing changed here: run 'marsadm primary vm1' again to take over from alpha")
        #expect(machine.step(F.inputs("beta", F.becoming(.waitingForSeal), designated: designated, wanted: F.request)).count == 3, "nobody waits: no answer")
    }

    /// A fork found while replaying towards the seal ends the request; the seal can never be reached.
    @Test func aForkWhileReplayingEndsTheRequest() {
        var machine = F.askingMachine()
        var inputs = F.inputs("beta", F.becoming(.replaying, finalLSN: F.sealLSN), wanted: F.request, members: F.sealedMembers)
        inputs.log.fork = ForkState(lsn: 73728, with: "alpha")
        #expect(machine.step(inputs).last?.error == "vm1 is in split brain here (its history forks from alpha's): repair first (marsadm view vm1)")
    }

    /// Commands in states that cannot take them say why and what to do.
    @Test func aCommandWhileHandingOverOrFencedIsRefused() {
        #expect(RoleMachine().stepped(F.inputs("alpha", F.handingOver(.closing), wanted: F.request, command: F.ask)).first?.error
            == "this host is handing vm1 over to beta: wait until beta is primary, then run 'marsadm primary vm1' here again")
        let fenced = LocalRole(role: .primary, fenced: FenceRecord(epoch: 5, by: "gamma"))
        var machine = RoleMachine()
        #expect(machine.step(F.inputs("beta", fenced, command: F.ask)) == [.finish(commandID: F.id, result: .failure(RoleError(
            "vm1 is fenced on this host: gamma is primary at epoch 5, and what this host wrote since is a split brain: repair first (marsadm view vm1)"
        )))])
        #expect(machine.waiting.isEmpty)
    }

    @Test func withdrawal() {
        var machine = F.askingMachine()
        let actions = machine.step(F.inputs("beta", F.becoming(.waitingForSeal), wanted: F.request, command: .secondary(id: 5)))
        #expect(actions == [
            .persist(F.secondary), .setWanted(nil), .push(to: ["alpha", "gamma"]),
            .finish(commandID: F.id, result: .failure(RoleError("the request to become primary of vm1 was withdrawn ('marsadm secondary vm1')"))),
            .finish(commandID: 5, result: .success("withdrew this host's request to become primary of vm1; alpha stays primary")),
        ])
        #expect(RoleMachine().stepped(F.inputs("gamma", F.secondary, command: .secondary(id: 5)))
            == [.finish(commandID: 5, result: .success("vm1 is secondary on this host; no request to withdraw"))])
        #expect(RoleMachine().stepped(F.inputs("alpha", F.primary, command: .secondary(id: 5)))
            == [.finish(commandID: 5, result: .failure(RoleError("this host is primary of vm1: to make another host primary, run 'marsadm primary vm1' there")))])
        #expect(RoleMachine().stepped(F.inputs("beta", F.becoming(.promoting, finalLSN: F.sealLSN), command: .secondary(id: 5))).first?.error
            == "vm1 is being promoted on this host: too late to withdraw; hand it back with 'marsadm primary vm1' on alpha")
    }

    /// The new primary never came: the sealed old primary takes over again past the promised epoch.
    @Test func retakeSkipsThePromisedEpoch() {
        var machine = RoleMachine()
        let actions = machine.step(F.inputs("alpha", F.handingOver(.sealed), wanted: F.request, command: F.ask))
        let retaking = LocalRole(role: .secondary, transition: RoleTransition(
            kind: .becomingPrimary, peer: "alpha", id: F.id, epoch: 3, nextEpoch: 5, phase: .promoting, finalLSN: F.sealLSN, finalSegment: F.sealSegment
        ))
        #expect(Array(actions.prefix(6)) == [.persist(retaking), .stopFetch, .promote(epoch: 5), .setDesignated(epoch: 5), .openExport, .persist(F.primary)])
        #expect(actions.last?.success == "vm1 is primary on this host at epoch 5 from LSN 81920")
        // The request key may be gone (gossip lost it, or the requester withdrew): the seal's promise alone is skipped.
        #expect(RoleMachine().stepped(F.inputs("alpha", F.handingOver(.sealed), command: F.ask)).contains(.promote(epoch: 5)))
    }

    /// Another host asks the sealed old primary (its first requester died): it asks above the
    /// promised epoch, the sealed host answers at once at that epoch.
    @Test func aLaterRequestAsksAboveThePromise() {
        var machine = RoleMachine()
        let actions = machine.step(F.inputs("gamma", F.secondary, members: F.sealedMembers, command: .primary(id: 9, timeout: 1000, ignoreSync: false, attach: false)))
        let gammaRequest = WantedPrimary(host: "gamma", epoch: 5, id: 9, from: "alpha")
        #expect(actions.dropFirst().first == .setWanted(gammaRequest))

        var members = F.sealedMembers
        members["alpha"]?.role = "secondary"
        let answer = RoleMachine().stepped(F.inputs("alpha", F.handingOver(.sealed), wanted: gammaRequest, members: members))
        #expect(answer.count == 3)
        #expect(answer[1].published?.handover == HandoverState(id: 9, to: "gamma", state: .sealed, nextEpoch: 5, finalLSN: F.sealLSN, finalSegment: F.sealSegment))
        // An equal epoch is never promised twice.
        var equal = gammaRequest
        equal.epoch = 4
        #expect(RoleMachine().stepped(F.inputs("alpha", F.handingOver(.sealed), wanted: equal, members: members)).allSatisfy { $0.published?.handover?.id != 9 })
        // A request that raced the seal for another asks again, above it.
        var raced = F.becoming(.waitingForSeal)
        raced.transition?.id = 9
        let again = RoleMachine().stepped(F.inputs("gamma", raced, wanted: WantedPrimary(host: "gamma", epoch: 4, id: 9, from: "alpha"), members: F.sealedMembers))
        #expect(again.dropFirst().first == .setWanted(gammaRequest))
    }

    @Test func aSecondarySwitchesItsSourceWhenTheDesignationMoves() {
        var machine = RoleMachine()
        var members = F.members
        members["gamma"]?.role = "secondary"
        var fetching = LogFacts(epoch: 3, endLSN: 90000, replayedLSN: 90000, fetchingFrom: "alpha")
        #expect(machine.step(F.inputs("gamma", F.secondary, log: fetching, members: members)) == [])
        let moved = ResourceEntry(size: 1 << 20, primary: "beta", epoch: 4)
        // Also on the first step of a machine: what counts is whom the fetcher fetches for.
        var fresh = RoleMachine()
        #expect(fresh.step(F.inputs("gamma", F.secondary, log: fetching, designated: moved, members: members)) == [.switchFetchSource])
        fetching.fetchingFrom = "beta"
        #expect(machine.step(F.inputs("gamma", F.secondary, log: fetching, designated: moved, members: members)) == [])
        fetching.fetchingFrom = nil
        #expect(machine.step(F.inputs("gamma", F.secondary, log: fetching, designated: moved, members: members)) == [], "a stopped fetcher is not switched")
    }

    /// F1: a primary that sees a newer designation stops admitting.
    @Test func aNewerDesignationFencesThePrimary() {
        var machine = RoleMachine()
        let newer = ResourceEntry(size: 1 << 20, primary: "gamma", epoch: 5)
        let actions = machine.step(F.inputs("beta", F.primary, log: LogFacts(epoch: 4, endLSN: 90000, replayedLSN: 90000), designated: newer))
        let fenced = LocalRole(role: .primary, fenced: FenceRecord(epoch: 5, by: "gamma"))
        #expect(Array(actions.prefix(3)) == [.fence(epoch: 5, by: "gamma"), .closeExport(reason: "fenced: gamma is primary of vm1 at epoch 5"), .persist(fenced)])
        #expect(actions.last?.published?.role == "fenced")
    }

    /// F2: another host promoted to this epoch with a newer clock (the designation is newest-wins).
    @Test func anEqualEpochDesignationOfAnotherHostFencesToo() {
        let other = ResourceEntry(size: 1 << 20, primary: "gamma", epoch: 4)
        let actions = RoleMachine().stepped(F.inputs("beta", F.primary, log: LogFacts(epoch: 4, endLSN: 90000, replayedLSN: 90000), designated: other))
        #expect(actions.first == .fence(epoch: 4, by: "gamma"))
    }

    // MARK: The command's wait

    @Test func aTimeoutAnswersOnceAndTheRequestStays() {
        var machine = F.askingMachine()
        let waiting = F.inputs("beta", F.becoming(.waitingForSeal), wanted: F.request, now: F.now + 299_999)
        #expect(machine.step(waiting) == [])
        var late = waiting
        late.now = F.now + 300_000
        #expect(machine.step(late) == [.finish(commandID: F.id, result: .failure(RoleError(
            "alpha (primary of vm1, epoch 3) has not sealed vm1 yet (last heard 302 s ago). The request stays: this host takes over as soon as it holds the seal. 'marsadm secondary vm1' withdraws it"
        )))])
        #expect(machine.step(late) == [])
        // A second command joins the pending request.
        late.command = F.ask
        #expect(machine.step(late) == [])
        #expect(machine.waiting.count == 1)
    }

    @Test func aTimeoutWhileReplayingSaysHowFar() {
        var machine = F.askingMachine()
        var inputs = F.inputs("beta", F.becoming(.replaying, finalLSN: F.sealLSN), wanted: F.request, members: F.sealedMembers, now: F.now + 400_000)
        inputs.log.endLSN = 77824
        inputs.log.replayedLSN = 73728
        #expect(machine.step(inputs).first?.error?.hasPrefix("alpha sealed vm1 at LSN 81920; this host has replayed to 73728 and fetched to 77824") == true)
    }
}

extension RoleMachine {
    /// One step of a fresh machine (no command waiting).
    func stepped(_ inputs: RoleInputs) -> [RoleAction] {
        var machine = self
        return machine.step(inputs)
    }
}
