import BlockStore
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

/// Limits and sizes of one resource's log.
public struct LogEngineConfiguration: Sendable {
    /// The host name in segment file names (`log-<sequence>-<host>`).
    public var host: String
    /// A segment is closed and a new one opened before it would grow beyond this (a segment holds at
    /// least one record, so one large record may exceed it).
    public var segmentSize: UInt64 = 256 << 20
    /// Bytes all segments of the resource may take together. When the log reaches it, new writes
    /// wait until writeback frees whole segments (docs/log-format.md, "When the log area fills").
    public var spaceLimit: UInt64 = 64 << 30
    /// Where the payloads of logged changes not yet written back are held, with the budget the
    /// host's engines share; beyond it new writes wait.
    public var pendingMemory = PendingMemory(capacity: 64 << 20)
    /// The largest write payload one record holds (readers refuse larger records); larger writes
    /// are submitted in parts.
    public var maxRecordPayload = 32 << 20
    /// Changes one writeback batch takes at most.
    public var writebackBatchChanges = 4096
    /// How long a resource going down keeps retrying a log it cannot write (a full or failing
    /// filesystem) before it gives up the records nobody was promised durability for.
    public var stoppingRetryLimit: Duration = .seconds(10)

    public init(host: String) {
        self.host = host
    }

    /// Bytes of the largest record a client can cause.
    var maxRecordSize: UInt64 { UInt64(LogRecordLayout.recordSize(payload: maxRecordPayload)) }

    /// Why this configuration cannot work, or nil.
    public var problem: String? {
        guard SafeName.isValid(host) else { return "host name '\(host)' cannot be part of a segment file name" }
        guard segmentSize >= 4096 else { return "segment size must be at least 4096 bytes" }
        // After writeback catches up only the open segment remains (at most segmentSize + one
        // record); one more record must always fit, or writes could wait forever.
        let minimum = 2 * (segmentSize + maxRecordSize)
        guard spaceLimit >= minimum else {
            return "log space limit \(spaceLimit) is below \(minimum) bytes (twice a segment plus the largest record)"
        }
        return nil
    }
}

/// An error a client's request gets from the log: an errno for the wire, and what happened.
public struct LogEngineError: Error, Sendable, Equatable, CustomStringConvertible {
    public let errno: Int32
    public let message: String

    public init(errno: Int32, _ message: String) {
        self.errno = errno
        self.message = message
    }

    init(_ error: any Error, while doing: String) {
        if let error = error as? SystemError {
            self.init(errno: error.errno, "\(doing): \(error)")
        } else {
            self.init(errno: EIO, "\(doing): \(error)")
        }
    }

    public var description: String { message }
}

/// The result of a request for a resource whose log cannot be recovered safely: the resource stays
/// down (invariant 6), and the message names the segment and offset.
public struct LogRecoveryError: Error, Sendable, CustomStringConvertible {
    public let segment: String?
    public let offset: UInt64?
    public let reason: String

    public var description: String {
        var text = "log recovery stopped"
        if let segment { text += " in segment \(segment)" }
        if let offset { text += " at byte \(offset)" }
        return text + ": \(reason)"
    }
}

/// What a shutdown left behind: whether the data device holds every acknowledged write, and if not,
/// which part of the log it lacks and why.
public struct LogShutdownResult: Sendable, Equatable, CustomStringConvertible {
    /// LSN the next record would have got: every write acknowledged is below it.
    public var appendedLSN: UInt64
    /// Every record before this LSN is durable in the log.
    public var durableLSN: UInt64
    /// Every change before this LSN is on the data device, synced, and the position stored.
    public var writebackLSN: UInt64
    /// The log or device failure that stopped the rest, if any.
    public var failure: String?

    /// The data device holds every acknowledged write.
    public var isComplete: Bool { writebackLSN >= appendedLSN }
    /// Acknowledged writes that were never made durable and are lost: given up after
    /// `stoppingRetryLimit` while the log could not be written (none were flushed or FUA).
    public var givenUp: Range<UInt64>? { durableLSN < appendedLSN ? durableLSN..<appendedLSN : nil }
    /// Changes durable in the log that the data device lacks: the next recovery replays them.
    public var notWrittenBack: Range<UInt64>? {
        writebackLSN < durableLSN ? writebackLSN..<durableLSN : nil
    }

    public var description: String {
        if isComplete { return "the data device holds every acknowledged write (written back to LSN \(writebackLSN))" }
        var parts: [String] = []
        if let range = givenUp {
            parts.append(
                "the writes at LSN \(range.lowerBound)..<\(range.upperBound) were given up: the log could not be written, "
                    + "they were never flushed, and the data device does not hold them"
            )
        }
        if let range = notWrittenBack {
            parts.append(
                "the changes at LSN \(range.lowerBound)..<\(range.upperBound) are in the log but not on the data device: "
                    + "'marsadm up' replays them"
            )
        }
        return parts.joined(separator: "; ") + (failure.map { " (\($0))" } ?? "")
    }
}

/// A logged change, as a client sent it.
public enum LogChange: Sendable {
    case write([UInt8])
    case trim(length: Int)
    case writeZeroes(length: Int, noHole: Bool)

    var length: Int {
        switch self {
        case .write(let bytes): bytes.count
        case .trim(let length), .writeZeroes(let length, _): length
        }
    }
}

/// Receives the outcome of requests that did not complete at once; called on an engine thread,
/// with every completion of one group commit or writeback round for this target together.
public protocol LogCompletionTarget: AnyObject, Sendable {
    func logCompleted(_ completions: [LogCompletion])
}

public struct LogCompletion: Sendable {
    public let token: Int
    public let error: LogEngineError?
}

/// What happened to a write or flush handed to the engine.
public enum LogAdmission: Sendable, Equatable {
    /// Done: reply now.
    case acknowledged
    /// The reply comes through the target's `logCompleted`.
    case waiting
    case refused(LogEngineError)
}

/// A log a peer may fetch from: a primary's (`LogEngine`), or a secondary's (`ReplicaLog`) for the
/// members behind it.
public protocol ShippingSource: AnyObject, Sendable {
    func shippingSnapshot() -> ShippingSnapshot
    var logDirectory: any StorageDirectory { get }
}

extension LogEngine: ShippingSource {}

/// The segments of a log and its durable end, as a peer's fetch sees them.
public struct ShippingSnapshot: Sendable, Equatable {
    public struct Segment: Sendable, Equatable {
        public var name: SegmentName
        public var firstLSN: UInt64
        public init(name: SegmentName, firstLSN: UInt64) {
            self.name = name
            self.firstLSN = firstLSN
        }
    }
    /// Oldest first; the last one is open.
    public var segments: [Segment]
    /// Every record before this LSN is durable.
    public var durableLSN: UInt64
    public var appendedLSN: UInt64
    public var epoch: UInt64

    public init(segments: [Segment], durableLSN: UInt64, appendedLSN: UInt64, epoch: UInt64) {
        self.segments = segments
        self.durableLSN = durableLSN
        self.appendedLSN = appendedLSN
        self.epoch = epoch
    }

    /// The bytes of segment `index` a peer may have now: its whole records when a later segment
    /// follows, the durable ones in the open segment. File offsets, header included.
    public func shippableEnd(of index: Int) -> UInt64 {
        let segment = segments[index]
        let endLSN = index + 1 < segments.count ? segments[index + 1].firstLSN : max(durableLSN, segment.firstLSN)
        return UInt64(SegmentHeader.size) + (endLSN - segment.firstLSN)
    }
}

/// Positions and sizes of a resource's log, for `marsadm view`.
public struct LogEngineStatus: Sendable, Equatable {
    public var epoch: UInt64
    /// LSN the next record gets.
    public var appendedLSN: UInt64
    /// Every record before this LSN is durable in the log.
    public var durableLSN: UInt64
    /// Every record before this LSN is durable on the data device.
    public var writebackLSN: UInt64
    public var pendingChanges: Int
    public var pendingBytes: Int
    /// Writes waiting for room in memory or in the log area.
    public var waitingWrites: Int
    public var logBytes: UInt64
    public var spaceLimit: UInt64
    public var segments: Int
    public var currentSegment: String
    public var groupCommits: Int
    public var failure: String?
    /// The seal the log ends with, once durable: this primary handed over and admits nothing.
    public var seal: Seal? = nil
}

/// The transaction log of one resource on its primary: every change is appended to the current
/// segment, made durable by a group commit (one fdatasync for every record waiting), and only then
/// written back to the data device (invariant 2). Until then reads see it through the pending map.
///
/// Four threads do the blocking work: the log writer (append, fdatasync, rotation), writeback
/// (device writes), the checkpointer (device fdatasync, the persisted position, retiring segments)
/// and the spare preparer (a written segment file ready for the writer). Requests arrive on event
/// loops and never block: a write that finds no room waits in a queue, in order, and its reply waits
/// with it.
public final class LogEngine: PendingMemoryWaiter {
    struct SegmentInfo {
        var name: SegmentName
        var firstLSN: UInt64
        var fileSize: UInt64
    }

    /// A written-back segment file waiting to become the next segment.
    struct Spare {
        var fileName: String
        var size: UInt64
    }

    /// File names of spares start with this (they are no segment names, so no history walk sees them).
    static let sparePrefix = "spare-"

    struct Waiter {
        var lsn: UInt64
        var target: any LogCompletionTarget
        var token: Int
    }

    struct WaitingWrite {
        var offset: UInt64
        var change: LogChange
        /// CRC32C of a write's payload (0 for other changes), computed by `submit`.
        var payloadChecksum: UInt32
        var fua: Bool
        var target: any LogCompletionTarget
        var token: Int
    }

    /// A record admitted to the log and the CRC32C of its payload.
    struct QueuedRecord {
        var record: LogRecord
        var payloadChecksum: UInt32
    }

    struct State {
        var epoch: UInt64
        var nextLSN: UInt64
        var durableLSN: UInt64
        var writebackLSN: UInt64
        var pending: PendingWriteMap
        /// Admitted records the log writer has not written yet, in LSN order.
        var queue: [QueuedRecord] = []
        var queuedBytes: UInt64 = 0
        var waitingWrites = FIFO<WaitingWrite>()
        var durabilityWaiters = FIFO<Waiter>()
        var segments: [SegmentInfo]
        /// Written-back or prepared segment files kept for reuse as the next segments (see `rotate`).
        var spares: [Spare] = []
        /// The size of a spare being prepared: counted in the log space while it is written.
        var preparingBytes: UInt64 = 0
        var logFailure: LogEngineError?
        var writebackFailure: LogEngineError?
        /// Set by `seal` (or `open` of a sealed log): every new request is refused with it.
        var sealing: LogEngineError?
        /// The epoch the queued or durable seal record promises.
        var promisedEpoch: UInt64?
        /// The seal the log ends with, once it is durable.
        var seal: Seal?
        /// Set by `fence`: another host is primary of a newer epoch; every request is refused with it.
        var fenced: LogEngineError?
        var groupCommits = 0
        /// No new requests; the threads finish what was admitted and stop.
        var stopping = false
        /// Stop at once, without further I/O (a simulated power loss in tests).
        var halted = false
        var writerDone = false
        /// Every change before this LSN is on the data device (in its page cache, not yet synced).
        var appliedLSN: UInt64 = 0
        /// When writeback last applied a batch (the checkpointer waits for a quiet second).
        var lastApplied = ContinuousClock.now
        var writebackDone = false
        /// The oldest LSN each other member still needs from this log: no segment holding bytes at
        /// or after the lowest is retired, whatever writeback did (docs/replication.md).
        var retentionHolds: [String: UInt64] = [:]
        var retentionFloor: UInt64? { retentionHolds.values.min() }

        var logBytes: UInt64 {
            segments.reduce(0) { $0 + $1.fileSize } + spares.reduce(0) { $0 + $1.size } + preparingBytes + queuedBytes
        }
    }

    let configuration: LogEngineConfiguration
    let directory: any StorageDirectory
    let device: any StorageFile
    let monitor: Monitor<State>
    let writerWake = Condition()
    let writebackWake = Condition()
    let checkpointWake = Condition()
    let prepareWake = Condition()
    let drained = Condition()
    let sealWake = Condition()
    private let threads = Mutex<[WorkerThread]>([])
    /// Only the log writer thread touches the open segment.
    let openSegment: OpenSegmentBox
    /// Only the writeback thread touches the position file.
    let positionBox: PositionBox

    init(
        configuration: LogEngineConfiguration, directory: any StorageDirectory, device: any StorageFile, state: State,
        openSegment: OpenSegment, position: PositionFile
    ) {
        self.configuration = configuration
        self.directory = directory
        self.device = device
        self.monitor = Monitor(state)
        self.openSegment = OpenSegmentBox(openSegment)
        self.positionBox = PositionBox(position)
    }

    func startThreads() {
        let writer = WorkerThread(name: "mars-log") { [self] in logWriterLoop() }
        let writeback = WorkerThread(name: "mars-writeback") { [self] in writebackLoop() }
        let checkpointer = WorkerThread(name: "mars-checkpoint") { [self] in checkpointLoop() }
        let preparer = WorkerThread(name: "mars-prepare") { [self] in sparePreparerLoop() }
        threads.withLock { $0 = [writer, writeback, checkpointer, preparer] }
    }

    // MARK: - Requests (called on event loops; never block)

    /// The largest write payload one record holds; larger writes are submitted in parts.
    public var maxRecordPayload: Int { configuration.maxRecordPayload }

    /// Logs a change at `offset`. Not FUA: acknowledged once admitted (reads see it at once; FLUSH
    /// makes it durable). FUA: acknowledged when its record is durable.
    public func submit(
        offset: UInt64, change: LogChange, fua: Bool, target: any LogCompletionTarget, token: Int
    ) -> LogAdmission {
        guard change.length > 0 else { return .acknowledged }
        if case .write(let bytes) = change, bytes.count > configuration.maxRecordPayload {
            return .refused(LogEngineError(
                errno: EINVAL,
                "a write of \(bytes.count) bytes is larger than one log record holds (\(configuration.maxRecordPayload)); submit it in parts"
            ))
        }
        // Checksummed here, on the event loop that has just copied the payload and still has it in
        // its cache, not in the log writer, which would read it back from memory (BENCHMARKS.md).
        let payloadChecksum = if case .write(let bytes) = change { CRC32C.checksum(bytes) } else { UInt32(0) }
        let write = WaitingWrite(
            offset: offset, change: change, payloadChecksum: payloadChecksum, fua: fua, target: target, token: token
        )
        return monitor.withLock { state -> LogAdmission in
            if let refusal = refusal(state) { return .refused(refusal) }
            if !state.waitingWrites.isEmpty || !hasRoom(state, for: change) {
                state.waitingWrites.append(write)
                waitForPendingMemoryIfNeeded(state)
                if state.waitingWrites.count == 1 {
                    // Once per wait, not per waiting write: both threads re-check under the lock
                    // before they sleep, and writeback signals the checkpointer again when it is urgent.
                    writerWake.signal()  // commit at once: writeback makes room
                    checkpointWake.signal()  // retiring segments may make room
                }
                return .waiting
            }
            return admit(write, &state) ? .waiting : .acknowledged
        }
    }

    /// Acknowledged when every record admitted so far is durable (one group commit covers all
    /// flushes and FUA writes waiting for it).
    public func flush(target: any LogCompletionTarget, token: Int) -> LogAdmission {
        monitor.withLock { state -> LogAdmission in
            if let refusal = refusal(state) { return .refused(refusal) }
            if state.durableLSN >= state.nextLSN { return .acknowledged }
            state.durabilityWaiters.append(Waiter(lsn: state.nextLSN, target: target, token: token))
            if state.durabilityWaiters.count == 1 { writerWake.signal() }
            return .waiting
        }
    }

    /// The pending changes over `[offset, offset+length)` a read must lay over the device's bytes, or
    /// nil when there are none. Take this before reading the device: a change written back meanwhile
    /// is then in both, and the overlay still has the newest bytes.
    public func overlay(offset: UInt64, length: Int) -> [PendingPiece]? {
        monitor.withLock { state in
            guard state.pending.overlaps(offset: offset, length: length) else { return nil }
            return state.pending.read(offset: offset, length: length).filter {
                if case .device = $0 { return false }
                return true
            }
        }
    }

    /// Reads through the log: the device with the pending changes laid over it.
    public func read(offset: UInt64, length: Int) throws(SystemError) -> [UInt8] {
        let pieces = overlay(offset: offset, length: length)
        var bytes = try device.read(count: length, at: offset)
        if bytes.count < length { bytes += [UInt8](repeating: 0, count: length - bytes.count) }
        if let pieces { Self.lay(pieces, over: &bytes, at: offset) }
        return bytes
    }

    /// Copies pending pieces over a buffer that holds the device's bytes from `offset`.
    public static func lay(_ pieces: [PendingPiece], over buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        for piece in pieces {
            switch piece {
            case .data(let start, let bytes):
                bytes.withUnsafeBytes { source in
                    (buffer.baseAddress! + Int(start - offset)).copyMemory(from: source.baseAddress!, byteCount: source.count)
                }
            case .zeroes(let start, let length, _):
                (buffer.baseAddress! + Int(start - offset)).initializeMemory(as: UInt8.self, repeating: 0, count: length)
            case .device:
                break
            }
        }
    }

    static func lay(_ pieces: [PendingPiece], over bytes: inout [UInt8], at offset: UInt64) {
        bytes.withUnsafeMutableBytes { lay(pieces, over: $0, at: offset) }
    }

    /// The log's directory: the segment files a peer fetches are read from here.
    public var logDirectory: any StorageDirectory { directory }

    /// What a peer may fetch now: the segments present and the end of the durable log. Bytes past
    /// the durable end are never shipped: a secondary must never hold data the primary could lose.
    public func shippingSnapshot() -> ShippingSnapshot {
        monitor.withLock { state in
            ShippingSnapshot(
                segments: state.segments.map { ShippingSnapshot.Segment(name: $0.name, firstLSN: $0.firstLSN) },
                durableLSN: state.durableLSN, appendedLSN: state.nextLSN, epoch: state.epoch
            )
        }
    }

    /// Keeps every segment holding bytes at or after `lsn` for `holder` (a member that has not
    /// fetched them yet); nil releases the hold.
    public func setRetention(_ lsn: UInt64?, for holder: String) {
        let raised = monitor.withLock { state -> Bool in
            let old = state.retentionHolds[holder]
            guard old != lsn else { return false }
            state.retentionHolds[holder] = lsn
            return lsn == nil || (old.map { lsn! > $0 } ?? false)
        }
        if raised { checkpointWake.signal() }
    }

    /// The holds in force, for persisting them (a restarted primary keeps what members still need).
    public var retentionHolds: [String: UInt64] { monitor.withLock { $0.retentionHolds } }

    /// Where an initial sync for `holder` starts: the writeback position, whose segment is held from
    /// now on in the same step (a checkpoint in between could retire it). Every record before it is
    /// on the data device, so a copy of the device plus the log from here is complete.
    public func beginSyncHold(for holder: String) -> (lsn: UInt64, segment: SegmentName, segmentFirstLSN: UInt64, epoch: UInt64) {
        monitor.withLock { state in
            let lsn = min(state.writebackLSN, state.retentionHolds[holder] ?? .max)
            state.retentionHolds[holder] = lsn
            let segment = state.segments.last { $0.firstLSN <= lsn } ?? state.segments[0]
            return (lsn, segment.name, segment.firstLSN, state.epoch)
        }
    }

    /// Reads the data device itself, without the pending changes (an initial sync copies the
    /// device and replays the log over it). Returns the bytes read: fewer only at the device's end.
    public func readDataDevice(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SystemError) -> Int {
        try device.read(into: buffer, at: offset)
    }

    public var status: LogEngineStatus {
        monitor.withLock { state in
            LogEngineStatus(
                epoch: state.epoch, appendedLSN: state.nextLSN, durableLSN: state.durableLSN, writebackLSN: state.writebackLSN,
                pendingChanges: state.pending.count, pendingBytes: state.pending.heldBytes, waitingWrites: state.waitingWrites.count,
                logBytes: state.logBytes, spaceLimit: configuration.spaceLimit, segments: state.segments.count,
                currentSegment: state.segments.last?.name.fileName ?? "", groupCommits: state.groupCommits,
                failure: (state.logFailure ?? state.writebackFailure)?.message, seal: state.seal
            )
        }
    }

    /// Stops taking requests, makes everything admitted durable and writes it back, persists the
    /// position, and stops the threads. Blocks: call it off the event loops. Returns what it
    /// achieved: a log or device that kept failing leaves acknowledged writes off the device.
    @discardableResult
    public func shutdown() -> LogShutdownResult {
        monitor.withLock { state in state.stopping = true }
        writerWake.signal()
        writebackWake.signal()
        checkpointWake.signal()
        prepareWake.signal()
        for thread in threads.withLock({ $0 }) { thread.join() }
        threads.withLock { $0 = [] }
        wake(monitor.withLock { $0.pending.release() })
        return monitor.withLock { state in
            LogShutdownResult(
                appendedLSN: state.nextLSN, durableLSN: state.durableLSN, writebackLSN: state.writebackLSN,
                failure: (state.logFailure ?? state.writebackFailure)?.message
            )
        }
    }

    /// Ends this primary's epoch for a handover (docs/handover.md, step H4). New writes and flushes
    /// are refused from now on with ESHUTDOWN and `reason` (what the daemon tells clients, e.g. "vm1
    /// is being handed over to hostB: this host no longer accepts writes"), and so are writes still
    /// waiting for room (none of them was acknowledged). Everything admitted before is appended and
    /// made durable, then the seal record promising `nextEpoch`; the segment is closed right after
    /// it (truncated: the seal is the log's last record). Writeback goes on; `shutdown` then ends
    /// the engine as always. Blocks: call it off the event loops.
    ///
    /// Idempotent: on a sealed log (sealed here, or found sealed by `open`) it returns that seal.
    /// - Returns: the seal: its end LSN (where the successor's segment starts) and its segment.
    /// - Throws: `LogEngineError` when `nextEpoch` is not after this epoch or another seal is under
    ///   way, or when the log cannot be written (admission stays closed; call `seal` again to retry).
    public func seal(nextEpoch: UInt64, reason: String) throws(LogEngineError) -> Seal {
        let refused = LogEngineError(errno: ESHUTDOWN, reason)
        let started = monitor.withLock { state -> Result<[Waiter], LogEngineError> in
            if let promised = state.promisedEpoch {
                guard promised == nextEpoch else {
                    return .failure(LogEngineError(
                        errno: EINVAL, "the log of \(directory.path) is sealed for epoch \(promised) already, not for epoch \(nextEpoch)"
                    ))
                }
                return .success([])
            }
            guard nextEpoch > state.epoch else {
                return .failure(LogEngineError(
                    errno: EINVAL, "cannot seal epoch \(state.epoch) of \(directory.path) for epoch \(nextEpoch): the successor's epoch must be later"
                ))
            }
            if state.stopping {
                return .failure(LogEngineError(errno: ESHUTDOWN, "the log of \(directory.path) is going down: it cannot be sealed now"))
            }
            state.sealing = refused
            state.promisedEpoch = nextEpoch
            var failed: [Waiter] = []
            while let write = state.waitingWrites.popFirst() { failed.append(Waiter(lsn: 0, target: write.target, token: write.token)) }
            let record = LogRecord.seal(lsn: state.nextLSN, epoch: state.epoch, nextEpoch: nextEpoch)
            let size = UInt64(record.encodedSize)
            state.nextLSN += size
            state.queuedBytes += size
            state.queue.append(QueuedRecord(record: record, payloadChecksum: 0))
            writerWake.signal()
            return .success(failed)
        }
        deliver(try started.get().map { ($0.target, LogCompletion(token: $0.token, error: refused)) })
        let outcome = monitor.wait(
            sealWake, until: { $0.seal != nil || $0.logFailure != nil || $0.halted },
            then: { state -> Result<Seal, LogEngineError> in
                if let seal = state.seal { return .success(seal) }
                return .failure(state.logFailure ?? LogEngineError(errno: ESHUTDOWN, "the log engine stopped before the seal was durable"))
            }
        )
        return try outcome.get()
    }

    /// Fences this primary (invariant 5; docs/handover.md §4.2): `host` is primary of a newer
    /// `epoch`. From now on every write and flush is refused with EIO ("fenced: ..."), and the FUA
    /// writes and flushes waiting for durability and the writes waiting for room fail with it: no
    /// write is acknowledged as durable after this. Records already admitted (acknowledged non-FUA
    /// writes) are still appended, on this host's side of the fork, and writeback goes on, so the
    /// device keeps matching this host's log (a split-brain repair starts from that). Why EIO: EROFS
    /// would tell an NBD client the export is read-only, and ESHUTDOWN is the planned handover's.
    /// A later call with a newer epoch replaces the message.
    public func fence(epoch: UInt64, by host: String) {
        let (failed, error) = monitor.withLock { state -> ([Waiter], LogEngineError) in
            let error = LogEngineError(
                errno: EIO,
                "fenced: \(host) is primary at epoch \(epoch), after this host's epoch \(state.epoch) (log \(directory.path)); "
                    + "this host takes no more writes, and those it took since \(host) took over are not replicated"
            )
            state.fenced = error
            return (failedWaiters(&state, error), error)
        }
        deliver(failed.map { ($0.target, LogCompletion(token: $0.token, error: error)) })
    }

    /// Stops the threads at once without more I/O: what a power loss or kill -9 leaves behind.
    /// Requests still waiting are failed.
    public func halt() {
        let failed = monitor.withLock { state -> [Waiter] in
            state.halted = true
            state.stopping = true
            return failedWaiters(&state, LogEngineError(errno: ESHUTDOWN, "the log engine stopped"))
        }
        deliver(failed.map { ($0.target, LogCompletion(token: $0.token, error: LogEngineError(errno: ESHUTDOWN, "the log engine stopped"))) })
        writerWake.broadcast()
        writebackWake.broadcast()
        checkpointWake.broadcast()
        prepareWake.broadcast()
        sealWake.broadcast()
        for thread in threads.withLock({ $0 }) { thread.join() }
        threads.withLock { $0 = [] }
        wake(monitor.withLock { $0.pending.release() })
    }

    // MARK: - Admission (under the lock)

    private func refusal(_ state: State) -> LogEngineError? {
        if let fenced = state.fenced { return fenced }
        if let sealing = state.sealing { return sealing }
        if state.stopping { return LogEngineError(errno: ESHUTDOWN, "the resource is going down") }
        if let failure = state.logFailure {
            return LogEngineError(errno: failure.errno, "the log cannot be written (\(failure.message)); writes resume when it can")
        }
        return nil
    }

    private func recordSize(_ change: LogChange) -> UInt64 {
        let payload = if case .write(let bytes) = change { bytes.count } else { 0 }
        return UInt64(LogRecordLayout.recordSize(payload: payload))
    }

    private func hasRoom(_ state: State, for change: LogChange) -> Bool {
        let held = if case .write(let bytes) = change { bytes.count } else { 0 }
        return state.pending.hasRoom(for: held) && state.logBytes + recordSize(change) <= configuration.spaceLimit
    }

    /// Whether the oldest waiting write waits for log space (not for room in the pending map, which
    /// writeback frees without a checkpoint).
    func waitsForLogSpace(_ state: State) -> Bool {
        guard let first = state.waitingWrites.first else { return false }
        return state.logBytes + recordSize(first.change) > configuration.spaceLimit
    }

    /// Appends the record and makes the change visible to reads. Returns whether the reply waits for
    /// durability (FUA).
    private func admit(_ write: WaitingWrite, _ state: inout State) -> Bool {
        let lsn = state.nextLSN
        let record: LogRecord
        let content: PendingContent
        switch write.change {
        case .write(let bytes):
            record = LogRecord(
                type: .write, flags: write.fua ? .fua : [], lsn: lsn, epoch: state.epoch, offset: write.offset,
                length: UInt64(bytes.count), payload: bytes
            )
            content = .data(bytes)
        case .trim(let length):
            record = LogRecord(type: .trim, flags: write.fua ? .fua : [], lsn: lsn, epoch: state.epoch, offset: write.offset, length: UInt64(length))
            content = .zeroes(length: length, keepAllocated: false)
        case .writeZeroes(let length, let noHole):
            var flags: LogRecordFlags = noHole ? .noHole : []
            if write.fua { flags.insert(.fua) }
            record = LogRecord(type: .writeZeroes, flags: flags, lsn: lsn, epoch: state.epoch, offset: write.offset, length: UInt64(length))
            content = .zeroes(length: length, keepAllocated: noHole)
        }
        let size = UInt64(record.encodedSize)
        state.nextLSN += size
        state.queuedBytes += size
        state.pending.insert(lsn: lsn, offset: write.offset, content: content)
        state.queue.append(QueuedRecord(record: record, payloadChecksum: write.payloadChecksum))
        let gathered = state.queuedBytes >= Self.lazyCommitBytes && state.queuedBytes - size < Self.lazyCommitBytes
        if state.queue.count == 1 || gathered { writerWake.signal() }
        guard write.fua else { return false }
        state.durabilityWaiters.append(Waiter(lsn: state.nextLSN, target: write.target, token: write.token))
        if state.durabilityWaiters.count == 1 { writerWake.signal() }
        return true
    }

    /// Admits waiting writes while there is room; returns the acknowledgements for non-FUA ones.
    func admitWaiting(_ state: inout State) -> [(any LogCompletionTarget, LogCompletion)] {
        var acknowledged: [(any LogCompletionTarget, LogCompletion)] = []
        while let next = state.waitingWrites.first, state.logFailure == nil, hasRoom(state, for: next.change) {
            _ = state.waitingWrites.popFirst()
            if !admit(next, &state) { acknowledged.append((next.target, LogCompletion(token: next.token, error: nil))) }
        }
        if state.logFailure == nil { waitForPendingMemoryIfNeeded(state) }
        return acknowledged
    }

    /// When the oldest waiting write waits for pending memory that other engines hold, asks to be
    /// called when they give some back. (If they gave it back just before, this engine's own
    /// writeback still admits the write: a map that holds nothing takes any change.)
    private func waitForPendingMemoryIfNeeded(_ state: State) {
        guard let first = state.waitingWrites.first, !state.pending.isEmpty else { return }
        let held = if case .write(let bytes) = first.change { bytes.count } else { 0 }
        if !state.pending.hasRoom(for: held) { configuration.pendingMemory.wait(self) }
    }

    /// Memory another engine gave back: admit what waits for it.
    func pendingMemoryFreed() {
        deliver(monitor.withLock { state in admitWaiting(&state) })
    }

    /// Calls those that wait for the pending memory given back, with no lock held.
    func wake(_ waiters: [any PendingMemoryWaiter]) {
        for waiter in waiters { waiter.pendingMemoryFreed() }
    }

    func failedWaiters(_ state: inout State, _ error: LogEngineError) -> [Waiter] {
        var failed: [Waiter] = []
        while let waiter = state.durabilityWaiters.popFirst() { failed.append(waiter) }
        while let write = state.waitingWrites.popFirst() { failed.append(Waiter(lsn: 0, target: write.target, token: write.token)) }
        return failed
    }

    /// Hands completions to their targets, one call per target.
    func deliver(_ completions: [(any LogCompletionTarget, LogCompletion)]) {
        guard !completions.isEmpty else { return }
        if completions.count == 1 {
            completions[0].0.logCompleted([completions[0].1])
            return
        }
        var groups: [ObjectIdentifier: (any LogCompletionTarget, [LogCompletion])] = [:]
        var order: [ObjectIdentifier] = []
        for (target, completion) in completions {
            let key = ObjectIdentifier(target)
            if groups[key] == nil {
                groups[key] = (target, [])
                order.append(key)
            }
            groups[key]!.1.append(completion)
        }
        for key in order {
            let (target, list) = groups[key]!
            target.logCompleted(list)
        }
    }
}

import Synchronization

/// The segment the log writer appends to; confined to the log writer thread.
struct OpenSegment {
    var name: SegmentName
    var file: any StorageFile
    let appender: SegmentAppender
    var header: SegmentHeader
    /// Where the next record goes.
    var size: UInt64
    /// Bytes the file holds: more than `size` when the last block is padded, and in a recycled
    /// segment (old bytes past the records).
    var fileSize: UInt64
    var digest: HistoryDigest
    var records: Int
    /// A reused spare: appends overwrite written blocks (see `rotate`).
    let overwrites: Bool
}

final class OpenSegmentBox: @unchecked Sendable {
    var value: OpenSegment
    init(_ value: OpenSegment) { self.value = value }
}

final class PositionBox: @unchecked Sendable {
    var value: PositionFile
    init(_ value: PositionFile) { self.value = value }
}
