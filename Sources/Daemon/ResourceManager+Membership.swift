import BlockStore
import Cluster
import LogEngine
import Logging
import PeerProtocol
import Replication
import Synchronization
import TransactionLog

extension ResourceManager {
    /// This host stops being a member of `name` (a secondary): fetch, sync and replay stop, the
    /// local log and state go, the data device stays as it is. The primary stops keeping segments
    /// for it once the gossip tells it.
    func leaveResource(_ name: String) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }), let host = identity?.host else { return "" }
        try refuseDuringRoleChange(resource, doing: "leave it")
        guard resource.config.role == "secondary" else {
            throw DaemonError(
                "this host is the primary of \(name): it cannot leave it; 'marsadm delete-resource \(name)' removes the resource once it is the last member"
            )
        }
        let consistency = resource.replica.map { replica in
            let status = replica.log.status
            return status.consistent && resource.config.sync?.endLSN.map { status.replayedLSN >= $0 } == true
                ? "a consistent copy as of LSN \(status.replayedLSN)" : "Inconsistent (its sync or replay had not finished)"
        } ?? "as it was"
        await takeDown(name)
        try removeResourceDirectory(resource.directory)
        state.withLock { _ = $0.resources.removeValue(forKey: name) }
        cluster.set(ClusterService.memberKey(name, host), MemberEntry?.none, by: host)
        logger.info("left resource", metadata: ["resource": "\(name)"])
        return "left resource \(name); the data device \(resource.config.device) stays, \(consistency)"
    }

    /// Removes `name` from the cluster, on its primary, once no other member holds it.
    func deleteResource(_ name: String) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }), let host = identity?.host else { return "" }
        try refuseDuringRoleChange(resource, doing: "delete it")
        guard resource.config.role == "primary" else {
            throw DaemonError("delete-resource runs on the primary of \(name); on this secondary, 'marsadm leave-resource \(name)' leaves it")
        }
        let others = cluster.keys(withPrefix: "resource/\(name)/member/").map { String($0.split(separator: "/").last!) }
            .filter { $0 != host }.sorted()
        guard others.isEmpty else {
            throw DaemonError("\(others.joined(separator: ", ")) still hold \(name): run 'marsadm leave-resource \(name)' there first")
        }
        try setWanted(name, "down")
        await takeDown(name)
        try removeResourceDirectory(resource.directory)
        state.withLock { _ = $0.resources.removeValue(forKey: name) }
        cluster.set(ClusterService.memberKey(name, host), MemberEntry?.none, by: host)
        cluster.set(ClusterService.resourceKey(name), ResourceEntry?.none, by: host)
        return "deleted resource \(name); its log is written back and the data device \(resource.config.device) holds every write"
    }

    /// Throws this replica's state away and syncs it again from the primary: after NeedsSync, a
    /// split brain on this host's side, or a damaged local log. Only chunks that differ travel.
    func invalidate(_ name: String) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }) else { return "" }
        try refuseDuringRoleChange(resource, doing: "sync it again")
        guard resource.config.role == "secondary" else {
            throw DaemonError("this host is the primary of \(name): invalidate repairs a secondary from its primary")
        }
        guard let entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)) else {
            throw DaemonError("the cluster metadata has no primary for \(name)")
        }
        let start: SyncPosition
        do {
            start = try await ask(entry.primary, .syncBegin(resource: name)) { message in
                if case .syncPosition(let position) = message { return position }
                return nil
            }
        } catch {
            throw DaemonError("cannot start a new sync of \(name) from \(entry.primary): \(error)")
        }
        await takeDown(name)
        for file in try resource.directory.list() where file != ResourceConfig.fileName {
            try resource.directory.remove(file)
        }
        try ReplicaLog.create(in: resource.directory, startLSN: start.lsn, epoch: start.epoch)
        try updateConfig(name) { config in
            config.sync = SyncRecord(startLSN: start.lsn, startSegment: start.segment, epoch: start.epoch, offset: 0, endLSN: nil)
            config.syncPaused = nil
        }
        try await bringUp(name)
        return "\(name) syncs again from \(entry.primary) (it is Inconsistent until the sync and its replay are done)"
    }

    /// Removes this host from its cluster: refused while it holds resources.
    func leaveCluster() async throws -> String {
        guard let identity = identity, let credentials else { throw DaemonError("this host is in no cluster") }
        let names = state.withLock { Array($0.resources.keys).sorted() }
        guard names.isEmpty else {
            throw DaemonError("this host still holds \(names.joined(separator: ", ")): leave-resource (or delete-resource on a primary) first")
        }
        cluster.set(ClusterService.hostKey(identity.host), HostEntry?.none, by: identity.host)
        // Tell the others now; whoever is unreachable learns it from the rest later.
        await cluster.gossipRound(group: peerGroup, credentials: credentials)
        try cluster.reset()
        try root.remove(ClusterIdentity.fileName)
        try root.sync()
        state.withLock { $0.identity = nil }
        return "this host left cluster \(identity.cluster)"
    }

    func removeResourceDirectory(_ directory: any StorageDirectory) throws {
        for file in try directory.list() { try directory.remove(file) }
        try POSIXDirectory(path: directory.path).removeDirectory()
        try root.sync()
    }
}
