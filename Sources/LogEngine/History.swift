import BlockStore
import TransactionLog

/// One segment as a walk over the history found it.
public struct WalkedSegment: Sendable {
    public let name: SegmentName
    public let scan: SegmentScan
    public let fileSize: UInt64
}

/// The segments of a resource, read in order and checked as one history.
public struct HistoryWalk: Sendable {
    public var segments: [WalkedSegment] = []
    /// The newest segment, when its creation was interrupted (a file no longer than its header).
    public var interrupted: SegmentName?
    /// The epoch of the history at its end: the highest in headers and records (epochs never go
    /// back in one history).
    public var epoch: UInt64 = 0
    /// Where each epoch of the walked history starts: the oldest segment's header, then every epoch
    /// record (one per primary change, so few).
    public var epochStarts: [EpochStart] = []
    /// The seal rules at the end of the walk: `seals.pending` is the seal the log ends with, if any
    /// (a primary that handed over).
    public var seals = SealRule()
    /// The newest seal anywhere in the walked history (records may follow it).
    public var lastSeal: Seal?

    public init() {}

    /// The seal the log ends with: its last record is a seal.
    public var sealed: Seal? { seals.pending }

    public var endLSN: UInt64? { segments.last?.scan.endLSN }
    public var digest: [UInt8]? { segments.last?.scan.digest }

    /// The epoch of the history just before `lsn` (the epoch an epoch record at `lsn` follows), as far
    /// as the walked segments tell: before the oldest segment's first record, its header's epoch.
    public func epoch(at lsn: UInt64) -> UInt64 {
        (epochStarts.last { $0.lsn < lsn } ?? epochStarts.first)?.epoch ?? 0
    }
}

/// Where an epoch begins in a history: an epoch record, or the header of the oldest segment walked.
public struct EpochStart: Sendable, Equatable {
    public var epoch: UInt64
    public var lsn: UInt64
    public var segment: SegmentName
}

/// Reads every segment of a log directory in sequence order and checks that they form one
/// history: each header is readable and names its own sequence, each segment starts where the one
/// before ends and carries its digest, every record is valid, and a seal is followed only as
/// `SealRule` allows. A torn tail is allowed in the
/// newest segment only. Recovery replays through `visit`; `marsadm log-verify` and `log-dump` use
/// the same walk.
public enum LogHistory {
    /// What recovery reports when it cuts the newest segment after its last valid record. A reused
    /// segment file still holds its earlier records' bytes there, which cannot be told from an
    /// append a crash cut short; neither was acknowledged as durable.
    static func cutTail(of segment: SegmentName, at offset: Int, _ defect: RecordDefect) -> String {
        "cutting \(segment) at byte \(offset), after its last valid record (\(defect) there): a torn tail (an append the crash cut short, never acknowledged) or bytes left from the file's earlier use as a segment"
    }

    /// A segment's place in the history is checked from its header before any of its records is
    /// visited: recovery must not replay records of a segment that does not continue the one before
    /// (a missing or forked segment) and only then find out. `begin` sees each accepted header first.
    public static func walk(
        _ directory: any StorageDirectory, begin: (SegmentName, SegmentHeader) throws -> Void = { _, _ in },
        visit: (LogRecord, SegmentName, UInt64) throws -> Void = { _, _, _ in }
    ) throws -> HistoryWalk {
        var walk = HistoryWalk()
        try self.walk(directory, into: &walk, begin: begin, visit: visit)
        return walk
    }

    /// The same walk into `walk`, which keeps what was read before a problem stopped it (the
    /// damaged segment included, its scan ending where the damage is), for `marsadm log-dump`.
    public static func walk(
        _ directory: any StorageDirectory, into walk: inout HistoryWalk, begin: (SegmentName, SegmentHeader) throws -> Void = { _, _ in },
        visit: (LogRecord, SegmentName, UInt64) throws -> Void = { _, _, _ in }
    ) throws {
        let names = try directory.list().compactMap(SegmentName.init(fileName:)).sorted { $0.sequence < $1.sequence }
        guard !names.isEmpty else { throw LogRecoveryError(segment: nil, offset: nil, reason: "no log segments in \(directory.path)") }
        for (index, name) in names.enumerated() {
            let isNewest = index == names.count - 1
            let file = try directory.open(name.fileName, create: false)
            let scan: SegmentScan
            do {
                let previous = walk.segments.last
                scan = try SegmentReader.scan(
                    file, name: name.fileName,
                    accept: { header in
                        try checkPlace(of: header, in: name, after: previous)
                        if walk.epochStarts.isEmpty {
                            walk.epochStarts.append(EpochStart(epoch: header.epoch, lsn: header.firstLSN, segment: name))
                        }
                        try begin(name, header)
                    },
                    visit: { record, offset in
                        if let fork = walk.seals.check(record, in: name) {
                            throw LogRecoveryError(segment: name.fileName, offset: offset, reason: "split brain: \(fork)")
                        }
                        if record.type == .seal { walk.lastSeal = walk.seals.pending }
                        walk.epoch = max(walk.epoch, record.epoch)
                        if record.type == .epoch {
                            walk.epochStarts.append(EpochStart(epoch: record.epoch, lsn: record.lsn, segment: name))
                        }
                        try visit(record, name, offset)
                    }
                )
            } catch let error as SegmentHeaderError {
                if isNewest, index > 0, error.fileSize <= UInt64(SegmentHeader.size) {
                    walk.interrupted = name
                    break
                }
                throw LogRecoveryError(segment: name.fileName, offset: 0, reason: "the segment header is unreadable (\(error.defect))")
            }
            walk.epoch = max(walk.epoch, scan.header.epoch)
            walk.segments.append(WalkedSegment(name: name, scan: scan, fileSize: try file.size()))
            switch scan.end {
            case .end:
                break
            case .tornTail where isNewest:
                break
            case .tornTail(let offset, let defect), .corrupt(let offset, let defect):
                throw LogRecoveryError(segment: name.fileName, offset: UInt64(offset), reason: "damaged record (\(defect)) with more log after it")
            }
        }
    }

    /// The writeback position (`writeback-position`): replay starts there.
    static func openPosition(in directory: any StorageDirectory) throws -> PositionFile {
        do {
            guard let position = try PositionFile.open(in: directory) else {
                throw LogRecoveryError(segment: nil, offset: nil, reason: "\(PositionFile.name) has no valid slot")
            }
            return position
        } catch let error as SystemError {
            throw LogRecoveryError(segment: nil, offset: nil, reason: "cannot read \(PositionFile.name): \(error)")
        }
    }

    /// A log whose oldest segment starts after the writeback position lacks records.
    static func checkPosition(_ position: UInt64, oldest: SegmentName, startingAt firstLSN: UInt64) throws {
        if firstLSN > position {
            throw LogRecoveryError(
                segment: oldest.fileName, offset: 0, reason: "the writeback position is \(position) but the oldest segment starts at \(firstLSN)"
            )
        }
    }

    static func checkPosition(_ position: UInt64, newest: SegmentName, endingAt endLSN: UInt64) throws {
        if position > endLSN {
            throw LogRecoveryError(segment: newest.fileName, offset: nil, reason: "the writeback position \(position) is beyond the log's end \(endLSN)")
        }
    }

    /// The writeback position of an intact `walk` of `directory`, checked against it as recovery
    /// checks it (for `marsadm log-verify`, which would otherwise call a log OK that recovery refuses).
    public static func verifiedPosition(in directory: any StorageDirectory, walk: HistoryWalk) throws -> UInt64 {
        let position = try openPosition(in: directory).writebackLSN
        if let oldest = walk.segments.first, let newest = walk.segments.last {
            try checkPosition(position, oldest: oldest.name, startingAt: oldest.scan.header.firstLSN)
            try checkPosition(position, newest: newest.name, endingAt: newest.scan.endLSN)
        }
        return position
    }

    /// Whether `header` names its own file's sequence and continues the segment before.
    private static func checkPlace(of header: SegmentHeader, in name: SegmentName, after previous: WalkedSegment?) throws {
        if header.sequence != name.sequence {
            throw LogRecoveryError(segment: name.fileName, offset: 0, reason: "its header says sequence \(header.sequence)")
        }
        guard let previous else { return }
        if header.firstLSN != previous.scan.endLSN {
            throw LogRecoveryError(
                segment: name.fileName, offset: 0,
                reason: "it starts at LSN \(header.firstLSN) but the segment before ends at \(previous.scan.endLSN)"
            )
        }
        if header.previousDigest != previous.scan.digest {
            throw LogRecoveryError(segment: name.fileName, offset: 0, reason: "its history digest does not continue the segment before")
        }
    }
}
