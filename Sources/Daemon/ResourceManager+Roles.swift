import BlockStore
import Cluster
import ControlProtocol
import LocalDevice
import LogEngine
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import NIOPosix
import Replication
import Synchronization
import TransactionLog

/// The role machines of this host's resources and the control commands waiting for them.
final class RoleDriver: Sendable {
    let machines = Mutex<[String: RoleMachine]>([:])
    /// `marsadm primary`/`secondary` commands waiting for their answer, by the id given to the machine.
    let waiters = Mutex<[UInt64: CheckedContinuation<Result<String, RoleError>, Never>]>([:])

    func answer(_ id: UInt64, _ result: Result<String, RoleError>) {
        waiters.withLock { $0.removeValue(forKey: id) }?.resume(returning: result)
    }

    /// marsd stops: nobody will answer the waiting commands.
    func answerAll(_ result: Result<String, RoleError>) {
        for waiter in waiters.withLock({ waiters in defer { waiters = [:] }; return Array(waiters.values) }) {
            waiter.resume(returning: result)
        }
    }
}

/// The driver of the role machines (docs/handover.md §2): samples each resource's inputs, steps
/// its `RoleMachine`, and carries out the actions with the daemon's pieces (exports, log engines,
/// replicas, gossip). It runs in the command queue: after a role command, after gossip changed a
/// role key, and every gossip round.
extension ResourceManager {
    /// `marsadm primary` and `marsadm secondary`: answered when the machine finishes the command.
    func requestRole(_ request: ControlRequest) async -> ControlResponse {
        let name: String
        do {
            name = try existingName(request)
        } catch {
            return ControlResponse(error: "\(error)")
        }
        let id = UInt64.random(in: 1...UInt64.max)
        let timeout = UInt64(max(0, (request.timeout ?? 300) * 1000))
        let command: RoleCommand =
            request.command == .primary
            ? .primary(id: id, timeout: timeout, ignoreSync: request.ignoreSync ?? false, attach: request.attach ?? false)
            : .secondary(id: id)
        let result = await withCheckedContinuation { continuation in
            roles.waiters.withLock { $0[id] = continuation }
            Task { await commands.run { await self.evaluateRole(name, command: (command, id)) } }
        }
        switch result {
        case .success(let message): return ControlResponse(message: message)
        case .failure(let error): return ControlResponse(error: error.description)
        }
    }

    /// Re-evaluates the resources whose role keys gossip changed (outside the command queue: it
    /// queues the evaluation).
    func roleKeysChanged(_ names: [String]) {
        Task {
            await commands.run {
                for name in names { await self.evaluateRole(name) }
            }
        }
    }

    /// Steps the machines of resources in a role change often (their progress is mostly local:
    /// a seal written, a replay reaching the seal), so a handover does not wait for gossip rounds.
    func runTransitions() async {
        while !Task.isCancelled {
            let changing = state.withLock { $0.resources.values.filter { $0.config.transition != nil }.map(\.config.name).sorted() }
            if !changing.isEmpty {
                await commands.run {
                    for name in changing { await self.evaluateRole(name) }
                }
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
    }

    /// Every resource's machine, once per gossip round (timeouts, and anything a lost push missed).
    func evaluateRoles() async {
        for name in state.withLock({ $0.resources.keys.sorted() }) { await evaluateRole(name) }
    }

    /// Steps the machine of `name` until it has nothing more to do (each step's actions change
    /// the inputs of the next: a seal is followed by the conversion, say). Call in the command queue.
    func evaluateRole(_ name: String, command: (RoleCommand, UInt64)? = nil) async {
        var command = command
        for _ in 0..<8 {
            guard let inputs = roleInputs(of: name, command: command?.0) else {
                if let (_, id) = command {
                    roles.answer(id, .failure(RoleError(roleUnavailableReason(name))))
                }
                return
            }
            command = nil
            let actions = roles.machines.withLock { $0[name, default: RoleMachine()].step(inputs) }
            if actions.isEmpty { return }
            guard await execute(actions, of: name, me: inputs.me) else { return }
        }
    }

    private func roleUnavailableReason(_ name: String) -> String {
        guard let resource = state.withLock({ $0.resources[name] }) else { return "there is no resource '\(name)' on this host any more" }
        if identity == nil { return "this host is in no cluster" }
        if let error = resource.error { return "\(name) is not up on this host: \(error)" }
        return "\(name) is down on this host: 'marsadm up \(name)' first"
    }

    /// What the machine of `name` decides on now; nil while the resource is not up here (a down
    /// resource has no log to seal or promote, and its epoch is unknown).
    func roleInputs(of name: String, command: RoleCommand?) -> RoleInputs? {
        guard let me = identity?.host, let resource = state.withLock({ $0.resources[name] }) else { return nil }
        let config = resource.config
        let designated = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name))
        let facts: LogFacts
        if let engine = resource.engine {
            let status = engine.status
            facts = LogFacts(
                epoch: status.epoch, endLSN: status.durableLSN, replayedLSN: status.writebackLSN, sealedAt: status.seal?.endLSN,
                sealSegment: status.seal?.segment.fileName, failure: status.failure, down: config.wanted != "up"
            )
        } else if let replica = resource.replica {
            let status = replica.log.status
            let fetch = replica.fetcher.status
            let letGo = cluster.value(String.self, ClusterService.needsSyncKey(name, me)) != nil
            facts = LogFacts(
                epoch: status.epoch, endLSN: status.fetchedLSN, replayedLSN: status.replayedLSN, sealedAt: status.seal?.endLSN,
                sealSegment: status.seal?.segment.fileName, failure: status.failure,
                fork: (status.fork != nil || fetch.forked) ? ForkState(lsn: nil, with: designated?.primary ?? "?") : nil,
                // Synced once the copy is done: the replay that a handover runs up to the seal passes
                // the sync's end and any batch a crash left half applied (the device is consistent there).
                synced: config.sync?.endLSN != nil, needsSync: fetch.needsSync || letGo,
                fetchPaused: config.fetchPaused == true, replayPaused: config.replayPaused == true, down: config.wanted != "up",
                fetchingFrom: [.stopped, .paused].contains(fetch.link) ? nil : fetch.primary
            )
        } else {
            return nil
        }
        return RoleInputs(
            resource: name, me: me, now: wallClockMilliseconds(),
            local: LocalRole(role: config.role == "primary" ? .primary : .secondary, transition: config.transition, fenced: config.fenced),
            log: facts, use: users(of: resource), attached: config.attachedDevice != nil, designated: designated,
            wanted: cluster.value(WantedPrimary.self, MetadataKeys.wantedPrimary(name)), members: cluster.members(of: name),
            command: command
        )
    }

    /// What keeps a primary's resource busy: the users of its kernel device, and NBD connections
    /// other than that device's own.
    func users(of resource: Resource) -> [String] {
        guard resource.engine != nil else { return [] }
        let name = resource.config.name
        var users: [String] = []
        if let index = resource.config.attachedDevice {
            users += DeviceUsers.of("/dev/nbd\(index)").map { "\(links.path(of: name)) (/dev/nbd\(index)) \($0)" }
        }
        let connections = exports.exports.first { $0.descriptor.name == name }?.statistics.activeConnections.load(ordering: .relaxed) ?? 0
        let clients = connections - (resource.config.attachedDevice == nil ? 0 : 1)
        if clients > 0 { users.append("\(clients) NBD connection\(clients == 1 ? "" : "s") to its export") }
        return users
    }

    /// Carries out `actions` in order. Returns false when one failed (the rest of the step is
    /// dropped: the next step sees the state as it is and decides again).
    private func execute(_ actions: [RoleAction], of name: String, me: String) async -> Bool {
        for action in actions {
            do {
                try await execute(action, of: name, me: me)
            } catch {
                logger.error("role of \(name): \(describe(action)) failed: \(error)")
                return false
            }
        }
        return true
    }

    private func describe(_ action: RoleAction) -> String {
        switch action {
        case .persist: "storing the role"
        case .publish: "publishing the member state"
        case .setDesignated(let epoch): "designating this host at epoch \(epoch)"
        case .setWanted: "writing the primary request"
        case .closeExport: "closing the export"
        case .openExport: "opening the export"
        case .detachDevice: "detaching the local device"
        case .attachDevice: "attaching the local device"
        case .seal(let epoch): "sealing the log for epoch \(epoch)"
        case .fence(let epoch, let by): "fencing for \(by) at epoch \(epoch)"
        case .convertToReplica(let lsn, _, _): "opening the sealed log as a replica at LSN \(lsn)"
        case .promote(let epoch): "promoting the log to epoch \(epoch)"
        case .startFetch: "starting the fetch"
        case .stopFetch: "stopping the fetch"
        case .switchFetchSource: "switching the fetch source"
        case .push: "pushing the gossip"
        case .finish: "answering the command"
        }
    }

    private func execute(_ action: RoleAction, of name: String, me: String) async throws {
        switch action {
        case .persist(let role):
            try updateConfig(name) { config in
                config.role = role.role.rawValue
                config.transition = role.transition
                config.fenced = role.fenced
            }
        case .publish(let entry):
            cluster.set(ClusterService.memberKey(name, me), entry, by: me)
        case .setDesignated(let epoch):
            let size = state.withLock { $0.resources[name]?.config.size } ?? 0
            var entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)) ?? ResourceEntry(size: size, primary: me)
            entry.primary = me
            entry.epoch = epoch
            cluster.set(ClusterService.resourceKey(name), entry, by: me)
        case .setWanted(let wanted):
            cluster.set(MetadataKeys.wantedPrimary(name), wanted, by: me)
        case .closeExport(let reason):
            exports.remove(named: name, reason: reason)
        case .openExport:
            try openExport(name)
        case .detachDevice:
            _ = try await detachIfAttached(name, force: false, doing: "hand it over")
        case .attachDevice:
            do {
                _ = try await attach(name)
            } catch {
                // The role is taken: a device that cannot be attached is said, not undone.
                logger.error("resource \(name) is primary here, but its device could not be attached: \(error)")
            }
        case .seal(let nextEpoch):
            try await seal(name, nextEpoch: nextEpoch)
        case .fence(let epoch, let by):
            guard let engine = state.withLock({ $0.resources[name]?.engine }) else { return }
            engine.fence(epoch: epoch, by: by)
        case .convertToReplica:
            // The seal's LSN, segment and epoch come from the persisted transition, the same
            // source a restart between the two steps converts from.
            try await convertToReplica(name)
        case .promote(let epoch):
            try await promote(name, epoch: epoch)
        case .startFetch:
            guard let (replica, config) = state.withLock({ state in state.resources[name].flatMap { r in r.replica.map { ($0, r.config) } } })
            else { return }
            if config.fetchPaused != true { replica.fetcher.start() }
        case .stopFetch:
            if let replica = state.withLock({ $0.resources[name]?.replica }) { try? await replica.fetcher.stop().get() }
        case .switchFetchSource:
            state.withLock { $0.resources[name]?.replica }?.fetcher.sourcesChanged()
        case .push(let hosts):
            guard let credentials else { return }
            // The exchange must not hold up the command queue (a host out of reach takes seconds).
            Task { await cluster.push(to: hosts, group: peerGroup, credentials: credentials) }
        case .finish(let id, let result):
            roles.answer(id, result)
        }
    }
}

extension ResourceManager {
    /// Leave, delete and invalidate would take away the log a handover needs (the new primary
    /// replays the old one's up to the seal): refused until it ends.
    func refuseDuringRoleChange(_ resource: Resource, doing action: String) throws {
        guard let transition = resource.config.transition, let description = Self.describe(transition) else { return }
        let name = resource.config.name
        let withdraw = transition.kind == .becomingPrimary ? ", or withdraw the request with 'marsadm secondary \(name)'" : ""
        throw DaemonError("\(name) is in a handover on this host (\(description)): wait until it ends ('marsadm view \(name)')\(withdraw), then \(action)")
    }

    /// What `view` says about a role change under way on this host.
    static func describe(_ transition: RoleTransition?) -> String? {
        guard let transition else { return nil }
        let peer = transition.peer
        let epoch = transition.nextEpoch
        switch (transition.kind, transition.phase) {
        case (.handingOver, .closing):
            return "handing over to \(peer) (epoch \(epoch)): export closed, sealing the log"
        case (.handingOver, _):
            return "handed over to \(peer): sealed at LSN \(transition.finalLSN ?? 0) for epoch \(epoch); waiting for \(peer) to take over"
        case (.becomingPrimary, .waitingForSeal):
            return "becoming primary (epoch \(epoch)): waiting for \(peer) to seal its log; 'marsadm secondary' withdraws the request"
        case (.becomingPrimary, .replaying):
            return "becoming primary (epoch \(epoch)): \(peer) sealed at LSN \(transition.finalLSN ?? 0); replaying up to it"
        case (.becomingPrimary, _):
            return "becoming primary (epoch \(epoch)): starting the new epoch"
        }
    }
}

// MARK: - The log side of a role change (docs/handover.md §3, §3.2)

extension ResourceManager {
    /// H4: admission ends (clients are told `reason`), the admitted writes and then the seal are
    /// made durable. Idempotent: a sealed log returns its seal.
    func seal(_ name: String, nextEpoch: UInt64) async throws {
        guard let (engine, peer) = state.withLock({ state in state.resources[name].flatMap { r in r.engine.map { ($0, r.config.transition?.peer) } } }) else {
            throw DaemonError("resource \(name) has no open log on this host to seal")
        }
        let reason = "\(name) is being handed over to \(peer ?? "another host"): this host no longer accepts writes for it"
        let seal = try await NIOThreadPool.singleton.runIfActive { try engine.seal(nextEpoch: nextEpoch, reason: reason) }
        logger.notice("sealed \(name) at LSN \(seal.endLSN) (\(seal.segment.fileName)) for epoch \(nextEpoch)")
    }

    /// H5: the sealed primary's log is closed (writeback completes) and its directory opened as a
    /// replica's at the seal. Its fetch waits until the cluster names the new primary.
    func convertToReplica(_ name: String) async throws {
        guard state.withLock({ $0.resources[name]?.replica == nil }) else { return }
        let peer = state.withLock { $0.resources[name]?.config.transition?.peer } ?? "another host"
        let result = await takeDown(name)
        exports.setUnavailable(name, reason: "\(name) is handed over to \(peer): this host is a secondary of it now")
        if let result, !result.isComplete {
            throw DaemonError("the sealed log of \(name) could not be written back completely: \(result)")
        }
        try await bringUpReplica(name)
    }

    /// H7: the replica stops, and its directory opens as the primary's log at `epoch`, which starts
    /// a segment of this host at the end of the history (the seal). Idempotent: a log already at
    /// `epoch` opens as it is.
    func promote(_ name: String, epoch: UInt64) async throws {
        guard let resource = state.withLock({ $0.resources[name] }), resource.engine == nil else { return }
        if let replica = resource.replica {
            await replica.stop()
            state.withLock { $0.resources[name]?.replica = nil }
        }
        try await openPrimaryLog(name, promotion: epoch)
        logger.notice("resource \(name) is primary on this host at epoch \(epoch)")
    }
}

extension MemberEntry {
    /// The member keeps a replica that fetches the log: a secondary, or one on its way to primary.
    var fetches: Bool { role == "secondary" || role == "becomingPrimary" }
}
