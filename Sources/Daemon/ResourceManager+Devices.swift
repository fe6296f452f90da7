import BlockStore
import LocalDevice
import Logging
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The local block device of a resource on its primary: the kernel's NBD client connected to
/// marsd's own Unix socket, /dev/mars/NAME linked to the /dev/nbdN it got. A device set up over
/// netlink stays while marsd restarts (its requests wait for the reconnect that `reattach` makes);
/// one set up over ioctl ends with marsd, and `reattach` makes a new one.
extension ResourceManager {
    var links: DeviceLinks { settings.deviceLinks }

    func attach(_ name: String) async throws -> String {
        guard let resource = state.withLock({ $0.resources[name] }) else { throw DaemonError("there is no resource '\(name)' on this host") }
        guard resource.config.role == "primary" else {
            throw DaemonError("resource \(name) is a secondary on this host: only its primary has a local device")
        }
        guard resource.engine != nil else { throw DaemonError("resource \(name) is down: 'marsadm up \(name)' first, then attach it") }
        if let index = resource.config.attachedDevice {
            return "resource \(name) is attached already: \(deviceDescription(name, index))"
        }
        let index = try await connectKernelClient(name, at: nil)
        do {
            try setAttached(name, index)
            try links.create(name, target: "/dev/nbd\(index)")
        } catch {
            try? kernelClient.disconnect(index: index)
            try? setAttached(name, nil)
            throw DaemonError("cannot record the device of resource \(name): \(error); /dev/nbd\(index) is disconnected again")
        }
        logger.info("resource attached", metadata: ["resource": "\(name)", "device": "/dev/nbd\(index)", "interface": "\(kernelClient.interface(of: index))"])
        return "resource \(name) is attached: \(deviceDescription(name, index)) (\(resource.config.size) bytes)"
    }

    /// "/dev/mars/NAME -> /dev/nbdN", with what an ioctl device cannot do (for attach and view).
    func deviceDescription(_ name: String, _ index: Int32) -> String {
        let link = "\(links.path(of: name)) -> /dev/nbd\(index)"
        guard kernelClient.interface(of: index) == .ioctl else { return link }
        return link + " over the ioctl interface: the device ends when marsd stops (a restart makes a new one; a filesystem mounted on the old one gets I/O errors)"
    }

    func detach(_ name: String, force: Bool) async throws -> String {
        guard let message = try await detachIfAttached(name, force: force, doing: "detach it") else {
            throw DaemonError("resource \(name) is not attached ('marsadm attach \(name)' gives it \(links.path(of: name)))")
        }
        return message
    }

    /// Detaches the resource's local device when it has one, refusing while it is in use unless
    /// `force`. Returns what it did, nil when there was no device.
    func detachIfAttached(_ name: String, force: Bool, doing action: String) async throws -> String? {
        guard let index = state.withLock({ $0.resources[name]?.config.attachedDevice }) else { return nil }
        let link = links.path(of: name)
        if !force {
            let users = DeviceUsers.of("/dev/nbd\(index)")
            if !users.isEmpty {
                throw DaemonError(
                    "\(link) (/dev/nbd\(index)) is in use: \(users.joined(separator: "; ")). Unmount it and stop what holds it, "
                        + "then \(action) again; --force does it anyway (whatever uses the device gets I/O errors)"
                )
            }
        }
        do {
            try kernelClient.disconnect(index: index)
        } catch {
            // EINVAL/ENOENT: not connected any more (its dead-connection time ran out, or the host rebooted).
            guard error.errno == EINVAL || error.errno == ENOENT else {
                throw DaemonError(NBDKernelClient.explanation(of: error, interface: kernelClient.interface(of: index)))
            }
        }
        try links.remove(name)
        try setAttached(name, nil)
        logger.info("resource detached", metadata: ["resource": "\(name)", "device": "/dev/nbd\(index)", "forced": "\(force)"])
        return "\(link) (/dev/nbd\(index)) is detached"
    }

    /// After marsd (re)started and the resource came up: hands the kernel's device, whose
    /// connection died with the old marsd, a new connection; or connects it anew when the kernel
    /// forgot it (a reboot, the dead-connection time ran out, or it was an ioctl device, which
    /// ended with the old marsd).
    func reattach(_ name: String) async {
        guard let index = state.withLock({ $0.resources[name]?.config.attachedDevice }) else { return }
        do {
            let reconnected = try await connectKernelClient(name, at: index)
            if reconnected != index { try setAttached(name, reconnected) }
            try links.create(name, target: "/dev/nbd\(reconnected)")
            logger.info("resource reattached", metadata: ["resource": "\(name)", "device": "/dev/nbd\(reconnected)"])
        } catch {
            logger.error("resource \(name): its device /dev/nbd\(index) could not be reconnected: \(error). 'marsadm detach --force \(name)' and 'marsadm attach \(name)' make a new one")
        }
        // The kernel keeps the size it had: a resize settled while marsd was gone from it reaches it now.
        do {
            try resizeAttachedDevice(name)
        } catch {
            logger.error("resource \(name): \(error)")
        }
    }

    /// Does the NBD handshake on marsd's own socket, then gives the socket to the kernel: as a
    /// replacement for the dead connection of `/dev/nbd<index>` when the kernel still has that
    /// device configured, else as a new device. Returns the device's index.
    private func connectKernelClient(_ name: String, at index: Int32?) async throws -> Int32 {
        guard let socketPath = settings.nbdSocketPath else {
            throw DaemonError("a local device needs marsd's NBD Unix socket, which the kernel connects to: start marsd with --unix PATH")
        }
        let kernelClient = self.kernelClient
        return try await NIOThreadPool.singleton.runIfActive {
            let (socket, export) = try NBDClientHandshake.connect(unixSocket: socketPath, export: name)
            // The kernel holds its own reference to the socket.
            defer { close(socket) }
            do {
                if let index, try kernelClient.isConnected(index: index) {
                    try kernelClient.reconnect(index: index, socket: socket)
                    return index
                }
                return try kernelClient.connect(socket: socket, export: export, index: index)
            } catch let error as SystemError {
                throw DaemonError(NBDKernelClient.explanation(of: error, interface: kernelClient.interfaceForNewDevice()))
            }
        }
    }

    private func setAttached(_ name: String, _ index: Int32?) throws {
        guard var resource = state.withLock({ $0.resources[name] }) else { return }
        resource.config.attachedDevice = index
        try StateFile.write(resource.config, named: ResourceConfig.fileName, in: resource.directory)
        let config = resource.config
        state.withLock { $0.resources[name]?.config = config }
    }
}
