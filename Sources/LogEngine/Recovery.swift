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
        let segment = try startSegment(
            name, in: directory, appender: SegmentAppender(capacity: 0), firstLSN: 0, epoch: epoch,
            previousDigest: HistoryDigest.genesis, preallocate: 0
        )
        try segment.appender.append(LogRecord(type: .epoch, lsn: 0, epoch: epoch).encoded(), to: segment.file)
        try segment.appender.flush(to: segment.file)
        try segment.file.sync()
        _ = try PositionFile.create(in: directory)
        try directory.sync()
    }

    /// Opens the log in `directory` and recovers: replays every record from the persisted writeback
    /// position onto `device`, cuts a torn tail off the newest segment, and stops with a
    /// `LogRecoveryError` naming segment and offset at anything else that is not a valid record of
    /// this history (invariant 6). Then starts a new segment and the engine's threads.
    public static func open(
        directory: any StorageDirectory, device: any StorageFile, deviceSize: UInt64, configuration: LogEngineConfiguration,
        retentionHolds: [String: UInt64] = [:], report: (String) -> Void = { _ in }
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
        // Segments another member still needs stay (they count towards the log space and are
        // retired once fetched); the others are written back and go.
        var kept: [SegmentInfo] = []
        var retired: [SegmentName] = []
        for (index, segment) in walk.segments.enumerated() {
            if retirable(nextFirstLSN: segment.scan.endLSN, position: endLSN, holds: retentionHolds) {
                retired.append(segment.name)
            } else {
                let size = index == walk.segments.count - 1 ? UInt64(end) : segment.fileSize
                kept.append(SegmentInfo(name: segment.name, firstLSN: segment.scan.header.firstLSN, fileSize: size))
            }
        }
        try device.sync()
        if replayed > 0 { report("replayed \(replayed) records from LSN \(start) to \(endLSN)") }

        // Appends continue in a new segment; every older one is now written back.
        guard let name = SegmentName(sequence: newest.name.sequence + 1, host: configuration.host) else {
            throw LogEngineError(errno: EOVERFLOW, "segment numbers are exhausted after \(newest)")
        }
        let segment = try startSegment(
            name, in: directory, appender: SegmentAppender(), firstLSN: endLSN, epoch: epoch, previousDigest: digest,
            preallocate: configuration.segmentSize
        )
        var stored = position
        try stored.store(endLSN, epoch: epoch)
        // Replayed segments nobody needs and spares left from before are deleted.
        let spares = try directory.list().filter { $0.hasPrefix(sparePrefix) }
        for old in retired.map(\.fileName) + spares { try directory.remove(old) }
        try directory.sync()

        var state = State(
            epoch: epoch, nextLSN: endLSN, durableLSN: endLSN, writebackLSN: endLSN,
            pending: PendingWriteMap(memory: configuration.pendingMemory),
            segments: kept + [SegmentInfo(name: name, firstLSN: endLSN, fileSize: segment.fileSize)]
        )
        state.appliedLSN = endLSN
        state.retentionHolds = retentionHolds
        let engine = LogEngine(
            configuration: configuration, directory: directory, device: device, state: state,
            openSegment: segment, position: stored
        )
        engine.startThreads()
        return engine
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
