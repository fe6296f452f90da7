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
import PeerProtocol
import Replication
import Synchronization
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

/// How resources are stored and served: the root directory and the log's limits.
public struct ResourceSettings: Sendable {
    public var root = "/mars"
    public var cacheMode: CacheMode = .buffered
    public var segmentSize: UInt64 = 256 << 20
    public var spaceLimit: UInt64 = 64 << 30
    /// The memory every resource's pending changes share (`--log-pending-mib`).
    public var pendingMemory = PendingMemory(capacity: 64 << 20)
    /// Where this host listens for peers (`--peer`).
    public var peerAddress: String?
    /// Where other hosts reach it (`--peer-advertise`, e.g. through NAT or a proxy); `peerAddress` when nil.
    public var advertisedPeerAddress: String?
    /// Bytes of log a primary keeps for members that have not fetched them; beyond it the most
    /// lagging member is let go (NeedsSync) so the others and the writers go on. nil: half the log space.
    public var retentionLimit: UInt64?
    /// marsd's own NBD Unix socket (`--unix`): the kernel's NBD client of an attached resource connects there.
    public var nbdSocketPath: String?
    /// Where the links to attached resources' devices go.
    public var deviceLinks = DeviceLinks()
    /// How attached resources' devices are set up in the kernel (`--nbd-interface`).
    public var nbdInterface: NBDInterface = .auto

    public init() {}

    func engineConfiguration(host: String) -> LogEngineConfiguration {
        var configuration = LogEngineConfiguration(host: host)
        configuration.segmentSize = segmentSize
        configuration.spaceLimit = spaceLimit
        configuration.pendingMemory = pendingMemory
        return configuration
    }
}

/// The resources of this host: their state on disk under the root, their log engines, and their
/// exports. Every change is persisted before it is reported, so a restart restores each resource
/// as the operator left it.
final class ResourceManager: Sendable {
    struct Resource {
        var config: ResourceConfig
        var directory: any StorageDirectory
        var engine: LogEngine?
        /// The data device a primary's export serves (with `engine`).
        var device: BlockDevice?
        var replica: Replica?
        var error: String?
        /// What the last `down` could not do (acknowledged writes not on the data device); shown
        /// by view until the resource comes up again.
        var downProblem: String?
    }

    struct State {
        var identity: ClusterIdentity?
        var resources: [String: Resource] = [:]
        /// Resource directories whose resource.json cannot be read, and why: shown as failed, never
        /// served, their name not reusable, until the operator restores the file and restarts marsd.
        var unreadable: [String: String] = [:]
    }

    let settings: ResourceSettings
    let root: any StorageDirectory
    /// Held while marsd runs: a second marsd on the same root would recover the same logs and
    /// delete segments the first one still appends to.
    private let rootLock: FileLock
    let exports: ExportTable
    let logger: Logger
    let state = Mutex(State())
    /// Serializes commands: a resource going up or down is never raced by another command.
    let commands = CommandQueue()
    let cluster: ClusterService
    /// The retention holds last stored per resource (retention.json), so unchanged holds are not
    /// written again.
    let storedHolds = Mutex<[String: [String: UInt64]]>([:])
    /// Why this host's replica of a resource cannot get ready for a pending resize, by resource:
    /// gossiped with its state, so the primary's view names it.
    let resizeProblems = Mutex<[String: String]>([:])
    /// The event loops peer links run on.
    let peerGroup: any EventLoopGroup
    /// The role machines (handover) and the commands waiting for them.
    let roles = RoleDriver()
    /// The kernel's NBD client, which serves attached resources' /dev/nbdN.
    let kernelClient: NBDKernelClient

    init(settings: ResourceSettings, exports: ExportTable, peerGroup: any EventLoopGroup, logger: Logger) throws {
        self.settings = settings
        self.exports = exports
        self.logger = logger
        self.peerGroup = peerGroup
        kernelClient = NBDKernelClient(interface: settings.nbdInterface)
        do {
            root = try POSIXDirectory(path: settings.root, create: true)
        } catch {
            throw DaemonError("cannot use \(settings.root) as the root directory: \(error). Create it or give another --root.")
        }
        let lockPath = settings.root + "/" + Self.lockFileName
        switch try FileLock.acquire(lockPath) {
        case .success(let lock):
            rootLock = lock
        case .failure(let holder):
            let who = holder.pid > 0 ? "marsd (pid \(holder.pid))" : "another process"
            throw DaemonError(
                "\(settings.root) is in use by \(who): it holds \(lockPath). Stop that marsd first, or give this one another --root."
            )
        }
        let identity = try StateFile.read(ClusterIdentity.self, named: ClusterIdentity.fileName, in: root)
        cluster = try ClusterService(root: root, logger: logger)
        var resources: [String: Resource] = [:]
        var unreadable: [String: String] = [:]
        for entry in try root.list() where entry.hasPrefix("resource-") {
            let name = String(entry.dropFirst("resource-".count))
            guard (try? Names.validateResource(name)) != nil else { continue }
            let config: ResourceConfig
            do {
                let directory = try POSIXDirectory(path: settings.root + "/" + entry)
                guard let read = try StateFile.read(ResourceConfig.self, named: ResourceConfig.fileName, in: directory) else {
                    logger.warning("ignoring \(settings.root)/\(entry): it has no \(ResourceConfig.fileName)")
                    continue
                }
                config = read
                resources[name] = Resource(config: config, directory: directory)
            } catch {
                // One damaged resource keeps only itself down.
                logger.error("resource \(name) stays down: \(error)")
                unreadable[name] = "\(error)"
                continue
            }
            if exports.exports.contains(where: { $0.descriptor.name == name }) {
                throw DaemonError(
                    "--export \(name)=... has the name of resource '\(name)' under \(settings.root): its clients would bypass the log. Give the export another name."
                )
            }
        }
        state.withLock { state in
            state.identity = identity
            state.resources = resources
            state.unreadable = unreadable
        }
        // A client asking for a resource that is not served is told why.
        for (name, resource) in resources where resource.config.wanted != "up" {
            exports.setUnavailable(name, reason: Self.downReason(name))
        }
        for (name, problem) in unreadable {
            exports.setUnavailable(name, reason: "resource \(name) cannot be used: \(problem)")
        }
        cluster.onRoleKeysChanged = { [weak self] names in self?.roleKeysChanged(names) }
    }

    static func downReason(_ name: String) -> String { "resource \(name) is down ('marsadm up \(name)' brings it up)" }

    /// Marks every resource that is wanted up and not up yet as pending in the export table, so a
    /// client that connects before its recovery is done waits for it instead of hearing that it
    /// does not exist. Call before the NBD listeners start.
    func expectWanted() {
        // Replicas have no export: nothing waits for them.
        let wanted = state.withLock { state in
            state.resources.values.filter { $0.config.wanted == "up" && $0.engine == nil && $0.config.role == "primary" && $0.config.transition == nil }.map(\.config.name)
        }
        for name in wanted { exports.expect(name) }
    }

    static let lockFileName = "marsd.lock"

    /// Brings up every resource that was up when marsd stopped (recovering its log).
    func restore() async {
        expectWanted()
        let wanted = state.withLock { state in state.resources.values.filter { $0.config.wanted == "up" }.map(\.config.name) }
        for name in wanted.sorted() {
            await commands.run {
                do {
                    try await self.bringUp(name)
                } catch {
                    self.logger.error("resource \(name) stays down: \(error)")
                    return
                }
                await self.reattach(name)
            }
        }
    }

    func handle(_ request: ControlRequest) async -> ControlResponse {
        // Waiting may take long: it must not hold up the other commands (view among them).
        if request.command == .waitResource {
            do {
                let name = try existingName(request)
                let timeout = request.timeout ?? 300
                switch request.until ?? .uptodate {
                case .uptodate: return ControlResponse(message: try await waitUpToDate(name, timeout: timeout))
                case .primary, .secondary: return ControlResponse(message: try await waitForRole(name, request.until!, timeout: timeout))
                }
            } catch {
                return ControlResponse(error: "\(error)")
            }
        }
        // A role command waits for other hosts (the seal, the replay): the machine answers it.
        if request.command == .primary || request.command == .secondary {
            return await requestRole(request)
        }
        if request.command == .leaveResource, request.removeVolume == true {
            return await leaveResourceRemovingVolume(request)
        }
        return await commands.run {
            do {
                switch request.command {
                case .view:
                    return ControlResponse()
                case .createCluster:
                    let token = try self.createCluster(host: request.host)
                    return ControlResponse(
                        message: "created cluster \(token.cluster) with this host as '\(self.identity?.host ?? "?")'; other hosts join with:\n  marsadm join-cluster --host NAME --token \(token.text) \(self.settings.advertisedPeerAddress ?? self.settings.peerAddress ?? "THIS-HOST:7777")",
                        token: token.text
                    )
                case .joinCluster:
                    guard let token = request.token, let peer = request.peer else {
                        throw DaemonError("join-cluster needs --token and the address of a member")
                    }
                    return ControlResponse(message: try await self.joinCluster(host: request.host, token: token, peer: peer))
                case .joinResource:
                    guard let name = request.name else { throw DaemonError("join-resource needs a resource name") }
                    if let group = request.volumeGroup {
                        return ControlResponse(message: try await self.joinResourceOnNewVolume(name: name, group: group))
                    }
                    guard let device = request.device else { throw DaemonError("join-resource needs a device path or --lvm") }
                    return ControlResponse(message: try await self.joinResource(name: name, device: device))
                case .leaveResource:
                    return ControlResponse(message: try await self.leaveResource(try self.existingName(request)))
                case .deleteResource:
                    return ControlResponse(message: try await self.deleteResource(try self.existingName(request)))
                case .invalidate:
                    return ControlResponse(message: try await self.invalidate(try self.existingName(request)))
                case .leaveCluster:
                    return ControlResponse(message: try await self.leaveCluster())
                case .pauseFetch, .resumeFetch, .pauseReplay, .resumeReplay, .pauseSync, .resumeSync:
                    let name = try self.existingName(request)
                    return ControlResponse(message: try await self.setSwitch(name, request.command))
                case .waitResource, .primary, .secondary:
                    return ControlResponse(error: "\(request.command.rawValue) is answered outside the command queue")
                case .createResource:
                    guard let name = request.name else { throw DaemonError("create-resource needs a resource name") }
                    if let group = request.volumeGroup {
                        guard let size = request.size else { throw DaemonError("create-resource --lvm needs --size") }
                        return ControlResponse(message: try await self.createResourceOnNewVolume(name: name, group: group, size: size))
                    }
                    guard let device = request.device else { throw DaemonError("create-resource needs a device path or --lvm") }
                    return ControlResponse(message: try await self.createResource(name: name, device: device))
                case .up:
                    let name = try self.existingName(request)
                    try self.setWanted(name, "up")
                    try await self.bringUp(name)
                    return ControlResponse(message: "resource \(name) is up")
                case .attach:
                    return ControlResponse(message: try await self.attach(try self.existingName(request)))
                case .detach:
                    return ControlResponse(message: try await self.detach(try self.existingName(request), force: request.force ?? false))
                case .resize:
                    guard let size = request.size else { throw DaemonError("resize needs the new size") }
                    return ControlResponse(
                        message: try await self.resize(try self.existingName(request), to: size, force: request.force ?? false)
                    )
                case .down:
                    let name = try self.existingName(request)
                    // Its local device first: a mounted filesystem must not lose its disk to a down.
                    let detached = try await self.detachIfAttached(name, force: request.force ?? false, doing: "take it down")
                    try self.setWanted(name, "down")
                    let replayed = self.state.withLock { $0.resources[name]?.replica?.log.status.replayedLSN }
                    let result = await self.takeDown(name)
                    if let replayed {
                        return ControlResponse(message: "replica \(name) is down: fetch and replay stopped at LSN \(replayed) (the device is a prefix of the log)")
                    }
                    if let result, !result.isComplete {
                        throw DaemonError("resource \(name) is down, but the data device does not hold every acknowledged write: \(result)")
                    }
                    return ControlResponse(message: (detached.map { $0 + "; " } ?? "") + "resource \(name) is down; its log is written back")
                }
            } catch {
                return ControlResponse(error: "\(error)")
            }
        }
    }

    func existingName(_ request: ControlRequest) throws -> String {
        guard let name = request.name else { throw DaemonError("\(request.command.rawValue) needs a resource name") }
        try Names.validateResource(name)
        if let problem = state.withLock({ $0.unreadable[name] }) { throw DaemonError("resource '\(name)' cannot be used: \(problem)") }
        guard state.withLock({ $0.resources[name] != nil }) else {
            throw DaemonError("there is no resource '\(name)' on this host (marsadm view lists them)")
        }
        return name
    }

    private func createCluster(host: String?) throws -> JoinToken {
        if let identity = state.withLock({ $0.identity }) {
            throw DaemonError("this host is already in cluster \(identity.cluster) as '\(identity.host)'")
        }
        let name = host ?? Self.hostname()
        try Names.validateHost(name)
        var generator = SystemRandomNumberGenerator()
        let token = JoinToken.generate(cluster: randomIdentifier(), using: &generator)
        let identity = ClusterIdentity(token: token, host: name, hostID: randomIdentifier())
        try StateFile.write(identity, named: ClusterIdentity.fileName, in: root)
        state.withLock { $0.identity = identity }
        announceHost()
        logger.info("cluster created", metadata: ["cluster": "\(identity.cluster)", "host": "\(name)"])
        return token
    }

    /// Joins the cluster of `token` through the member at `peer`: the first gossip exchange both
    /// authenticates this host (both ways, with the token's secret) and brings the cluster's metadata.
    private func joinCluster(host: String?, token text: String, peer: String) async throws -> String {
        if let identity = state.withLock({ $0.identity }) {
            throw DaemonError("this host is already in cluster \(identity.cluster) as '\(identity.host)'")
        }
        guard settings.peerAddress != nil else {
            throw DaemonError("this marsd has no peer port: start it with --peer ADDRESS:PORT so the other members can reach it")
        }
        let token: JoinToken
        do { token = try JoinToken(parsing: text) } catch { throw DaemonError("\(error)") }
        let address: PeerAddress
        do { address = try PeerAddress(parsing: peer) } catch { throw DaemonError("\(error)") }
        let name = host ?? Self.hostname()
        try Names.validateHost(name)
        let identity = ClusterIdentity(token: token, host: name, hostID: randomIdentifier())
        let credentials = PeerCredentials(
            cluster: identity.cluster, secret: token.secret, local: PeerIdentity(host: name, hostID: identity.hostID!), sourceHost: sourceHost
        )
        do {
            try await cluster.exchange(with: address, group: peerGroup, credentials: credentials)
        } catch {
            throw DaemonError("cannot join through \(address): \(error). Check the address, the token, and that marsd there runs with --peer.")
        }
        if let taken = cluster.hosts()[name], taken.hostID != identity.hostID {
            throw DaemonError("cluster \(token.cluster) has a host named '\(name)' already (at \(taken.address)): choose another --host")
        }
        try StateFile.write(identity, named: ClusterIdentity.fileName, in: root)
        state.withLock { $0.identity = identity }
        announceHost()
        try? await cluster.exchange(with: address, group: peerGroup, credentials: credentials)
        logger.info("joined cluster", metadata: ["cluster": "\(identity.cluster)", "host": "\(name)", "through": "\(address)"])
        return "joined cluster \(identity.cluster) as '\(name)' through \(address); members: \(cluster.hosts().keys.sorted().joined(separator: ", "))"
    }

    /// This host's entry in the metadata: its peer address.
    private func announceHost() {
        guard let identity = state.withLock({ $0.identity }), let address = settings.advertisedPeerAddress ?? settings.peerAddress, let hostID = identity.hostID else { return }
        cluster.set(ClusterService.hostKey(identity.host), HostEntry(address: address, hostID: hostID), by: identity.host)
    }

    /// How this host proves itself to peers; nil before it is in a cluster.
    var credentials: PeerCredentials? {
        guard let identity = state.withLock({ $0.identity }), let secret = identity.token?.secret, let hostID = identity.hostID else {
            return nil
        }
        return PeerCredentials(
            cluster: identity.cluster, secret: secret, local: PeerIdentity(host: identity.host, hostID: hostID), sourceHost: sourceHost
        )
    }

    /// Outgoing links start from the peer port's address, unless it listens on every address.
    private var sourceHost: String? {
        settings.peerAddress.flatMap { try? PeerAddress(parsing: $0) }.map(\.host).flatMap { host in
            host == "0.0.0.0" || host == "::" ? nil : host
        }
    }

    func createResource(name: String, device path: String, volumeGroup: String? = nil) async throws -> String {
        try Names.validateResource(name)
        guard let identity = state.withLock({ $0.identity }) else {
            throw DaemonError("this host is in no cluster yet: run 'marsadm create-cluster' first")
        }
        guard state.withLock({ $0.resources[name] == nil && $0.unreadable[name] == nil }) else {
            throw DaemonError("resource '\(name)' exists already")
        }
        guard exports.exports.allSatisfy({ $0.descriptor.name != name }) else {
            throw DaemonError("an export named '\(name)' is already served (marsd --export)")
        }
        if let existing = cluster.value(ResourceEntry.self, ClusterService.resourceKey(name)), existing.primary != identity.host {
            throw DaemonError("the cluster has a resource '\(name)' already, with primary \(existing.primary): join it with 'marsadm join-resource' or choose another name")
        }
        let device: BlockDevice
        do {
            device = try BlockDevice(path: path, cacheMode: settings.cacheMode)
        } catch {
            throw DaemonError("cannot open the data device \(path): \(error). Check the path and permissions.")
        }
        guard device.size > 0 else { throw DaemonError("the data device \(path) is empty: give it a size first") }
        if let user = user(of: device) { throw DaemonError("\(path) is already \(user): a device belongs to one resource or export") }
        let directoryPath = settings.root + "/" + Names.resourceDirectory(name)
        if access(directoryPath, F_OK) == 0 {
            throw DaemonError("\(directoryPath) exists already: remove it or choose another resource name")
        }
        let configuration = settings.engineConfiguration(host: identity.host)
        let directory = try POSIXDirectory(path: directoryPath, create: true)
        var config = ResourceConfig(name: name, device: path, size: device.size, role: "primary", wanted: "up", createdEpoch: 1)
        config.volumeGroup = volumeGroup
        do {
            try root.sync()
            try LogEngine.create(in: directory, configuration: configuration, epoch: 1)
            try StateFile.write(config, named: ResourceConfig.fileName, in: directory)
        } catch {
            // Leave nothing half-made behind: the name stays free for the next attempt.
            for file in (try? directory.list()) ?? [] { try? directory.remove(file) }
            try? directory.removeDirectory()
            throw DaemonError("cannot create resource '\(name)' under \(directoryPath): \(error)")
        }
        state.withLock { $0.resources[name] = Resource(config: config, directory: directory) }
        cluster.set(ClusterService.resourceKey(name), ResourceEntry(size: device.size, primary: identity.host), by: identity.host)
        try await bringUp(name)
        return "created resource \(name) on \(path) (\(device.size) bytes); this host is its primary"
    }

    /// Who already uses `device` (another resource, an export, or marsd's own root), or nil.
    func user(of device: BlockDevice) -> String? {
        func canonical(_ path: String) -> String {
            guard let real = realpath(path, nil) else { return path }
            defer { free(real) }
            return String(cString: real)
        }
        if canonical(device.path).hasPrefix(canonical(settings.root) + "/") { return "inside marsd's root \(settings.root)" }
        for export in exports.exports where export.device.identity == device.identity {
            return export.log == nil ? "served as export '\(export.descriptor.name)'" : "the device of resource '\(export.descriptor.name)'"
        }
        for resource in state.withLock({ Array($0.resources.values) }) {
            // A device missing now (a resource that is down) cannot be this one.
            if let identity = try? DeviceIdentity(path: resource.config.device), identity == device.identity {
                return "the device of resource '\(resource.config.name)'"
            }
        }
        return nil
    }

    func setWanted(_ name: String, _ wanted: String) throws {
        guard var resource = state.withLock({ $0.resources[name] }) else { return }
        guard resource.config.wanted != wanted else { return }
        resource.config.wanted = wanted
        try StateFile.write(resource.config, named: ResourceConfig.fileName, in: resource.directory)
        let config = resource.config
        state.withLock { $0.resources[name]?.config = config }
    }

    /// Opens the device, recovers the log (replaying it onto the device), and opens the export.
    ///
    /// The export advertises the `size` in resource.json (the device's size at create-resource,
    /// changed only by a resize: `ResourceSize` has the rule), never the device's current size: a
    /// device that grew (an LV extended ahead of a resize) serves the same size. Recovery accepts
    /// records within the device itself (a forced shrink leaves records beyond the size in the
    /// log); a device that shrank below the size keeps the resource down with an error that says so.
    /// A primary that was handing the resource over when it stopped opens its log but not its
    /// export: its role machine finishes the handover (docs/handover.md §3.1).
    func bringUp(_ name: String) async throws {
        guard let resource = state.withLock({ $0.resources[name] }), resource.engine == nil, resource.replica == nil else { return }
        if resource.config.role == "secondary" {
            return try await bringUpReplica(name)
        }
        let handingOver = resource.config.transition?.kind == .handingOver
        // Clients asking for it from now on wait for the outcome.
        if !handingOver { exports.expect(name) }
        do {
            try await openPrimaryLog(name)
            if handingOver {
                exports.setUnavailable(name, reason: "\(name) is being handed over to \(resource.config.transition!.peer)")
            } else {
                try openExport(name)
            }
            logger.info("resource up", metadata: ["resource": "\(name)", "device": "\(resource.config.device)"])
        } catch {
            // A recovery that failed told the waiting clients why already.
            if exports.isPending(name) { exports.giveUp(name, reason: "resource \(name) failed to come up: \(error)") }
            throw error
        }
    }

    /// Opens the data device and the primary's log of `name` (recovery replays it onto the device);
    /// with `promotion`, a replica's directory becomes the primary's at that epoch (docs/handover.md §3.2).
    func openPrimaryLog(_ name: String, promotion: UInt64? = nil) async throws {
        guard let resource = state.withLock({ $0.resources[name] }) else { return }
        let identityHost = state.withLock { $0.identity?.host } ?? ""
        let settings = self.settings
        let logger = self.logger
        // What the other members had not fetched when this host last heard of them stays.
        let holds = retentionHolds(of: name, except: identityHost)
        do {
            guard let identity = state.withLock({ $0.identity }) else {
                throw DaemonError("\(settings.root)/\(ClusterIdentity.fileName) is missing: this host's identity is lost")
            }
            let (device, engine) = try await NIOThreadPool.singleton.runIfActive { () throws -> (BlockDevice, LogEngine) in
                let device: BlockDevice
                do {
                    device = try BlockDevice(path: resource.config.device, cacheMode: settings.cacheMode)
                } catch {
                    throw DaemonError("cannot open the data device \(resource.config.device): \(error)")
                }
                guard device.size >= resource.config.size else {
                    throw DaemonError(
                        "the data device \(resource.config.device) has \(device.size) bytes, the resource needs \(resource.config.size): "
                            + "it shrank; give it its size back"
                    )
                }
                let engine = try LogEngine.open(
                    directory: resource.directory, device: POSIXFile(device: device),
                    deviceSize: device.size, configuration: settings.engineConfiguration(host: identity.host),
                    retentionHolds: holds, promotion: promotion
                ) { message in
                    logger.notice("recovery of \(name): \(message)")
                }
                return (device, engine)
            }
            state.withLock { state in
                state.resources[name]?.engine = engine
                state.resources[name]?.device = device
                state.resources[name]?.error = nil
                state.resources[name]?.downProblem = nil
            }
        } catch let error as LogRecoveryError {
            // The error states what recovery found; what to do is said here, where an operator sees
            // it (marsadm's log commands print the facts only: they are the inspection this points to).
            let failure = DaemonError(
                "\(error). The resource stays down. 'marsadm log-dump' lists the log up to the damage and 'marsadm log-verify' "
                    + "the writeback position; README, Operations, 'When recovery stops' says how to go on."
            )
            state.withLock { $0.resources[name]?.error = failure.description }
            exports.giveUp(name, reason: "resource \(name) failed to recover: \(error)")
            throw failure
        } catch {
            state.withLock { $0.resources[name]?.error = "\(error)" }
            throw error
        }
    }

    /// Serves the primary's log of `name` as its NBD export (once: an open export stays).
    func openExport(_ name: String) throws {
        guard let resource = state.withLock({ $0.resources[name] }), let engine = resource.engine, let device = resource.device else {
            throw DaemonError("resource \(name) has no open log on this host to serve")
        }
        guard !exports.exports.contains(where: { $0.descriptor.name == name }) else { return }
        exports.add(ServedExport(name: name, description: "swift-mars resource \(name)", device: device, size: resource.config.size, log: engine))
    }

    /// Closes the export, then drains the log onto the device. Returns what the log engine
    /// achieved (nil when the resource was not up, or is a replica: its replay stops at a batch boundary).
    @discardableResult
    func takeDown(_ name: String) async -> LogShutdownResult? {
        guard let resource = state.withLock({ $0.resources[name] }) else { return nil }
        if let replica = resource.replica {
            await replica.stop()
            state.withLock { $0.resources[name]?.replica = nil }
            logger.info("resource down", metadata: ["resource": "\(name)"])
            return nil
        }
        guard let engine = resource.engine else { return nil }
        exports.remove(named: name, reason: Self.downReason(name))
        let result: LogShutdownResult
        do {
            result = try await NIOThreadPool.singleton.runIfActive { engine.shutdown() }
        } catch {
            // The thread pool is gone (marsd exiting): shut down here rather than not at all.
            result = engine.shutdown()
        }
        let problem = result.isComplete ? nil : "down with acknowledged writes missing from the data device: \(result)"
        state.withLock { state in
            state.resources[name]?.engine = nil
            state.resources[name]?.device = nil
            state.resources[name]?.downProblem = problem
        }
        if let problem {
            logger.error("resource \(name) is \(problem)")
        } else {
            logger.info("resource down", metadata: ["resource": "\(name)"])
        }
        return result
    }

    /// Takes every resource down (marsd stopping); their wanted state stays as it was.
    func shutdown() async {
        roles.answerAll(.failure(RoleError("marsd is stopping; the request stays and goes on when it starts again")))
        let names = state.withLock { Array($0.resources.keys) }
        for name in names.sorted() {
            _ = await commands.run { await self.takeDown(name) }
        }
    }

    /// Lets another marsd take the root: call it once nothing of this one runs any more.
    func releaseRoot() {
        rootLock.release()
    }

    var identity: ClusterIdentity? { state.withLock { $0.identity } }

    func status() -> [ResourceStatus] {
        let (resources, unreadable) = state.withLock { (Array($0.resources.values), $0.unreadable) }
        let broken = unreadable.map { name, problem in
            ResourceStatus(name: name, device: "?", size: 0, role: "?", wanted: "?", state: "failed", error: problem)
        }
        let exports = self.exports
        return (resources.map { resource in
            var status = Self.status(of: resource, recovering: exports.isPending(resource.config.name), device: deviceDescription)
            status.replication = replicationStatus(of: resource)
            status.resize = pendingResizeDescription(of: resource)
            status.transition = Self.describe(resource.config.transition)
            return status
        } + broken).sorted { $0.name < $1.name }
    }

    private static func status(of resource: Resource, recovering: Bool, device: (String, Int32) -> String) -> ResourceStatus {
        let log = resource.engine.map { engine -> LogStatus in
            let status = engine.status
            return LogStatus(
                epoch: status.epoch, appendedLSN: status.appendedLSN, durableLSN: status.durableLSN,
                writebackLSN: status.writebackLSN, pendingChanges: status.pendingChanges, pendingBytes: status.pendingBytes,
                waitingWrites: status.waitingWrites, logBytes: status.logBytes, spaceLimit: status.spaceLimit,
                segments: status.segments, currentSegment: status.currentSegment, groupCommits: status.groupCommits,
                failure: status.failure
            )
        }
        let state = resource.engine != nil || resource.replica != nil ? "up" : recovering ? "recovering" : (resource.error != nil ? "failed" : "down")
        return ResourceStatus(
            name: resource.config.name, device: resource.config.device, size: resource.config.size, role: resource.config.role,
            wanted: resource.config.wanted, state: state, error: resource.error ?? resource.downProblem, log: log,
            attached: resource.config.attachedDevice.map { device(resource.config.name, $0) }
        )
    }

    static func hostname() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        gethostname(&buffer, buffer.count)
        let name = buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        return name.split(separator: ".").first.map(String.init) ?? "localhost"
    }
}

/// Runs commands one at a time, in arrival order.
actor CommandQueue {
    private var busy = false
    private var waiting: [CheckedContinuation<Void, Never>] = []

    func run<T: Sendable>(_ body: @Sendable () async -> T) async -> T {
        if busy {
            await withCheckedContinuation { waiting.append($0) }
        }
        busy = true
        defer {
            if waiting.isEmpty { busy = false } else { waiting.removeFirst().resume() }
        }
        return await body()
    }
}
