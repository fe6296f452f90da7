import Cluster
import ControlProtocol
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

    /// Leaves the resource (a command like the others) and then removes its logical volume:
    /// refused before anything happens while another user has the volume open. The replica's
    /// handles of the device are released asynchronously after the leave, so the removal runs
    /// after the command and waits (5 s at most) for libdevmapper to count no opens.
    func leaveResourceRemovingVolume(_ request: ControlRequest) async -> ControlResponse {
        let left: Result<(message: String, group: String, name: String, device: String), any Error> = await commands.run {
            do {
                let name = try self.existingName(request)
                guard let config = self.state.withLock({ $0.resources[name]?.config }) else { throw DaemonError("there is no resource '\(name)'") }
                guard let group = config.volumeGroup else {
                    throw DaemonError(
                        "the data device \(config.device) of \(name) was not made with --lvm: leave without --remove-lv and remove it yourself"
                    )
                }
                let users = DeviceUsers.of(config.device)
                guard users.isEmpty else {
                    throw DaemonError("\(config.device) is in use: \(users.joined(separator: "; ")). Unmount it and stop what holds it, then leave again")
                }
                return .success((try await self.leaveResource(name), group, name, config.device))
            } catch {
                return .failure(error)
            }
        }
        guard case .success(let (message, group, name, device)) = left else {
            if case .failure(let error) = left { return ControlResponse(error: "\(error)") }
            return ControlResponse(error: "leave-resource failed")
        }
        // Bounded: a user that opens the volume now keeps it, and the error says so.
        for _ in 0..<50 where ((try? LogicalVolumes.openCount(device)) ?? 0) > 0 {
            try? await Task.sleep(for: .milliseconds(100))
        }
        do {
            try await NIOThreadPool.singleton.runIfActive { try LogicalVolumes.remove(name, in: group) }
        } catch {
            return ControlResponse(error: "\(message); but logical volume \(group)/\(name) stays: \(error)")
        }
        return ControlResponse(message: "\(message); logical volume \(group)/\(name) removed")
    }

    private func checkNameIsFree(_ name: String) throws {
        try Names.validateResource(name)
        guard state.withLock({ $0.resources[name] == nil && $0.unreadable[name] == nil }) else {
            throw DaemonError("resource '\(name)' exists on this host already")
        }
    }
}
