import BlockStore
import Cluster
import ControlProtocol
import LogEngine
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import NIOPosix
import PeerProtocol
import Replication
import Synchronization
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

extension ResourceManager: PeerRequestHandler {
    // MARK: - Serving peers (this host as primary)

    func primaryLog(of resource: String) -> LogEngine? {
        state.withLock { state in
            guard let entry = state.resources[resource], entry.config.role == "primary" else { return nil }
            return entry.engine
        }
    }

    func fetchSource(of resource: String) -> (any ShippingSource)? {
        state.withLock { state -> (any ShippingSource)? in
            guard let entry = state.resources[resource] else { return nil }
            if let engine = entry.engine, entry.config.role == "primary" { return engine }
            guard let replica = entry.replica, replica.log.status.fork == nil else { return nil }
            return replica.log
        }
    }

    func dataDevice(of resource: String) -> BlockDevice? {
        guard primaryLog(of: resource) != nil else { return nil }
        return exports.exports.first { $0.descriptor.name == resource }?.device
    }

    func size(of resource: String) -> UInt64? {
        state.withLock { $0.resources[resource]?.config.size }
    }

    func gossip(_ entries: [UInt8], from peer: PeerIdentity) -> [UInt8] {
        cluster.receiveGossip(entries, from: peer)
    }

    func fetched(_ resource: String, by peer: PeerIdentity, upTo lsn: UInt64) {
        guard let log = primaryLog(of: resource) else { return }
        log.setRetention(lsn, for: peer.host)
        // A member let go that fetches again (its segments were still here) is back in line.
        let key = ClusterService.needsSyncKey(resource, peer.host)
        if let host = identity?.host, cluster.value(String.self, key) != nil {
            cluster.set(key, String?.none, by: host)
            logger.notice("\(peer.host) fetches \(resource) again: its segments are kept for it again")
        }
    }

    func syncStarting(_ resource: String, by peer: PeerIdentity) {
        storeRetentionHolds(of: resource)
        guard let host = identity?.host else { return }
        let key = ClusterService.needsSyncKey(resource, peer.host)
        if cluster.value(String.self, key) != nil { cluster.set(key, String?.none, by: host) }
    }

    /// Fencing on it comes with forced failover (docs/handover.md §4.2, step 9); until then it is logged.
    func staleSourceSeen(_ resource: String, epoch: UInt64, by peer: PeerIdentity) {
        logger.warning("\(peer.host) fetches \(resource) at epoch \(epoch), newer than this host's history")
    }

    /// The primary's own record of its members' holds (`ROOT/resource-NAME/retention.json`):
    /// stored when a sync begins and with each gossip round when they changed, so a restart
    /// keeps what a member that just joined (and nobody gossiped about yet) needs.
    static let retentionFileName = "retention.json"

    func storeRetentionHolds(of resource: String) {
        guard let entry = state.withLock({ $0.resources[resource] }), let engine = entry.engine else { return }
        let holds = engine.retentionHolds
        guard storedHolds.withLock({ $0[resource] }) != holds else { return }
        do {
            try StateFile.write(holds, named: Self.retentionFileName, in: entry.directory)
            storedHolds.withLock { $0[resource] = holds }
        } catch {
            logger.error("cannot store the retention holds of \(resource): \(error)")
        }
    }

    /// What the other members of `resource` had fetched when this host last heard of them: a
    /// restarted primary keeps their segments (`except` is this host). The lower of the stored
    /// hold and the gossiped position wins (keeping more is always safe).
    func retentionHolds(of resource: String, except host: String) -> [String: UInt64] {
        var holds: [String: UInt64] = [:]
        if let directory = state.withLock({ $0.resources[resource]?.directory }),
            let stored = try? StateFile.read([String: UInt64].self, named: Self.retentionFileName, in: directory)
        {
            holds = stored.filter { !cluster.isDeleted(ClusterService.memberKey(resource, $0.key)) }
        }
        for (member, entry) in cluster.members(of: resource) where member != host && entry.fetches {
            // A member let go (NeedsSync) holds nothing until it syncs again.
            guard cluster.value(String.self, ClusterService.needsSyncKey(resource, member)) == nil else {
                holds[member] = nil
                continue
            }
            holds[member] = min(holds[member] ?? entry.fetchedLSN, entry.fetchedLSN)
        }
        return holds
    }

    // MARK: - Replicas (this host as secondary)

    /// Makes this host a replica of `name`: asks the primary where a sync starts (it holds its log
    /// from there), creates the resource directory, and brings the replica up (sync, fetch, replay).
    func joinResource(name: String, device path: String, volumeGroup: String? = nil) async throws -> String {
        try Names.validateResource(name)
        guard let identity = state.withLock({ $0.identity }), credentials != nil else {
            throw DaemonError("this host is in no cluster yet: run 'marsadm join-cluster' first")
        }
        guard state.withLock({ $0.resources[name] == nil && $0.unreadable[name] == nil }) else {
            throw DaemonError("resource '\(name)' exists on this host already")
        }
        guard let entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)) else {
            throw DaemonError(
                "the cluster has no resource '\(name)' (yet): create it on its primary first; the gossip brings it here within seconds"
            )
        }
        guard entry.primary != identity.host else { throw DaemonError("this host is the primary of '\(name)'") }
        if let wanted = entry.wanted {
            throw DaemonError(
                "resource \(name) is being resized to \(wanted) bytes: join it once that is done ('marsadm view \(name)' on \(entry.primary) "
                    + "shows what it waits for; 'marsadm resize \(name) \(entry.size)' there cancels it)"
            )
        }
        let device: BlockDevice
        do {
            device = try BlockDevice(path: path, cacheMode: settings.cacheMode)
        } catch {
            throw DaemonError("cannot open the data device \(path): \(error). Check the path and permissions.")
        }
        guard device.size >= entry.size else {
            throw DaemonError("the data device \(path) has \(device.size) bytes; resource \(name) needs \(entry.size): give it at least that size")
        }
        if let user = user(of: device) { throw DaemonError("\(path) is already \(user): a device belongs to one resource or export") }
        let start: SyncPosition
        do {
            start = try await ask(entry.primary, .syncBegin(resource: name)) { message in
                if case .syncPosition(let position) = message { return position }
                return nil
            }
        } catch {
            throw DaemonError("cannot start the sync of \(name) from its primary \(entry.primary): \(error)")
        }
        let directoryPath = settings.root + "/" + Names.resourceDirectory(name)
        if access(directoryPath, F_OK) == 0 {
            throw DaemonError("\(directoryPath) exists already: remove it or choose another resource name")
        }
        let directory = try POSIXDirectory(path: directoryPath, create: true)
        var config = ResourceConfig(
            name: name, device: path, size: entry.size, role: "secondary", wanted: "up", createdEpoch: start.epoch,
            sync: SyncRecord(startLSN: start.lsn, startSegment: start.segment, epoch: start.epoch, offset: 0, endLSN: nil)
        )
        config.volumeGroup = volumeGroup
        do {
            try root.sync()
            try ReplicaLog.create(in: directory, startLSN: start.lsn, epoch: start.epoch)
            try StateFile.write(config, named: ResourceConfig.fileName, in: directory)
        } catch {
            for file in (try? directory.list()) ?? [] { try? directory.remove(file) }
            try? directory.removeDirectory()
            throw DaemonError("cannot create resource '\(name)' under \(directoryPath): \(error)")
        }
        state.withLock { $0.resources[name] = Resource(config: config, directory: directory) }
        try await bringUp(name)
        // Every member learns of this one now, not a gossip round later: a host that becomes
        // primary keeps the log for the members it knows of.
        await publishMembershipNow(inQueue: true)
        return "joined resource \(name) as a secondary of \(entry.primary); the initial sync of \(entry.size) bytes runs "
            + "('marsadm view' shows it, 'marsadm wait-resource \(name) --until uptodate' waits for it)"
    }

    /// Opens a replica: its log (replay paused until the sync is done or while the operator paused
    /// it), the fetch from the primary, and the sync if it has not finished.
    func bringUpReplica(_ name: String) async throws {
        guard let found = state.withLock({ $0.resources[name] }) else { return }
        var resource = found
        if let sealed = resource.config.transition, sealed.kind == .handingOver, sealed.phase == .sealed, let end = sealed.finalLSN,
            resource.config.sync?.startLSN != end || resource.config.sync?.endLSN != end
        {
            // A primary that sealed for a handover: its history ends at the seal, which is where
            // this replica is complete (docs/handover.md §3.2); the members' holds are the new primary's.
            let host = identity?.host ?? ""
            let directory = resource.directory
            _ = try await NIOThreadPool.singleton.runIfActive { [logger] in
                try LogEngine.convertToReplica(directory: directory, host: host) { logger.notice("converting the log of \(name): \($0)") }
            }
            try updateConfig(name) { config in
                config.sync = SyncRecord(startLSN: end, startSegment: sealed.finalSegment ?? "", epoch: sealed.epoch, offset: config.size, endLSN: end)
            }
            try? resource.directory.remove(Self.retentionFileName)
            resource.config = state.withLock { $0.resources[name]?.config } ?? resource.config
        }
        let config = resource.config
        let directory = resource.directory
        guard let sync = config.sync else {
            throw DaemonError("\(resource.directory.path)/\(ResourceConfig.fileName) has no sync record: join the resource again")
        }
        do {
            let cacheMode = settings.cacheMode
            let spaceLimit = settings.spaceLimit
            let holds = replicaHolds(of: name, except: identity?.host ?? "")
            let (device, log) = try await NIOThreadPool.singleton.runIfActive { () throws -> (BlockDevice, ReplicaLog) in
                let device: BlockDevice
                do {
                    device = try BlockDevice(path: config.device, cacheMode: cacheMode)
                } catch {
                    throw DaemonError("cannot open the data device \(config.device): \(error)")
                }
                guard device.size >= config.size else {
                    throw DaemonError("the data device \(config.device) has \(device.size) bytes, the resource needs \(config.size)")
                }
                let log = try ReplicaLog.open(
                    directory: directory, device: POSIXFile(device: device), deviceSize: device.size,
                    replayPaused: sync.endLSN == nil || config.replayPaused == true, spaceLimit: spaceLimit, retentionHolds: holds
                ) { [logger = self.logger] message in logger.notice("replica log of \(name): \(message)") }
                return (device, log)
            }
            let fetcher = ReplicaFetcher(
                resource: name, log: log, firstSegment: SegmentName(fileName: sync.startSegment),
                sources: { [cluster, identity] in
                    // The primary first, then the other secondaries that are ahead of this one,
                    // furthest ahead first (one behind could only stall this one).
                    guard let entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)) else { return [] }
                    let hosts = cluster.hosts()
                    let own = identity.flatMap { cluster.members(of: name)[$0.host]?.fetchedLSN } ?? 0
                    let others = cluster.members(of: name).filter {
                        $0.key != entry.primary && $0.key != identity?.host && $0.value.fetches && $0.value.fetchedLSN > own
                    }.sorted { $0.value.fetchedLSN > $1.value.fetchedLSN }.map(\.key)
                    return ([entry.primary] + others).compactMap { host in
                        hosts[host].flatMap { try? PeerAddress(parsing: $0.address) }.map { FetchSource(host: host, address: $0) }
                    }
                },
                group: peerGroup, pool: NIOThreadPool.singleton, credentials: { [weak self] in self?.credentials }, logger: logger
            )
            let replica = Replica(name: name, device: device, log: log, fetcher: fetcher)
            state.withLock { state in
                state.resources[name]?.replica = replica
                state.resources[name]?.error = nil
            }
            // A sealed old primary fetches once the cluster names the new one (its role machine starts it).
            if config.fetchPaused != true && config.transition?.kind != .handingOver { fetcher.start() }
            if sync.endLSN == nil {
                if config.syncPaused != true { startSync(name, replica: replica) }
            } else {
                replica.synced.store(true, ordering: .relaxed)
            }
            logger.info("replica up", metadata: ["resource": "\(name)", "device": "\(config.device)"])
        } catch let error as LogRecoveryError {
            let failure = DaemonError("\(error). The replica stays down: 'marsadm log-verify \(name)' shows its local log.")
            state.withLock { $0.resources[name]?.error = failure.description }
            throw failure
        } catch {
            state.withLock { $0.resources[name]?.error = "\(error)" }
            throw error
        }
    }

    /// Runs the initial sync until it is done, reconnecting after failures; then records where the
    /// replica becomes consistent (the primary's durable end after the copy) and lets replay run.
    func startSync(_ name: String, replica: Replica) {
        keepSyncing(name, replica: replica) { [self] in try await runSync(name, replica: replica) }
    }

    /// Runs `copy` as the replica's sync task until it succeeds, after a failure again and again
    /// (0.2 s doubling to 5 s apart), until the task is cancelled.
    func keepSyncing(_ name: String, replica: Replica, _ copy: @escaping @Sendable () async throws -> Void) {
        replica.startSyncTask { [self] in
            var delay: Duration = .milliseconds(200)
            while !Task.isCancelled {
                do {
                    try await copy()
                    return
                } catch {
                    if Task.isCancelled { return }
                    logger.notice("sync of \(name): \(error); retrying")
                    try? await Task.sleep(for: delay)
                    delay = min(delay * 2, .seconds(5))
                }
            }
        }
    }

    private func runSync(_ name: String, replica: Replica) async throws {
        guard let config = state.withLock({ $0.resources[name]?.config }), let sync = config.sync else { return }
        guard let primary = try await copyFromPrimary(name, replica: replica, from: sync.offset, to: config.size, checkpoint: { [weak self] offset in
            self?.recordSyncOffset(name, offset)
        }) else { return }
        let end = try await ask(primary, .logPosition(resource: name)) { message in
            if case .syncPosition(let position) = message { return position.lsn }
            return nil
        }
        try updateConfig(name) { config in config.sync?.endLSN = end }
        replica.synced.store(true, ordering: .relaxed)
        let paused = state.withLock { $0.resources[name]?.config.replayPaused == true }
        replica.log.setReplayPaused(paused)
        logger.notice("sync of \(name) done; consistent once replay reaches LSN \(end)")
    }

    /// Makes bytes `start..<end` of the replica's device equal to the primary's device (only
    /// chunks that differ travel); `checkpoint` gets offsets every byte before which is durably
    /// copied. Returns the primary's host name, nil when this host is in no cluster.
    @discardableResult
    func copyFromPrimary(
        _ name: String, replica: Replica, from start: UInt64, to end: UInt64, checkpoint: @escaping @Sendable (UInt64) -> Void
    ) async throws -> String? {
        guard let credentials else { return nil }
        guard let address = primaryAddress(of: name) else { throw DaemonError("no address is known for the primary of \(name)") }
        let link = try await PeerLink.connect(to: address.address, group: peerGroup, credentials: credentials, logger: logger).get()
        defer { link.close() }
        let client = SyncClient(
            resource: name, device: replica.device, size: end, start: start, loop: link.eventLoop, pool: NIOThreadPool.singleton,
            logger: logger, checkpoint: checkpoint
        )
        replica.setSync(client)
        try await withTaskCancellationHandler {
            try await client.run(over: link).get()
        } onCancel: {
            link.close()
        }
        return address.host
    }

    private func recordSyncOffset(_ name: String, _ offset: UInt64) {
        do {
            try updateConfig(name) { config in
                let reached = max(config.sync?.offset ?? 0, offset)
                config.sync?.offset = reached
            }
        } catch {
            logger.warning("sync of \(name): cannot store its progress: \(error)")
        }
    }

    func updateConfig(_ name: String, _ change: (inout ResourceConfig) -> Void) throws {
        guard let resource = state.withLock({ $0.resources[name] }) else { return }
        var config = resource.config
        change(&config)
        guard config != resource.config else { return }
        try StateFile.write(config, named: ResourceConfig.fileName, in: resource.directory)
        state.withLock { $0.resources[name]?.config = config }
    }

    func primaryAddress(of name: String) -> (host: String, address: PeerAddress)? {
        guard let entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)),
            let host = cluster.hosts()[entry.primary], let address = try? PeerAddress(parsing: host.address)
        else { return nil }
        return (entry.primary, address)
    }

    /// One request to `host` over a new link, and the first reply `pick` accepts.
    func ask<T: Sendable>(_ host: String, _ request: PeerMessage, pick: @escaping @Sendable (PeerMessage) -> T?) async throws -> T {
        guard let credentials else { throw DaemonError("this host is in no cluster") }
        guard let entry = cluster.hosts()[host], let address = try? PeerAddress(parsing: entry.address) else {
            throw DaemonError("no peer address is known for host \(host)")
        }
        let link = try await PeerLink.connect(to: address, group: peerGroup, credentials: credentials, logger: logger).get()
        defer { link.close() }
        let reply = link.eventLoop.makePromise(of: T.self)
        link.eventLoop.execute {
            link.onMessage = { message in
                if let value = pick(message) {
                    reply.succeed(value)
                } else if case .fetchError(let error) = message {
                    reply.fail(DaemonError("\(host) said: \(error.reason)"))
                }
            }
            link.onClose = { reply.fail(DaemonError("\(host) closed the link without an answer")) }
        }
        link.send(request)
        let timeout = link.eventLoop.scheduleTask(in: .seconds(10)) { reply.fail(DaemonError("\(host) did not answer within 10 s")) }
        defer { timeout.cancel() }
        return try await reply.futureResult.get()
    }

    // MARK: - Switches and waiting

    func setSwitch(_ name: String, _ command: ControlRequest.Command) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }), resource.config.role == "secondary" else {
            throw DaemonError("\(name) is not a replica on this host: \(command.rawValue) applies to secondaries")
        }
        switch command {
        case .pauseSync, .resumeSync:
            guard resource.config.sync?.endLSN == nil else { return "the initial sync of \(name) is done already" }
            let paused = command == .pauseSync
            try updateConfig(name) { $0.syncPaused = paused }
            if let replica = resource.replica {
                if paused { await replica.stopSync() } else { startSync(name, replica: replica) }
            }
            return paused ? "sync of \(name) paused at byte \(resource.replica?.syncClient?.status.offset ?? resource.config.sync?.offset ?? 0); it goes on from there with resume-sync"
                : "sync of \(name) resumed"
        case .pauseFetch, .resumeFetch:
            let paused = command == .pauseFetch
            try updateConfig(name) { $0.fetchPaused = paused }
            if let replica = resource.replica {
                if paused { try? await replica.fetcher.stop(.paused).get() } else { replica.fetcher.start() }
            }
            return "fetch of \(name) \(paused ? "paused" : "resumed")"
        default:
            let paused = command == .pauseReplay
            try updateConfig(name) { $0.replayPaused = paused }
            if let replica = resource.replica, replica.synced.load(ordering: .relaxed) {
                let log = replica.log
                try await NIOThreadPool.singleton.runIfActive { log.setReplayPaused(paused) }
            }
            return paused ? "replay of \(name) paused: its device is a consistent copy as of LSN \(resource.replica?.log.status.replayedLSN ?? 0)"
                : "replay of \(name) resumed"
        }
    }

    /// Waits until this host's replica has finished its sync and replayed everything the primary
    /// had made durable when the command started.
    func waitUpToDate(_ name: String, timeout: Double) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }) else { throw DaemonError("there is no resource '\(name)' on this host") }
        if resource.config.role == "primary" { return "\(name): this host is its primary (UpToDate)" }
        let deadline = ContinuousClock.now + .milliseconds(Int64(timeout * 1000))
        // The primary may be out of reach for a moment (a flapping link), or just handed over: ask
        // the one the cluster names now, until the deadline.
        var known: UInt64?
        while known == nil {
            guard let entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)) else {
                throw DaemonError("the cluster metadata has no primary for \(name)")
            }
            do {
                known = try await ask(entry.primary, .logPosition(resource: name)) { message in
                    if case .syncPosition(let position) = message { return position.lsn }
                    return nil
                }
            } catch {
                if ContinuousClock.now >= deadline {
                    throw DaemonError("\(name): the primary \(entry.primary) could not say how far its log is within \(timeout) s: \(error)")
                }
                try await Task.sleep(for: .milliseconds(500))
            }
        }
        let target = known!
        while true {
            if let replica = state.withLock({ $0.resources[name]?.replica }), let config = state.withLock({ $0.resources[name]?.config }) {
                let log = replica.log.status
                if let problem = log.fork ?? log.failure { throw DaemonError("\(name) cannot become UpToDate: \(problem)") }
                if replica.fetcher.status.needsSync { throw DaemonError("\(name) needs a new sync: \(replica.fetcher.status.problem ?? "")") }
                if let end = config.sync?.endLSN, log.consistent, log.replayedLSN >= max(end, target) {
                    await publishMembershipNow()
                    return "\(name) is UpToDate: replayed to LSN \(log.replayedLSN) (the primary's durable end was \(target))"
                }
                if ContinuousClock.now >= deadline {
                    throw DaemonError(
                        "\(name) is not UpToDate after \(timeout) s: replayed \(log.replayedLSN), fetched \(log.fetchedLSN), waiting for \(target)"
                            + (config.sync?.endLSN == nil ? "; the initial sync is still running" : "")
                    )
                }
            } else if ContinuousClock.now >= deadline {
                throw DaemonError("\(name) is not up on this host ('marsadm up \(name)')")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    /// Waits until this host is the primary of `name` and serves it, or a secondary fetching from
    /// another host that the cluster names as primary.
    func waitForRole(_ name: String, _ target: ControlRequest.WaitTarget, timeout: Double) async throws -> String {
        let deadline = ContinuousClock.now + .milliseconds(Int64(timeout * 1000))
        while true {
            let designated = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name))?.primary
            let me = identity?.host
            let (role, serving) = state.withLock { state -> (String?, Bool) in
                guard let resource = state.resources[name] else { return (nil, false) }
                let serving = resource.config.role == "primary" ? resource.engine != nil
                    : resource.replica.map { ![.stopped, .paused].contains($0.fetcher.status.link) } ?? false
                return (resource.config.role, serving)
            }
            guard let role else { throw DaemonError("there is no resource '\(name)' on this host any more") }
            switch target {
            case .primary where role == "primary" && serving && designated == me:
                return "\(name): this host is its primary and serves it"
            case .secondary where role == "secondary" && serving && designated != nil && designated != me:
                return "\(name): this host is a secondary of \(designated!)"
            default:
                break
            }
            if ContinuousClock.now >= deadline {
                let now = role == "primary" ? (serving ? "primary" : "primary, but down") : (serving ? "a fetching secondary" : "a secondary, not fetching")
                throw DaemonError(
                    "\(name) is not \(target.rawValue) here after \(timeout) s: this host is \(now), and the cluster names \(designated ?? "no host") as primary"
                )
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    // MARK: - Status and gossip

    func replicationStatus(of resource: Resource) -> ReplicationStatus? {
        let name = resource.config.name
        let primary = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name))?.primary
        let now = wallClockMilliseconds()
        let members = cluster.members(of: name).map { host, entry in
            MemberStatus(
                host: host, role: entry.role, disk: entry.disk, replication: entry.replication, fetchedLSN: entry.fetchedLSN,
                replayedLSN: entry.replayedLSN, age: Double(now > entry.updated ? now - entry.updated : 0) / 1000
            )
        }.sorted { $0.host < $1.host }
        guard members.count > 1 || resource.config.role == "secondary" else { return nil }
        var status = ownState(of: resource)
        status.primary = primary
        status.members = members
        return status
    }

    /// This host's disk and replication state of `resource`, as view and the gossip show it.
    func ownState(of resource: Resource) -> ReplicationStatus {
        let name = resource.config.name
        if resource.config.role == "primary" {
            let log = resource.engine?.status
            return ReplicationStatus(
                disk: resource.engine == nil ? "Detached" : "UpToDate", replication: resource.engine == nil ? "Down" : "Replicating",
                fetchedLSN: log?.durableLSN, replayedLSN: log?.writebackLSN
            )
        }
        guard let replica = resource.replica else {
            return ReplicationStatus(disk: "Detached", replication: resource.error == nil ? "Down" : "Failed", problem: resource.error)
        }
        let log = replica.log.status
        let fetch = replica.fetcher.status
        let primary = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name))?.primary
        let primaryEntry = primary.flatMap { cluster.members(of: name)[$0] }
        let primaryDurable = primaryEntry.map { max($0.fetchedLSN, log.fetchedLSN) }
        let sync = resource.config.sync
        let synced = sync?.endLSN != nil
        let disk: String
        if log.fork != nil || fetch.forked {
            disk = "SplitBrain"
        } else if !synced || !log.consistent || log.replayedLSN < (sync?.endLSN ?? 0) {
            disk = "Inconsistent"
        } else if let primaryDurable, log.replayedLSN >= primaryDurable, !fetch.needsSync {
            disk = "UpToDate"
        } else {
            disk = "Outdated"
        }
        let letGo = identity.flatMap { cluster.value(String.self, ClusterService.needsSyncKey(name, $0.host)) }
        let replication: String
        if fetch.needsSync || letGo != nil {
            replication = "NeedsSync"
        } else if log.fork != nil || fetch.forked {
            replication = "SplitBrain"
        } else if log.failure != nil {
            replication = "Failed"
        } else if !synced {
            replication = resource.config.syncPaused == true ? "PausedSync" : "Syncing"
        } else if resource.config.fetchPaused == true {
            replication = "PausedFetch"
        } else if resource.config.replayPaused == true {
            replication = "PausedReplay"
        } else if fetch.logFull {
            replication = "LogFull"
        } else if fetch.link == .unreachable {
            replication = "PrimaryUnreachable"
        } else {
            replication = "Replicating"
        }
        let progress = replica.syncClient?.status
        return ReplicationStatus(
            disk: disk, replication: replication, fetchedLSN: log.fetchedLSN, replayedLSN: log.replayedLSN,
            primaryDurableLSN: primaryDurable, lagBytes: primaryDurable.map { $0 > log.replayedLSN ? $0 - log.replayedLSN : 0 },
            lagSeconds: synced ? max(log.lagSeconds, replica.secondsBehind(replayed: log.replayedLSN, now: wallClockMilliseconds())) : nil,
            syncOffset: synced ? nil : (progress?.offset ?? sync?.offset), syncSize: synced ? nil : resource.config.size,
            syncBytesSent: progress?.bytesSent, fetchSource: fetch.source, problem: log.fork ?? log.failure ?? letGo ?? fetch.problem
        )
    }

    /// Every couple of seconds until the task is cancelled: free heap memory handed back to the
    /// kernel (bursts of log, fetch and sync buffers leave it behind in the allocator's arenas),
    /// retention on primaries and replicas, this host's state of every resource published and
    /// gossiped with every other member.
    func runGossip() async {
        await withDiscardingTaskGroup { tasks in
            tasks.addTask { await self.runTransitions() }
            await gossipRounds()
        }
    }

    private func gossipRounds() async {
        while !Task.isCancelled {
            releaseFreeMemory()
            if let credentials {
                enforceRetention(credentials.local.host)
                holdForOtherMembers(credentials.local.host)
                observePrimaries()
                await commands.run { await self.advanceResizes(credentials.local.host) }
                // In the queue, as the role machines' own publishing: one writer of the member keys at a time.
                await commands.run {
                    await self.evaluateRoles()
                    self.announceMembership(credentials.local.host)
                }
                await cluster.gossipRound(group: peerGroup, credentials: credentials)
            }
            try? await Task.sleep(for: ClusterService.gossipInterval)
        }
    }

    /// On each resource this host is primary of: releases the holds of members that left, and when
    /// the log kept for members passes the retention limit, lets the most lagging one go (it is
    /// marked NeedsSync, visibly, and only a new sync brings it back): the others and the writers
    /// are never held up by a member that stays away.
    /// On each replica: keeps the replayed segments other secondaries have not fetched yet (they may
    /// fetch from here when the primary is out of reach).
    private func holdForOtherMembers(_ host: String) {
        let replicas = state.withLock { state in
            state.resources.values.compactMap { resource -> (String, ReplicaLog)? in
                guard let replica = resource.replica else { return nil }
                return (resource.config.name, replica.log)
            }
        }
        for (name, log) in replicas { log.setRetentionHolds(replicaHolds(of: name, except: host)) }
    }

    /// What the other secondaries of `name` have fetched, as gossiped: a replica keeps its
    /// replayed segments from there on for them (they may fetch from it, e.g. from an old primary
    /// that handed over while they were behind).
    func replicaHolds(of name: String, except host: String) -> [String: UInt64] {
        let primary = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name))?.primary
        var holds: [String: UInt64] = [:]
        for (member, entry) in cluster.members(of: name) where member != host && member != primary && entry.fetches {
            holds[member] = entry.fetchedLSN
        }
        return holds
    }

    /// Notes the primaries' durable ends as gossiped, for the lag in seconds of what is not fetched yet.
    private func observePrimaries() {
        let replicas = state.withLock { state in state.resources.values.compactMap { resource in resource.replica } }
        let now = wallClockMilliseconds()
        for replica in replicas {
            guard let primary = cluster.value(ResourceEntry.self, ClusterService.resourceKey(replica.name))?.primary,
                let entry = cluster.members(of: replica.name)[primary]
            else { continue }
            replica.observePrimary(durable: entry.fetchedLSN, now: now)
        }
    }

    private func enforceRetention(_ host: String) {
        let primaries = state.withLock { state in
            state.resources.values.compactMap { resource -> (String, LogEngine)? in
                guard resource.config.role == "primary", let engine = resource.engine else { return nil }
                return (resource.config.name, engine)
            }
        }
        defer { for (name, _) in primaries { storeRetentionHolds(of: name) } }
        for (name, engine) in primaries {
            for holder in engine.retentionHolds.keys where cluster.isDeleted(ClusterService.memberKey(name, holder)) {
                engine.setRetention(nil, for: holder)
                logger.notice("\(holder) left \(name): its segments are no longer kept")
            }
            // A member fetching from another member (transitive fetch) acknowledges nothing here:
            // what it has, as gossiped, is not needed from this log any more.
            let members = cluster.members(of: name)
            for (holder, lsn) in engine.retentionHolds {
                if let member = members[holder], member.fetchedLSN > lsn { engine.setRetention(member.fetchedLSN, for: holder) }
            }
            // The log kept for a member is what it has not fetched (the primary's own writeback
            // backlog is not the member's doing).
            let status = engine.status
            let limit = settings.retentionLimit ?? status.spaceLimit / 2
            guard let laggard = engine.retentionHolds.min(by: { $0.value < $1.value }), status.durableLSN > laggard.value,
                status.durableLSN - laggard.value > limit
            else { continue }
            engine.setRetention(nil, for: laggard.key)
            let reason = "\(host) let \(laggard.key) go: it had fetched \(name) only to LSN \(laggard.value), \(status.durableLSN - laggard.value) "
                + "bytes behind, past the retention limit of \(limit); 'marsadm invalidate \(name)' on \(laggard.key) syncs it again"
            cluster.set(ClusterService.needsSyncKey(name, laggard.key), reason, by: host)
            logger.warning("\(reason)")
        }
    }

    /// Publishes this host's state of every resource and pushes it to every host at once (after a
    /// join, or when wait-resource answers UpToDate: a command run next on another host, such as a
    /// handover that checks for syncing members, must not see the state of a gossip round ago).
    func publishMembershipNow(inQueue: Bool = false) async {
        guard let credentials else { return }
        if inQueue {
            announceMembership(credentials.local.host)
        } else {
            await commands.run { self.announceMembership(credentials.local.host) }
        }
        await cluster.push(to: Array(cluster.hosts().keys), group: peerGroup, credentials: credentials)
    }

    func announceMembership(_ host: String) {
        let resources = state.withLock { Array($0.resources.values) }
        for resource in resources {
            let own = ownState(of: resource)
            let key = ClusterService.memberKey(resource.config.name, host)
            let old = cluster.value(MemberEntry.self, key)
            let role = LocalRole(role: resource.config.role == "primary" ? .primary : .secondary, transition: resource.config.transition, fenced: resource.config.fenced)
            var entry = MemberEntry(
                role: role.viewName, disk: own.disk, replication: own.replication, fetchedLSN: own.fetchedLSN ?? 0,
                replayedLSN: own.replayedLSN ?? 0, updated: wallClockMilliseconds()
            )
            // The role machine owns the handover fields (it publishes them); positions and use are refreshed here.
            entry.epoch = old?.epoch
            entry.handover = old?.handover
            entry.fenced = old?.fenced
            entry.fork = old?.fork
            entry.epochs = old?.epochs
            let users = users(of: resource)
            entry.inUse = users.isEmpty ? nil : users
            if cluster.value(ResourceEntry.self, ClusterService.resourceKey(resource.config.name))?.wanted != nil {
                entry.readySize = readySize(of: resource)
                entry.resizeProblem = resizeProblems.withLock { $0[resource.config.name] }
            }
            // The timestamp alone changes nothing worth a gossip: compare without it.
            if let old, old.sameState(as: entry) { continue }
            cluster.set(key, entry, by: host)
        }
    }
}
