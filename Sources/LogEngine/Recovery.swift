import BlockStore
import TransactionLog

#if canImport(Glibc)
import Glibc
#endif

extension LogEngine {
    /// Creates the log of a new resource in `directory`: the first segment, opening the history with
    /// an epoch record, and the writeback position 0. Everything is durable when this returns.
    public static func create(in directory: any StorageDirectory, configuration: LogEngineConfiguration, epoch: UInt64) throws {
        if let problem = configuration.problem { throw LogEngineError(errno: EINVAL, problem) }
        let name = SegmentName(sequence: 1, host: configuration.host)!
        _ = try startSegment(
            name, in: directory, appender: SegmentAppender(capacity: 0), firstLSN: 0, epoch: epoch,
            previousDigest: HistoryDigest.genesis, preallocate: 0, opening: LogRecord(type: .epoch, lsn: 0, epoch: epoch)
        )
        _ = try PositionFile.create(in: directory)
        try directory.sync()
    }

    /// Opens the log in `directory` and recovers: replays every record from the persisted writeback
    /// position onto `device`, cuts a torn tail off the newest segment, and stops with a
    /// `LogRecoveryError` naming segment and offset at anything else that is not a valid record of
    /// this history (invariant 6). Then starts a new segment and the engine's threads.
    ///
    /// A log that ends with a seal (this host handed over) gets no new segment and admits nothing:
    /// every request is refused with ESHUTDOWN, and `seal` returns that seal.
    ///
    /// - Parameter promotion: makes this host the primary of a new epoch (docs/handover.md, step H7):
    ///   the directory may be a replica's (`ReplicaLog`, shut down), ending at L with a seal (planned
    ///   handover) or with its last whole record (forced failover). After recovery the new segment
    ///   `log-<N+1>-<host>` starts at L in epoch `promotion`, chained to the history up to L, and
    ///   opens with an epoch record at L; both are durable before `open` returns. Idempotent: when
    ///   the history is at that epoch already, started by this host, it opens with no second
    ///   promotion. Refused (EINVAL) when `promotion` is not after the history's epoch, or below
    ///   the epoch a seal at the end promised.
    public static func open(
        directory: any StorageDirectory, device: any StorageFile, deviceSize: UInt64, configuration: LogEngineConfiguration,
        retentionHolds: [String: UInt64] = [:], promotion: UInt64? = nil, report: (String) -> Void = { _ in }
    ) throws -> LogEngine {
        if let problem = configuration.problem { throw LogEngineError(errno: EINVAL, problem) }
        let position = try LogHistory.openPosition(in: directory)
        let start = position.writebackLSN
        var replayed = 0
        var oldestChecked = false
        let walk = try LogHistory.walk(directory, begin: { name, header in
            // Before anything is replayed: a log that starts after the position lacks records.
            guard !oldestChecked else { return }
            oldestChecked = true
            try LogHistory.checkPosition(start, oldest: name, startingAt: header.firstLSN)
        }) { record, name, offset in
            guard record.lsn >= start, record.type.carriesRange else { return }
            guard record.offset + record.length <= deviceSize else {
                throw LogRecoveryError(
                    segment: name.fileName, offset: offset,
                    reason: "a record for bytes \(record.offset)..<\(record.offset + record.length) of a \(deviceSize)-byte device"
                )
            }
            try replay(record, onto: device)
            replayed += 1
        }
        guard let endLSN = walk.endLSN, let digest = walk.digest, let newest = walk.segments.last
        else {
            throw LogRecoveryError(segment: nil, offset: nil, reason: "no readable segment")
        }
        try LogHistory.checkPosition(start, newest: newest.name, endingAt: endLSN)
        if let interrupted = walk.interrupted {
            report("removing \(interrupted), whose creation was interrupted")
            try directory.remove(interrupted.fileName)
        }
        // Cut what follows the last valid record of the newest segment: a torn append, or zeroes.
        let end: Int
        switch newest.scan.end {
        case .end(let offset): end = offset
        case .tornTail(let offset, let defect):
            report(LogHistory.cutTail(of: newest.name, at: offset, defect))
            end = offset
        case .corrupt(let offset, _): end = offset  // the walk throws for corruption; kept total
        }
        if newest.fileSize > UInt64(end) {
            let file = try directory.open(newest.name.fileName, create: false)
            try file.truncate(to: UInt64(end))
            try file.sync()
        }
        let epoch = walk.epoch
        let promoted = try epochToStart(promotion, walk: walk, host: configuration.host, path: directory.path)
        // A sealed log stays as it is, in its last segment; a promotion (a retake) goes on after the seal.
        let sealed = promoted == nil ? walk.sealed : nil
        // Segments another member still needs stay (they count towards the log space and are
        // retired once fetched); the others are written back and go.
        var kept: [SegmentInfo] = []
        var retired: [SegmentName] = []
        for (index, segment) in walk.segments.enumerated() {
            let staysOpen = sealed != nil && index == walk.segments.count - 1
            if !staysOpen, retirable(nextFirstLSN: segment.scan.endLSN, position: endLSN, holds: retentionHolds) {
                retired.append(segment.name)
            } else {
                let size = index == walk.segments.count - 1 ? UInt64(end) : segment.fileSize
                kept.append(SegmentInfo(name: segment.name, firstLSN: segment.scan.header.firstLSN, fileSize: size))
            }
        }
        try device.sync()
        if replayed > 0 { report("replayed \(replayed) records from LSN \(start) to \(endLSN)") }

        let segment: OpenSegment
        var segments = kept
        if let sealed {
            // Nothing is appended to it, but the log writer keeps its segment as always.
            segment = OpenSegment(
                name: newest.name, file: try directory.open(newest.name.fileName, create: false, direct: true),
                appender: SegmentAppender(capacity: 0), header: newest.scan.header, size: UInt64(end), fileSize: UInt64(end),
                digest: newest.scan.chain, records: newest.scan.records, overwrites: false
            )
            report("the log is sealed: epoch \(sealed.epoch) was handed over at LSN \(sealed.endLSN) (\(sealed.segment))")
        } else {
            // Appends continue in a new segment; every older one is now written back.
            guard let name = SegmentName(sequence: newest.name.sequence + 1, host: configuration.host) else {
                throw LogEngineError(errno: EOVERFLOW, "segment numbers are exhausted after \(newest)")
            }
            segment = try startSegment(
                name, in: directory, appender: SegmentAppender(), firstLSN: endLSN, epoch: promoted ?? epoch, previousDigest: digest,
                preallocate: configuration.segmentSize, opening: promoted.map { LogRecord(type: .epoch, lsn: endLSN, epoch: $0) }
            )
            segments.append(SegmentInfo(name: name, firstLSN: endLSN, fileSize: segment.fileSize))
            if let promoted { report("promoted: \(name) starts epoch \(promoted) at LSN \(endLSN)") }
        }
        // The epoch of the history at `endLSN`: a promotion's epoch record lies after it.
        var stored = position
        try stored.store(endLSN, epoch: epoch)
        // Replayed segments nobody needs and spares left from before are deleted.
        let spares = try directory.list().filter { $0.hasPrefix(sparePrefix) }
        for old in retired.map(\.fileName) + spares { try directory.remove(old) }
        try directory.sync()

        // After the promotion's epoch record, if there is one; a sealed log ends with the seal.
        let appendedLSN = sealed == nil ? endLSN + segment.size - UInt64(SegmentHeader.size) : endLSN
        var state = State(
            epoch: promoted ?? epoch, nextLSN: appendedLSN, durableLSN: appendedLSN, writebackLSN: endLSN,
            pending: PendingWriteMap(memory: configuration.pendingMemory), segments: segments
        )
        state.appliedLSN = appendedLSN
        state.retentionHolds = retentionHolds
        if let sealed {
            state.seal = sealed
            state.promisedEpoch = sealed.nextEpoch
            state.sealing = LogEngineError(
                errno: ESHUTDOWN,
                "the log of \(directory.path) is sealed: epoch \(sealed.epoch) was handed over at LSN \(sealed.endLSN), and this host no longer accepts writes"
            )
        }
        let engine = LogEngine(
            configuration: configuration, directory: directory, device: device, state: state,
            openSegment: segment, position: stored
        )
        engine.startThreads()
        return engine
    }

    /// The epoch a promotion to `promotion` must start, or nil when there is none to start: none was
    /// asked, or an earlier `open` made it durable (the history's newest epoch is that one, begun by
    /// `host` and not sealed: a crash after the promotion, before the daemon recorded it).
    static func epochToStart(_ promotion: UInt64?, walk: HistoryWalk, host: String, path: String) throws(LogEngineError) -> UInt64? {
        guard let promotion else { return nil }
        if walk.epoch == promotion, walk.sealed == nil, let start = walk.epochStarts.last, start.epoch == promotion,
            start.segment.host == host
        {
            return nil
        }
        guard promotion > walk.epoch else {
            throw LogEngineError(
                errno: EINVAL, "cannot promote the log of \(path) to epoch \(promotion): its history is at epoch \(walk.epoch) already; promote to a later epoch"
            )
        }
        if let seal = walk.sealed, promotion < seal.nextEpoch {
            throw LogEngineError(
                errno: EINVAL,
                "cannot promote the log of \(path) to epoch \(promotion): its seal (\(seal.segment)) promised epoch \(seal.nextEpoch) to a successor; promote to that epoch or a later one"
            )
        }
        return promotion
    }

    /// Turns the log directory of a primary whose engine is shut down (after `seal`, or a fenced
    /// primary that wrote nothing after the fork) into a replica's, ready for `ReplicaLog.open`
    /// (docs/handover.md §3.2). The replica then appends to the returned segment, and the
    /// successor's first segment must start at the returned LSN and chain to its digest.
    ///
    /// - A trailing segment of `host` that holds no record (one a recovery started) is removed: the
    ///   successor's `log-<N+1>-<its host>` must not stand next to it. (When it is the only segment,
    ///   the replica then starts with the successor's segment, as a new replica does.)
    /// - The primary's spare files go.
    /// - The position keeps its LSN and is stored with the epoch of the history there, taken from
    ///   the walk (a position file of an older version says epoch 0).
    ///
    /// Idempotent; on a replica's directory it changes nothing but such an empty segment of `host`.
    /// The walk's problems are thrown as `LogRecoveryError`, naming segment and offset.
    public static func convertToReplica(
        directory: any StorageDirectory, host: String, report: (String) -> Void = { _ in }
    ) throws -> LogEnd {
        var walk = try LogHistory.walk(directory)
        if let interrupted = walk.interrupted {
            report("removing \(interrupted), whose creation was interrupted")
            try directory.remove(interrupted.fileName)
        }
        guard let newest = walk.segments.last else {
            throw LogRecoveryError(segment: nil, offset: nil, reason: "no readable segment in \(directory.path)")
        }
        if newest.scan.records == 0, newest.name.host == host {
            report("removing \(newest.name): this host started it and it holds no record")
            try directory.remove(newest.name.fileName)
            walk.segments.removeLast()
        }
        for spare in try directory.list() where spare.hasPrefix(sparePrefix) { try directory.remove(spare) }
        var position = try LogHistory.openPosition(in: directory)
        try LogHistory.checkPosition(position.writebackLSN, newest: newest.name, endingAt: newest.scan.endLSN)
        let epoch = walk.epoch(at: position.writebackLSN)
        if position.epoch != epoch { try position.store(position.writebackLSN, intent: position.intentLSN, epoch: epoch) }
        try directory.sync()
        return LogEnd(lsn: newest.scan.endLSN, epoch: walk.epoch, segment: walk.segments.last?.name, seal: walk.sealed)
    }

    /// Applies one record to the device (recovery; writeback applies batches from memory).
    static func replay(_ record: LogRecord, onto device: any StorageFile) throws(SystemError) {
        switch record.type {
        case .write:
            try device.write(record.payload, at: record.offset)
        case .trim:
            try device.zero(offset: record.offset, length: record.length, keepAllocated: false)
        case .writeZeroes:
            try device.zero(offset: record.offset, length: record.length, keepAllocated: record.flags.contains(.noHole))
        case .epoch, .seal:
            break
        }
    }
}

/// Where the history of a log directory ends, as `LogEngine.convertToReplica` leaves it.
public struct LogEnd: Sendable, Equatable {
    /// The LSN after the last record: where a successor's segment starts.
    public var lsn: UInt64
    /// The epoch of the history there.
    public var epoch: UInt64
    /// The newest segment: a replica's fetch continues in it, and the successor's segment must
    /// chain to its digest. Nil when the directory keeps no segment (a new replica's state).
    public var segment: SegmentName?
    /// The seal the log ends with (a primary that handed over), or nil.
    public var seal: Seal?
}
