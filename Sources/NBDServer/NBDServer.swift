import BlockStore
import Logging
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Where and how an NBD server listens.
public struct NBDServerConfiguration: Sendable {
    /// A Unix socket path; an existing socket file there is replaced.
    public var unixSocketPath: String?
    /// TCP host and port. Port 0 picks a free port (see `NBDServer.tcpPort`).
    public var tcpHost: String?
    public var tcpPort: Int = 10809
    public var limits = ConnectionLimits()
    /// Connections beyond this are closed right after accept, with a log line.
    public var maxConnections = 16384
    public var ioEngine: IOEngine = .auto
    public var pageCacheWrites: PageCacheWritePolicy = .inline
    public var pageCacheReads: PageCacheReadPolicy = .sendfile
    /// SO_SNDBUF of each Unix socket connection (the kernel caps it at net.core.wmem_max and doubles
    /// it). A Unix socket's replies in flight are bounded by its sender's buffer, and Linux's default
    /// (208 KiB) cut a 1 MiB READ reply into five sends, each waiting for the client to wake and
    /// drain: 1 MiB READs ran at 1.9 GB/s with it, 3.4 (copied) and 4.5 (sendfile) with 1 MiB
    /// (BENCHMARKS.md). TCP tunes its own buffers.
    public var unixSendBuffer: Int32 = 1 << 20
    /// Payload bytes all connections of one event loop may hold together (see `LoopIO`).
    public var bufferBudgetPerLoop = 256 << 20
    /// Sizes of the buffers a connection's socket is read into: a WRITE payload is gathered from
    /// as many of them as it spans.
    public var receiveBuffers = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 64 << 10, maximum: 1 << 20)

    public init() {}
}

/// The NBD front door: listeners on a Unix socket and/or TCP, serving an `ExportTable`.
public final class NBDServer: Sendable {
    public let exports: ExportTable
    public let configuration: NBDServerConfiguration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let ioRegistry: LoopIORegistry
    private let listeners = Mutex<[any Channel]>([])
    private let connections = ConnectionCounter()

    /// The engine the event loops' I/O queues use ("io_uring" or "threads").
    public var ioEngineName: String { ioRegistry.engineName }

    public init(
        exports: ExportTable, configuration: NBDServerConfiguration, group: any EventLoopGroup, logger: Logger
    ) throws {
        self.exports = exports
        self.configuration = configuration
        self.group = group
        self.logger = logger
        self.ioRegistry = try LoopIORegistry(
            group: group, engine: configuration.ioEngine, pageCacheWrites: configuration.pageCacheWrites,
            bufferBudget: configuration.bufferBudgetPerLoop, logger: logger
        )
    }

    /// The highest payload bytes held at once by the connections of each event loop.
    func peakBufferedBytes() async throws -> [Int] {
        try await ioRegistry.peakBufferedBytes()
    }

    /// Binds every configured listener.
    public func start() async throws {
        if let path = configuration.unixSocketPath {
            try claimUnixSocketPath(path)
            let channel = try await bootstrap(tcp: false).bind(unixDomainSocketPath: path).get()
            listeners.withLock { $0.append(channel) }
            logger.info("NBD listening", metadata: ["unix": "\(path)"])
        }
        if let host = configuration.tcpHost {
            let channel = try await bootstrap(tcp: true).bind(host: host, port: configuration.tcpPort).get()
            listeners.withLock { $0.append(channel) }
            logger.info("NBD listening", metadata: ["tcp": "\(channel.localAddress?.description ?? host)"])
        }
    }

    /// The bound TCP port, once started.
    public var tcpPort: Int? {
        listeners.withLock { channels in
            channels.lazy.compactMap { $0.localAddress?.protocol == .inet || $0.localAddress?.protocol == .inet6 ? $0.localAddress?.port : nil }.first
        }
    }

    /// Closes the listeners; open connections end when their clients disconnect or the group stops.
    public func stop() async {
        let channels = listeners.withLock { list in
            defer { list.removeAll() }
            return list
        }
        for channel in channels {
            try? await channel.close()
        }
        if let path = configuration.unixSocketPath { unlink(path) }
    }

    private func bootstrap(tcp: Bool) -> ServerBootstrap {
        let exports = self.exports
        let limits = configuration.limits
        let registry = ioRegistry
        let logger = self.logger
        let maxConnections = configuration.maxConnections
        let open = connections
        let receiveSizes = configuration.receiveBuffers
        let smallestSentRead = configuration.pageCacheReads.smallestSent(tcp: tcp)
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelOption(.allocator, value: pooledAllocator)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 1 << 20, high: 4 << 20))
        if tcp {
            bootstrap = bootstrap.childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        } else {
            bootstrap = bootstrap.childChannelOption(.socketOption(.so_sndbuf), value: SocketOptionValue(configuration.unixSendBuffer))
        }
        return bootstrap.childChannelInitializer { channel in
            let count = open.value.add(1, ordering: .relaxed).newValue
            channel.closeFuture.whenComplete { _ in open.value.subtract(1, ordering: .relaxed) }
            if count > maxConnections {
                logger.warning("refusing NBD connection: \(maxConnections) connections are open (raise --max-connections)")
                return channel.close()
            }
            return channel.eventLoop.makeCompletedFuture {
                let receiveBuffers = PayloadAligningReceiveBuffers(sizes: receiveSizes)
                // Per connection: its handler moves where the next received byte lands.
                try channel.syncOptions?.setOption(.recvAllocator, value: receiveBuffers)
                try channel.pipeline.syncOperations.addHandler(
                    NBDConnectionHandler(
                        exports: exports, limits: limits, ioRegistry: registry, receiveBuffers: receiveBuffers,
                        smallestSentRead: smallestSentRead, logger: logger
                    )
                )
            }
        }
    }
}

/// Prepares `path` for binding a Unix socket: a stale socket file (no one listening) is removed;
/// a live one, or any other kind of file, is an error that names the path.
public func claimUnixSocketPath(_ path: String) throws {
    var info = stat()
    guard lstat(path, &info) == 0 else { return }
    guard info.st_mode & S_IFMT == S_IFSOCK else {
        throw SystemError("bind", "\(path) (exists and is not a socket; choose another path)", errno: EEXIST)
    }
    let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(probe) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
        throw SystemError("bind", "\(path) (longer than a Unix socket path may be)", errno: ENAMETOOLONG)
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let live = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(probe, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    if live == 0 {
        throw SystemError("bind", "\(path) (another process is listening there; stop it or choose another path)", errno: EADDRINUSE)
    }
    unlink(path)
}

/// The number of open NBD connections, shared by the listeners.
private final class ConnectionCounter: Sendable {
    let value = Atomic<Int>(0)
}
