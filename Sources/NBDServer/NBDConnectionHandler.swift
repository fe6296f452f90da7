import BlockStore
import LogEngine
import Logging
import NBDProtocol
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Limits of one connection.
public struct ConnectionLimits: Sendable {
    /// Requests in flight per connection; beyond it the socket is not read (backpressure).
    public var maxInFlight = 64
    /// Payload bytes in flight per connection (reads being filled, writes being written).
    public var maxInFlightBytes = 64 << 20
    /// A client must finish the handshake within this time.
    public var handshakeTimeout: TimeAmount = .seconds(30)
    /// How long a handshake naming a resource that is still recovering waits for it before the
    /// client is told to try again (the handshake timeout starts afresh after the wait).
    public var recoveryWait: TimeAmount = .seconds(60)
    public var handshake = HandshakeLimits()
    /// WRITE payloads of at least this size are gathered from the received buffers without copying
    /// and written with one writev.
    public var gatherWritesFrom = 64 << 10

    public init() {}
}

/// One NBD connection: handshake, then transmission. Protocol decisions come from the pure
/// `HandshakeStateMachine` and `RequestParser`; this class only moves bytes, submits device I/O
/// through its event loop's `LoopIO`, and writes replies when completions arrive (out of order).
final class NBDConnectionHandler: ChannelInboundHandler, IOCompletionTarget {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Phase {
        case handshake(HandshakeStateMachine)
        case transmission(RequestParser, ServedExport)
        case closed
    }

    /// What remains to do for a request whose device operation completed.
    private enum Stage {
        case transfer
        /// Writing zeroes by hand because fallocate cannot zero this range; `next` is the next offset.
        case zeroFill(next: UInt64)
        /// The fdatasync a FUA TRIM or WRITE_ZEROES needs after the operation itself.
        case flushAfter
    }

    private struct Pending {
        var cookie: UInt64
        var command: NBDCommand
        var flags: NBDCommandFlags
        var offset: UInt64
        var length: Int
        /// READ: the reply, header written, data area behind it. WRITE: the payload.
        var buffer: ByteBuffer?
        /// The data area of `buffer` (stable: `buffer` is held unchanged until completion).
        var address: UnsafeMutableRawPointer?
        /// A gathered WRITE payload: the received buffers and the iovecs pointing into them.
        var fragments: [ByteBuffer] = []
        var iovecs: UnsafeMutablePointer<iovec>?
        var done = 0
        var stage = Stage.transfer
        /// READ of a logged export: pending changes to lay over the device's bytes before replying.
        var overlay: [PendingPiece]?
        /// A request of a logged export: log submissions not completed yet (a WRITE larger than a
        /// record is several), and the first error among them.
        var logPartsOutstanding = 0
        var logError: LogEngineError?
    }

    private let exports: ExportTable
    private let limits: ConnectionLimits
    private let logger: Logger
    private let ioRegistry: LoopIORegistry
    private var io: LoopIO!
    private var context: ChannelHandlerContext?
    private var phase: Phase
    private var inbound: ByteBuffer?
    /// True when `inbound` shares storage with a WRITE payload still in flight.
    private var inboundShared = false
    /// A WRITE whose payload is still arriving, gathered as slices of the received buffers.
    private var gathering: (header: RequestHeader, fragments: [ByteBuffer], remaining: Int)?
    private var pending: [Pending?] = []
    private var freePending: [Int] = []
    private var inFlight = 0
    private var inFlightBytes = 0
    private var needsFlush = false
    /// Small replies (done, errors, block status) written since the last flush, in one buffer: a
    /// batch of replies costs one allocation and one pipeline write instead of one per request.
    private var replyBatch: ByteBuffer?
    private var waitingForBudget = false
    private var completedSinceBatchEnd = false
    private var disconnectRequested = false
    private var handshakeTimer: Scheduled<Void>?
    /// While the handshake waits for a pending export: the wait's timer and its registration.
    private var exportWait: (name: String, timer: Scheduled<Void>, registration: UInt64)?
    private var structured = false
    /// The export whose active-connection count includes this connection.
    private var countedExport: ServedExport?
    private let allocator = pooledAllocator
    /// The export's data device, duplicated for sendfile: READs served from the page cache (see
    /// `sendFromPageCache`). Opened on first use, closed with the connection.
    private var pageCacheFile: NIOFileHandle?
    private var pageCacheFileFailed = false
    /// READs of at least this many bytes may be sent from the page cache; nil: none are.
    private let smallestSentRead: Int?
    /// Where the log engine sends completions of this connection's requests (created on first use).
    private var logMailbox: LogMailbox?

    /// Where the next received byte lands in its page: the payload's own offset while a WRITE is gathered.
    private let receiveBuffers: PayloadAligningReceiveBuffers

    init(
        exports: ExportTable, limits: ConnectionLimits, ioRegistry: LoopIORegistry,
        receiveBuffers: PayloadAligningReceiveBuffers, smallestSentRead: Int?, logger: Logger
    ) {
        self.exports = exports
        self.smallestSentRead = smallestSentRead
        self.receiveBuffers = receiveBuffers
        self.limits = limits
        self.ioRegistry = ioRegistry
        self.logger = logger
        self.phase = .handshake(HandshakeStateMachine(catalog: exports.catalog, limits: limits.handshake))
    }

    // MARK: - Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.io = ioRegistry.io(for: context.eventLoop)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        // The channel is closed and its pending writes failed: no FileRegion uses the file now.
        try? pageCacheFile?.close()
        pageCacheFile = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        guard case .handshake(let machine) = phase else { return }
        context.writeAndFlush(wrapOutboundOut(machine.greeting()), promise: nil)
        startHandshakeTimer(context)
        context.read()
    }

    private func startHandshakeTimer(_ context: ChannelHandlerContext) {
        let timeout = limits.handshakeTimeout
        handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [weak self] in
            self?.close(reason: "handshake not finished within \(timeout.nanoseconds / 1_000_000_000) s")
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        endExportWait()
        countedExport?.statistics.activeConnections.subtract(1, ordering: .relaxed)
        countedExport = nil
        phase = .closed
        inbound = nil
        if let write = gathering {
            io.release(Int(write.header.length))
            gathering = nil
        }
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if var buffer = inbound, buffer.readableBytes > 0 {
            if inboundShared {
                // Copy only the unread bytes, not storage that an in-flight WRITE still points into.
                var fresh = allocator.buffer(capacity: buffer.readableBytes + incoming.readableBytes)
                fresh.writeBuffer(&buffer)
                buffer = fresh
                inboundShared = false
            }
            inbound = nil  // Keep the buffer uniquely referenced while appending.
            buffer.writeBuffer(&incoming)
            inbound = buffer
        } else {
            inbound = incoming
            inboundShared = false
        }
        processInbound()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushIfNeeded()
        readIfReady()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            processInbound()
            readIfReady()
        }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        close(reason: "connection error: \(error)")
    }

    // MARK: - Input

    /// Whether the next request may be taken; registers for a wake-up when the loop's budget is spent.
    private func readyForRequest() -> Bool {
        guard let context, context.channel.isWritable, !disconnectRequested else { return false }
        guard io.hasBudget else {
            if !waitingForBudget {
                waitingForBudget = true
                io.waitForBudget(self)
            }
            return false
        }
        return inFlight < limits.maxInFlight && (inFlight == 0 || inFlightBytes < limits.maxInFlightBytes)
    }

    func budgetAvailable() {
        waitingForBudget = false
        guard case .transmission = phase else { return }
        processInbound()
        readIfReady()
    }

    private func readIfReady() {
        guard let context, !disconnectRequested else { return }
        switch phase {
        case .closed:
            return
        case .handshake:
            if exportWait == nil { context.read() }
        case .transmission:
            if readyForRequest() || gathering != nil { context.read() }
        }
    }

    /// Parses and acts on every complete message in `inbound` while limits allow.
    private func processInbound() {
        guard var buffer = inbound else { return }
        inbound = nil
        defer {
            if case .closed = phase { } else { inbound = buffer }
            io.submitPending()
            flushIfNeeded()
        }
        while true {
            switch phase {
            case .closed:
                return
            case .handshake(var machine):
                let action = machine.receive(&buffer)
                phase = .handshake(machine)
                guard handle(action) else { return }
            case .transmission(let parser, let export):
                if gathering != nil {
                    guard gatherPayload(&buffer, parser, export) else { return }
                    continue
                }
                guard readyForRequest() else { return }
                switch parser.parse(&buffer) {
                case .writeHeader(let header):
                    io.reserve(Int(header.length))  // Released with the request, or if it never becomes one.
                    gathering = (header, [], Int(header.length))
                case .needMoreData:
                    reserveForPayload(&buffer)
                    return
                case .request(let request):
                    if request.command == .disconnect {
                        disconnectRequested = true
                        logger.debug("client sent DISC")
                        closeIfDrained()
                        return
                    }
                    if request.payload != nil { inboundShared = true }
                    dispatch(request, export)
                case .reject(let cookie, let command, let error, let message):
                    reject(cookie: cookie, command: command, error, message, export)
                case .rejectAndClose(let cookie, let command, let error, let message):
                    logger.notice("rejected request and closing", metadata: ["command": "\(command)", "reason": "\(message)"])
                    export.statistics.errors.add(1, ordering: .relaxed)
                    sendError(cookie: cookie, error, message)
                    flushIfNeeded()
                    close(reason: message)
                    return
                case .close(let reason):
                    close(reason: reason)
                    return
                }
            }
        }
    }

    private func reject(cookie: UInt64, command: UInt16, _ error: NBDError, _ message: String, _ export: ServedExport) {
        logger.debug("rejected request", metadata: ["command": "\(command)", "error": "\(error)", "reason": "\(message)"])
        export.statistics.errors.add(1, ordering: .relaxed)
        sendError(cookie: cookie, error, message)
    }

    /// Moves payload bytes of the WRITE being gathered out of `buffer` (as slices, no copy); true
    /// once the payload is complete and the request was handled.
    private func gatherPayload(_ buffer: inout ByteBuffer, _ parser: RequestParser, _ export: ServedExport) -> Bool {
        guard var write = gathering else { return true }
        gathering = nil  // Keep the fragment list uniquely referenced while appending.
        let count = min(write.remaining, buffer.readableBytes)
        if count > 0 {
            write.fragments.append(buffer.readSlice(length: count)!)
            write.remaining -= count
            inboundShared = true
        }
        guard write.remaining == 0 else {
            let received = UInt64(Int(write.header.length) - write.remaining)
            receiveBuffers.nextByteOffsetInPage = Int((write.header.offset + received) % UInt64(directIOAlignment))
            gathering = write
            return false
        }
        receiveBuffers.nextByteOffsetInPage = nil
        switch parser.finishWrite(write.header) {
        case .request(let request):
            dispatch(request, export, fragments: write.fragments, reserved: true)
        case .reject(let cookie, let command, let error, let message):
            io.release(Int(write.header.length))
            reject(cookie: cookie, command: command, error, message, export)
        default:
            preconditionFailure("finishWrite returns a request or a rejection")
        }
        return true
    }

    /// Carries out a handshake action; false when input processing must stop.
    private func handle(_ action: HandshakeAction) -> Bool {
        guard let context else { return false }
        switch action {
        case .needMoreData:
            return false
        case .send(let bytes):
            context.write(wrapOutboundOut(bytes), promise: nil)
            needsFlush = true
            return true
        case .sendAndClose(let bytes):
            phase = .closed
            context.writeAndFlush(wrapOutboundOut(bytes)).assumeIsolated().whenComplete { _ in
                context.close(promise: nil)
            }
            return false
        case .close(let reason):
            close(reason: reason)
            return false
        case .awaitExport(let name):
            waitForExport(name, context)
            return false
        case .startTransmission(let bytes, let session):
            handshakeTimer?.cancel()
            guard let export = exports.served(session.export) else {
                close(reason: "export '\(session.export.name)' disappeared during the handshake")
                return false
            }
            context.write(wrapOutboundOut(bytes), promise: nil)
            needsFlush = true
            structured = session.structuredReplies
            phase = .transmission(
                RequestParser(session: session, gatherPayloadsFrom: limits.gatherWritesFrom) { export.size }, export
            )
            export.statistics.activeConnections.add(1, ordering: .relaxed)
            countedExport = export
            export.statistics.totalConnections.add(1, ordering: .relaxed)
            logger.debug("transmission started", metadata: ["export": "\(export.descriptor.name)", "structured": "\(structured)"])
            return true
        }
    }

    // MARK: - Waiting for a recovering export

    /// Holds the handshake until the pending export `name` is served or given up, or the recovery
    /// wait passes. Reads stop meanwhile; the handshake timeout starts afresh afterwards.
    private func waitForExport(_ name: String, _ context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let registration = exports.notifyWhenDecided(name) {
            bound.eventLoop.execute { bound.value.exportDecided() }
        }
        guard let registration else {
            // Decided between the catalog the handshake used and now.
            context.eventLoop.assumeIsolated().execute { self.exportDecided() }
            return
        }
        let wait = limits.recoveryWait
        let timer = context.eventLoop.assumeIsolated().scheduleTask(in: wait) { [weak self] () -> Void in
            self?.exportWaitTimedOut()
        }
        exportWait = (name, timer, registration)
        logger.debug("handshake waits for a recovering export", metadata: ["export": "\(name)"])
    }

    private func endExportWait() {
        guard let wait = exportWait else { return }
        exportWait = nil
        wait.timer.cancel()
        exports.cancelNotification(wait.registration)
    }

    private func exportDecided() {
        endExportWait()
        let catalog = exports.catalog
        continueHandshake { $0.resume(catalog: catalog) }
    }

    private func exportWaitTimedOut() {
        guard let wait = exportWait else { return }
        logger.notice("export still recovering after the recovery wait", metadata: ["export": "\(wait.name)"])
        endExportWait()
        continueHandshake { $0.stopWaiting() }
    }

    /// Carries out what the handshake says after a wait, then goes on with any input that arrived.
    private func continueHandshake(_ step: (inout HandshakeStateMachine) -> HandshakeAction) {
        guard let context, case .handshake(var machine) = phase else { return }
        let action = step(&machine)
        phase = .handshake(machine)
        if case .awaitExport = action {} else if handshakeTimer == nil, case .handshake = phase {
            startHandshakeTimer(context)
        }
        if handle(action) { processInbound() }
        flushIfNeeded()
        readIfReady()
    }

    /// Makes room for the whole WRITE payload at the head of `buffer`, so it arrives without regrowing.
    private func reserveForPayload(_ buffer: inout ByteBuffer) {
        guard buffer.readableBytes >= RequestHeader.size,
            buffer.getInteger(at: buffer.readerIndex + 6, as: UInt16.self) == NBDCommand.write.rawValue,
            let length = buffer.getInteger(at: buffer.readerIndex + 24, as: UInt32.self),
            length <= NBDLimits.acceptedMaxPayload
        else { return }
        let needed = RequestHeader.size + Int(length) - buffer.readableBytes
        if needed > buffer.writableBytes {
            if inboundShared {
                var fresh = allocator.buffer(capacity: RequestHeader.size + Int(length))
                fresh.writeBuffer(&buffer)
                buffer = fresh
                inboundShared = false
            } else {
                buffer.reserveCapacity(minimumWritableBytes: needed)
            }
        }
    }

    // MARK: - Dispatch

    /// Starts a validated request. A WRITE's payload is `request.payload`, or `fragments` when it was
    /// gathered.
    private func dispatch(_ request: Request, _ export: ServedExport, fragments: [ByteBuffer] = [], reserved: Bool = false) {
        if export.isRetired {
            if reserved { io.release(Int(request.length)) }
            return close(reason: "export '\(export.descriptor.name)' was taken down")
        }
        let device = export.device
        export.statistics.requests.add(1, ordering: .relaxed)
        var overlay: [PendingPiece]?
        if request.command == .read {
            // Taken before the device read (see `LogEngine.overlay`), and once: it also decides
            // whether the READ may be sent from the page cache.
            overlay = export.log?.overlay(offset: request.offset, length: Int(request.length))
            if overlay == nil, sendFromPageCache(request, export) { return }
        }
        if request.command == .read || request.command == .write {
            // Payload bytes this request holds until it completes: per connection and per loop.
            if !reserved { io.reserve(Int(request.length)) }
            inFlightBytes += Int(request.length)
            if request.command == .write {
                export.statistics.bytesWritten.add(Int(request.length), ordering: .relaxed)
            }
        }
        var item = Pending(
            cookie: request.cookie, command: request.command, flags: request.flags, offset: request.offset,
            length: Int(request.length)
        )
        if let log = export.log, request.command != .read, request.command != .cache, request.command != .blockStatus {
            return dispatchLogged(request, item, log, fragments: fragments)
        }
        switch request.command {
        case .read:
            item.overlay = overlay
            let headerSize = ReplyEncoder.readHeaderSize(structured: structured)
            var buffer: ByteBuffer
            if device.cacheMode == .direct || item.length > alignedReadSize {
                // The data area starts on a page boundary, so the read can go straight to O_DIRECT,
                // and the kernel's copy from the page cache runs at full speed: between addresses at
                // different offsets in their pages it took about twice as long on this project's AMD
                // machines (issue 18, BENCHMARKS.md). Large buffers are pooled, so the leading page
                // costs nothing per request.
                buffer = pageAlignedAllocator.buffer(capacity: directIOAlignment + item.length)
                buffer.moveWriterIndex(to: directIOAlignment - headerSize)
                buffer.moveReaderIndex(to: directIOAlignment - headerSize)
            } else {
                buffer = allocator.buffer(capacity: headerSize + item.length)
            }
            ReplyEncoder.writeReadHeader(
                &buffer, structured: structured, cookie: request.cookie, offset: request.offset, length: item.length
            )
            item.address = buffer.withUnsafeMutableWritableBytes { $0.baseAddress! }
            item.buffer = buffer
            submitTransfer(store(item), device)
        case .write where fragments.count > 1 && fragments.count <= maxWriteVectors && device.cacheMode == .buffered:
            // Write the received buffers as they are: one writev, no copy.
            let iovecs = UnsafeMutablePointer<iovec>.allocate(capacity: fragments.count)
            for (index, fragment) in fragments.enumerated() {
                let base = fragment.withUnsafeReadableBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress!) }
                iovecs[index] = iovec(iov_base: base, iov_len: fragment.readableBytes)
            }
            item.fragments = fragments
            item.iovecs = iovecs
            let token = store(item)
            io.enqueue(
                .writev(fd: device.bufferedFD, iovecs: iovecs, count: fragments.count, offset: item.offset, durable: item.flags.contains(.fua)),
                for: self, token: token,
                pageCacheWrite: isInlineCandidate(offset: item.offset, count: item.length, fua: item.flags.contains(.fua))
            )
        case .write:
            var payload = request.payload
                ?? (fragments.count == 1 ? fragments[0] : coalesce(fragments, aligned: device.cacheMode == .direct))
            var address = payload.withUnsafeReadableBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress!) }
            if device.cacheMode == .direct, isDirectAligned(item, device),
                device.descriptor(offset: item.offset, length: item.length, address: address) == device.bufferedFD
            {
                // Aligned range, unaligned memory: copy into a page-aligned buffer to keep O_DIRECT.
                var aligned = pageAlignedAllocator.buffer(capacity: item.length)
                aligned.writeBuffer(&payload)
                payload = aligned
                address = payload.withUnsafeReadableBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress!) }
            }
            item.buffer = payload
            item.address = address
            submitTransfer(store(item), device)
        case .flush:
            io.enqueue(.fdatasync(fd: device.bufferedFD), for: self, token: store(item))
        case .trim:
            io.enqueue(
                .fallocate(fd: device.bufferedFD, mode: FallocateMode.punchHole, offset: item.offset, length: UInt64(item.length)),
                for: self, token: store(item)
            )
        case .writeZeroes:
            if item.flags.contains(.fastZero), item.flags.contains(.noHole), device.kind == .blockDevice {
                // ZERO_RANGE on a block device may write zeroes in the kernel: not fast.
                sendError(cookie: item.cookie, .notSupported, "fast zeroing without holes is not supported on a block device")
                return
            }
            let mode = item.flags.contains(.noHole) ? FallocateMode.zeroRange : FallocateMode.punchHole
            io.enqueue(
                .fallocate(fd: device.bufferedFD, mode: mode, offset: item.offset, length: UInt64(item.length)),
                for: self, token: store(item)
            )
        case .cache:
            device.prefetch(offset: item.offset, length: UInt64(item.length))
            sendDone(cookie: item.cookie)
        case .blockStatus:
            sendBlockStatus(item, device)
        case .disconnect:
            preconditionFailure("DISC is handled before dispatch")
        }
    }

    /// Replies to a large READ (`smallestSentRead`) whose bytes are all in the page cache with
    /// sendfile: the kernel sends the cached pages themselves, so marsd copies nothing (the copy path
    /// copies each byte twice: page cache to buffer, buffer to socket). The caller passes only READs
    /// that no pending log change overlaps. Returns false, doing nothing, when the copy path must
    /// serve it.
    ///
    /// The bytes are read when the socket takes them, not now. That can only show a change made
    /// after this READ arrived, which the client could not have waited for: the two are concurrent,
    /// and either order is what the NBD spec allows. A device error while sending cannot become an
    /// NBD error reply (the header is sent), so it closes the connection; cached pages make that
    /// as rare as a memory error.
    private func sendFromPageCache(_ request: Request, _ export: ServedExport) -> Bool {
        let device = export.device
        let length = Int(request.length)
        guard let smallestSentRead, length >= smallestSentRead, device.cacheMode == .buffered, let context,
            device.isCached(offset: request.offset, length: length),
            let file = pageCacheFile(device)
        else { return false }
        appendReply(atMost: ReplyEncoder.readHeaderSize(structured: structured)) {
            ReplyEncoder.writeReadHeader(&$0, structured: structured, cookie: request.cookie, offset: request.offset, length: length)
        }
        writeReplyBatch()
        let start = Int(request.offset)
        context.write(NIOAny(IOData.fileRegion(FileRegion(fileHandle: file, readerIndex: start, endIndex: start + length))), promise: nil)
        export.statistics.bytesRead.add(length, ordering: .relaxed)
        export.statistics.pageCacheReads.add(1, ordering: .relaxed)
        return true
    }

    private func pageCacheFile(_ device: BlockDevice) -> NIOFileHandle? {
        if let pageCacheFile { return pageCacheFile }
        guard !pageCacheFileFailed else { return nil }
        let fd = fcntl(device.bufferedFD, F_DUPFD_CLOEXEC, 0)
        guard fd >= 0 else {
            pageCacheFileFailed = true  // Once per connection: no log line per READ while descriptors are short.
            logger.warning(
                "cannot duplicate the data device for sendfile; this connection's READs are copied (raise the open-file limit)",
                metadata: ["device": "\(device.path)", "error": "\(String(cString: strerror(errno)))"]
            )
            return nil
        }
        pageCacheFile = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
        return pageCacheFile
    }

    /// WRITE, TRIM, WRITE_ZEROES and FLUSH of a logged export go to its transaction log; the data
    /// device sees them only through writeback (invariant 2).
    private func dispatchLogged(_ request: Request, _ item: Pending, _ log: LogEngine, fragments: [ByteBuffer]) {
        let mailbox = mailbox()
        let fua = item.flags.contains(.fua)
        var item = item
        item.logPartsOutstanding = 1
        let token = store(item)
        let admission: LogAdmission
        switch request.command {
        case .write:
            return submitLoggedWrite(request, token, log, mailbox, fragments: fragments)
        case .trim:
            admission = log.submit(offset: item.offset, change: .trim(length: item.length), fua: fua, target: mailbox, token: token)
        case .writeZeroes:
            // Logged zeroing is a small record whatever the range: always fast (FAST_ZERO holds).
            let change = LogChange.writeZeroes(length: item.length, noHole: item.flags.contains(.noHole))
            admission = log.submit(offset: item.offset, change: change, fua: fua, target: mailbox, token: token)
        case .flush:
            admission = log.flush(target: mailbox, token: token)
        default:
            preconditionFailure("\(request.command) is not a logged command")
        }
        logPartAdmitted(token, admission)
    }

    /// Logs a WRITE as records of at most the log's record size: accepted payloads are larger
    /// than a record (`NBDLimits.acceptedMaxPayload`). NBD does not promise that a WRITE is
    /// atomic, and the records are consecutive in the log, so replicas replay them in order.
    private func submitLoggedWrite(_ request: Request, _ token: Int, _ log: LogEngine, _ mailbox: LogMailbox, fragments: [ByteBuffer]) {
        let item = pending[token]!
        let parts = payloadParts(request.payload.map { [$0] } ?? fragments, length: item.length, partSize: log.maxRecordPayload)
        pending[token]!.logPartsOutstanding = parts.count
        var offset = item.offset
        for (index, part) in parts.enumerated() {
            let admission = log.submit(offset: offset, change: .write(part), fua: item.flags.contains(.fua), target: mailbox, token: token)
            offset += UInt64(part.count)
            if case .refused = admission {
                // The parts after a refused one are not submitted: the reply waits only for those before.
                pending[token]!.logPartsOutstanding -= parts.count - index - 1
                return logPartAdmitted(token, admission)
            }
            logPartAdmitted(token, admission)
        }
    }

    /// The payload bytes of `buffers` copied into arrays of at most `partSize` bytes.
    private func payloadParts(_ buffers: [ByteBuffer], length: Int, partSize: Int) -> [[UInt8]] {
        var parts: [[UInt8]] = []
        var part = [UInt8]()
        part.reserveCapacity(min(partSize, length))
        var copied = 0
        for var buffer in buffers {
            while buffer.readableBytes > 0 {
                let count = min(buffer.readableBytes, partSize - part.count)
                buffer.readWithUnsafeReadableBytes { bytes in
                    part.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes.prefix(count)))
                    return count
                }
                copied += count
                if part.count == partSize {
                    parts.append(part)
                    part = []
                    part.reserveCapacity(min(partSize, length - copied))
                }
            }
        }
        if !part.isEmpty { parts.append(part) }
        return parts
    }

    private func logPartAdmitted(_ token: Int, _ admission: LogAdmission) {
        switch admission {
        case .acknowledged:
            logPartCompleted(token, error: nil)
        case .waiting:
            break
        case .refused(let error):
            logPartCompleted(token, error: error)
        }
    }

    /// One log submission of a request completed; the reply goes out with the last one.
    private func logPartCompleted(_ token: Int, error: LogEngineError?) {
        guard var item = pending[token] else { return }
        item.logPartsOutstanding -= 1
        if item.logError == nil { item.logError = error }
        pending[token] = item
        guard item.logPartsOutstanding == 0 else { return }
        if let error = item.logError {
            finish(token, logError: error)
        } else {
            finish(token, error: nil, nil)
        }
    }

    private func mailbox() -> LogMailbox {
        if let logMailbox { return logMailbox }
        let mailbox = LogMailbox(handler: NIOLoopBound(WeakHandler(self), eventLoop: context!.eventLoop))
        logMailbox = mailbox
        return mailbox
    }

    /// Completions from the log engine, on this connection's loop.
    func logCompleted(_ completions: [LogCompletion]) {
        for completion in completions {
            logPartCompleted(completion.token, error: completion.error)
        }
        completedSinceBatchEnd = true
        completionBatchEnded()
    }

    private func finish(_ token: Int, logError error: LogEngineError) {
        logger.warning("log refused a request", metadata: ["errno": "\(error.errno)", "reason": "\(error.message)"])
        finish(token, error: nbdError(errno: error.errno, fastZeroRequested: false), error.message)
    }

    /// A buffered write that may run inline on the loop: page-aligned (only a copy into the page
    /// cache, no read-modify-write from disk), not FUA (that would wait for the disk), and at most
    /// 1 MiB. Handing it to an io_uring worker costs more CPU than the copy saves the loop, up to
    /// 1 MiB (measured: docs/architecture.md); larger ones go to the workers so that one request
    /// does not hold the loop for long.
    private func isInlineCandidate(offset: UInt64, count: Int, fua: Bool) -> Bool {
        !fua && (offset | UInt64(count)) & 4095 == 0 && count <= inlineWriteLimit
    }

    private let inlineWriteLimit = 1 << 20

    /// READs larger than this get their data on a page boundary in buffered mode too (see `dispatch`).
    private let alignedReadSize = RequestBufferPool.smallestPooled

    /// IOV_MAX on Linux: a WRITE gathered from more received buffers than this is copied into one.
    private let maxWriteVectors = 1024

    /// One contiguous copy of gathered fragments; page-aligned for O_DIRECT.
    private func coalesce(_ fragments: [ByteBuffer], aligned: Bool) -> ByteBuffer {
        let length = fragments.reduce(0) { $0 + $1.readableBytes }
        var buffer = (aligned ? pageAlignedAllocator : allocator).buffer(capacity: length)
        for var fragment in fragments { buffer.writeBuffer(&fragment) }
        return buffer
    }

    private func isDirectAligned(_ item: Pending, _ device: BlockDevice) -> Bool {
        let mask = device.directOffsetAlignment - 1
        return item.offset & mask == 0 && UInt64(item.length) & mask == 0
    }

    private func store(_ item: Pending) -> Int {
        inFlight += 1
        if let index = freePending.popLast() {
            pending[index] = item
            return index
        }
        pending.append(item)
        return pending.count - 1
    }

    private func submitTransfer(_ token: Int, _ device: BlockDevice) {
        let item = pending[token]!
        let address = item.address! + item.done
        let count = item.length - item.done
        let offset = item.offset + UInt64(item.done)
        let fd = device.descriptor(offset: offset, length: count, address: address)
        if item.command == .read {
            io.enqueue(.read(fd: fd, buffer: address, count: count, offset: offset), for: self, token: token)
        } else {
            io.enqueue(
                .write(fd: fd, buffer: address, count: count, offset: offset, durable: item.flags.contains(.fua)),
                for: self, token: token,
                pageCacheWrite: fd == device.bufferedFD && isInlineCandidate(offset: offset, count: count, fua: item.flags.contains(.fua))
            )
        }
    }

    // MARK: - Completions

    func ioCompleted(token: Int, result: Int32) {
        completedSinceBatchEnd = true
        guard var item = pending[token], case .transmission(_, let export) = phase else {
            // The connection is gone; the buffer is released with the slot.
            release(token)
            return
        }
        let device = export.device
        if result < 0 {
            let code = -result
            if item.command == .trim, code == EOPNOTSUPP, case .transfer = item.stage {
                // TRIM is a hint: a device that cannot discard has done all it must.
                return afterOperation(token, &item, device)
            }
            if item.command == .writeZeroes, code == EOPNOTSUPP, case .transfer = item.stage {
                if item.flags.contains(.fastZero) {
                    return finish(token, error: .notSupported, "the data device cannot zero this range quickly")
                }
                item.stage = .zeroFill(next: item.offset)
                pending[token] = item
                return submitZeroFill(token, item, device)
            }
            let error = nbdError(errno: code, fastZeroRequested: item.flags.contains(.fastZero))
            logger.warning(
                "I/O error on data device",
                metadata: ["device": "\(device.path)", "command": "\(item.command)", "offset": "\(item.offset)", "errno": "\(code)"]
            )
            return finish(token, error: error, "\(item.command) at \(item.offset): \(String(cString: strerror(code)))")
        }
        switch item.stage {
        case .transfer where item.command == .read || item.command == .write:
            if result == 0 {
                return finish(token, error: .io, "\(item.command) at \(item.offset + UInt64(item.done)): unexpected end of device")
            }
            item.done += Int(result)
            if item.done < item.length, let iovecs = item.iovecs {
                // A short gathered write: continue from one contiguous copy.
                var buffer = coalesce(item.fragments, aligned: false)
                item.address = buffer.withUnsafeMutableReadableBytes { $0.baseAddress! }
                item.buffer = buffer
                item.fragments = []
                item.iovecs = nil
                iovecs.deallocate()
            }
            pending[token] = item
            if item.done < item.length {
                return submitTransfer(token, device)  // A short transfer: continue with the rest.
            }
            finish(token, error: nil, nil)
        case .transfer:
            afterOperation(token, &item, device)
        case .zeroFill(let next):
            let reached = next + UInt64(result)
            item.stage = .zeroFill(next: reached)
            pending[token] = item
            if reached < item.offset + UInt64(item.length) {
                return submitZeroFill(token, item, device)
            }
            afterOperation(token, &item, device)
        case .flushAfter:
            finish(token, error: nil, nil)
        }
    }

    /// After TRIM or WRITE_ZEROES: a FUA request still needs its fdatasync.
    private func afterOperation(_ token: Int, _ item: inout Pending, _ device: BlockDevice) {
        guard item.flags.contains(.fua), item.command != .flush else {
            return finish(token, error: nil, nil)
        }
        if case .flushAfter = item.stage { return finish(token, error: nil, nil) }
        item.stage = .flushAfter
        pending[token] = item
        io.enqueue(.fdatasync(fd: device.bufferedFD), for: self, token: token)
    }

    private func submitZeroFill(_ token: Int, _ item: Pending, _ device: BlockDevice) {
        guard case .zeroFill(let next) = item.stage else { return }
        let zeroes = ZeroBlock.shared
        let count = Int(min(UInt64(zeroes.size), item.offset + UInt64(item.length) - next))
        let fd = device.descriptor(offset: next, length: count, address: zeroes.address)
        io.enqueue(
            .write(fd: fd, buffer: zeroes.address, count: count, offset: next, durable: false), for: self, token: token
        )
    }

    func completionBatchEnded() {
        // LoopIO calls this once per completion of the batch; only the first call has work to do.
        guard completedSinceBatchEnd else { return }
        completedSinceBatchEnd = false
        flushIfNeeded()
        if case .transmission = phase {
            processInbound()
            readIfReady()
        }
        closeIfDrained()
    }

    private func release(_ token: Int) {
        if let item = pending[token], item.command == .read || item.command == .write {
            inFlightBytes -= item.length
            io.release(item.length)
            item.iovecs?.deallocate()
        }
        pending[token] = nil
        freePending.append(token)
        inFlight -= 1
    }

    /// Sends the reply of a finished request and frees its slot.
    private func finish(_ token: Int, error: NBDError?, _ message: String?) {
        guard let item = pending[token] else { return }
        release(token)
        guard let context, case .transmission(_, let export) = phase else { return }
        if let error {
            export.statistics.errors.add(1, ordering: .relaxed)
            sendError(cookie: item.cookie, error, message ?? "\(item.command) failed")
            return
        }
        if item.command == .read, var buffer = item.buffer {
            if let overlay = item.overlay, let address = item.address {
                LogEngine.lay(overlay, over: UnsafeMutableRawBufferPointer(start: address, count: item.length), at: item.offset)
            }
            buffer.moveWriterIndex(forwardBy: item.length)
            export.statistics.bytesRead.add(item.length, ordering: .relaxed)
            writeReplyBatch()
            context.write(wrapOutboundOut(buffer), promise: nil)
            needsFlush = true
        } else {
            sendDone(cookie: item.cookie)
        }
    }

    // MARK: - Replies

    private func sendDone(cookie: UInt64) {
        appendReply(atMost: ReplyEncoder.simpleHeaderSize) { ReplyEncoder.writeDone(&$0, cookie: cookie) }
    }

    private func sendError(cookie: UInt64, _ error: NBDError, _ message: String) {
        appendReply(atMost: 32 + message.utf8.count) {
            ReplyEncoder.writeError(&$0, structured: structured, cookie: cookie, error: error, message: message)
        }
    }

    /// Encodes a small reply of at most `size` bytes at the end of the batch, starting the batch
    /// (with room for it and a few dozen more) when it is empty.
    private func appendReply(atMost size: Int, _ encode: (inout ByteBuffer) -> Void) {
        guard context != nil else { return }
        var batch = replyBatch ?? allocator.buffer(capacity: max(size, 32 * ReplyEncoder.simpleHeaderSize))
        replyBatch = nil  // Keep the buffer uniquely referenced while appending.
        encode(&batch)
        replyBatch = batch
        needsFlush = true
    }

    /// Hands the batched small replies to the channel (before a reply written on its own, and at flush).
    private func writeReplyBatch() {
        guard let batch = replyBatch, let context else { return }
        replyBatch = nil
        context.write(wrapOutboundOut(batch), promise: nil)
    }

    private func sendBlockStatus(_ item: Pending, _ device: BlockDevice) {
        guard case .transmission(let parser, let export) = phase, let contextID = parser.session.allocationContextID else { return }
        let maxExtents = item.flags.contains(.requestOne) ? 1 : 1024
        let hole = NBDAllocationState.hole | NBDAllocationState.zero
        // Allocation of the device's bytes (lseek), as (length, flags).
        func deviceRuns(_ offset: UInt64, _ length: UInt64) -> [(UInt64, UInt32)] {
            device.allocationRuns(offset: offset, length: length, maxRuns: maxExtents).map { ($0.length, $0.isHole ? hole : 0) }
        }
        var runs: [(UInt64, UInt32)]
        if let overlay = export.log?.overlay(offset: item.offset, length: item.length) {
            // Changes not yet written back are invisible to lseek: they describe their own ranges.
            runs = []
            var position = item.offset
            for piece in overlay {
                if piece.offset > position { runs += deviceRuns(position, piece.offset - position) }
                switch piece {
                case .data(_, let bytes): runs.append((UInt64(bytes.count), 0))
                case .zeroes(_, let length, let keepAllocated): runs.append((UInt64(length), keepAllocated ? NBDAllocationState.zero : hole))
                case .device(_, let length): runs += deviceRuns(piece.offset, UInt64(length))
                }
                position = piece.offset + UInt64(piece.length)
            }
            let end = item.offset + UInt64(item.length)
            if position < end { runs += deviceRuns(position, end - position) }
        } else {
            runs = deviceRuns(item.offset, UInt64(item.length))
        }
        var extents: [Extent] = []
        extents.reserveCapacity(min(runs.count, maxExtents))
        for (length, flags) in runs where length > 0 {
            if let last = extents.last, last.flags == flags, UInt64(last.length) + length <= UInt64(UInt32.max) {
                extents[extents.count - 1].length += UInt32(length)
            } else if extents.count < maxExtents {
                extents.append(Extent(length: UInt32(min(length, UInt64(UInt32.max))), flags: flags))
            } else {
                break
            }
        }
        if extents.isEmpty {
            // lseek found nothing to report (the device shrank): "allocated, contents unknown" is always safe.
            extents = [Extent(length: UInt32(item.length), flags: 0)]
        }
        appendReply(atMost: 32 + 8 * extents.count) {
            ReplyEncoder.writeBlockStatus(&$0, cookie: item.cookie, contextID: contextID, extents: extents)
        }
    }

    private func flushIfNeeded() {
        guard needsFlush, let context else { return }
        needsFlush = false
        writeReplyBatch()
        context.flush()
    }

    // MARK: - Closing

    private func closeIfDrained() {
        guard disconnectRequested, inFlight == 0, let context else { return }
        if case .closed = phase { return }
        flushIfNeeded()
        phase = .closed
        context.close(promise: nil)
    }

    private func close(reason: String) {
        guard let context else { return }
        if case .closed = phase { return }
        logger.notice("closing NBD connection", metadata: ["peer": "\(context.channel.remoteAddress?.description ?? "unix")", "reason": "\(reason)"])
        phase = .closed
        context.close(promise: nil)
    }
}

/// Holds a connection handler without keeping it alive (the engine may outlive the connection).
final class WeakHandler {
    weak var handler: NBDConnectionHandler?
    init(_ handler: NBDConnectionHandler) { self.handler = handler }
}

/// The log engine's way back to one connection: completions hop to the connection's event loop,
/// one hop per group commit.
final class LogMailbox: LogCompletionTarget {
    private let handler: NIOLoopBound<WeakHandler>

    init(handler: NIOLoopBound<WeakHandler>) {
        self.handler = handler
    }

    func logCompleted(_ completions: [LogCompletion]) {
        let handler = self.handler
        handler.eventLoop.execute {
            handler.value.handler?.logCompleted(completions)
        }
    }
}
