import BlockStore
import TransactionLog

/// What a full read of one segment file found.
public struct SegmentScan: Sendable {
    public let header: SegmentHeader
    /// How the records ended; offsets are file offsets.
    public let end: ScanEnd
    /// The LSN after the last valid record.
    public let endLSN: UInt64
    public let records: Int
    /// The history digest over the header and the valid records (the next segment's `previousDigest`).
    public let digest: [UInt8]
}

/// A segment whose header cannot be read.
public struct SegmentHeaderError: Error, Sendable, CustomStringConvertible {
    public let segment: String
    public let defect: SegmentHeader.Defect
    /// Bytes in the file: a file no longer than a header was cut short while being created.
    public let fileSize: UInt64

    public var description: String { "segment \(segment): unreadable header (\(defect)) in a file of \(fileSize) bytes" }
}

/// Reads segment files sequentially with bounded memory: a window of at most `max(1 MiB, one
/// record)` bytes, whatever the segment's size.
public enum SegmentReader {
    static let window = 1 << 20

    /// Reads the header and every record of `file` in order, calling `visit` with each valid record
    /// and its file offset, and says how the records ended (clean end, torn tail, or corruption with
    /// valid records after it). `accept` sees the header before any record is visited and throws if
    /// the segment does not belong where it is.
    public static func scan(
        _ file: any StorageFile, name: String, accept: (SegmentHeader) throws -> Void = { _ in },
        visit: (LogRecord, UInt64) throws -> Void = { _, _ in }
    ) throws -> SegmentScan {
        let size = try file.size()
        let headerBytes = try file.read(count: SegmentHeader.size, at: 0)
        let header: SegmentHeader
        switch headerBytes.withUnsafeBytes({ SegmentHeader.decode($0) }) {
        case .success(let decoded): header = decoded
        case .failure(let defect): throw SegmentHeaderError(segment: name, defect: defect, fileSize: size)
        }
        try accept(header)
        var digest = HistoryDigest(header: header)
        var reader = WindowReader(file: file, size: size)
        var position = UInt64(SegmentHeader.size)
        var lsn = header.firstLSN
        var records = 0
        while position < size {
            let outcome = try reader.record(at: position, expectedLSN: lsn)
            switch outcome {
            case .success(let (record, checksum, headerCopy)):
                headerCopy.withUnsafeBytes { digest.add(recordHeader: $0, checksum: checksum) }
                try visit(record, position)
                position += UInt64(record.encodedSize)
                lsn += UInt64(record.encodedSize)
                records += 1
            case .failure(let defect):
                let end: ScanEnd
                if try reader.isZero(from: position) {
                    end = .end(offset: Int(position))
                } else if try reader.hasValidRecord(after: position, firstLSN: header.firstLSN, committedAfter: lsn) {
                    end = .corrupt(offset: Int(position), defect: defect)
                } else {
                    end = .tornTail(offset: Int(position), defect: defect)
                }
                return SegmentScan(header: header, end: end, endLSN: lsn, records: records, digest: digest.finalize())
            }
        }
        return SegmentScan(header: header, end: .end(offset: Int(position)), endLSN: lsn, records: records, digest: digest.finalize())
    }
}

private struct WindowReader {
    let file: any StorageFile
    let size: UInt64
    var bytes: [UInt8] = []
    var start: UInt64 = 0

    init(file: any StorageFile, size: UInt64) {
        self.file = file
        self.size = size
    }

    /// Makes the window hold `[offset, offset+count)`, or up to the end of the file.
    mutating func ensure(_ offset: UInt64, _ count: Int) throws {
        let wanted = min(offset + UInt64(count), size)
        if offset >= start, wanted <= start + UInt64(bytes.count) { return }
        bytes = try file.read(count: max(count, SegmentReader.window), at: offset)
        start = offset
    }

    mutating func record(at position: UInt64, expectedLSN: UInt64) throws -> Result<(LogRecord, UInt32, [UInt8]), RecordDefect> {
        try ensure(position, LogRecordLayout.headerSize)
        let local = Int(position - start)
        if bytes.count - local >= LogRecordLayout.headerSize {
            let payload = bytes.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: local + 8, as: UInt32.self))) }
            if payload <= LogRecordLayout.maxPayload {
                try ensure(position, LogRecordLayout.recordSize(payload: payload))
            }
        }
        let at = Int(position - start)
        return bytes.withUnsafeBytes { buffer in
            decodeRecord(buffer, at: at, expectedLSN: expectedLSN).map { record in
                let checksumAt = at + LogRecordLayout.headerSize + record.payload.count
                let checksum = UInt32(littleEndian: buffer.loadUnaligned(fromByteOffset: checksumAt, as: UInt32.self))
                return (record, checksum, Array(buffer[at..<(at + LogRecordLayout.headerSize)]))
            }
        }
    }

    func isZero(from position: UInt64) throws -> Bool {
        var offset = position
        while offset < size {
            let chunk = try file.read(count: SegmentReader.window, at: offset)
            if chunk.isEmpty { break }
            if !chunk.allSatisfy({ $0 == 0 }) { return false }
            offset += UInt64(chunk.count)
        }
        return true
    }

    /// Whether a genuine record of this segment (magic, checksum and the LSN its position implies)
    /// starts anywhere after `position`.
    /// Whether a valid record after `position` was written by a group commit that began after
    /// `defectLSN`, i.e. once the bytes at the defect were durable: then the defect is damage.
    /// Valid records of the commit the defect is part of do not count: until its fdatasync returned,
    /// the disk could persist that commit's blocks in any order, so a power loss can leave a hole in
    /// it with later records intact, and nothing in it was acknowledged as durable.
    func hasValidRecord(after position: UInt64, firstLSN: UInt64, committedAfter defectLSN: UInt64) throws -> Bool {
        let magic = withUnsafeBytes(of: LogRecordLayout.magic.littleEndian) { Array($0) }
        var offset = position + 1
        while offset < size {
            let chunk = try file.read(count: SegmentReader.window + 3, at: offset)
            if chunk.count < LogRecordLayout.headerSize { return false }
            for index in 0..<(chunk.count - 3) where chunk[index] == magic[0] && chunk[index + 1] == magic[1]
                && chunk[index + 2] == magic[2] && chunk[index + 3] == magic[3]
            {
                let candidate = offset + UInt64(index)
                var probe = WindowReader(file: file, size: size)
                let expected = firstLSN + (candidate - UInt64(SegmentHeader.size))
                if case .success(let (record, _, _)) = try probe.record(at: candidate, expectedLSN: expected),
                    record.commitStart > defectLSN
                {
                    return true
                }
            }
            offset += UInt64(SegmentReader.window)
        }
        return false
    }
}
