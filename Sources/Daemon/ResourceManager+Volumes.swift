import LocalDevice
import LogicalVolumes
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Data devices made as logical volumes (--lvm): named after the resource, made before the
/// resource and removed again when it cannot be made, so a refusal leaves nothing behind.
extension ResourceManager {
    func createResourceOnNewVolume(name: String, group: String, size: UInt64) async throws -> String {
        try checkNameIsFree(name)
        let device = try await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.create(name, in: group, size: size) }
        do {
            return "logical volume \(group)/\(name) created; " + (try await createResource(name: name, device: device, volumeGroup: group))
        } catch {
            try? await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.remove(name, in: group) }
            throw error
        }
    }

    /// The logical volume gets the resource's size, as the cluster knows it.
    func joinResourceOnNewVolume(name: String, group: String) async throws -> String {
        try checkNameIsFree(name)
        guard let entry = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)) else {
            throw DaemonError("the cluster has no resource '\(name)' (yet): create it on its primary first; the gossip brings it here within seconds")
        }
        let device = try await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.create(name, in: group, size: entry.size) }
        do {
            return "logical volume \(group)/\(name) created; " + (try await joinResource(name: name, device: device, volumeGroup: group))
        } catch {
            try? await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.remove(name, in: group) }
            throw error
        }
    }

    /// Leaves the resource and removes its logical volume: refused before anything happens while
    /// another user has the volume open; the volume goes only when libdevmapper counts no opens.
    func leaveResourceRemovingVolume(_ name: String) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }) else { return "" }
        guard let group = resource.config.volumeGroup else {
            throw DaemonError(
                "the data device \(resource.config.device) of \(name) was not made with --lvm: leave without --remove-lv and remove it yourself"
            )
        }
        let device = resource.config.device
        let users = DeviceUsers.of(device)
        guard users.isEmpty else {
            throw DaemonError("\(device) is in use: \(users.joined(separator: "; ")). Unmount it and stop what holds it, then leave again")
        }
        let left = try await leaveResource(name)
        // The replica's threads close their handles of the device as they end, shortly after the leave.
        for _ in 0..<100 where ((try? LogicalVolumes.openCount(device)) ?? 0) > 0 {
            try await Task.sleep(for: .milliseconds(100))
        }
        do {
            try await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.remove(name, in: group) }
        } catch {
            throw DaemonError("\(left); but logical volume \(group)/\(name) stays: \(error)")
        }
        return "\(left); logical volume \(group)/\(name) removed"
    }

    private func checkNameIsFree(_ name: String) throws {
        try Names.validateResource(name)
        guard state.withLock({ $0.resources[name] == nil && $0.unreadable[name] == nil }) else {
            throw DaemonError("resource '\(name)' exists on this host already")
        }
    }
}
