import Logging
import NIOCore
import NIOPosix
import PeerProtocol

/// What this host proves itself with on the peer network.
public struct PeerCredentials: Sendable {
    public var cluster: String
    public var secret: [UInt8]
    public var local: PeerIdentity
    /// The address outgoing links start from: this host's peer address, so that the others (and
    /// firewall rules) see the same address in both directions. nil: the kernel's choice.
    public var sourceHost: String?

    public init(cluster: String, secret: [UInt8], local: PeerIdentity, sourceHost: String? = nil) {
        self.cluster = cluster
        self.secret = secret
        self.local = local
        self.sourceHost = sourceHost
    }
}

/// A peer address: `HOST:PORT`, `[IPv6]:PORT`, or a host alone (port 7777).
public struct PeerAddress: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init(parsing text: String) throws(ReplicationError) {
        var host = text
        var port = PeerWire.defaultPort
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw ReplicationError("peer address '\(text)' has no closing ']'") }
            host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":"), let value = Int(rest.dropFirst()) else {
                    throw ReplicationError("peer address '\(text)' is not [IPV6]:PORT")
                }
                port = value
            }
        } else if let colon = text.lastIndex(of: ":"), text.firstIndex(of: ":") == colon {
            host = String(text[..<colon])
            guard let value = Int(text[text.index(after: colon)...]) else {
                throw ReplicationError("peer address '\(text)' has no valid port after ':'")
            }
            port = value
        }
        guard !host.isEmpty else { throw ReplicationError("peer address '\(text)' has no host") }
        guard (1...65535).contains(port) else { throw ReplicationError("peer address '\(text)': port \(port) is not between 1 and 65535") }
        self.host = host
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

public struct ReplicationError: Error, Sendable, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// An authenticated connection to a peer. Its callbacks run on the channel's event loop; `send`
/// may be called from any thread.
public final class PeerLink: @unchecked Sendable {
    public let remote: PeerIdentity
    public let address: String
    let channel: any Channel
    /// Set on the event loop, before the first message can arrive (in the `established` callback).
    public var onMessage: ((PeerMessage) -> Void)?
    public var onClose: (() -> Void)?
    /// The socket took what was queued: a sender that stopped at `isWritable` goes on.
    public var onWritable: (() -> Void)?

    init(remote: PeerIdentity, address: String, channel: any Channel) {
        self.remote = remote
        self.address = address
        self.channel = channel
    }

    public var eventLoop: any EventLoop { channel.eventLoop }

    public var allocator: ByteBufferAllocator { channel.allocator }

    public func send(_ message: PeerMessage) {
        if channel.eventLoop.inEventLoop {
            Self.write(message, to: channel)
        } else {
            // One task per message: the two parts of a frame never interleave with another's.
            channel.eventLoop.execute { [channel] in Self.write(message, to: channel) }
        }
    }

    /// Writes the frame of `message`; the bulk bytes of a large payload go to the socket as they
    /// are (a second buffer of the same writev), not copied behind the frame's head.
    static func write(_ message: PeerMessage, to channel: any Channel) {
        var head = channel.allocator.buffer(capacity: 64)
        if let payload = message.payload, payload.readableBytes >= 4096 {
            message.encodeFrame(into: &head, leavingOutPayload: true)
            channel.write(head, promise: nil)
            channel.writeAndFlush(payload, promise: nil)
        } else {
            message.encodeFrame(into: &head)
            channel.writeAndFlush(head, promise: nil)
        }
    }

    public var isWritable: Bool { channel.isWritable }

    /// Bulk senders (log shipping) keep a few 1 MiB messages queued, so the socket never idles
    /// between two of them; beyond the high mark they wait for `onWritable`.
    static let waterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 2 << 20, high: 4 << 20)

    public func close() {
        channel.close(promise: nil)
    }

    /// Connects to `address`, authenticates both ways, and returns the link once the peer welcomed it.
    public static func connect(
        to address: PeerAddress, group: any EventLoopGroup, credentials: PeerCredentials, logger: Logger,
        timeout: TimeAmount = .seconds(10)
    ) -> EventLoopFuture<PeerLink> {
        let loop = group.next()
        let promise = loop.makePromise(of: PeerLink.self)
        var bootstrap = ClientBootstrap(group: loop)
        if let source = credentials.sourceHost, let local = try? SocketAddress(ipAddress: source, port: 0) {
            bootstrap = bootstrap.bind(to: local)
        }
        bootstrap
            .connectTimeout(timeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.writeBufferWaterMark, value: PeerLink.waterMark)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = PeerLinkHandler(
                        role: .client, credentials: credentials, address: "\(address)", logger: logger, timeout: timeout,
                        established: { link in promise.succeed(link) },
                        failed: { reason in promise.fail(ReplicationError("peer \(address): \(reason)")) }
                    )
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: address.host, port: address.port)
            .whenFailure { error in promise.fail(ReplicationError("cannot connect to peer \(address): \(error)")) }
        return promise.futureResult
    }
}

/// The peer port: every connection authenticates, then `accept` gets the link.
public final class PeerListener: Sendable {
    let channel: any Channel

    public static func start(
        on address: PeerAddress, group: any EventLoopGroup, credentials: @escaping @Sendable () -> PeerCredentials?, logger: Logger,
        accept: @escaping @Sendable (PeerLink) -> Void
    ) async throws -> PeerListener {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: PeerLink.waterMark)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let remote = channel.remoteAddress.map { address in
                        address.ipAddress.map { ip in address.protocol == .inet6 ? "[\(ip)]:\(address.port ?? 0)" : "\(ip):\(address.port ?? 0)" }
                            ?? "\(address)"
                    } ?? "?"
                    guard let credentials = credentials() else {
                        // Not in a cluster yet: nobody to authenticate against.
                        logger.notice("peer \(remote): refused, this host is in no cluster yet")
                        channel.close(promise: nil)
                        return
                    }
                    let handler = PeerLinkHandler(
                        role: .server, credentials: credentials, address: remote, logger: logger, timeout: .seconds(10),
                        established: accept, failed: { _ in }
                    )
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .bind(host: address.host, port: address.port)
            .get()
        logger.info("peer port listening", metadata: ["address": "\(address)"])
        return PeerListener(channel: channel)
    }

    init(channel: any Channel) {
        self.channel = channel
    }

    public var port: Int? { channel.localAddress?.port }

    public func stop() async {
        try? await channel.close()
    }
}

/// Frames in, handshake first, then messages to the link's callback. Every refusal is logged with
/// the peer's address and the reason, and closes the connection: bad input never stalls marsd.
final class PeerLinkHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var decoder = PeerFrameDecoder()
    private var handshake: PeerHandshake
    private var link: PeerLink?
    private let role: PeerHandshake.Role
    private let address: String
    private let logger: Logger
    private let timeout: TimeAmount
    private let established: (PeerLink) -> Void
    private let failed: (String) -> Void
    private var finished = false
    private var deadline: Scheduled<Void>?

    init(
        role: PeerHandshake.Role, credentials: PeerCredentials, address: String, logger: Logger, timeout: TimeAmount,
        established: @escaping (PeerLink) -> Void, failed: @escaping (String) -> Void
    ) {
        var nonce = [UInt8](repeating: 0, count: 32)
        var generator = SystemRandomNumberGenerator()
        for index in nonce.indices { nonce[index] = generator.next() }
        self.handshake = PeerHandshake(role: role, cluster: credentials.cluster, secret: credentials.secret, local: credentials.local, nonce: nonce)
        self.role = role
        self.address = address
        self.logger = logger
        self.timeout = timeout
        self.established = established
        self.failed = failed
    }

    func channelActive(context: ChannelHandlerContext) {
        if let hello = handshake.start() { PeerLink.write(hello, to: context.channel) }
        let channel = context.channel
        deadline = context.eventLoop.scheduleTask(in: timeout) { [weak self] in
            guard let self, self.link == nil else { return }
            self.fail("no authenticated handshake within \(self.timeout.nanoseconds / 1_000_000_000) s", channel: channel)
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        decoder.append(unwrapInboundIn(data))
        do {
            while !finished, let message = try decoder.next() {
                if let link {
                    link.onMessage?(message)
                } else {
                    handle(handshake.receive(message), context: context)
                }
            }
        } catch {
            if let link, let _ = link.onMessage {
                logger.warning("peer \(address) (\(link.remote.host)): closing the link: \(error)")
            }
            fail("\(error)", channel: context.channel)
        }
    }

    private func handle(_ action: HandshakeAction, context: ChannelHandlerContext) {
        switch action {
        case .send(let message):
            PeerLink.write(message, to: context.channel)
        case .sendAndEstablish(let message, let identity):
            PeerLink.write(message, to: context.channel)
            establish(identity, context: context)
        case .established(let identity):
            establish(identity, context: context)
        case .refuse(let message, let reason):
            PeerLink.write(message, to: context.channel)
            fail(reason, channel: context.channel)
        case .failed(let reason):
            fail(reason, channel: context.channel)
        }
    }

    private func establish(_ identity: PeerIdentity, context: ChannelHandlerContext) {
        deadline?.cancel()
        let link = PeerLink(remote: identity, address: address, channel: context.channel)
        self.link = link
        established(link)
    }

    private func fail(_ reason: String, channel: any Channel) {
        guard !finished else { return }
        finished = true
        deadline?.cancel()
        if link == nil {
            logger.notice("peer \(address): refused: \(reason)")
            failed(reason)
        }
        channel.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { link?.onWritable?() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        if let link {
            link.onClose?()
            link.onMessage = nil
            link.onClose = nil
            link.onWritable = nil
        } else if !finished {
            finished = true
            failed("the connection closed during the handshake")
        }
        finished = true
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail("\(error)", channel: context.channel)
    }

}
