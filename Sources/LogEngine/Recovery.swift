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
            name, in: directory, firstLSN: 0, epoch: epoch, previousDigest: HistoryDigest.genesis, preallocate: 0
        )
        try segment.file.write(LogRecord(type: .epoch, lsn: 0, epoch: epoch).encoded(), at: segment.size)
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
        report: (String) -> Void = { _ in }
    ) throws -> LogEngine {
        if let problem = configuration.problem { throw LogEngineError(errno: EINVAL, problem) }
        let position: PositionFile
        do {
            guard let opened = try PositionFile.open(in: directory) else {
                throw LogRecoveryError(segment: nil, offset: nil, reason: "\(PositionFile.name) has no valid slot")
            }
            position = opened
        } catch let error as SystemError {
            throw LogRecoveryError(segment: nil, offset: nil, reason: "cannot read \(PositionFile.name): \(error)")
        }
        let names = try directory.list().compactMap(SegmentName.init(fileName:)).sorted { $0.sequence < $1.sequence }
        guard !names.isEmpty else { throw LogRecoveryError(segment: nil, offset: nil, reason: "no log segments in \(directory.path)") }
        let start = position.writebackLSN
        var expectedLSN: UInt64?
        var previousDigest: [UInt8]?
        var epoch: UInt64 = 0
        var kept: [SegmentName] = []
        var replayed = 0
        for (index, name) in names.enumerated() {
            let isNewest = index == names.count - 1
            let file = try directory.open(name.fileName, create: false)
            let scan: SegmentScan
            do {
                scan = try SegmentReader.scan(file, name: name.fileName) { record, offset in
                    epoch = max(epoch, record.epoch)
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
            } catch let error as SegmentHeaderError {
                if isNewest, index > 0, error.fileSize <= UInt64(SegmentHeader.size) {
                    // Cut short while being created: it never held a record.
                    report("removing \(name), whose creation was interrupted")
                    try directory.remove(name.fileName)
                    try directory.sync()
                    break
                }
                throw LogRecoveryError(segment: name.fileName, offset: 0, reason: "the segment header is unreadable (\(error.defect))")
            }
            if scan.header.sequence != name.sequence {
                throw LogRecoveryError(segment: name.fileName, offset: 0, reason: "its header says sequence \(scan.header.sequence)")
            }
            if let expectedLSN, scan.header.firstLSN != expectedLSN {
                throw LogRecoveryError(
                    segment: name.fileName, offset: 0,
                    reason: "it starts at LSN \(scan.header.firstLSN) but the segment before ends at \(expectedLSN)"
                )
            }
            if let previousDigest, scan.header.previousDigest != previousDigest {
                throw LogRecoveryError(segment: name.fileName, offset: 0, reason: "its history digest does not continue the segment before")
            }
            if index == 0, scan.header.firstLSN > start {
                throw LogRecoveryError(
                    segment: name.fileName, offset: 0,
                    reason: "the writeback position is \(start) but the oldest segment starts at \(scan.header.firstLSN)"
                )
            }
            epoch = max(epoch, scan.header.epoch)
            switch scan.end {
            case .end(let offset):
                if try file.size() > UInt64(offset) { try cut(file, at: offset) }
            case .tornTail(let offset, let defect) where isNewest:
                report("cutting a torn tail off \(name) at byte \(offset) (\(defect))")
                try cut(file, at: offset)
            case .tornTail(let offset, let defect), .corrupt(let offset, let defect):
                throw LogRecoveryError(segment: name.fileName, offset: UInt64(offset), reason: "damaged record (\(defect)) with more log after it")
            }
            expectedLSN = scan.endLSN
            previousDigest = scan.digest
            kept.append(name)
        }
        guard let endLSN = expectedLSN, let digest = previousDigest, let newest = kept.last else {
            throw LogRecoveryError(segment: nil, offset: nil, reason: "no readable segment")
        }
        if start > endLSN {
            throw LogRecoveryError(segment: newest.fileName, offset: nil, reason: "the writeback position \(start) is beyond the log's end \(endLSN)")
        }
        try device.sync()
        if replayed > 0 { report("replayed \(replayed) records from LSN \(start) to \(endLSN)") }

        // Appends continue in a new segment; every older one is now written back.
        guard let name = SegmentName(sequence: newest.sequence + 1, host: configuration.host) else {
            throw LogEngineError(errno: EOVERFLOW, "segment numbers are exhausted after \(newest)")
        }
        let segment = try startSegment(
            name, in: directory, firstLSN: endLSN, epoch: epoch, previousDigest: digest, preallocate: configuration.segmentSize
        )
        var stored = position
        try stored.store(endLSN)
        for old in kept { try directory.remove(old.fileName) }
        try directory.sync()

        let state = State(
            epoch: epoch, nextLSN: endLSN, durableLSN: endLSN, writebackLSN: endLSN,
            pending: PendingWriteMap(capacity: configuration.pendingCapacity),
            segments: [SegmentInfo(name: name, firstLSN: endLSN, fileSize: segment.size)]
        )
        let engine = LogEngine(
            configuration: configuration, directory: directory, device: device, deviceSize: deviceSize, state: state,
            openSegment: segment, position: stored
        )
        engine.startThreads()
        return engine
    }

    private static func cut(_ file: any StorageFile, at offset: Int) throws(SystemError) {
        try file.truncate(to: UInt64(offset))
        try file.sync()
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
        case .epoch:
            break
        }
    }
}
