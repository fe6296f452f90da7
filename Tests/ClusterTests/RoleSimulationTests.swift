import Cluster
import FoundationEssentials
import TestSupport
import Testing

/// A deterministic simulation of planned handovers between 2-4 hosts (docs/handover.md §7, row
/// "pure"): each host runs a RoleMachine over its own ClusterMetadata, a simple log model and a
/// driver model that executes the actions in order. The network gossips whole metadata between
/// pairs, loses exchanges and partitions hosts; hosts crash between any two actions and restart
/// from what they persisted (resource.json's role, the log, the metadata file) only; the clock
/// is injected. Operators ask for handovers, withdraw them and retake. After the chaos the
/// network heals, and the run must settle on one primary.
///
/// Properties: at most one host admits writes per epoch; a sealed or fenced log never has an
/// open export; a promotion starts exactly at a seal the host holds and has replayed (never
/// below it, never past it); each run converges to one primary that every host designates.
struct RoleSimulation {
    /// One record of the log model; `id` is unique across the run, so two logs that hold the same
    /// record at the same position share the history before it (fetch only appends to a prefix).
    struct Record: Equatable {
        enum Kind: Equatable {
            case epochStart(UInt64)
            case write(UInt64)
            case seal(epoch: UInt64, next: UInt64)
        }

        var id: Int
        var kind: Kind
        var origin: Int
    }

    struct Host {
        let name: String
        // Persisted: survives a crash.
        var local: LocalRole
        var metadata = ClusterMetadata()
        var log: [Record]
        var replayed: Int
        var fork: ForkState?
        // Ephemeral: the process's state, lost with a crash.
        var machine = RoleMachine()
        var up = true
        var exportOpen: Bool
        var fetchStopped = false
        var engineFenced = false
        var attached = false
        var use: [String] = []

        var epoch: UInt64 {
            for record in log.reversed() {
                switch record.kind {
                case .epochStart(let epoch), .write(let epoch), .seal(let epoch, _): return epoch
                }
            }
            return 0
        }

        var sealedAt: UInt64? {
            if case .seal? = log.last?.kind { UInt64(log.count) } else { nil }
        }

        var admits: Bool {
            up && exportOpen && local.role == .primary && local.fenced == nil && !engineFenced && sealedAt == nil
        }

        /// Whether the fetcher runs, as the driver starts it at bringUp and after startFetch.
        var fetching: Bool {
            guard up, !fetchStopped, local.role == .secondary, fork == nil else { return false }
            guard let transition = local.transition else { return true }
            return transition.kind == .becomingPrimary && transition.phase != .promoting
        }
    }

    static let resource = "vm1"
    var random: SplitMix64
    let seed: UInt64
    var hosts: [Host]
    var now: UInt64 = 1_700_000_000_000
    var skew: [UInt64]
    var links: Set<[Int]> = []
    var nextRecord = 1
    var nextCommand: UInt64 = 1
    var admitted: [UInt64: Set<Int>] = [:]
    var violations: [String] = []
    var decoded: [String: any Sendable] = [:]
    /// The last events, printed with a violation (MARS_TEST_SEED replays the run).
    var trace: [String] = []
    /// How often the heal ended with the operator's retake (nobody was primary).
    var remedies = 0

    mutating func note(_ event: String) {
        trace.append("t=\(now % 1_000_000) \(event)")
        if trace.count > 80 { trace.removeFirst() }
    }

    init(seed: UInt64) {
        self.seed = seed
        var random = SplitMix64(state: seed)
        let count = 2 + Int(random.next() % 3)
        hosts = (0..<count).map { index in
            Host(name: "h\(index)", local: LocalRole(role: index == 0 ? .primary : .secondary), log: [], replayed: 0, exportOpen: index == 0)
        }
        skew = (0..<count).map { _ in random.next() % 5000 }
        self.random = random
        let start = Record(id: 0, kind: .epochStart(1), origin: 0)
        for index in hosts.indices {
            hosts[index].log = [start]
            hosts[index].replayed = 1
            for other in index + 1..<count { links.insert([index, other]) }
        }
        set(0, MetadataKeys.resource(Self.resource), ResourceEntry(size: 1 << 20, primary: "h0", epoch: 1))
        for index in hosts.indices {
            let entry = MemberEntry(role: hosts[index].local.role.rawValue, disk: "UpToDate", replication: "Replicating", fetchedLSN: 1, replayedLSN: 1, updated: now, epoch: 1)
            set(index, MetadataKeys.member(Self.resource, hosts[index].name), entry)
        }
        for a in hosts.indices { for b in hosts.indices where a < b { exchange(a, b) } }
    }

    // MARK: Metadata

    func clock(_ host: Int) -> UInt64 { now + skew[host] }

    mutating func set(_ host: Int, _ key: String, _ value: (some Encodable)?) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let text = value.map { String(decoding: try! encoder.encode($0), as: UTF8.self) }
        hosts[host].metadata.set(key, text, by: hosts[host].name, now: clock(host))
    }

    mutating func value<T: Decodable & Sendable>(_ type: T.Type, _ host: Int, _ key: String) -> T? {
        guard let text = hosts[host].metadata.value(key) else { return nil }
        if let known = decoded[text] as? T { return known }
        let value = try? JSONDecoder().decode(T.self, from: Data(text.utf8))
        decoded[text] = value
        return value
    }

    func linked(_ a: Int, _ b: Int) -> Bool { hosts[a].up && hosts[b].up && links.contains([min(a, b), max(a, b)]) }

    /// One gossip exchange: each side merges the other's whole metadata.
    mutating func exchange(_ a: Int, _ b: Int) {
        let fromA = Array(hosts[a].metadata.entries.values)
        let fromB = Array(hosts[b].metadata.entries.values)
        hosts[b].metadata.merge(fromA, now: clock(b))
        hosts[a].metadata.merge(fromB, now: clock(a))
    }

    // MARK: The driver model

    mutating func inputs(_ host: Int, command: RoleCommand?) -> RoleInputs {
        let h = hosts[host]
        var members: [String: MemberEntry] = [:]
        for entry in h.metadata.entries(withPrefix: MetadataKeys.memberPrefix(Self.resource)) {
            members[String(entry.key.split(separator: "/").last!)] = value(MemberEntry.self, host, entry.key)
        }
        let log = LogFacts(
            epoch: h.epoch, endLSN: UInt64(h.log.count), replayedLSN: UInt64(h.replayed), sealedAt: h.sealedAt,
            sealSegment: h.sealedAt.map { _ in "log-\(h.name)" }, fork: h.fork
        )
        return RoleInputs(
            resource: Self.resource, me: h.name, now: clock(host), local: h.local, log: log, use: h.use, attached: h.attached,
            designated: value(ResourceEntry.self, host, MetadataKeys.resource(Self.resource)),
            wanted: value(WantedPrimary.self, host, MetadataKeys.wantedPrimary(Self.resource)), members: members, command: command
        )
    }

    mutating func step(_ host: Int, command: RoleCommand? = nil, crashes: Bool) {
        guard hosts[host].up else { return }
        if let command { note("\(hosts[host].name) command \(command)") }
        let actions = hosts[host].machine.step(inputs(host, command: command))
        for action in actions {
            if crashes && random.next() % 40 == 0 {
                crash(host)
                return
            }
            if !execute(action, on: host) { return }
        }
    }

    /// Executes one action as the driver does; false stops the step (a refused detach).
    mutating func execute(_ action: RoleAction, on host: Int) -> Bool {
        let name = hosts[host].name
        note("\(name): \(action)")
        switch action {
        case .persist(let role):
            hosts[host].local = role
        case .publish(let entry):
            set(host, MetadataKeys.member(Self.resource, name), entry)
        case .setDesignated(let epoch):
            set(host, MetadataKeys.resource(Self.resource), ResourceEntry(size: 1 << 20, primary: name, epoch: epoch))
        case .setWanted(let wanted):
            set(host, MetadataKeys.wantedPrimary(Self.resource), wanted)
        case .closeExport:
            hosts[host].exportOpen = false
        case .openExport:
            if hosts[host].sealedAt != nil { violations.append("\(name) opened the export of a sealed log (seed \(seed))") }
            hosts[host].exportOpen = true
        case .detachDevice:
            if !hosts[host].use.isEmpty { return false }
            hosts[host].attached = false
        case .attachDevice:
            hosts[host].attached = true
        case .seal(let next):
            guard hosts[host].sealedAt == nil else { break }
            if hosts[host].exportOpen { violations.append("\(name) sealed with its export open (seed \(seed))") }
            append(host, .seal(epoch: hosts[host].epoch, next: next))
        case .fence:
            hosts[host].engineFenced = true
        case .convertToReplica(let finalLSN, _, _):
            if hosts[host].sealedAt != finalLSN { violations.append("\(name) converted at \(finalLSN), its log is sealed at \(String(describing: hosts[host].sealedAt)) (seed \(seed))") }
        case .promote(let epoch):
            promote(host, epoch: epoch)
        case .startFetch:
            hosts[host].fetchStopped = false
        case .stopFetch:
            hosts[host].fetchStopped = true
        case .switchFetchSource:
            break
        case .push(let peers):
            for peer in peers {
                guard let other = hosts.firstIndex(where: { $0.name == peer }), linked(host, other), random.next() % 8 != 0 else { continue }
                exchange(host, other)
            }
        case .finish:
            break
        }
        return true
    }

    mutating func append(_ host: Int, _ kind: Record.Kind) {
        hosts[host].log.append(Record(id: nextRecord, kind: kind, origin: host))
        nextRecord += 1
        hosts[host].replayed = hosts[host].log.count
    }

    mutating func promote(_ host: Int, epoch: UInt64) {
        let h = hosts[host]
        if case .epochStart(epoch)? = h.log.last(where: { if case .epochStart = $0.kind { true } else { false } })?.kind { return }
        guard case .seal(_, let promised)? = h.log.last?.kind else {
            violations.append("\(h.name) promoted to epoch \(epoch) on a log that does not end with a seal (end \(h.log.count), seed \(seed))")
            return
        }
        if h.replayed != h.log.count { violations.append("\(h.name) promoted with replay at \(h.replayed) below the seal at \(h.log.count) (seed \(seed))") }
        if let finalLSN = h.local.transition?.finalLSN, finalLSN != UInt64(h.log.count) {
            violations.append("\(h.name) promoted at \(h.log.count), its transition names the seal at \(finalLSN) (seed \(seed))")
        }
        if let peer = h.local.transition?.peer, let old = hosts.firstIndex(where: { $0.name == peer }), old != host {
            // Every write the old primary admitted is here: its seal, at the same place of its log.
            let seal = h.log.count - 1
            if h.log.last?.origin != old || hosts[old].log.count <= seal || hosts[old].log[seal] != h.log.last {
                violations.append("\(h.name) promoted on a seal that is not \(peer)'s at LSN \(h.log.count) (seed \(seed))")
            }
        }
        if epoch < promised { violations.append("\(h.name) promoted to epoch \(epoch) below the sealed promise \(promised) (seed \(seed))") }
        append(host, .epochStart(epoch))
    }

    mutating func crash(_ host: Int) {
        note("\(hosts[host].name) crashes")
        hosts[host].up = false
    }

    /// A restart: only resource.json, the log and the metadata file remain.
    mutating func restart(_ host: Int) {
        note("\(hosts[host].name) restarts")
        var h = hosts[host]
        h.up = true
        h.machine = RoleMachine()
        h.fetchStopped = false
        h.engineFenced = h.local.fenced != nil
        h.exportOpen = h.local.role == .primary && h.local.transition == nil && h.local.fenced == nil && h.sealedAt == nil
        h.replayed = min(h.replayed, h.log.count)
        hosts[host] = h
    }

    // MARK: Log model

    /// A write on every host that admits one; records who admitted at which epoch.
    mutating func write(_ host: Int) {
        guard hosts[host].admits else { return }
        let epoch = hosts[host].epoch
        admitted[epoch, default: []].insert(host)
        if admitted[epoch]!.count > 1 {
            violations.append("hosts \(admitted[epoch]!.sorted()) both admitted writes at epoch \(epoch) (seed \(seed))")
        }
        append(host, .write(epoch))
    }

    /// Fetch a little from the source the host follows, and replay a little.
    mutating func fetch(_ host: Int) {
        guard hosts[host].fetching else { return }
        let sourceName = hosts[host].local.transition?.peer ?? value(ResourceEntry.self, host, MetadataKeys.resource(Self.resource))?.primary
        if let sourceName, let source = hosts.firstIndex(where: { $0.name == sourceName }), source != host, linked(host, source) {
            let mine = hosts[host].log
            let theirs = hosts[source].log
            if theirs.count >= mine.count && theirs[mine.count - 1] == mine.last! {
                let take = min(theirs.count - mine.count, 1 + Int(random.next() % 6))
                hosts[host].log += theirs[mine.count..<(mine.count + take)]
            } else if theirs.count < mine.count && mine[theirs.count - 1] == theirs.last! {
                // The source is behind this host (it has not fetched everything yet): nothing to take.
            } else {
                note("\(hosts[host].name) forks against \(sourceName): \(mine.suffix(3)) vs \(theirs.suffix(3))")
                hosts[host].fork = ForkState(lsn: nil, with: sourceName)
            }
        }
        hosts[host].replayed = min(hosts[host].log.count, hosts[host].replayed + Int(random.next() % 8))
    }

    // MARK: Runs

    mutating func command(_ host: Int) -> RoleCommand {
        nextCommand += 1
        if random.next() % 5 == 0 { return .secondary(id: nextCommand) }
        return .primary(id: nextCommand, timeout: 20_000, ignoreSync: false, attach: random.next() % 2 == 0)
    }

    /// `marsadm primary` on a sealed old primary is a retake, for when the new primary never came
    /// (§3.1). It is a promotion the new primary does not hear of, as `--force` is: if that one
    /// did promote behind a partition (or restarts later and does) and handed on, two hosts can
    /// reach the same epoch, and only fencing (F2) resolves it. So the operator here retakes only
    /// once the network healed and nobody is primary or becoming it (`remedy`).
    func operatorMayAsk(_ host: Int) -> Bool {
        guard let sealed = hosts[host].local.transition else { return true }
        return !(sealed.kind == .handingOver && sealed.phase == .sealed)
    }

    mutating func checkInvariants() {
        for h in hosts where h.up && h.exportOpen {
            if h.sealedAt != nil { violations.append("\(h.name) has an open export on a sealed log (seed \(seed))") }
            if h.local.fenced != nil || h.engineFenced { violations.append("\(h.name) has an open export while fenced (seed \(seed))") }
        }
    }

    mutating func chaos(ticks: Int) {
        for _ in 0..<ticks {
            now += random.next() % 700
            let host = Int(random.next() % UInt64(hosts.count))
            switch random.next() % 100 {
            case 0..<30: step(host, crashes: true)
            case 30..<48:
                let other = Int(random.next() % UInt64(hosts.count))
                if other != host, linked(host, other), random.next() % 5 != 0 { exchange(host, other) }
            case 48..<60: write(host)
            case 60..<75: fetch(host)
            case 75..<80: if operatorMayAsk(host) { step(host, command: command(host), crashes: true) }
            case 80..<84: if hosts[host].up { crash(host) } else { restart(host) }
            case 84..<90: if !hosts[host].up { restart(host) }
            case 90..<95:
                let other = Int(random.next() % UInt64(hosts.count))
                if other != host {
                    let link = [min(host, other), max(host, other)]
                    if links.contains(link) { links.remove(link) } else { links.insert(link) }
                }
            default:
                hosts[host].use = hosts[host].use.isEmpty ? ["/dev/nbd0 is mounted on /srv"] : []
            }
            checkInvariants()
        }
    }

    /// Everything up and linked, no users, rounds of gossip, fetch and steps.
    mutating func heal(rounds: Int) {
        for host in hosts.indices where !hosts[host].up { restart(host) }
        for host in hosts.indices { hosts[host].use = [] }
        for a in hosts.indices { for b in hosts.indices where a < b { links.insert([a, b]) } }
        for _ in 0..<rounds {
            now += 2000
            for a in hosts.indices { for b in hosts.indices where a < b { exchange(a, b) } }
            for host in hosts.indices {
                for _ in 0..<4 { fetch(host) }
                step(host, crashes: false)
            }
            checkInvariants()
        }
    }

    var primaries: [Int] { hosts.indices.filter { hosts[$0].admits } }

    var pending: Bool { hosts.contains { $0.local.transition?.kind == .becomingPrimary } }

    /// The operator's remedy when nobody is primary after the heal (§3.1, "B never comes back"):
    /// `marsadm primary` on a host that holds the newest seal, else on any host not fenced or forked.
    mutating func remedy() {
        let candidates = hosts.indices.filter { hosts[$0].local.fenced == nil && hosts[$0].fork == nil }
        guard let host = candidates.max(by: { (hosts[$0].sealedAt ?? 0, hosts[$0].log.count) < (hosts[$1].sealedAt ?? 0, hosts[$1].log.count) }) else { return }
        nextCommand += 1
        remedies += 1
        step(host, command: .primary(id: nextCommand, timeout: 20_000, ignoreSync: true, attach: false), crashes: false)
    }

    mutating func run() {
        chaos(ticks: 300)
        heal(rounds: 12)
        if primaries.isEmpty && !pending { remedy() }
        heal(rounds: 12)
        if primaries.isEmpty && !pending { remedy() }
        heal(rounds: 12)
        let primaries = primaries
        if primaries.count != 1 {
            let states = hosts.map { "\($0.name): \($0.local) export \($0.exportOpen) sealed \(String(describing: $0.sealedAt)) epoch \($0.epoch) fork \(String(describing: $0.fork))" }
            violations.append("\(primaries.count) hosts admit writes after the heal (seed \(seed)): \(states.joined(separator: "; "))")
            return
        }
        let primary = hosts[primaries[0]]
        for host in hosts.indices {
            let designated = value(ResourceEntry.self, host, MetadataKeys.resource(Self.resource))
            if designated?.primary != primary.name || designated?.epoch != primary.epoch {
                violations.append("\(hosts[host].name) designates \(String(describing: designated)), the primary is \(primary.name) at \(primary.epoch) (seed \(seed))")
            }
        }
    }
}

@Suite("Role machine: simulation")
struct RoleSimulationTests {
    @Test func plannedHandoversUnderCrashesAndPartitions() {
        let base = TestSeed.make("plannedHandoversUnderCrashesAndPartitions")
        let runs = TestSeed.fromEnvironment == nil ? 1000 : 1
        var violations: [String] = []
        var promotions = 0
        var remedies = 0
        for run in 0..<runs {
            var simulation = RoleSimulation(seed: base &+ UInt64(run))
            simulation.run()
            violations += simulation.violations
            if !simulation.violations.isEmpty { print(simulation.trace.joined(separator: "\n")) }
            promotions += simulation.hosts.map { $0.epoch }.max()! > 1 ? 1 : 0
            remedies += simulation.remedies
            if violations.count > 5 { break }
        }
        print("\(runs) runs: \(promotions) changed the primary, \(remedies) needed a retake after the heal")
        #expect(violations.isEmpty, "\(violations.prefix(5).joined(separator: "\n"))")
        #expect(runs == 1 || promotions > runs / 4, "only \(promotions) of \(runs) runs changed the primary: the simulation hardly exercises handover")
    }
}
