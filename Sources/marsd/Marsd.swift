import ArgumentParser
import BlockStore
import ControlProtocol
import Daemon
import Logging
import NBDServer

@main
struct Marsd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "marsd",
        abstract: "The swift-mars daemon: serves replicated block devices over NBD.",
        discussion: """
            marsd runs on every host of a swift-mars cluster. This version serves local data devices \
            (regular files or block devices) over the NBD protocol; the transaction log and replication \
            follow in later versions.
            """,
        version: marsVersion,
        subcommands: [Serve.self]
    )
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve local devices over NBD, without log or replication.",
        discussion: """
            Each --export maps an NBD export name to a device. Clients connect over the Unix socket \
            (nbd+unix:///NAME?socket=PATH) or TCP (nbd://HOST:PORT/NAME). When exactly one export is \
            served, the empty export name means that export. marsd stops gracefully on SIGTERM or SIGINT.
            """
    )

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

    @Option(help: "I/O engine for the data devices: auto (io_uring if the kernel allows it), uring, or posix (pread/pwrite on threads).")
    var ioEngine: IOEngine = .auto

    @Option(help: "buffered (page cache) or direct (O_DIRECT for aligned requests).")
    var cache: CacheMode = .buffered

    @Option(help: "Where small (up to 32 KiB) page-aligned buffered writes run: inline (on the event loop, a copy into the page cache) or engine (through the I/O engine, like all other I/O).")
    var pageCacheWrites: PageCacheWritePolicy = .inline

    @Option(help: ArgumentHelp("Answer marsadm on this Unix socket.", valueName: "path"))
    var control: String?

    @Option(help: "Requests in flight per connection before marsd stops reading from it.")
    var maxInflight = 64

    @Option(help: "MiB of request payload (reads being filled, writes being received or written) the connections of one event loop may hold together; beyond it they stop taking requests.")
    var maxBufferedMib = 256

    @Option(help: "Open NBD connections beyond which new ones are closed at once.")
    var maxConnections = 16384

    @Option(help: "Seconds a client has to finish the NBD handshake.")
    var handshakeTimeout = 30

    @Option(help: "Event loop threads (default: one per core).")
    var threads: Int?

    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    func validate() throws {
        if exports.isEmpty { throw ValidationError("give at least one --export NAME=PATH") }
        if unixSocket == nil && tcp == nil { throw ValidationError("give --unix PATH and/or --tcp HOST:PORT") }
        if let tcp, Self.parseHostPort(tcp) == nil {
            throw ValidationError("--tcp must be HOST:PORT or PORT, for example 127.0.0.1:10809")
        }
        if maxInflight < 1 { throw ValidationError("--max-inflight must be at least 1") }
        if maxBufferedMib < 1 { throw ValidationError("--max-buffered-mib must be at least 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
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
        configuration.cacheMode = cache
        configuration.controlSocketPath = control
        if let threads { configuration.eventLoopThreads = threads }
        configuration.nbd.unixSocketPath = unixSocket
        if let tcp, let (host, port) = Self.parseHostPort(tcp) {
            configuration.nbd.tcpHost = host
            configuration.nbd.tcpPort = port
        }
        configuration.nbd.ioEngine = ioEngine
        configuration.nbd.pageCacheWrites = pageCacheWrites
        configuration.nbd.maxConnections = maxConnections
        configuration.nbd.bufferBudgetPerLoop = maxBufferedMib << 20
        configuration.nbd.limits.maxInFlight = maxInflight
        configuration.handshakeTimeoutSeconds = handshakeTimeout
        do {
            try await StandaloneServer.runUntilSignalled(configuration, logger: logger)
        } catch let error as DaemonError {
            logger.critical("\(error)")
            throw ExitCode.failure
        }
    }
}

extension IOEngine: ExpressibleByArgument {}
extension CacheMode: ExpressibleByArgument {}
extension PageCacheWritePolicy: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
