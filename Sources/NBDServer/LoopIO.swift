import BlockStore
import Logging
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#endif

/// Where page-aligned writes through the page cache run.
public enum PageCacheWritePolicy: String, Sendable, CaseIterable {
    /// Those of up to 1 MiB without FUA on the event loop thread, synchronously: a copy into the page cache.
    case inline
    /// Through the I/O engine like everything else.
    case engine
}

/// How READs whose bytes are in the page cache are answered.
public enum PageCacheReadPolicy: String, Sendable, CaseIterable {
    /// Large READs: sendfile from the page cache, no copy in marsd (see `NBDConnectionHandler`).
    case sendfile
    /// Every READ through the I/O engine into a buffer, then written to the socket.
    case copy

    /// The smallest READ sent with sendfile. Its header then goes out on its own, not batched with
    /// other replies, which costs a TCP segment: over TCP, 64 KiB random reads ran at 2085 MiB/s sent
    /// against 3015 copied, 256 KiB ones at 4477 against 3450; over the Unix socket sending won at
    /// both sizes (3702 against 3441, 5013 against 3830; BENCHMARKS.md, session 16).
    func smallestSent(tcp: Bool) -> Int? {
        guard self == .sendfile else { return nil }
        return tcp ? 256 << 10 : 64 << 10
    }
}

/// Something that submitted I/O through a `LoopIO` and wants its completions.
protocol IOCompletionTarget: AnyObject {
    func ioCompleted(token: Int, result: Int32)
    /// Called once after a batch of completions, so replies go out with one flush.
    func completionBatchEnded()
    /// The loop's payload budget has room again after this target waited for it.
    func budgetAvailable()
}

/// The data-device I/O of one event loop: one `IOQueue` (an io_uring, normally) whose completion
/// eventfd is watched by the loop itself, so requests are submitted and completed on the loop thread
/// with no hop and no lock. Completions are reaped in batches and each connection flushes once per
/// batch.
final class LoopIO {
    private struct Slot {
        var target: (any IOCompletionTarget)?
        var token: Int
    }

    let queue: any IOQueue
    private var slots: [Slot] = []
    private var freeSlots: [Int] = []
    private var hasUnsubmitted = false
    /// Targets that got completions in the current batch.
    private var touched: [any IOCompletionTarget] = []

    /// Payload bytes held by requests of this loop's connections (read buffers being filled, write
    /// payloads being received or written), and the most they may hold before connections stop
    /// taking new requests. Bounds memory however many clients there are (invariant 7).
    private(set) var bufferedBytes = 0
    let bufferBudget: Int
    private var budgetWaiters: [any IOCompletionTarget] = []
    private var wakeScheduled = false
    private let eventLoop: any EventLoop

    init(queue: any IOQueue, pageCacheWrites: PageCacheWritePolicy, bufferBudget: Int, eventLoop: any EventLoop) {
        self.queue = queue
        self.pageCacheWrites = pageCacheWrites
        self.bufferBudget = bufferBudget
        self.eventLoop = eventLoop
    }

    var hasBudget: Bool { bufferedBytes < bufferBudget }

    /// The most `bufferedBytes` has been, for tests and status.
    private(set) var peakBufferedBytes = 0

    func reserve(_ bytes: Int) {
        bufferedBytes += bytes
        peakBufferedBytes = max(peakBufferedBytes, bufferedBytes)
    }

    /// Returns bytes to the budget. Waiters are woken in a later loop tick, never from inside the
    /// completion or connection code that released.
    func release(_ bytes: Int) {
        bufferedBytes -= bytes
        if hasBudget, !budgetWaiters.isEmpty, !wakeScheduled {
            wakeScheduled = true
            eventLoop.assumeIsolated().execute { [self] in
                wakeScheduled = false
                wakeBudgetWaiters()
            }
        }
    }

    /// Asks for `budgetAvailable()` once the budget has room; each target asks at most once.
    func waitForBudget(_ target: any IOCompletionTarget) {
        budgetWaiters.append(target)
    }

    private func wakeBudgetWaiters() {
        while hasBudget, !budgetWaiters.isEmpty {
            budgetWaiters.removeFirst().budgetAvailable()
        }
    }

    /// Results of operations run inline, delivered right after the next submit.
    private var inlineResults: [(target: any IOCompletionTarget, token: Int, result: Int32)] = []
    private let pageCacheWrites: PageCacheWritePolicy

    /// Queues `operation`; the target keeps its buffers alive until `ioCompleted(token:result:)`.
    ///
    /// `pageCacheWrite` marks a small page-aligned write through the page cache. Where buffered
    /// writes cannot be issued without blocking (ext4 has no RWF_NOWAIT for them), io_uring hands each
    /// one to a kernel worker thread; the `.inline` policy instead copies it into the page cache right
    /// here, which costs less CPU and latency than the worker round trip (see docs/architecture.md).
    func enqueue(_ operation: IOOperation, for target: any IOCompletionTarget, token: Int, pageCacheWrite: Bool = false) {
        if pageCacheWrite && pageCacheWrites == .inline {
            inlineResults.append((target, token, ThreadPoolIOQueue.execute(operation)))
            hasUnsubmitted = true
            return
        }
        let index: Int
        if let free = freeSlots.popLast() {
            index = free
            slots[index] = Slot(target: target, token: token)
        } else {
            index = slots.count
            slots.append(Slot(target: target, token: token))
        }
        queue.enqueue(operation, tag: UInt64(index))
        hasUnsubmitted = true
    }

    /// Hands queued operations to the engine; called once per read batch and per completion batch.
    func submitPending() {
        guard hasUnsubmitted else { return }
        hasUnsubmitted = false
        queue.submit()
        if !inlineResults.isEmpty { deliverInline() }
    }

    private func deliverInline() {
        while !inlineResults.isEmpty {
            let batch = inlineResults
            inlineResults.removeAll(keepingCapacity: true)
            for item in batch {
                item.target.ioCompleted(token: item.token, result: item.result)
            }
            queue.submit()
            for item in batch { item.target.completionBatchEnded() }
        }
    }

    /// Delivers every ready completion, submits any follow-up operations they queued (short
    /// transfers, the flush after a FUA trim), then lets each touched target flush its replies once.
    func reapAll() {
        queue.reap { tag, result in
            let index = Int(tag)
            guard let target = slots[index].target else { return }
            let token = slots[index].token
            slots[index].target = nil
            freeSlots.append(index)
            target.ioCompleted(token: token, result: result)
            touched.append(target)
        }
        submitPending()
        // A target may appear several times; it flushes only if it has something to send.
        for target in touched { target.completionBatchEnded() }
        touched.removeAll(keepingCapacity: true)
    }
}

/// Reads the completion eventfd of a `LoopIO` inside the event loop and reaps on every wake-up.
private final class CompletionNotifier: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let io: LoopIO

    init(io: LoopIO) {
        self.io = io
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // The bytes are the eventfd counter; reading them re-arms the notification.
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        io.reapAll()
    }
}

/// One `LoopIO` per event loop of a group, created up front.
final class LoopIORegistry: Sendable {
    private let byLoop: [ObjectIdentifier: NIOLoopBound<LoopIO>]
    let engineName: String

    init(
        group: any EventLoopGroup, engine: IOEngine, pageCacheWrites: PageCacheWritePolicy, bufferBudget: Int,
        logger: Logger
    ) throws {
        var byLoop: [ObjectIdentifier: NIOLoopBound<LoopIO>] = [:]
        var names = Set<String>()
        for loop in group.makeIterator() {
            // The queue is created on its loop's thread and never leaves it.
            let (bound, name, notifyFD) = try loop.submit {
                let queue = try engine.makeQueue()
                let notifyFD = dup(queue.completionFD)
                guard notifyFD >= 0 else { throw SystemError("dup", "completion eventfd", errno: errno) }
                return (NIOLoopBound(
                    LoopIO(queue: queue, pageCacheWrites: pageCacheWrites, bufferBudget: bufferBudget, eventLoop: loop),
                    eventLoop: loop
                ), queue.engineName, notifyFD)
            }.wait()
            names.insert(name)
            _ = try NIOPipeBootstrap(group: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(CompletionNotifier(io: bound.value))
                    }
                }
                .takingOwnershipOfDescriptor(input: notifyFD)
                .wait()
            byLoop[ObjectIdentifier(loop)] = bound
        }
        self.byLoop = byLoop
        self.engineName = names.sorted().joined(separator: ",")
        logger.info("data-device I/O engine: \(engineName)")
    }

    /// The highest payload bytes each loop's connections held at once.
    func peakBufferedBytes() async throws -> [Int] {
        var peaks: [Int] = []
        for bound in byLoop.values {
            peaks.append(try await bound.eventLoop.submit { bound.value.peakBufferedBytes }.get())
        }
        return peaks
    }

    /// The `LoopIO` of `loop`; call on that loop only.
    func io(for loop: any EventLoop) -> LoopIO {
        byLoop[ObjectIdentifier(loop)]!.value
    }
}
