import BlockStore
import Cluster
import LocalDevice
import LogEngine
import LogicalVolumes
import Logging
import NBDProtocol
import NBDServer
import NIOPosix
import Replication
import Synchronization

/// `marsadm resize` and the gossip rounds that carry it out, following the rule in
/// `ResourceSize`: the primary asks (`wanted` in the resource entry), every secondary grows its
/// device and copies the new tail while nobody can write it, says how far it is ready, and the
/// primary raises the size once all are ready. Every step is either in resource.json or in the
/// gossiped metadata, and each round starts from there: restarts in any order resume.
extension ResourceManager {
    func resize(_ name: String, to wanted: UInt64, force: Bool) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }), let host = identity?.host else {
            throw DaemonError("there is no resource '\(name)' on this host (marsadm view lists them)")
        }
        let key = ClusterService.resourceKey(name)
        guard resource.config.role == "primary" else {
            let primary = cluster.value(ResourceEntry.self, key)?.primary
            throw DaemonError("this host is a secondary of \(name): resize it on its primary\(primary.map { " (\($0))" } ?? "")")
        }
        guard resource.engine != nil, let export = exports.exports.first(where: { $0.descriptor.name == name }) else {
            throw DaemonError("resource \(name) is down: 'marsadm up \(name)' first, then resize it")
        }
        let current = resource.config.size
        let change: ResourceSize.Change
        do {
            change = try ResourceSize.change(of: name, from: current, to: wanted, force: force)
        } catch {
            throw DaemonError(error.description)
        }
        var entry = cluster.value(ResourceEntry.self, key) ?? ResourceEntry(size: current, primary: host)
        switch change {
        case .unchanged:
            guard let pending = entry.wanted else { return "resource \(name) has \(current) bytes already" }
            entry.wanted = nil
            cluster.set(key, entry, by: host)
            return "resource \(name) keeps its \(current) bytes; the pending resize to \(pending) bytes is cancelled"
        case .shrink:
            let note = try applySize(name, wanted, host: host)
            return "resource \(name) shrunk to \(wanted) bytes (forced): clients see the new size, the data devices keep theirs" + note
        case .grow:
            let device = export.device
            var grown = ""
            if try device.refreshSize() < wanted {
                guard let group = resource.config.volumeGroup else {
                    throw DaemonError(
                        "the data device \(resource.config.device) has \(device.size) bytes, less than \(wanted): grow it first "
                            + "(lvextend, or truncate -s for a file), then resize again"
                    )
                }
                try await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.extend(name, in: group, to: wanted) }
                try device.refreshSize()
                grown = "logical volume \(group)/\(name) grown to \(device.size) bytes; "
            }
            entry.wanted = wanted
            cluster.set(key, entry, by: host)
            switch settleResize(name, host: host) {
            case .waiting(let why)?:
                return grown + "resource \(name) grows \(why); it grows once every member is ready ('marsadm view \(name)' shows it)"
            case .applied(let note)?:
                return grown + "resource \(name) has \(wanted) bytes now" + note
            case nil:
                throw DaemonError("resource \(name) went down during the resize: 'marsadm up \(name)', then resize it again")
            }
        }
    }

    /// One step of every pending resize on this host (each gossip round): a primary settles its
    /// resources' resizes, a secondary follows the size and gets ready for a wanted one.
    func advanceResizes(_ host: String) async {
        let resources = state.withLock { Array($0.resources.values) }
        for resource in resources {
            let name = resource.config.name
            if resource.config.role == "primary" {
                guard resource.engine != nil else { continue }
                // resource.json is the primary's truth; the entry follows it (a crash between the two).
                let key = ClusterService.resourceKey(name)
                if var entry = cluster.value(ResourceEntry.self, key), entry.primary == host, entry.size != resource.config.size {
                    entry.size = resource.config.size
                    cluster.set(key, entry, by: host)
                }
                _ = settleResize(name, host: host)
            } else if let replica = resource.replica {
                await prepareForResize(name, replica: replica)
            }
        }
    }

    /// What settling a pending resize did.
    enum ResizeProgress {
        /// The size is raised; what became of /dev/mars/NAME.
        case applied(String)
        /// Not yet, and why.
        case waiting(String)
    }

    /// Raises the size when every member is ready for the wanted one; otherwise says who is not.
    /// nil when nothing is pending.
    @discardableResult
    func settleResize(_ name: String, host: String) -> ResizeProgress? {
        guard let pending = pendingResize(name, host: host) else { return nil }
        switch pending.settlement {
        case .settled(let size):
            do {
                return .applied(try applySize(name, size, host: host))
            } catch {
                logger.error("resize of \(name) to \(size) bytes: \(error)")
                return .waiting("to \(size) bytes, but it cannot be stored (tried again every 2 s): \(error)")
            }
        case .waiting:
            return .waiting(pending.description)
        }
    }

    /// The pending resize of `name` on its primary as things stand: who is ready for it, in words
    /// for view and the command's answer.
    private func pendingResize(_ name: String, host: String) -> (settlement: ResourceSize.Settlement, description: String)? {
        guard let resource = state.withLock({ $0.resources[name] }), resource.config.role == "primary", let engine = resource.engine,
            let device = exports.exports.first(where: { $0.descriptor.name == name })?.device,
            let wanted = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name))?.wanted
        else { return nil }
        var ready = [host: device.size]
        let members = cluster.members(of: name)
        for (member, entry) in members where member != host && entry.fetches {
            // A member let go syncs everything again anyway, at the size of that time.
            guard cluster.value(String.self, ClusterService.needsSyncKey(name, member)) == nil else { continue }
            ready[member] = entry.readySize ?? 0
        }
        // A member that has just joined holds the log from its sync's start on, before its state
        // reaches this host by gossip: it counts too.
        for holder in engine.retentionHolds.keys where ready[holder] == nil {
            ready[holder] = 0
        }
        let settlement = ResourceSize.settle(current: resource.config.size, wanted: wanted, ready: ready)
        guard case .waiting(let hosts) = settlement else { return (settlement, "to \(wanted) bytes: every member is ready") }
        let waiting = hosts.map { member -> String in
            guard let entry = members[member] else { return "\(member) (no state of it has arrived yet)" }
            let readiness = entry.readySize.map { "ready to \($0) bytes" } ?? "not ready"
            return "\(member) (\(readiness)\(entry.resizeProblem.map { ": \($0)" } ?? ""))"
        }
        return (settlement, "to \(wanted) bytes, waiting for " + waiting.joined(separator: ", "))
    }

    /// The primary serves `size` from now on: resource.json first (a restart serves what it
    /// says), then the export, the cluster (members replay within it) and /dev/mars/NAME.
    /// Returns what became of /dev/mars/NAME, for the operator.
    private func applySize(_ name: String, _ size: UInt64, host: String) throws -> String {
        try updateConfig(name) { $0.size = size }
        exports.exports.first { $0.descriptor.name == name }?.resize(to: size)
        cluster.set(ClusterService.resourceKey(name), ResourceEntry(size: size, primary: host), by: host)
        logger.notice("resource \(name) has \(size) bytes now")
        guard let index = state.withLock({ $0.resources[name]?.config.attachedDevice }) else { return "" }
        do {
            try resizeAttachedDevice(name)
            return "; \(links.path(of: name)) (/dev/nbd\(index)) too (resize2fs grows a filesystem on it online)"
        } catch {
            logger.error("resource \(name): \(error)")
            return "; but \(error)"
        }
    }

    /// Tells the kernel the size of the resource's /dev/nbdN, when it is attached.
    func resizeAttachedDevice(_ name: String) throws {
        guard let config = state.withLock({ $0.resources[name]?.config }), let index = config.attachedDevice else { return }
        do {
            try kernelClient.resize(index: index, to: config.size)
        } catch {
            throw DaemonError("\(links.path(of: name)) (/dev/nbd\(index)) keeps its old size: \(error); 'marsadm detach' and 'attach' give it the new one")
        }
    }

    /// A secondary's step: follow the size the primary set, and for a wanted size grow the data
    /// device (--lvm) and copy the new tail from the primary.
    private func prepareForResize(_ name: String, replica: Replica) async {
        guard let config = state.withLock({ $0.resources[name]?.config }), config.sync?.endLSN != nil,
            let entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name))
        else { return }
        var problem: String?
        defer { resizeProblems.withLock { $0[name] = problem } }
        do {
            if entry.size != config.size { try updateConfig(name) { $0.size = entry.size } }
            let capacity = try replica.device.refreshSize()
            let synced = config.syncedSize ?? config.size
            switch ResourceSize.memberStep(logical: entry.size, wanted: entry.wanted, capacity: capacity, synced: synced) {
            case .nothing:
                break
            case .grow(let size):
                guard let group = config.volumeGroup else {
                    problem = "its data device \(config.device) has \(capacity) bytes: grow it to \(size) (lvextend, or truncate -s for a file)"
                    return
                }
                try await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.extend(name, in: group, to: size) }
                try replica.device.refreshSize()
                logger.notice("resize of \(name): logical volume \(group)/\(name) grown to \(replica.device.size) bytes")
            case .copyTail(let start, let end):
                guard !replica.isSyncing else { return }
                logger.notice("resize of \(name): copying bytes \(start)..<\(end) from the primary")
                keepSyncing(name, replica: replica) { [self] in
                    try await copyFromPrimary(name, replica: replica, from: start, to: end) { [weak self] offset in
                        self?.recordSyncedSize(name, offset)
                    }
                    recordSyncedSize(name, end)
                    logger.notice("resize of \(name): ready for \(end) bytes")
                }
            }
        } catch {
            problem = "\(error)"
        }
    }

    private func recordSyncedSize(_ name: String, _ offset: UInt64) {
        do {
            try updateConfig(name) { config in config.syncedSize = max(config.syncedSize ?? config.size, offset) }
        } catch {
            logger.warning("resize of \(name): cannot store its progress: \(error)")
        }
    }

    /// How far this secondary is ready for a pending resize (ResourceSize.ready), for the gossip.
    func readySize(of resource: Resource) -> UInt64? {
        guard let replica = resource.replica, resource.config.sync?.endLSN != nil else { return nil }
        return ResourceSize.ready(capacity: replica.device.size, synced: resource.config.syncedSize ?? resource.config.size)
    }

    /// What view says about a pending resize of `resource` on its primary.
    func pendingResizeDescription(of resource: Resource) -> String? {
        guard let host = identity?.host else { return nil }
        return pendingResize(resource.config.name, host: host)?.description
    }
}
