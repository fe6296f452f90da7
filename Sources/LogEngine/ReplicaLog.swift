import BlockStore
import Synchronization
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

/// Why a replica's log stopped taking bytes or replaying them. Each one names the segment and
/// offset, so the operator sees where (invariants 4 and 6).
public struct ReplicaLogError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        /// The bytes do not continue this host's history (another epoch, a digest that does not
        /// chain): split brain. Nothing from the fork on is kept or applied.
        case fork
        /// A record that is not valid (checksum, position, fields): never applied.
        case corrupt
        /// The peer sent bytes that do not fit where this log is (a protocol fault).
        case misplaced
        /// A file could not be read or written.
        case io
    }

    public let kind: Kind
    public let segment: String
    public let offset: UInt64
    public let reason: String

    public init(_ kind: Kind, segment: String, offset: UInt64, _ reason: String) {
        self.kind = kind
        self.segment = segment
        self.offset = offset
        self.reason = reason
    }

    public var description: String {
        let what = kind == .fork ? "split brain" : kind == .corrupt ? "damaged log" : kind == .misplaced ? "misplaced bytes" : "I/O error"
        return "\(what) in segment \(segment) at byte \(offset): \(reason)"
    }
}

/// Where a replica's fetch goes on: the segment and byte its log ends at.
public struct FetchPosition: Sendable, Equatable {
    public var segment: SegmentName
    public var offset: UInt64
}

/// Positions of a replica, for `marsadm view` and the gossip.
public struct ReplicaLogStatus: Sendable, Equatable {
    /// Every record before this LSN is in the local log, durably.
    public var fetchedLSN: UInt64
    /// Every record before this LSN is durably on the data device.
    public var replayedLSN: UInt64
    /// Replay applies the records before this LSN now; beyond `replayedLSN` the device is between
    /// two prefixes until its next sync.
    public var applyingLSN: UInt64
    /// After a crash in the middle of a batch: the device is consistent again once replay reaches this.
    public var consistentFrom: UInt64
    public var epoch: UInt64
    public var replayPaused: Bool
    public var replaying: Bool
    public var segments: Int
    public var logBytes: UInt64
    public var fetchSegment: String?
    /// How long ago the oldest fetched byte not yet replayed arrived (0 when replay is at the fetched end).
    public var lagSeconds: Double
    public var failure: String?
    /// The fork, when the fetched history is not this host's (split brain).
    public var fork: String?
    /// The seal the replayed history ends with: the primary that wrote it handed over there.
    public var seal: Seal? = nil

    public var consistent: Bool { replayedLSN >= consistentFrom && applyingLSN <= replayedLSN }
}

/// The log of a resource on a secondary: bytes fetched from a peer are checked record by record
/// and appended to local segments of the same names, then replayed onto the data device in order
/// by one thread. The replay position is persisted only after the device is synced, with the end
/// of each batch stored before it starts, so the device equals a prefix of the log whenever replay
/// stops, and a crash inside a batch says so (Inconsistent) until replay passes that end
/// (invariant 3). Nothing that fails a check is written or applied (invariants 4 and 6).
public final class ReplicaLog: ShippingSource {
    struct LocalSegment {
        var name: SegmentName
        var firstLSN: UInt64
        /// Bytes of whole, checked records (header included): the replayer reads up to here.
        var size: UInt64
        /// Complete: the peer said it ended at `size` (or a later segment arrived).
        var closed: Bool
    }

    /// The segment the receiver appends to (only the caller of `receive` touches it).
    struct Appending {
        var file: any StorageFile
        var name: SegmentName
        var header: SegmentHeader
        var digest: HistoryDigest
        /// Bytes written (checked records), synced or not.
        var written: UInt64
        /// Bytes received past `written`: the start of a record whose rest is still on its way.
        var partial: [UInt8]
        var nextLSN: UInt64
        var epoch: UInt64
        /// The seal rules at `nextLSN`: what may follow a seal.
        var seals: SealRule
    }

    struct State {
        var segments: [LocalSegment]
        /// The durable end of each segment: `segments[i].size` counts synced bytes only.
        var replayedLSN: UInt64
        var applyingLSN: UInt64
        var consistentFrom: UInt64
        var epoch: UInt64
        /// The seal rules at `replayedLSN`, as `epoch` is the epoch there.
        var seals: SealRule
        var replayPaused: Bool
        var replaying = false
        var stopping = false
        var failure: ReplicaLogError?
        var fork: ReplicaLogError?
        /// The oldest LSN each other member still fetches from this log (transitive fetch): replayed
        /// segments holding bytes at or after the lowest stay.
        var retentionHolds: [String: UInt64] = [:]
        /// When the log's end reached which LSN (bounded: one sample per 100 ms, 256 at most), for
        /// the lag in seconds.
        var arrivals: [(lsn: UInt64, at: ContinuousClock.Instant)] = []
    }

    let directory: any StorageDirectory
    let device: any StorageFile
    /// The data device's capacity as last seen: replay applies no record beyond it (see `fitsDevice`).
    let deviceSize: Atomic<UInt64>
    let monitor: Monitor<State>
    let replayWake = Condition()
    let idle = Condition()
    private let appendingBox: AppendingBox
    let positionBox: PositionBox
    private let thread = Mutex<WorkerThread?>(nil)
    let batchBytes: UInt64
    /// Records one replay batch holds at most: small records cost more memory than their bytes
    /// (a record and an array each), so 4 KiB writes make batches of 32 MiB, not 64.
    static let batchRecords = 8192
    /// Bytes the local segments may take; beyond it fetch waits for replay (`hasRoom`).
    let spaceLimit: UInt64

    /// Creates the log directory of a new replica: no segments yet, the replay position at
    /// `startLSN` of epoch `epoch` (where its initial sync began).
    public static func create(in directory: any StorageDirectory, startLSN: UInt64, epoch: UInt64) throws {
        var position = try PositionFile.create(in: directory)
        try position.store(startLSN, intent: startLSN, epoch: epoch)
        try directory.sync()
    }

    /// Opens a replica's log: checks the local segments as one history (cutting a torn tail off
    /// the newest, which a crash in the middle of an append leaves), reads the replay position,
    /// and starts replaying (unless `replayPaused`).
    public static func open(
        directory: any StorageDirectory, device: any StorageFile, deviceSize: UInt64, replayPaused: Bool,
        batchBytes: UInt64 = 64 << 20, spaceLimit: UInt64 = 64 << 30, retentionHolds: [String: UInt64] = [:],
        report: (String) -> Void = { _ in }
    ) throws -> ReplicaLog {
        let position = try LogHistory.openPosition(in: directory)
        var segments: [LocalSegment] = []
        var appending: Appending?
        var replaySeals = SealRule()
        let hasSegments = try directory.list().contains { SegmentName(fileName: $0) != nil }
        if hasSegments {
            let walk = try LogHistory.walk(directory)
            if let interrupted = walk.interrupted {
                report("removing \(interrupted), whose first bytes never arrived")
                try directory.remove(interrupted.fileName)
            }
            for (index, walked) in walk.segments.enumerated() {
                var end: UInt64
                switch walked.scan.end {
                case .end(let offset): end = UInt64(offset)
                case .tornTail(let offset, let defect):
                    report(LogHistory.cutTail(of: walked.name, at: offset, defect))
                    end = UInt64(offset)
                case .corrupt(let offset, _): end = UInt64(offset)
                }
                let newest = index == walk.segments.count - 1
                if newest, walked.fileSize > end {
                    let file = try directory.open(walked.name.fileName, create: false)
                    try file.truncate(to: end)
                    try file.sync()
                }
                segments.append(
                    LocalSegment(name: walked.name, firstLSN: walked.scan.header.firstLSN, size: end, closed: !newest)
                )
            }
            if let newest = walk.segments.last {
                // The newest segment may still grow: the receiver appends to it after rescanning it
                // for its digest (the next segment's header must chain to it).
                let file = try directory.open(newest.name.fileName, create: false)
                var digest = HistoryDigest(header: newest.scan.header)
                var epoch = newest.scan.header.epoch
                _ = try SegmentReader.scan(file, name: newest.name.fileName, visit: { record, _ in
                    var header: [UInt8] = []
                    let checksum = record.encodeHeader(into: &header)
                    header.withUnsafeBytes { digest.add(recordHeader: $0, checksum: checksum) }
                    if record.type == .epoch { epoch = max(epoch, record.epoch) }
                })
                appending = Appending(
                    file: file, name: newest.name, header: newest.scan.header, digest: digest, written: segments.last!.size,
                    partial: [], nextLSN: newest.scan.endLSN, epoch: epoch, seals: walk.seals
                )
            }
            // Replay resumes the rules at its position: right after a seal, the next record must answer it.
            if let seal = walk.lastSeal, seal.endLSN == position.writebackLSN { replaySeals = SealRule(pending: seal) }
            if let oldest = segments.first, oldest.firstLSN > position.writebackLSN {
                throw LogRecoveryError(
                    segment: oldest.name.fileName, offset: 0,
                    reason: "the replay position is \(position.writebackLSN) but the oldest local segment starts at \(oldest.firstLSN)"
                )
            }
        }
        var state = State(
            segments: segments, replayedLSN: position.writebackLSN, applyingLSN: position.writebackLSN,
            consistentFrom: max(position.intentLSN, position.writebackLSN), epoch: position.epoch, seals: replaySeals,
            replayPaused: replayPaused
        )
        // In force before replay first runs: a restart must not drop what other members still fetch from here.
        state.retentionHolds = retentionHolds
        let log = ReplicaLog(
            directory: directory, device: device, deviceSize: deviceSize, state: state, position: position, appending: appending,
            batchBytes: batchBytes, spaceLimit: spaceLimit
        )
        log.start()
        return log
    }

    private init(
        directory: any StorageDirectory, device: any StorageFile, deviceSize: UInt64, state: State, position: PositionFile,
        appending: Appending?, batchBytes: UInt64, spaceLimit: UInt64
    ) {
        self.spaceLimit = spaceLimit
        self.directory = directory
        self.device = device
        self.deviceSize = Atomic(deviceSize)
        self.monitor = Monitor(state)
        self.positionBox = PositionBox(position)
        self.appendingBox = AppendingBox(appending)
        self.batchBytes = batchBytes
    }

    private func start() {
        let worker = WorkerThread(name: "mars-replay") { [self] in replayLoop() }
        thread.withLock { $0 = worker }
    }

    /// Stops replay after its current batch (the device then equals a prefix) and joins the thread.
    public func shutdown() {
        monitor.withLock { $0.stopping = true }
        replayWake.broadcast()
        let worker = thread.withLock { worker -> WorkerThread? in
            defer { worker = nil }
            return worker
        }
        worker?.join()
    }

    public var status: ReplicaLogStatus {
        let fetchSegment = appendingBox.value?.name.fileName
        return monitor.withLock { state in
            let last = state.segments.last
            let lag = state.arrivals.first { $0.lsn > state.replayedLSN }.map { ContinuousClock.now - $0.at } ?? .zero
            let (seconds, attoseconds) = lag.components
            return ReplicaLogStatus(
                fetchedLSN: last.map { $0.firstLSN + $0.size - UInt64(SegmentHeader.size) } ?? state.replayedLSN,
                replayedLSN: state.replayedLSN, applyingLSN: state.applyingLSN, consistentFrom: state.consistentFrom,
                epoch: state.epoch, replayPaused: state.replayPaused, replaying: state.replaying, segments: state.segments.count,
                logBytes: state.segments.reduce(0) { $0 + $1.size }, fetchSegment: fetchSegment,
                lagSeconds: Double(seconds) + Double(attoseconds) / 1e18,
                failure: state.failure?.description, fork: state.fork?.description, seal: state.seals.pending
            )
        }
    }

    /// Pauses or resumes replay. Pausing returns once the batch in progress is applied and synced:
    /// the device is then a prefix of the log (a snapshot may be taken).
    public func setReplayPaused(_ paused: Bool) {
        monitor.withLock { $0.replayPaused = paused }
        replayWake.broadcast()
        if paused {
            monitor.wait(idle, until: { !$0.replaying || $0.stopping }, then: { _ in })
        }
    }

    /// Whether the local log is below its space limit: fetch acknowledges (and so receives) more
    /// only then, so a replica whose replay is paused or slow stops its primary's stream instead
    /// of filling its filesystem (the primary keeps the log meanwhile).
    public var hasRoom: Bool {
        monitor.withLock { state in state.segments.reduce(0) { $0 + $1.size } < spaceLimit }
    }

    /// Keeps replayed segments holding bytes at or after each LSN, for the other members that may
    /// fetch from this replica (replacing the holds before). Only while the log is below half its
    /// space: beyond, replayed segments go anyway, and such a member asks the primary.
    public func setRetentionHolds(_ holds: [String: UInt64]) {
        monitor.withLock { $0.retentionHolds = holds }
    }

    // MARK: - Serving other members (transitive fetch)

    public var logDirectory: any StorageDirectory { directory }

    /// The local segments and the end of the checked, durable bytes: what another member may fetch
    /// from this replica (replayed segments are gone; that member then asks the primary).
    public func shippingSnapshot() -> ShippingSnapshot {
        monitor.withLock { state in
            let end = Self.availableLSN(state)
            return ShippingSnapshot(
                segments: state.segments.map { ShippingSnapshot.Segment(name: $0.name, firstLSN: $0.firstLSN) },
                durableLSN: end, appendedLSN: end, epoch: state.epoch
            )
        }
    }

    // MARK: - Receiving (one caller at a time: the fetch link)

    /// Where fetch goes on: the newest segment's end, or nil when the log has no segment yet (a
    /// new replica starts with the primary's segment holding its replay position).
    public var fetchPosition: FetchPosition? {
        guard let appending = appendingBox.value else { return nil }
        return FetchPosition(segment: appending.name, offset: appending.written + UInt64(appending.partial.count))
    }

    /// Appends `bytes` received for `segment` at `offset` (which must be where this log ends),
    /// after checking every whole record in them: checksum, position, epoch, and for a new segment
    /// that its header continues this history. Not durable until `commit`. A record cut by the end
    /// of `bytes` waits for the rest.
    public func receive(segment: SegmentName, offset: UInt64, bytes: [UInt8]) throws(ReplicaLogError) {
        if let failure = monitor.withLock({ $0.fork ?? $0.failure }) { throw failure }
        do {
            try receiveChecked(segment: segment, offset: offset, bytes: bytes)
        } catch {
            if error.kind == .fork || error.kind == .corrupt { monitor.withLock { state in
                if error.kind == .fork { state.fork = error } else { state.failure = error }
            } }
            throw error
        }
    }

    private func receiveChecked(segment: SegmentName, offset: UInt64, bytes: [UInt8]) throws(ReplicaLogError) {
        var input = bytes[...]
        var appending: Appending
        if let current = appendingBox.value, current.name == segment {
            let end = current.written + UInt64(current.partial.count)
            guard offset == end else {
                throw ReplicaLogError(.misplaced, segment: segment.fileName, offset: offset, "this log ends at byte \(end) of the segment")
            }
            appending = current
        } else {
            guard offset == 0 else {
                throw ReplicaLogError(.misplaced, segment: segment.fileName, offset: offset, "a segment this host does not have starts at byte 0")
            }
            appending = try startSegment(segment, bytes: &input)
        }
        appending.partial += input
        // Take every whole record off the front of `partial`.
        var consumed = 0
        var accepted: [UInt8] = []
        let failure: ReplicaLogError? = appending.partial.withUnsafeBytes { raw -> ReplicaLogError? in
            while true {
                let position = consumed
                let fileOffset = appending.written + UInt64(accepted.count)
                switch decodeRecord(raw, at: position, expectedLSN: appending.nextLSN) {
                case .failure(.incomplete):
                    return nil
                case .failure(let defect):
                    return ReplicaLogError(.corrupt, segment: segment.fileName, offset: fileOffset, "\(defect)")
                case .success(let record):
                    if let fork = appending.seals.check(record, in: segment) {
                        return ReplicaLogError(.fork, segment: segment.fileName, offset: fileOffset, fork)
                    }
                    if record.type == .epoch {
                        // A new primary's segment opens with its epoch in the header and an epoch
                        // record of the same epoch: never lower.
                        guard record.epoch >= appending.epoch else {
                            return ReplicaLogError(.fork, segment: segment.fileName, offset: fileOffset,
                                "an epoch record for epoch \(record.epoch) where the history is at epoch \(appending.epoch)")
                        }
                        appending.epoch = record.epoch
                    } else if record.epoch != appending.epoch {
                        return ReplicaLogError(.fork, segment: segment.fileName, offset: fileOffset,
                            "a record of epoch \(record.epoch) where the history is at epoch \(appending.epoch)")
                    }
                    let size = record.encodedSize
                    let header = UnsafeRawBufferPointer(rebasing: raw[position..<(position + LogRecordLayout.headerSize)])
                    let checksum = raw.loadLittleEndianUInt32(at: position + size - LogRecordLayout.trailerSize)
                    appending.digest.add(recordHeader: header, checksum: checksum)
                    accepted.append(contentsOf: raw[position..<(position + size)])
                    consumed += size
                    appending.nextLSN += UInt64(size)
                }
            }
        }
        if let failure { throw failure }
        if !accepted.isEmpty {
            do {
                try appending.file.write(accepted, at: appending.written)
            } catch {
                throw ReplicaLogError(.io, segment: segment.fileName, offset: appending.written, "cannot write the local segment: \(error)")
            }
            appending.written += UInt64(accepted.count)
            appending.partial.removeFirst(consumed)
        }
        appendingBox.value = appending
    }

    /// A segment this log does not have yet: its 64-byte header must be at the front of `bytes`,
    /// and continue the history (sequence, first LSN, digest, epoch), unless this replica has no
    /// segment at all yet.
    private func startSegment(_ name: SegmentName, bytes: inout ArraySlice<UInt8>) throws(ReplicaLogError) -> Appending {
        guard bytes.count >= SegmentHeader.size else {
            throw ReplicaLogError(.misplaced, segment: name.fileName, offset: 0, "a new segment must start with its whole 64-byte header")
        }
        let headerBytes = Array(bytes.prefix(SegmentHeader.size))
        bytes = bytes.dropFirst(SegmentHeader.size)
        let header: SegmentHeader
        switch headerBytes.withUnsafeBytes({ SegmentHeader.decode($0) }) {
        case .success(let decoded): header = decoded
        case .failure(let defect): throw ReplicaLogError(.corrupt, segment: name.fileName, offset: 0, "unreadable header (\(defect))")
        }
        guard header.sequence == name.sequence else {
            throw ReplicaLogError(.corrupt, segment: name.fileName, offset: 0, "its header says sequence \(header.sequence)")
        }
        var epoch = header.epoch
        var seals = SealRule()
        if let previous = appendingBox.value {
            guard previous.partial.isEmpty else {
                throw ReplicaLogError(.misplaced, segment: previous.name.fileName, offset: previous.written,
                    "a new segment began while a record of this one was incomplete")
            }
            guard name.sequence == previous.name.sequence + 1, header.firstLSN == previous.nextLSN else {
                throw ReplicaLogError(.fork, segment: name.fileName, offset: 0,
                    "it starts at LSN \(header.firstLSN) (sequence \(name.sequence)) but this host's history ends at LSN \(previous.nextLSN) in \(previous.name)")
            }
            let chained = previous.digest
            let expected = chained.finalize()
            guard header.previousDigest == expected else {
                throw ReplicaLogError(.fork, segment: name.fileName, offset: 0,
                    "its history digest does not continue \(previous.name): the histories forked at LSN \(header.firstLSN)")
            }
            guard header.epoch >= previous.epoch else {
                throw ReplicaLogError(.fork, segment: name.fileName, offset: 0, "it was opened in epoch \(header.epoch), after epoch \(previous.epoch)")
            }
            epoch = max(header.epoch, previous.epoch)
            seals = previous.seals
            // The previous segment is complete: make it durable and closed before the next one exists.
            try commit()
            monitor.withLock { state in
                if let last = state.segments.indices.last { state.segments[last].closed = true }
            }
        }
        let file: any StorageFile
        do {
            file = try directory.open(name.fileName, create: true)
            try file.truncate(to: 0)
            try file.write(headerBytes, at: 0)
            try file.sync()
            try directory.sync()
        } catch {
            throw ReplicaLogError(.io, segment: name.fileName, offset: 0, "cannot create the local segment: \(error)")
        }
        monitor.withLock { state in
            state.segments.append(LocalSegment(name: name, firstLSN: header.firstLSN, size: UInt64(SegmentHeader.size), closed: false))
        }
        return Appending(
            file: file, name: name, header: header, digest: HistoryDigest(header: header), written: UInt64(SegmentHeader.size),
            partial: [], nextLSN: header.firstLSN, epoch: epoch, seals: seals
        )
    }

    /// The peer says `segment` ended at `size` bytes: every byte of it must be here.
    public func segmentEnded(_ segment: SegmentName, size: UInt64) throws(ReplicaLogError) {
        guard let appending = appendingBox.value, appending.name == segment else { return }
        guard appending.partial.isEmpty, appending.written == size else {
            throw ReplicaLogError(.misplaced, segment: segment.fileName, offset: appending.written,
                "the peer says it ends at byte \(size), this host has \(appending.written) bytes of whole records")
        }
        try commit()
        monitor.withLock { state in
            if let last = state.segments.indices.last { state.segments[last].closed = true }
        }
    }

    /// Makes every received record durable and lets replay have it. Returns the fetch position to
    /// acknowledge (bytes of whole records).
    @discardableResult
    public func commit() throws(ReplicaLogError) -> FetchPosition? {
        guard let appending = appendingBox.value else { return nil }
        let published = monitor.withLock { state in state.segments.last?.size ?? 0 }
        if appending.written > published {
            do {
                try appending.file.sync()
            } catch {
                throw ReplicaLogError(.io, segment: appending.name.fileName, offset: published, "cannot sync the local segment: \(error)")
            }
            monitor.withLock { state in
                guard let last = state.segments.indices.last else { return }
                state.segments[last].size = appending.written
                let lsn = state.segments[last].firstLSN + appending.written - UInt64(SegmentHeader.size)
                let now = ContinuousClock.now
                state.arrivals.removeAll { $0.lsn <= state.replayedLSN }
                if let newest = state.arrivals.last, now - newest.at < .milliseconds(100) {
                    state.arrivals[state.arrivals.count - 1].lsn = lsn
                } else {
                    state.arrivals.append((lsn, now))
                    if state.arrivals.count > 256 { state.arrivals.removeFirst() }
                }
            }
            replayWake.signal()
        }
        return FetchPosition(segment: appending.name, offset: appending.written)
    }
}

final class AppendingBox: @unchecked Sendable {
    var value: ReplicaLog.Appending?
    init(_ value: ReplicaLog.Appending?) { self.value = value }
}

extension UnsafeRawBufferPointer {
    func loadLittleEndianUInt32(at offset: Int) -> UInt32 {
        UInt32(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
}
