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

/// Visits the valid records of `bytes` from `start`, in order, and says how the scan ended.
///
/// Positions are checked as well as checksums: the record at byte `p` must carry LSN
/// `firstLSN + (p - start)`, so a stale record left behind from an earlier history is not taken for
/// part of this one.
public func scanRecords(
    _ bytes: UnsafeRawBufferPointer, firstLSN: UInt64, startingAt start: Int = 0,
    _ visit: (LogRecord, Int) throws -> Void
) rethrows -> ScanEnd {
    var position = start
    while position < bytes.count {
        let expected = firstLSN + UInt64(position - start)
        switch decodeRecord(bytes, at: position, expectedLSN: expected) {
        case .success(let record):
            try visit(record, position)
            position += record.encodedSize
        case .failure(let defect):
            if bytes[position...].allSatisfy({ $0 == 0 }) { return .end(offset: position) }
            if hasValidRecord(bytes, after: position, start: start, firstLSN: firstLSN, committedAfter: expected) {
                return .corrupt(offset: position, defect: defect)
            }
            return .tornTail(offset: position, defect: defect)
        }
    }
    return .end(offset: position)
}

/// Whether a genuine record of this history (right magic, checksum and LSN for its position) that a
/// group commit begun after `defectLSN` wrote starts anywhere after `position`.
private func hasValidRecord(
    _ bytes: UnsafeRawBufferPointer, after position: Int, start: Int, firstLSN: UInt64, committedAfter defectLSN: UInt64
) -> Bool {
    let magic = LogRecordLayout.magic.littleEndian
    var candidate = position + 1
    while candidate + LogRecordLayout.headerSize + LogRecordLayout.trailerSize <= bytes.count {
        if bytes.loadUnaligned(fromByteOffset: candidate, as: UInt32.self) == magic,
            case .success(let record) = decodeRecord(bytes, at: candidate, expectedLSN: firstLSN + UInt64(candidate - start)),
            record.commitStart > defectLSN
        {
            return true
        }
        candidate += 1
    }
    return false
}
