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

    public init(
        epoch: UInt64, endLSN: UInt64, replayedLSN: UInt64, sealedAt: UInt64? = nil, sealSegment: String? = nil, failure: String? = nil,
        fork: ForkState? = nil, synced: Bool = true, needsSync: Bool = false, fetchPaused: Bool = false, replayPaused: Bool = false,
        down: Bool = false
    ) {
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
        []
    }
}
