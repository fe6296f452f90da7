import BlockStore
import ControlProtocol
import Logging
import NBDServer
import NIOCore
import NIOPosix
import Replication
import ServiceLifecycle
import UnixSignals
import NBDProtocol
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One export of `marsd serve`: a name and the device behind it.
public struct ExportSpec: Sendable, Equatable {
    public var name: String
    public var path: String
    public var readOnly: Bool

    public init(name: String, path: String, readOnly: Bool = false) {
        self.name = name
        self.path = path
        self.readOnly = readOnly
    }

    /// Parses `NAME=PATH` or `NAME=PATH:ro`.
    public init(parsing text: String) throws {
        guard let equals = text.firstIndex(of: "="), equals != text.startIndex else {
            throw DaemonError("export '\(text)' is not NAME=PATH (for example disk=/var/lib/disk.img)")
        }
        var path = String(text[text.index(after: equals)...])
        var readOnly = false
        if path.hasSuffix(":ro") {
            readOnly = true
            path.removeLast(3)
        }
        guard !path.isEmpty else { throw DaemonError("export '\(text)' has no device path after '='") }
        let name = String(text[..<equals])
        guard name.utf8.count <= 4096, !name.utf8.contains(0) else {
            throw DaemonError("export name '\(name)' is longer than 4096 bytes or contains NUL")
        }
        self.init(name: name, path: path, readOnly: readOnly)
    }
}

/// Configuration of `marsd serve`: the resources under the root (logged), plus plain local devices
/// (`--export`, no log).
public struct ServeConfiguration: Sendable {
    public var exports: [ExportSpec] = []
    public var resources = ResourceSettings()
    public var nbd = NBDServerConfiguration()
    public var cacheMode: CacheMode = .buffered
    public var controlSocketPath: String?
    public var eventLoopThreads = System.coreCount
    public var handshakeTimeoutSeconds: Int {
        get { Int(nbd.limits.handshakeTimeout.nanoseconds / 1_000_000_000) }
        set { nbd.limits.handshakeTimeout = .seconds(Int64(newValue)) }
    }
    /// How long a client naming a recovering resource waits for it (ConnectionLimits.recoveryWait).
    public var recoveryWaitSeconds: Int {
        get { Int(nbd.limits.recoveryWait.nanoseconds / 1_000_000_000) }
        set { nbd.limits.recoveryWait = .seconds(Int64(newValue)) }
    }

    public init() {}
}

/// `marsd serve`: serves local devices over NBD until SIGTERM or SIGINT, with a control socket for
/// `marsadm view`. The daemon is a ServiceGroup, so shutdown is graceful: listeners close first.
public struct StandaloneServer: Service {
    public let configuration: ServeConfiguration
    public let logger: Logger

    public init(configuration: ServeConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Opens the devices, starts the listeners, and runs until a signal asks it to stop.
    public static func runUntilSignalled(_ configuration: ServeConfiguration, logger: Logger) async throws {
        raiseOpenFileLimit(logger: logger)
        keepRequestBuffersInHeap()
        let service = StandaloneServer(configuration: configuration, logger: logger)
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: service)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        )
        try await group.run()
    }

    public func run() async throws {
        let names = configuration.exports.map(\.name)
        guard Set(names).count == names.count else {
            throw DaemonError("export names must be unique: \(names.joined(separator: ", "))")
        }
        var served: [ServedExport] = []
        for spec in configuration.exports {
            do {
                let device = try BlockDevice(path: spec.path, readOnly: spec.readOnly, cacheMode: configuration.cacheMode)
                served.append(ServedExport(name: spec.name, device: device))
                logger.info(
                    "export ready",
                    metadata: ["name": "\(spec.name)", "device": "\(spec.path)", "size": "\(device.size)", "cache": "\(configuration.cacheMode)"]
                )
            } catch {
                throw DaemonError("cannot open the device of export '\(spec.name)': \(error). Check the path and permissions.")
            }
        }
        var resourceSettings = configuration.resources
        resourceSettings.cacheMode = configuration.cacheMode
        resourceSettings.nbdSocketPath = configuration.nbd.unixSocketPath
        let exports = ExportTable(served)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopThreads))
        // Peer links (gossip, log shipping, sync) on a loop of their own: their file reads never
        // delay an NBD reply.
        let peerGroup = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let resources: ResourceManager
        do {
            resources = try ResourceManager(settings: resourceSettings, exports: exports, peerGroup: peerGroup, logger: logger)
        } catch {
            try? await group.shutdownGracefully()
            try? await peerGroup.shutdownGracefully()
            throw error
        }
        // Before the listeners open: a client that connects while a resource recovers waits for it.
        resources.expectWanted()
        let server: NBDServer
        do {
            server = try NBDServer(exports: exports, configuration: configuration.nbd, group: group, logger: logger)
            try await server.start()
        } catch {
            try? await group.shutdownGracefully()
            throw DaemonError("cannot start the NBD listeners: \(error)")
        }
        var control: ControlServer?
        if let path = configuration.controlSocketPath {
            let listeners = listenerDescriptions(server)
            do {
                control = try await ControlServer.start(path: path, group: group, logger: logger) { request in
                    var response = await resources.handle(request)
                    // Every successful reply carries the state it left behind, so a script that
                    // changed something reads the result from the same reply (--json).
                    if response.error == nil {
                        response.status = status(server, resources: resources, listeners: listeners)
                    }
                    return response
                }
            } catch {
                await server.stop()
                try? await group.shutdownGracefully()
                throw error
            }
        }
        var peers: PeerListener?
        if let text = resourceSettings.peerAddress {
            do {
                let address = try PeerAddress(parsing: text)
                peers = try await PeerListener.start(
                    on: address, group: peerGroup, credentials: { [resources] in resources.credentials }, logger: logger
                ) { [resources, logger] link in
                    PeerSession.serve(link, handler: resources, pool: .singleton, logger: logger)
                }
            } catch {
                await control?.stop()
                await server.stop()
                try? await group.shutdownGracefully()
                try? await peerGroup.shutdownGracefully()
                throw DaemonError("cannot listen for peers on \(text): \(error)")
            }
        }
        await resources.restore()
        let gossip = Task { await resources.runGossip() }
        logger.info("marsd ready", metadata: ["pid": "\(getpid())", "io-engine": "\(server.ioEngineName)", "root": "\(resourceSettings.root)"])
        try? await gracefulShutdown()
        logger.info("marsd shutting down")
        gossip.cancel()
        await gossip.value
        await control?.stop()
        await peers?.stop()
        await server.stop()
        await resources.shutdown()
        try await group.shutdownGracefully()
        try? await peerGroup.shutdownGracefully()
        resources.releaseRoot()
    }

    private func listenerDescriptions(_ server: NBDServer) -> [String] {
        var result: [String] = []
        if let path = configuration.nbd.unixSocketPath { result.append("unix:\(path)") }
        if let host = configuration.nbd.tcpHost { result.append("tcp:\(host):\(server.tcpPort ?? configuration.nbd.tcpPort)") }
        if let peer = configuration.resources.peerAddress { result.append("peer:\(peer)") }
        return result
    }

    private func status(_ server: NBDServer, resources: ResourceManager, listeners: [String]) -> DaemonStatus {
        let identity = resources.identity
        return DaemonStatus(
            version: marsVersion, pid: getpid(), ioEngine: server.ioEngineName, listeners: listeners,
            root: resources.settings.root, host: identity?.host, cluster: identity?.cluster,
            members: identity == nil ? nil : resources.cluster.hosts().map { MemberHost(host: $0.key, address: $0.value.address) }.sorted { $0.host < $1.host },
            resources: resources.status(),
            exports: server.exports.exports.map { export in
                let stats = export.statistics
                return ExportStatus(
                    name: export.descriptor.name, device: export.device.path, kind: export.device.kind.rawValue,
                    size: export.descriptor.size, readOnly: export.device.readOnly, cacheMode: export.device.cacheMode.rawValue,
                    activeConnections: stats.activeConnections.load(ordering: .relaxed),
                    totalConnections: stats.totalConnections.load(ordering: .relaxed),
                    requests: stats.requests.load(ordering: .relaxed),
                    bytesRead: stats.bytesRead.load(ordering: .relaxed),
                    bytesWritten: stats.bytesWritten.load(ordering: .relaxed),
                    errors: stats.errors.load(ordering: .relaxed)
                )
            }
        )
    }
}

/// Thousands of NBD clients need thousands of descriptors: lift the soft limit to the hard one.
func raiseOpenFileLimit(logger: Logger) {
    var limit = rlimit()
    guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
    limit.rlim_cur = limit.rlim_max
    if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) != 0 {
        logger.warning("cannot raise the open-file limit; many NBD connections may be refused")
    }
}
