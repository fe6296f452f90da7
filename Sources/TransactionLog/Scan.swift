/// How a scan of log bytes ended.
public enum ScanEnd: Equatable, Sendable {
    /// Every byte up to `offset` was a valid record, and nothing but zeroes follows.
    case end(offset: Int)
    /// From `offset` on there is an incomplete or damaged record and nothing valid after it: the tail
    /// of an append that was interrupted. Recovery cuts the log at `offset`.
    case tornTail(offset: Int, defect: RecordDefect)
    /// A damaged record at `offset` with valid records after it that a later group commit wrote
    /// (once the damaged bytes were durable): the log is corrupt. Nothing from here on may be
    /// applied; recovery stops and reports the position (invariant 6). Valid records of the damaged
    /// record's own commit make it a torn tail: a power loss may persist a commit's blocks in any order.
    case corrupt(offset: Int, defect: RecordDefect)
}

/// Log bytes read at random: a segment file (`SegmentReader`), or bytes in memory.
public protocol LogBytes {
    /// Bytes in all.
    var count: UInt64 { get }
    /// Up to `count` bytes from `offset`; fewer only where the bytes end.
    func read(count: Int, at offset: UInt64) throws -> [UInt8]
}

/// Log bytes in memory.
public struct LogBytesInMemory: LogBytes {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var count: UInt64 { UInt64(bytes.count) }
    public func read(count: Int, at offset: UInt64) -> [UInt8] {
        guard offset < self.count else { return [] }
        let start = Int(offset)
        return Array(bytes[start..<min(bytes.count, start + count)])
    }
}

/// A valid record a scan found.
public struct ScannedRecord {
    public let record: LogRecord
    /// Where the record starts in the scanned bytes.
    public let offset: UInt64
    /// The record's encoded header and its checksum: what the history digest covers.
    public let header: [UInt8]
    public let checksum: UInt32
}

/// What a scan found after its visits.
public struct RecordScan: Equatable, Sendable {
    public let end: ScanEnd
    /// The LSN after the last valid record.
    public let endLSN: UInt64
    public let records: Int
}

/// Visits the valid records of `bytes` from `start`, in order, and says how the scan ended. Memory
/// stays bounded whatever the size: it reads a window of at most `max(window, one record)` bytes.
///
/// Positions are checked as well as checksums: the record at byte `p` must carry LSN
/// `firstLSN + (p - start)`, so a stale record left behind from an earlier history is not taken for
/// part of this one.
public func scanRecords(
    _ bytes: some LogBytes, from start: UInt64 = 0, firstLSN: UInt64, window: Int = 1 << 20,
    _ visit: (ScannedRecord) throws -> Void = { _ in }
) throws -> RecordScan {
    var reader = WindowReader(bytes: bytes, window: window)
    var position = start
    var records = 0
    while position < bytes.count {
        let lsn = firstLSN + (position - start)
        switch try reader.record(at: position, expectedLSN: lsn) {
        case .success(let found):
            try visit(found)
            position += UInt64(found.record.encodedSize)
            records += 1
        case .failure(let defect):
            let end: ScanEnd
            if try reader.isZero(from: position) {
                end = .end(offset: Int(position))
            } else if try reader.hasValidRecord(after: position, start: start, firstLSN: firstLSN, committedAfter: lsn) {
                end = .corrupt(offset: Int(position), defect: defect)
            } else {
                end = .tornTail(offset: Int(position), defect: defect)
            }
            return RecordScan(end: end, endLSN: lsn, records: records)
        }
    }
    return RecordScan(end: .end(offset: Int(position)), endLSN: firstLSN + (position - start), records: records)
}

/// Log bytes through a window that holds at most `max(window, one record)` of them.
private struct WindowReader<Bytes: LogBytes> {
    let bytes: Bytes
    let window: Int
    var held: [UInt8] = []
    var heldStart: UInt64 = 0

    init(bytes: Bytes, window: Int) {
        self.bytes = bytes
        self.window = max(window, LogRecordLayout.headerSize)
    }

    /// Makes the window hold `[offset, offset+count)`, or up to the end of the bytes.
    mutating func ensure(_ offset: UInt64, _ count: Int) throws {
        let wanted = min(offset + UInt64(count), bytes.count)
        if offset >= heldStart, wanted <= heldStart + UInt64(held.count) { return }
        held = try bytes.read(count: max(count, window), at: offset)
        heldStart = offset
    }

    mutating func record(at position: UInt64, expectedLSN: UInt64) throws -> Result<ScannedRecord, RecordDefect> {
        try ensure(position, LogRecordLayout.headerSize)
        let local = Int(position - heldStart)
        if held.count - local >= LogRecordLayout.headerSize {
            // The payload length field, to bring the whole record into the window; a length beyond
            // the maximum is refused by the decoder below.
            let payload = held.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: local + 8, as: UInt32.self))) }
            if payload <= LogRecordLayout.maxPayload {
                try ensure(position, LogRecordLayout.recordSize(payload: payload))
            }
        }
        let at = Int(position - heldStart)
        return held.withUnsafeBytes { buffer in
            decodeRecord(buffer, at: at, expectedLSN: expectedLSN).map { record in
                let checksumAt = at + LogRecordLayout.headerSize + record.payload.count
                return ScannedRecord(
                    record: record, offset: position, header: Array(buffer[at..<(at + LogRecordLayout.headerSize)]),
                    checksum: UInt32(littleEndian: buffer.loadUnaligned(fromByteOffset: checksumAt, as: UInt32.self))
                )
            }
        }
    }

    func isZero(from position: UInt64) throws -> Bool {
        var offset = position
        while offset < bytes.count {
            let chunk = try bytes.read(count: window, at: offset)
            if chunk.isEmpty { break }
            if !chunk.allSatisfy({ $0 == 0 }) { return false }
            offset += UInt64(chunk.count)
        }
        return true
    }

    /// Whether a genuine record of this history (magic, checksum and the LSN its position implies)
    /// that a group commit begun after `defectLSN` wrote starts anywhere after `position`: then the
    /// defect's bytes were durable before, and the defect is damage. Valid records of the defect's
    /// own commit do not count: until its fdatasync returned, the disk could persist that commit's
    /// blocks in any order, so a power loss can leave a hole in it with later records intact, and
    /// nothing in it was acknowledged as durable.
    func hasValidRecord(after position: UInt64, start: UInt64, firstLSN: UInt64, committedAfter defectLSN: UInt64) throws -> Bool {
        let magic = withUnsafeBytes(of: LogRecordLayout.magic.littleEndian) { Array($0) }
        var offset = position + 1
        while offset < bytes.count {
            // Three bytes of overlap, so a magic across two chunks is found.
            let chunk = try bytes.read(count: window + 3, at: offset)
            if chunk.count < LogRecordLayout.headerSize { return false }
            for index in 0..<(chunk.count - 3) where chunk[index] == magic[0] && chunk[index + 1] == magic[1]
                && chunk[index + 2] == magic[2] && chunk[index + 3] == magic[3]
            {
                let candidate = offset + UInt64(index)
                var probe = WindowReader(bytes: bytes, window: window)
                if case .success(let found) = try probe.record(at: candidate, expectedLSN: firstLSN + (candidate - start)),
                    found.record.commitStart > defectLSN
                {
                    return true
                }
            }
            offset += UInt64(window)
        }
        return false
    }
}
