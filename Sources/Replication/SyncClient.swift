import BlockStore
import Logging
import NIOCore
import NIOPosix
import PeerProtocol
import Synchronization

/// Progress of an initial sync, for `marsadm view`.
public struct SyncProgress: Sendable, Equatable {
    /// Every byte before this offset equals the primary's copy at some moment of the sync.
    public var offset: UInt64
    public var size: UInt64
    public var bytesSent: UInt64 = 0
    public var problem: String?
    public var done = false
}

/// Copies the primary's data device onto a joining replica's device: chunk digests go one way, only
/// the chunks that differ come back (zero chunks as a length), pipelined. Resumable: `offset`
/// persists through `checkpoint`, so a restart of either side goes on from there.
public final class SyncClient: @unchecked Sendable {
    public static let chunkSize = SyncChunk.size
    /// Chunks per compare request, and requests in flight.
    static let chunksPerRequest = 256
    static let requestsInFlight = 4

    private let resource: String
    private let device: any StorageFile
    private let blockDevice: BlockDevice
    private let size: UInt64
    private let loop: any EventLoop
    private let pool: NIOThreadPool
    private let logger: Logger
    private let progress: Mutex<SyncProgress>
    /// Event-loop confined.
    private var link: PeerLink?
    private var next: UInt64
    /// The compare requests not done yet: a range is copied once the primary has answered all of
    /// it (`syncCompared`) and every write of its answer is done. Writes run in parallel.
    private var outstanding: [OutstandingRange] = []
    private var completion: EventLoopPromise<Void>
    private var failed = false

    private struct OutstandingRange {
        let offset: UInt64
        let end: UInt64
        var writes = 0
        var compared = false
        var isDone: Bool { compared && writes == 0 }
    }
    private let checkpoint: @Sendable (UInt64) -> Void

    /// `start`: where a resumed sync goes on. `checkpoint` persists an offset every byte before
    /// which is durably on the device.
    public init(
        resource: String, device: BlockDevice, size: UInt64, start: UInt64, loop: any EventLoop, pool: NIOThreadPool,
        logger: Logger, checkpoint: @escaping @Sendable (UInt64) -> Void
    ) {
        self.resource = resource
        self.device = POSIXFile(device: device)
        self.blockDevice = device
        self.size = size
        self.next = start
        self.loop = loop
        self.pool = pool
        self.logger = logger
        self.checkpoint = checkpoint
        self.progress = Mutex(SyncProgress(offset: start, size: size))
        self.completion = loop.makePromise()
        self.checkpointed = (start, .now())
    }

    public var status: SyncProgress { progress.withLock { $0 } }

    /// Runs the comparison over `link` until the whole device is compared; the future fails when
    /// the link does (the caller reconnects and runs a new client from the checkpoint).
    public func run(over link: PeerLink) -> EventLoopFuture<Void> {
        loop.execute { [self] in
            self.link = link
            link.onMessage = { [self] message in received(message) }
            link.onClose = { [self] in
                self.link = nil
                completion.fail(ReplicationError("the link to \(link.remote.host) closed during the sync"))
            }
            for _ in 0..<Self.requestsInFlight { requestNext() }
            finishIfDone()
        }
        return completion.futureResult
    }

    private func requestNext() {
        guard next < size, let link else { return }
        let offset = next
        let count = Int(min(UInt64(Self.chunksPerRequest), (size - offset + UInt64(Self.chunkSize) - 1) / UInt64(Self.chunkSize)))
        next += UInt64(count * Self.chunkSize)
        outstanding.append(OutstandingRange(offset: offset, end: min(next, size)))
        let chunk = UInt64(Self.chunkSize)
        let (device, blockDevice, size, resource) = (device, blockDevice, size, resource)
        pool.runIfActive(eventLoop: loop) { () throws -> [[UInt8]] in
            (0..<count).map { index in
                let start = offset + UInt64(index) * chunk
                let length = Int(min(chunk, size - start))
                // A hole is zeroes: no read, no hash (an empty replica's sync is all holes).
                if blockDevice.isHole(offset: start, length: UInt64(length)) { return ChunkDigest.zero(count: length) }
                let bytes = (try? device.read(count: length, at: start)) ?? []
                return ChunkDigest.of(bytes)
            }
        }.whenComplete { [self] result in
            switch result {
            case .success(let digests):
                link.send(.syncCompare(SyncCompare(resource: resource, offset: offset, chunkSize: UInt32(chunk), digests: digests)))
            case .failure(let error):
                fail("cannot read the local device at \(offset): \(error)")
            }
        }
    }

    private func received(_ message: PeerMessage) {
        switch message {
        case .syncData(let data) where data.resource == resource:
            let bytes = data.bytes
            let length = UInt64(bytes.readableBytes)
            let (device, blockDevice) = (device, blockDevice)
            write(at: data.offset, length: length) {
                try bytes.withUnsafeReadableBytes { try device.write([$0], at: data.offset) }
                try blockDevice.startWriteback(offset: data.offset, length: length)
            }
            progress.withLock { $0.bytesSent += length }
        case .syncZero(let zero) where zero.resource == resource:
            let device = device
            write(at: zero.offset, length: zero.length) { try device.zero(offset: zero.offset, length: zero.length, keepAllocated: false) }
        case .syncCompared(let done) where done.resource == resource:
            guard let index = outstanding.firstIndex(where: { $0.offset == done.offset }) else {
                return fail("the primary answered a comparison at \(done.offset) that was not asked for")
            }
            outstanding[index].compared = true
            rangeProgressed(index)
        case .fetchError(let error) where error.resource == resource:
            fail("the primary said: \(error.reason)")
        default:
            fail("unexpected message \(message.name) during the sync")
        }
    }

    /// Writes the primary's bytes for `[offset, offset+length)`, which must lie in a range being
    /// compared, on the pool.
    private func write(at offset: UInt64, length: UInt64, _ body: @escaping @Sendable () throws -> Void) {
        guard let index = outstanding.firstIndex(where: { offset >= $0.offset && offset <= $0.end && length <= $0.end - offset }),
            !outstanding[index].compared
        else {
            return fail("the primary sent \(length) bytes at \(offset), outside the ranges being compared")
        }
        outstanding[index].writes += 1
        let rangeOffset = outstanding[index].offset
        pool.runIfActive(eventLoop: loop, body).whenComplete { [self] result in
            guard case .success = result else {
                if case .failure(let error) = result { fail("cannot write the local device at \(offset): \(error)") }
                return
            }
            guard let index = outstanding.firstIndex(where: { $0.offset == rangeOffset }) else { return }
            outstanding[index].writes -= 1
            rangeProgressed(index)
        }
    }

    private func rangeProgressed(_ index: Int) {
        guard !failed, outstanding[index].isDone else { return }
        let range = outstanding.remove(at: index)
        // Nobody else uses a device being synced: its pages need not stay cached.
        let blockDevice = blockDevice
        pool.runIfActive(eventLoop: loop) { try blockDevice.releaseCache(offset: range.offset, length: range.end - range.offset) }
            .whenFailure { [self] error in fail("cannot write the local device between \(range.offset) and \(range.end): \(error)") }
        let reached = outstanding.first?.offset ?? next
        progress.withLock { $0.offset = reached }
        checkpointIfDue(reached)
        requestNext()
        finishIfDone()
    }

    /// The offset persisted last, and when: a checkpoint stores an offset only after a device sync
    /// (a power loss must not leave the resumed sync skipping chunks that never reached the disk),
    /// every 256 MiB or 5 s.
    private var checkpointed: (offset: UInt64, at: NIODeadline) = (0, .now())
    private var checkpointing = false

    private func checkpointIfDue(_ reached: UInt64) {
        guard !checkpointing, reached >= checkpointed.offset + (256 << 20) || NIODeadline.now() - checkpointed.at > .seconds(5) else {
            return
        }
        checkpointing = true
        let device = device
        // Every write below `reached` is done; the device sync makes them durable.
        pool.runIfActive(eventLoop: loop) { try device.sync() }.whenComplete { [self] result in
            checkpointing = false
            guard case .success = result else { return }  // the next checkpoint tries again
            checkpointed = (reached, .now())
            checkpoint(reached)
        }
    }

    private func finishIfDone() {
        guard next >= size, outstanding.isEmpty else { return }
        let device = device
        pool.runIfActive(eventLoop: loop) { try device.sync() }.whenComplete { [self] result in
            switch result {
            case .success:
                progress.withLock { state in
                    state.offset = size
                    state.done = true
                }
                completion.succeed(())
            case .failure(let error):
                fail("cannot sync the local device: \(error)")
            }
        }
    }

    private func fail(_ reason: String) {
        failed = true
        progress.withLock { $0.problem = reason }
        logger.warning("sync of \(resource): \(reason)")
        link?.close()
        completion.fail(ReplicationError(reason))
    }
}
