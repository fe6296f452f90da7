import ControlProtocol
import Logging
import NBDServer
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Answers marsadm on a Unix socket: one JSON request line in, one JSON reply line out.
final class ControlServer: Sendable {
    typealias Responder = @Sendable (ControlRequest) async -> ControlResponse

    private let path: String
    private let channel: any Channel

    static func start(path: String, group: any EventLoopGroup, logger: Logger, responder: @escaping Responder) async throws -> ControlServer {
        do {
            try claimUnixSocketPath(path)
        } catch {
            throw DaemonError("cannot use the control socket: \(error)")
        }
        let channel = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ControlConnectionHandler(responder: responder, logger: logger))
                }
            }
            .bind(unixDomainSocketPath: path)
            .get()
        chmod(path, 0o600)
        logger.info("control socket listening", metadata: ["path": "\(path)"])
        return ControlServer(path: path, channel: channel)
    }

    private init(path: String, channel: any Channel) {
        self.path = path
        self.channel = channel
    }

    func stop() async {
        try? await channel.close()
        unlink(path)
    }
}

private final class ControlConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let responder: ControlServer.Responder
    private let logger: Logger
    private var received: [UInt8] = []

    init(responder: @escaping ControlServer.Responder, logger: Logger) {
        self.responder = responder
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        received += buffer.readBytes(length: buffer.readableBytes) ?? []
        guard let end = received.firstIndex(of: 0x0A) else {
            if received.count > ControlCodec.maxMessageSize {
                reply(context, ControlResponse(error: "request exceeds \(ControlCodec.maxMessageSize) bytes"))
            }
            return
        }
        let request: ControlRequest
        do {
            request = try ControlCodec.decode(ControlRequest.self, from: received[..<end])
        } catch {
            return reply(context, ControlResponse(error: "malformed control request: \(error)"))
        }
        received = []
        let responder = self.responder
        let promise = context.eventLoop.makePromise(of: ControlResponse.self)
        promise.completeWithTask { await responder(request) }
        promise.futureResult.assumeIsolated().whenSuccess { response in
            self.reply(context, response)
        }
    }

    private func reply(_ context: ChannelHandlerContext, _ response: ControlResponse) {
        received = []
        let bytes = (try? ControlCodec.encodeLine(response)) ?? Array("{\"error\":\"encoding failed\"}\n".utf8)
        let buffer = context.channel.allocator.buffer(bytes: bytes)
        context.writeAndFlush(wrapOutboundOut(buffer)).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("control connection error: \(error)")
        context.close(promise: nil)
    }
}
