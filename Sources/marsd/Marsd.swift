import ArgumentParser
import BlockStore
import ControlProtocol
import Daemon
import LocalDevice
import LogEngine
import Logging
import Replication
import NBDServer

@main
struct Marsd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "marsd",
        abstract: "The swift-mars daemon: serves replicated block devices over NBD.",
        discussion: """
            marsd runs on every host of a swift-mars cluster. It keeps the cluster identity and the \
            resources under its root directory (default /mars), serves each resource that is up as an \
            NBD export, and writes every block change into the resource's transaction log before it \
            reaches the data device. Replication to secondaries follows in a later version.
            """,
        version: marsVersion,
        subcommands: [Serve.self]
    )
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the daemon: serve the resources under the root, and plain exports, over NBD.",
        discussion: """
            Resources are created with marsadm create-cluster and marsadm create-resource; every one that \
            is up is served under its name, with every change logged under ROOT/resource-NAME. Restarting \
            marsd recovers each log and brings each resource back as it was. Each --export maps an NBD \
            export name to a device served without a log (for tests and comparisons). Clients connect over \
            the Unix socket (nbd+unix:///NAME?socket=PATH) or TCP (nbd://HOST:PORT/NAME). When exactly one \
            export is served, the empty export name means that export. marsd stops gracefully on SIGTERM \
            or SIGINT, writing every log back first.
            """
    )

    @Option(help: ArgumentHelp("The directory holding the cluster identity, the resources and their logs (created with mode 0700 if missing).", valueName: "path"))
    var root = "/mars"

    @Option(help: "A log segment is closed and the next one started at this size (MiB).")
    var logSegmentMib = 256

    @Option(help: "MiB the log segments of one resource may take together; when they do, writes wait until writeback frees whole segments. At least twice a segment plus 66 MiB (twice the largest record).")
    var logSpaceMib = 65536

    @Option(
        help: "MiB of log one resource's primary keeps for secondaries that have not fetched it; beyond it the most lagging secondary is let go (NeedsSync: 'marsadm invalidate' syncs it again) so the log does not fill. Default: half of --log-space-mib."
    )
    var logRetentionMib: Int?

    @Option(help: "MiB of logged writes not yet written back that this host's resources together hold in memory for reads (payloads, and 128 bytes per change); beyond it writes wait.")
    var logPendingMib = 64

    @Option(
        name: .customLong("export"),
        help: ArgumentHelp(
            "An export as NAME=PATH, or NAME=PATH:ro for read-only. PATH is a regular file (sparse is fine) or a block device. Repeatable.",
            valueName: "name=path"
        )
    )
    var exports: [String] = []

    @Option(name: .customLong("unix"), help: ArgumentHelp("Listen on this Unix socket path.", valueName: "path"))
    var unixSocket: String?

    @Option(
        name: .customLong("tcp"),
        help: ArgumentHelp(
            "Listen on TCP at HOST:PORT, or PORT alone for 127.0.0.1:PORT (port 0 picks a free one). Bind beyond loopback only on a trusted network.",
            valueName: "[host:]port"
        )
    )
    var tcp: String?

    @Option(
        help: """
            How 'marsadm attach' sets up /dev/nbdN in the kernel's NBD client: auto (netlink when the kernel has it), netlink, or \
            ioctl. Over netlink the device outlives marsd: after a restart (even kill -9) its requests wait up to 600 s and the new \
            marsd reconnects it, so a mounted filesystem goes on. Over ioctl (for kernels without the nbd netlink interface) a \
            thread of marsd serves the device, so the kernel tears it down when marsd ends: a restart attaches a fresh \
            /dev/nbdN, and a filesystem still mounted on the old one gets I/O errors (unmount before stopping marsd).
            """
    )
    var nbdInterface: NBDInterface = .auto

    @Option(help: "I/O engine for the data devices: auto (io_uring if the kernel allows it), uring, or posix (pread/pwrite on threads).")
    var ioEngine: IOEngine = .auto

    @Option(help: "buffered (page cache) or direct (O_DIRECT for aligned requests).")
    var cache: CacheMode = .buffered

    @Option(help: "Where page-aligned buffered writes of up to 1 MiB without FUA run: inline (on the event loop, a copy into the page cache) or engine (through the I/O engine, like all other I/O).")
    var pageCacheWrites: PageCacheWritePolicy = .inline

    @Option(help: "How large READs whose bytes are all in the page cache are answered (at least 64 KiB over the Unix socket, 256 KiB over TCP): sendfile (the kernel sends the cached pages, marsd copies nothing) or copy (read into a buffer through the I/O engine, like every other READ).")
    var pageCacheReads: PageCacheReadPolicy = .sendfile

    @Option(help: ArgumentHelp("Answer marsadm on this Unix socket.", valueName: "path"))
    var control: String?

    @Option(
        help: ArgumentHelp(
            "Listen for the other hosts of the cluster (gossip, log shipping, sync) on ADDRESS:PORT ([IPV6]:PORT; the port defaults to 7777). Other hosts reach this host at this address: give one they can connect to. Peers authenticate with the cluster secret; the traffic is not encrypted yet.",
            valueName: "address"
        )
    )
    var peer: String?

    @Option(help: ArgumentHelp("The peer address other hosts connect to, when it is not --peer's (NAT, a proxy).", valueName: "address"))
    var peerAdvertise: String?

    @Option(help: "Requests in flight per connection before marsd stops reading from it.")
    var maxInflight = 64

    @Option(help: "MiB of request payload (reads being filled, writes being received or written) the connections of one event loop may hold together; beyond it they stop taking requests.")
    var maxBufferedMib = 256

    @Option(help: "Open NBD connections beyond which new ones are closed at once.")
    var maxConnections = 16384

    @Option(help: "Seconds a client has to finish the NBD handshake.")
    var handshakeTimeout = 30

    @Option(help: "Seconds a client asking for a resource that is still recovering (after a restart, or during 'marsadm up') waits for it; then it is told the export is still recovering and to try again. A resource that is down or failed is refused at once, with the reason.")
    var recoveryWait = 60

    @Option(help: "Event loop threads (default: one per core).")
    var threads: Int?

    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    func validate() throws {
        if logSegmentMib < 1 { throw ValidationError("--log-segment-mib must be at least 1") }
        if logPendingMib < 1 { throw ValidationError("--log-pending-mib must be at least 1") }
        if let logRetentionMib, logRetentionMib < logSegmentMib || logRetentionMib > logSpaceMib {
            throw ValidationError("--log-retention-mib must be between a segment (\(logSegmentMib)) and --log-space-mib (\(logSpaceMib))")
        }
        if logSpaceMib < 2 * logSegmentMib + 66 {
            throw ValidationError("--log-space-mib must be at least \(2 * logSegmentMib + 66) (twice a segment plus the largest record, twice)")
        }
        if unixSocket == nil && tcp == nil { throw ValidationError("give --unix PATH and/or --tcp HOST:PORT") }
        if let tcp, Self.parseHostPort(tcp) == nil {
            throw ValidationError("--tcp must be HOST:PORT or PORT, for example 127.0.0.1:10809")
        }
        if let peer {
            do { _ = try PeerAddress(parsing: peer) } catch { throw ValidationError("--peer: \(error)") }
        }
        if let peerAdvertise {
            guard peer != nil else { throw ValidationError("--peer-advertise needs --peer") }
            do { _ = try PeerAddress(parsing: peerAdvertise) } catch { throw ValidationError("--peer-advertise: \(error)") }
        }
        if maxInflight < 1 { throw ValidationError("--max-inflight must be at least 1") }
        if maxBufferedMib < 1 { throw ValidationError("--max-buffered-mib must be at least 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if recoveryWait < 0 { throw ValidationError("--recovery-wait must be 0 or more seconds") }
    }

    static func parseHostPort(_ text: String) -> (String, Int)? {
        if let port = Int(text), (0...65535).contains(port) { return ("127.0.0.1", port) }
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (0...65535).contains(port)
        else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return host.isEmpty ? nil : (host, port)
    }

    func run() async throws {
        let level = logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "marsd")
        var configuration = ServeConfiguration()
        configuration.exports = try exports.map(ExportSpec.init(parsing:))
        configuration.resources.root = root
        configuration.resources.segmentSize = UInt64(logSegmentMib) << 20
        configuration.resources.spaceLimit = UInt64(logSpaceMib) << 20
        configuration.resources.pendingMemory = PendingMemory(capacity: logPendingMib << 20)
        configuration.resources.nbdInterface = nbdInterface
        configuration.resources.retentionLimit = logRetentionMib.map { UInt64($0) << 20 }
        configuration.cacheMode = cache
        configuration.controlSocketPath = control
        configuration.resources.peerAddress = peer
        configuration.resources.advertisedPeerAddress = peerAdvertise
        if let threads { configuration.eventLoopThreads = threads }
        configuration.nbd.unixSocketPath = unixSocket
        if let tcp, let (host, port) = Self.parseHostPort(tcp) {
            configuration.nbd.tcpHost = host
            configuration.nbd.tcpPort = port
        }
        configuration.nbd.ioEngine = ioEngine
        configuration.nbd.pageCacheWrites = pageCacheWrites
        configuration.nbd.pageCacheReads = pageCacheReads
        configuration.nbd.maxConnections = maxConnections
        configuration.nbd.bufferBudgetPerLoop = maxBufferedMib << 20
        configuration.nbd.limits.maxInFlight = maxInflight
        configuration.handshakeTimeoutSeconds = handshakeTimeout
        configuration.recoveryWaitSeconds = recoveryWait
        do {
            try await StandaloneServer.runUntilSignalled(configuration, logger: logger)
        } catch let error as DaemonError {
            logger.critical("\(error)")
            throw ExitCode.failure
        }
    }
}

extension IOEngine: ExpressibleByArgument {}
extension NBDInterface: ExpressibleByArgument {}
extension CacheMode: ExpressibleByArgument {}
extension PageCacheWritePolicy: ExpressibleByArgument {}
extension PageCacheReadPolicy: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
