/// The role state machine of one resource on one host (docs/handover.md §2): planned handover
/// (`marsadm primary` on the new primary), its refusal, the seal, the conversion of both hosts,
/// withdrawal and retake. Pure value code: inputs in, actions out, no clocks or sockets inside;
/// the driver (ResourceManager+Roles) samples the inputs and executes the actions in order.
///
/// Level-triggered: each step compares the persisted role, the log and the gossiped keys, and
/// emits only what brings them in line. A step on unchanged inputs emits nothing new, and a
/// restart rebuilds everything that matters from the persisted inputs (§3.1).

/// The log facts and local switches a role decision needs (Cluster cannot see LogEngine).
public struct LogFacts: Sendable, Equatable {
    /// The epoch of the local history at its end.
    public var epoch: UInt64
    /// Primary: the durable end of its log. Replica: the end of the whole records it fetched.
    public var endLSN: UInt64
    /// Where the data device is (writeback on a primary, replay on a replica).
    public var replayedLSN: UInt64
    /// The log ends with a seal record that ends here.
    public var sealedAt: UInt64?
    /// The segment holding that seal.
    public var sealSegment: String?
    /// Why the log cannot go on (`LogEngineStatus.failure` / the replica's), nil when healthy.
    public var failure: String?
    /// A fork this host found against another history (split brain).
    public var fork: ForkState?
    /// The initial sync is done (`SyncRecord.endLSN` set; a primary is synced).
    public var synced: Bool
    /// The primary let this member go (`needs-sync` key): only a new sync brings it back.
    public var needsSync: Bool
    public var fetchPaused: Bool
    public var replayPaused: Bool
    /// The resource is down here, or going down (`marsadm down`).
    public var down: Bool
    /// Replica: the primary its fetcher last connected for; nil while it does not fetch.
    public var fetchingFrom: String?

    public init(
        epoch: UInt64, endLSN: UInt64, replayedLSN: UInt64, sealedAt: UInt64? = nil, sealSegment: String? = nil, failure: String? = nil,
        fork: ForkState? = nil, synced: Bool = true, needsSync: Bool = false, fetchPaused: Bool = false, replayPaused: Bool = false,
        down: Bool = false, fetchingFrom: String? = nil
    ) {
        self.fetchingFrom = fetchingFrom
        self.epoch = epoch
        self.endLSN = endLSN
        self.replayedLSN = replayedLSN
        self.sealedAt = sealedAt
        self.sealSegment = sealSegment
        self.failure = failure
        self.fork = fork
        self.synced = synced
        self.needsSync = needsSync
        self.fetchPaused = fetchPaused
        self.replayPaused = replayPaused
        self.down = down
    }
}

/// A role change under way, persisted in resource.json so a restart resumes it (§3.1).
public struct RoleTransition: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        /// The old primary, handing over to `peer`.
        case handingOver
        /// The new primary, taking over from `peer`.
        case becomingPrimary
    }

    public enum Phase: String, Codable, Sendable {
        /// handingOver: export closed, the seal being written.
        case closing
        /// handingOver: the log ends with the seal at `finalLSN`; this host is a replica now.
        case sealed
        /// becomingPrimary: the request is out, the old primary has not sealed yet.
        case waitingForSeal
        /// becomingPrimary: fetching and replaying up to exactly `finalLSN`.
        case replaying
        /// becomingPrimary: the new epoch's segment is being started.
        case promoting
    }

    public var kind: Kind
    /// handingOver: the new primary; becomingPrimary: the old one.
    public var peer: String
    /// The request's id (`WantedPrimary.id`).
    public var id: UInt64
    /// The epoch being ended.
    public var epoch: UInt64
    /// The epoch promised to the new primary.
    public var nextEpoch: UInt64
    public var phase: Phase
    /// The end of the seal record (from `sealed` and `replaying` on).
    public var finalLSN: UInt64?
    public var finalSegment: String?
    /// becomingPrimary: attach a kernel device once primary (`--attach`, or the old primary had one).
    public var attach: Bool?

    public init(
        kind: Kind, peer: String, id: UInt64, epoch: UInt64, nextEpoch: UInt64, phase: Phase, finalLSN: UInt64? = nil,
        finalSegment: String? = nil, attach: Bool? = nil
    ) {
        self.kind = kind
        self.peer = peer
        self.id = id
        self.epoch = epoch
        self.nextEpoch = nextEpoch
        self.phase = phase
        self.finalLSN = finalLSN
        self.finalSegment = finalSegment
        self.attach = attach
    }
}

/// The persisted role of one resource on this host (resource.json): which log class opens the
/// directory, the transition under way, and a fence.
public struct LocalRole: Codable, Sendable, Equatable {
    public enum Role: String, Codable, Sendable {
        case primary, secondary
    }

    public var role: Role
    public var transition: RoleTransition?
    public var fenced: FenceRecord?

    public init(role: Role, transition: RoleTransition? = nil, fenced: FenceRecord? = nil) {
        self.role = role
        self.transition = transition
        self.fenced = fenced
    }

    /// The role other hosts see in `MemberEntry.role`.
    public var viewName: String {
        if fenced != nil { return "fenced" }
        switch transition?.kind {
        case .handingOver? where role == .primary: return "handingOver"
        case .becomingPrimary?: return "becomingPrimary"
        default: return role.rawValue
        }
    }
}

/// A control command for the machine, given in the one step after it arrived.
public enum RoleCommand: Sendable, Equatable {
    /// `marsadm primary NAME` here (planned). `id` is random (the driver's), names the request
    /// and the waiting command. `timeout`: ms until the command answers with what it waits for
    /// (the request stays).
    case primary(id: UInt64, timeout: UInt64, ignoreSync: Bool, attach: Bool)
    /// `marsadm secondary NAME` here: withdraws a pending request of this host.
    case secondary(id: UInt64)
}

/// Why a role command failed, in words that say what to do next.
public struct RoleError: Error, Codable, Sendable, Equatable, CustomStringConvertible {
    public let description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// Everything one decision needs, sampled by the driver.
public struct RoleInputs: Sendable, Equatable {
    public var resource: String
    public var me: String
    /// Wall clock in ms, for timeouts only.
    public var now: UInt64
    /// From resource.json.
    public var local: LocalRole
    public var log: LogFacts
    /// What keeps the resource busy here: device users of its /dev/nbdN and NBD connections
    /// other than the attached device's own, each in words ("/dev/nbd0 is mounted on /srv").
    public var use: [String]
    /// A kernel device of the resource is attached here (marsadm attach).
    public var attached: Bool
    /// `resource/N`.
    public var designated: ResourceEntry?
    /// `resource/N/wanted-primary`.
    public var wanted: WantedPrimary?
    /// `resource/N/member/*`, this host's own entry included.
    public var members: [String: MemberEntry]
    /// The command that arrived since the last step, if any.
    public var command: RoleCommand?

    public init(
        resource: String, me: String, now: UInt64, local: LocalRole, log: LogFacts, use: [String] = [], attached: Bool = false, designated: ResourceEntry?,
        wanted: WantedPrimary? = nil, members: [String: MemberEntry] = [:], command: RoleCommand? = nil
    ) {
        self.resource = resource
        self.me = me
        self.now = now
        self.local = local
        self.log = log
        self.use = use
        self.attached = attached
        self.designated = designated
        self.wanted = wanted
        self.members = members
        self.command = command
    }
}

/// What the driver does, in the order given. Each action is idempotent: a restart may repeat it.
public enum RoleAction: Sendable, Equatable {
    /// Store this role in resource.json, durably, before the next action.
    case persist(LocalRole)
    /// Write this host's member key (positions as known to the machine; the driver refreshes them).
    case publish(MemberEntry)
    /// Write `resource/N` naming this host at `epoch` (size and pending resize kept).
    case setDesignated(epoch: UInt64)
    /// Write `resource/N/wanted-primary` (nil: delete it).
    case setWanted(WantedPrimary?)
    /// Remove the export; clients that ask later are told `reason`.
    case closeExport(reason: String)
    case openExport
    /// Detach the kernel device of the resource, refusing (not forcing) while it is in use. When
    /// that fails, the driver stops executing this step's actions; the next step sees the user.
    case detachDevice
    case attachDevice
    /// Seal the primary's log: admission ends, the seal record promises `nextEpoch`, the log's
    /// last record is the seal. Afterwards `LogFacts.sealedAt` is its end.
    case seal(nextEpoch: UInt64)
    /// Stop admitting writes: `by` is primary at the newer `epoch`.
    case fence(epoch: UInt64, by: String)
    /// Close the primary's (sealed) log and open the directory as a replica at the seal.
    case convertToReplica(finalLSN: UInt64, segment: String, epoch: UInt64)
    /// Close the replica and open the directory as the primary's log, starting `epoch` at its end.
    case promote(epoch: UInt64)
    case startFetch
    case stopFetch
    /// The designated primary changed: fetch from the new one.
    case switchFetchSource
    /// Gossip with these hosts now, not at the next round.
    case push(to: [String])
    /// Answer the waiting control command `commandID` (none waits after a restart: ignore it).
    case finish(commandID: UInt64, result: Result<String, RoleError>)
}

/// One resource's role machine on one host.
public struct RoleMachine: Sendable {
    /// Control commands waiting for an answer: id → deadline (ms). Not persisted: after a restart
    /// nobody waits, while the request itself lives on in the persisted state and the keys.
    public private(set) var waiting: [UInt64: UInt64] = [:]

    public init() {}

    /// The actions that bring the local state in line with `inputs`.
    public mutating func step(_ inputs: RoleInputs) -> [RoleAction] {
        var step = Step(inputs)
        if let command = inputs.command { take(command, &step) }
        if step.actions.isEmpty { advance(&step) }
        expireWaiters(&step)
        return step.actions
    }

    /// One step's view of the inputs, and the actions it collects.
    struct Step {
        let inputs: RoleInputs
        var actions: [RoleAction] = []
        init(_ inputs: RoleInputs) { self.inputs = inputs }

        var resource: String { inputs.resource }
        var me: String { inputs.me }
        var local: LocalRole { inputs.local }
        var designatedEpoch: UInt64 { inputs.designated?.epoch ?? 0 }
        var others: [String] { inputs.members.keys.filter { $0 != inputs.me }.sorted() }
        var ownEntry: MemberEntry {
            inputs.members[inputs.me]
                ?? MemberEntry(role: local.viewName, disk: "", replication: "", fetchedLSN: inputs.log.endLSN,
                               replayedLSN: inputs.log.replayedLSN, updated: inputs.now)
        }

        /// Publishes this host's role fields when they differ from its gossiped entry.
        mutating func publish(role: LocalRole, epoch: UInt64, handover: HandoverState?, pushTo hosts: [String] = []) {
            var entry = ownEntry
            entry.role = role.viewName
            entry.epoch = epoch
            entry.handover = handover
            entry.fenced = role.fenced
            if let current = inputs.members[me], current.sameRole(as: entry) { return }
            actions.append(.publish(entry))
            if !hosts.isEmpty { actions.append(.push(to: hosts)) }
        }
    }

    // MARK: - Commands

    private mutating func take(_ command: RoleCommand, _ step: inout Step) {
        switch command {
        case .primary(let id, let timeout, let ignoreSync, let attach):
            requestPrimary(id: id, deadline: step.inputs.now &+ timeout, ignoreSync: ignoreSync, attach: attach, &step)
        case .secondary(let id):
            withdraw(id: id, &step)
        }
    }

    private mutating func requestPrimary(id: UInt64, deadline: UInt64, ignoreSync: Bool, attach: Bool, _ step: inout Step) {
        let resource = step.resource
        let local = step.local
        switch (local.role, local.transition?.kind, local.transition?.phase) {
        case (.primary, nil, _) where local.fenced == nil:
            step.actions.append(.finish(commandID: id, result: .success("\(resource) is already primary on this host (epoch \(step.inputs.log.epoch))")))
        case (.primary, _, _) where local.fenced != nil:
            let fence = local.fenced!
            step.actions.append(
                .finish(commandID: id, result: .failure(RoleError("\(resource) is fenced on this host: \(fence.by) is primary at epoch \(fence.epoch), and what this host wrote since is a split brain: repair first (marsadm view \(resource))")))
            )
        case (_, .becomingPrimary?, _):
            // The request is out already: this command waits for it too.
            waiting[id] = deadline
        case (.primary, .handingOver?, _):
            let peer = local.transition!.peer
            step.actions.append(
                .finish(commandID: id, result: .failure(RoleError("this host is handing \(resource) over to \(peer): wait until \(peer) is primary, then run 'marsadm primary \(resource)' here again")))
            )
        case (.secondary, .handingOver?, .sealed?):
            retake(id: id, deadline: deadline, attach: attach, &step)
        default:
            if let refusal = Self.plannedRefusal(step.inputs, ignoreSync: ignoreSync) {
                step.actions.append(.finish(commandID: id, result: .failure(refusal)))
                return
            }
            let designated = step.inputs.designated!
            let promised = step.inputs.members[designated.primary]?.handover.flatMap { $0.state == .refused ? nil : $0.nextEpoch } ?? 0
            let transition = RoleTransition(
                kind: .becomingPrimary, peer: designated.primary, id: id, epoch: designated.epoch,
                nextEpoch: max(designated.epoch, promised) + 1, phase: .waitingForSeal, attach: attach ? true : nil
            )
            waiting[id] = deadline
            step.actions += [
                .persist(LocalRole(role: .secondary, transition: transition)),
                .setWanted(WantedPrimary(host: step.me, epoch: transition.nextEpoch, id: id, from: designated.primary)),
                .push(to: step.others),
            ]
        }
    }

    /// P1-P6 of a planned request (§2.2, §3 H1).
    static func plannedRefusal(_ inputs: RoleInputs, ignoreSync: Bool) -> RoleError? {
        let resource = inputs.resource
        let log = inputs.log
        if log.down { return RoleError("\(resource) is down on this host: 'marsadm up \(resource)' first") }
        if !log.synced {
            return RoleError(
                "\(resource) has no complete copy on this host yet (its initial sync is running): wait ('marsadm wait-resource \(resource) --until uptodate'), then run 'marsadm primary \(resource)' again"
            )
        }
        if log.fork != nil { return RoleError("\(resource) is in split brain here: repair first (marsadm view \(resource))") }
        if log.needsSync {
            return RoleError("\(resource) needs a new sync on this host (its primary let it go): 'marsadm invalidate \(resource)' first")
        }
        if log.fetchPaused { return RoleError("fetch of \(resource) is paused on this host: 'marsadm resume-fetch \(resource)' first") }
        if log.replayPaused { return RoleError("replay of \(resource) is paused on this host: 'marsadm resume-replay \(resource)' first") }
        guard let designated = inputs.designated, !designated.primary.isEmpty else {
            return RoleError("\(resource) has no primary to take over from, so there is nothing to hand over: 'marsadm primary \(resource) --force' makes this host primary with what it has")
        }
        if designated.primary == inputs.me {
            return RoleError("\(resource) is being made primary on this host already (epoch \(designated.epoch)): 'marsadm wait-resource \(resource) --until primary'")
        }
        // This host's own state comes from its log (P1, P2), not from its gossiped entry, which may be a round old.
        let members = inputs.members.filter { $0.key != inputs.me }.sorted { $0.key < $1.key }
        if !ignoreSync, let (host, _) = members.first(where: { $0.value.replication == "Syncing" || $0.value.replication == "PausedSync" }) {
            return RoleError(
                "\(host) is syncing \(resource): a handover would restart its sync. Wait ('marsadm wait-resource \(resource) --until uptodate' there) or add --ignore-sync"
            )
        }
        if let (host, _) = members.first(where: { $0.value.fork != nil || $0.value.disk == "SplitBrain" || $0.value.replication == "SplitBrain" }) {
            return RoleError("\(host) reports a split brain of \(resource): repair it first (marsadm view \(resource) there)")
        }
        // The old primary's use is not checked here: its gossiped `inUse` is up to a round old
        // (a device unmounted a moment ago would refuse), and the old primary checks anyway (P7).
        return nil
    }

    /// The old primary's refusal while something uses the resource there (§6).
    static func inUseRefusal(by host: String, of resource: String, use: [String]) -> RoleError {
        RoleError(
            "\(host) refused the handover of \(resource): \(use.joined(separator: "; ")). Stop the guest/unmount there, then run 'marsadm primary \(resource)' again"
        )
    }

    /// `marsadm primary` on the old primary that sealed for a new one that never came (§2.2):
    /// promote past the epoch promised to it, so that host, should it ever promote, is fenced.
    private mutating func retake(id: UInt64, deadline: UInt64, attach: Bool, _ step: inout Step) {
        let sealed = step.local.transition!
        let epoch = max(sealed.nextEpoch, step.designatedEpoch, step.inputs.wanted?.epoch ?? 0) + 1
        let transition = RoleTransition(
            kind: .becomingPrimary, peer: step.me, id: id, epoch: sealed.epoch, nextEpoch: epoch, phase: .promoting,
            finalLSN: sealed.finalLSN, finalSegment: sealed.finalSegment, attach: (attach || sealed.attach == true) ? true : nil
        )
        waiting[id] = deadline
        step.actions.append(.persist(LocalRole(role: .secondary, transition: transition)))
        promote(transition, &step)
    }

    private mutating func withdraw(id: UInt64, _ step: inout Step) {
        let resource = step.resource
        guard let transition = step.local.transition, transition.kind == .becomingPrimary else {
            let answer: Result<String, RoleError> =
                switch step.local.role {
                case .secondary: .success("\(resource) is secondary on this host; no request to withdraw")
                case .primary:
                    .failure(RoleError("this host is primary of \(resource): to make another host primary, run 'marsadm primary \(resource)' there"))
                }
            step.actions.append(.finish(commandID: id, result: answer))
            return
        }
        guard transition.phase != .promoting else {
            step.actions.append(.finish(commandID: id, result: .failure(RoleError("\(resource) is being promoted on this host: too late to withdraw; hand it back with 'marsadm primary \(resource)' on \(transition.peer)"))))
            return
        }
        abandon(transition, because: RoleError("the request to become primary of \(resource) was withdrawn ('marsadm secondary \(resource)')"), &step)
        step.actions.append(.finish(commandID: id, result: .success("withdrew this host's request to become primary of \(resource); \(transition.peer) stays primary")))
    }

    // MARK: - Level rules

    private mutating func advance(_ step: inout Step) {
        let local = step.local
        switch (local.role, local.transition) {
        case (.primary, nil):
            if local.fenced == nil { primaryRules(&step) }
        case (.primary, let transition?) where transition.kind == .handingOver:
            closing(transition, &step)
        case (.secondary, nil):
            secondaryRules(&step)
        case (.secondary, let transition?) where transition.kind == .handingOver:
            sealedRules(transition, &step)
        case (_, let transition?):
            becomingPrimary(transition, &step)
        }
    }

    /// A primary keeps the designation naming it at its epoch (a restart between resource.json and
    /// resource/N, §3.1), and answers requests to hand over (H2, H3).
    private func primaryRules(_ step: inout Step) {
        let inputs = step.inputs
        let epoch = inputs.log.epoch
        if let designated = inputs.designated, designated.epoch >= epoch, designated.primary != step.me {
            // F1 (§4.2): a newer primary exists (a retake, or a request that went past the epoch
            // this host was promised): stop admitting at once. F2: another host's promotion to
            // this epoch (a retake racing a promotion it did not hear of) has the newer clock.
            let fence = FenceRecord(epoch: designated.epoch, by: designated.primary)
            let role = LocalRole(role: .primary, fenced: fence)
            step.actions += [
                .fence(epoch: fence.epoch, by: fence.by),
                .closeExport(reason: "fenced: \(fence.by) is primary of \(step.resource) at epoch \(fence.epoch)"), .persist(role),
            ]
            step.publish(role: role, epoch: epoch, handover: nil)
            return
        }
        if inputs.designated?.primary != step.me || inputs.designated?.epoch != epoch {
            step.actions += [.setDesignated(epoch: epoch), .push(to: step.others)]
        }
        guard let wanted = inputs.wanted, wanted.from == step.me, wanted.host != step.me, !wanted.force, wanted.epoch > epoch else {
            step.publish(role: step.local, epoch: epoch, handover: step.ownEntry.handover.flatMap { $0.state == .refused ? $0 : nil })
            return
        }
        if let answered = step.ownEntry.handover, answered.id == wanted.id, answered.state == .refused {
            // A refusal is final for its request: the requester gives up on it (and may already
            // have), so sealing for it later would leave nobody to take over.
            return
        }
        if let reason = Self.handoverRefusal(inputs, to: wanted.host) {
            let refusal = HandoverState(id: wanted.id, to: wanted.host, state: .refused, reason: reason)
            step.publish(role: step.local, epoch: epoch, handover: refusal, pushTo: [wanted.host])
            return
        }
        let transition = RoleTransition(
            kind: .handingOver, peer: wanted.host, id: wanted.id, epoch: epoch, nextEpoch: wanted.epoch, phase: .closing,
            attach: inputs.attached ? true : nil
        )
        let role = LocalRole(role: .primary, transition: transition)
        step.actions.append(.persist(role))
        step.publish(role: role, epoch: epoch, handover: HandoverState(id: wanted.id, to: wanted.host, state: .draining, nextEpoch: wanted.epoch))
        seal(transition, &step)
    }

    /// P7: what keeps the old primary from handing over, in words for the requester.
    static func handoverRefusal(_ inputs: RoleInputs, to host: String) -> String? {
        let resource = inputs.resource
        if !inputs.use.isEmpty { return inUseRefusal(by: inputs.me, of: resource, use: inputs.use).description }
        if let failure = inputs.log.failure {
            return "\(inputs.me) refused the handover of \(resource): its log failed (\(failure)); 'marsadm primary \(resource) --force' on \(host) takes over with what \(host) has"
        }
        if inputs.log.down {
            return "\(inputs.me) refused the handover of \(resource): it is going down there; 'marsadm up \(resource)' on \(inputs.me), then run 'marsadm primary \(resource)' again"
        }
        return nil
    }

    private func seal(_ transition: RoleTransition, _ step: inout Step) {
        step.actions += [
            .detachDevice, .closeExport(reason: "\(step.resource) is being handed over to \(transition.peer)"),
            .seal(nextEpoch: transition.nextEpoch),
        ]
    }

    /// handingOver(closing): seal (again after a restart), then convert (H4, H5). A user that
    /// appeared since the check (the detach refused) ends the handover with a refusal.
    private func closing(_ transition: RoleTransition, _ step: inout Step) {
        let inputs = step.inputs
        guard let finalLSN = inputs.log.sealedAt else {
            if let reason = Self.handoverRefusal(inputs, to: transition.peer) {
                let role = LocalRole(role: .primary)
                step.actions += [.persist(role), .openExport]
                step.publish(role: role, epoch: transition.epoch, handover: HandoverState(id: transition.id, to: transition.peer, state: .refused, reason: reason), pushTo: [transition.peer])
            } else {
                seal(transition, &step)
            }
            return
        }
        var sealed = transition
        sealed.phase = .sealed
        sealed.finalLSN = finalLSN
        sealed.finalSegment = inputs.log.sealSegment ?? ""
        let role = LocalRole(role: .secondary, transition: sealed)
        step.actions += [.persist(role), .convertToReplica(finalLSN: finalLSN, segment: sealed.finalSegment!, epoch: transition.epoch)]
        step.publish(role: role, epoch: transition.epoch, handover: Self.sealedAnswer(sealed), pushTo: [transition.peer])
    }

    static func sealedAnswer(_ sealed: RoleTransition) -> HandoverState {
        HandoverState(
            id: sealed.id, to: sealed.peer, state: .sealed, nextEpoch: sealed.nextEpoch, finalLSN: sealed.finalLSN,
            finalSegment: sealed.finalSegment, detached: sealed.attach
        )
    }

    /// The old primary after its seal, a replica now: it answers requests (a later one from
    /// another host gets the seal too, at a higher epoch) until the designation names the new
    /// primary, then fetches from it (H8).
    private func sealedRules(_ sealed: RoleTransition, _ step: inout Step) {
        let inputs = step.inputs
        if let designated = inputs.designated, designated.primary != step.me, designated.epoch >= sealed.nextEpoch {
            let role = LocalRole(role: .secondary)
            step.actions += [.persist(role), .startFetch]
            step.publish(role: role, epoch: sealed.epoch, handover: nil)
            return
        }
        if let wanted = inputs.wanted, wanted.from == step.me, wanted.host != step.me, !wanted.force, wanted.id != sealed.id,
            wanted.epoch > sealed.nextEpoch
        {
            var again = sealed
            again.peer = wanted.host
            again.id = wanted.id
            again.nextEpoch = wanted.epoch
            let role = LocalRole(role: .secondary, transition: again)
            step.actions.append(.persist(role))
            step.publish(role: role, epoch: sealed.epoch, handover: Self.sealedAnswer(again), pushTo: [wanted.host])
            return
        }
        step.publish(role: step.local, epoch: sealed.epoch, handover: Self.sealedAnswer(sealed), pushTo: [sealed.peer])
    }

    private func secondaryRules(_ step: inout Step) {
        // Compared with the fetcher itself, not with what this machine saw last: a designation
        // that moved before the first step (or while the fetcher connected) is followed too.
        if let primary = step.inputs.designated?.primary, !primary.isEmpty, let from = step.inputs.log.fetchingFrom, from != primary {
            step.actions.append(.switchFetchSource)
        }
        step.publish(role: step.local, epoch: step.inputs.log.epoch, handover: nil)
    }

    /// The new primary: waits for the seal, replays to it, promotes (H6, H7); gives up when the
    /// old primary refuses, another request wins or the designation moved on.
    private mutating func becomingPrimary(_ transition: RoleTransition, _ step: inout Step) {
        let inputs = step.inputs
        let resource = step.resource
        if transition.phase == .promoting {
            promote(transition, &step)
            return
        }
        if let wanted = inputs.wanted, wanted.host != step.me {
            abandon(transition, because: RoleError("\(wanted.host) asked to become primary of \(resource) after this host; its request wins. Nothing changed here"), &step)
            return
        }
        if let designated = inputs.designated, designated.primary != transition.peer || designated.epoch != transition.epoch {
            let who = designated.primary.isEmpty ? "nobody" : designated.primary
            abandon(transition, because: RoleError("the primary of \(resource) changed to \(who) (epoch \(designated.epoch)) while this host waited; nothing changed here: run 'marsadm primary \(resource)' again to take over from \(who)"), &step)
            return
        }
        let answer = inputs.members[transition.peer]?.handover
        if let answer, answer.id == transition.id, answer.state == .refused {
            abandon(transition, because: RoleError(answer.reason ?? "\(transition.peer) refused the handover of \(resource)"), &step)
            return
        }
        switch transition.phase {
        case .waitingForSeal:
            if let answer, answer.id != transition.id, answer.state == .sealed, let promised = answer.nextEpoch, promised >= transition.nextEpoch {
                // The old primary sealed for an earlier request, promising it our epoch: ask above it.
                var again = transition
                again.nextEpoch = promised + 1
                step.actions += [
                    .persist(LocalRole(role: .secondary, transition: again)),
                    .setWanted(WantedPrimary(host: step.me, epoch: again.nextEpoch, id: again.id, from: again.peer)), .push(to: step.others),
                ]
                return
            }
            let request = WantedPrimary(host: step.me, epoch: transition.nextEpoch, id: transition.id, from: transition.peer)
            if inputs.wanted != request {
                // Lost with a restart before it was written (H1), or replaced by an older request of ours.
                step.actions += [.setWanted(request), .push(to: step.others)]
                return
            }
            if let answer, answer.id == transition.id, answer.state == .sealed, let finalLSN = answer.finalLSN {
                var replaying = transition
                replaying.phase = .replaying
                replaying.finalLSN = finalLSN
                replaying.finalSegment = answer.finalSegment
                if answer.detached == true { replaying.attach = true }
                step.actions.append(.persist(LocalRole(role: .secondary, transition: replaying)))
                replayed(replaying, &step)
            }
        case .replaying:
            replayed(transition, &step)
        case .promoting, .closing, .sealed:
            break
        }
    }

    /// replaying(L): promote once the replay stands exactly at the seal.
    private mutating func replayed(_ transition: RoleTransition, _ step: inout Step) {
        let log = step.inputs.log
        guard let finalLSN = transition.finalLSN else { return }
        if let fork = log.fork {
            abandon(transition, because: RoleError("\(step.resource) is in split brain here (its history forks from \(fork.with)'s): repair first (marsadm view \(step.resource))"), &step)
            return
        }
        if log.endLSN > finalLSN && log.sealedAt != finalLSN {
            abandon(transition, because: RoleError("this host's log of \(step.resource) goes on past the seal of \(transition.peer) at LSN \(finalLSN) (to \(log.endLSN)): the histories fork; see 'marsadm view \(step.resource)'"), &step)
            return
        }
        guard log.replayedLSN == finalLSN, log.sealedAt == finalLSN else { return }
        var promoting = transition
        promoting.phase = .promoting
        step.actions.append(.persist(LocalRole(role: .secondary, transition: promoting)))
        promote(promoting, &step)
    }

    /// H7: start the new epoch at the seal, take the designation, open the export.
    private mutating func promote(_ transition: RoleTransition, _ step: inout Step) {
        let role = LocalRole(role: .primary)
        step.actions += [.stopFetch, .promote(epoch: transition.nextEpoch), .setDesignated(epoch: transition.nextEpoch), .openExport]
        step.actions.append(.persist(role))
        // After the persist: only a primary gets a local device.
        if transition.attach == true { step.actions.append(.attachDevice) }
        if step.inputs.wanted?.host == step.me { step.actions.append(.setWanted(nil)) }
        step.publish(role: role, epoch: transition.nextEpoch, handover: nil)
        step.actions.append(.push(to: step.others))
        let from = transition.finalLSN.map { " from LSN \($0)" } ?? ""
        finishAll(.success("\(step.resource) is primary on this host at epoch \(transition.nextEpoch)\(from)"), &step)
    }

    /// Back to a plain secondary: the request is gone, the waiting commands get `error`.
    private mutating func abandon(_ transition: RoleTransition, because error: RoleError, _ step: inout Step) {
        step.actions.append(.persist(LocalRole(role: .secondary)))
        if step.inputs.wanted?.id == transition.id && step.inputs.wanted?.host == step.me {
            step.actions += [.setWanted(nil), .push(to: step.others)]
        }
        finishAll(.failure(error), &step)
    }

    private mutating func finishAll(_ result: Result<String, RoleError>, _ step: inout Step) {
        for id in waiting.keys.sorted() { step.actions.append(.finish(commandID: id, result: result)) }
        waiting = [:]
    }

    /// A waiting command whose time is up gets the state of its request; the request stays (§3).
    private mutating func expireWaiters(_ step: inout Step) {
        let persisted = step.actions.last { if case .persist = $0 { true } else { false } }
        guard case .persist(let role)? = persisted ?? .persist(step.local), let transition = role.transition, transition.kind == .becomingPrimary else {
            waiting = [:]
            return
        }
        let now = step.inputs.now
        for (id, deadline) in waiting.sorted(by: { $0.key < $1.key }) where deadline <= now {
            waiting[id] = nil
            step.actions.append(.finish(commandID: id, result: .failure(Self.timeoutError(transition, step.inputs))))
        }
    }

    static func timeoutError(_ transition: RoleTransition, _ inputs: RoleInputs) -> RoleError {
        let resource = inputs.resource
        let peer = transition.peer
        let heard = inputs.members[peer].map { inputs.now >= $0.updated ? " (last heard \((inputs.now - $0.updated) / 1000) s ago)" : "" } ?? " (never heard)"
        let state: String
        switch transition.phase {
        case .replaying:
            state = "\(peer) sealed \(resource) at LSN \(transition.finalLSN ?? 0); this host has replayed to \(inputs.log.replayedLSN) and fetched to \(inputs.log.endLSN)\(heard)"
        default:
            state = "\(peer) (primary of \(resource), epoch \(transition.epoch)) has not sealed \(resource) yet\(heard)"
        }
        return RoleError(
            "\(state). The request stays: this host takes over as soon as it holds the seal. 'marsadm secondary \(resource)' withdraws it"
        )
    }
}
