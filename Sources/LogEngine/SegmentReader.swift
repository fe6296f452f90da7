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
    /// The same digest before it was finished: more records can be added to it.
    let chain: HistoryDigest
}

/// A segment whose header cannot be read.
public struct SegmentHeaderError: Error, Sendable, CustomStringConvertible {
    public let segment: String
    public let defect: SegmentHeader.Defect
    /// Bytes in the file: a file no longer than a header was cut short while being created.
    public let fileSize: UInt64

    public var description: String { "segment \(segment): unreadable header (\(defect)) in a file of \(fileSize) bytes" }
}

/// Reads segment files through `scanRecords`, with bounded memory whatever the segment's size.
public enum SegmentReader {
    /// Reads the header and every record of `file` in order, calling `visit` with each valid record
    /// and its file offset, and says how the records ended (clean end, torn tail, or corruption with
    /// valid records after it). `accept` sees the header before any record is visited and throws if
    /// the segment does not belong where it is.
    public static func scan(
        _ file: any StorageFile, name: String, accept: (SegmentHeader) throws -> Void = { _ in },
        visit: (LogRecord, UInt64) throws -> Void = { _, _ in }
    ) throws -> SegmentScan {
        let bytes = FileLogBytes(file: file, count: try file.size())
        let headerBytes = try file.read(count: SegmentHeader.size, at: 0)
        let header: SegmentHeader
        switch headerBytes.withUnsafeBytes({ SegmentHeader.decode($0) }) {
        case .success(let decoded): header = decoded
        case .failure(let defect): throw SegmentHeaderError(segment: name, defect: defect, fileSize: bytes.count)
        }
        try accept(header)
        var digest = HistoryDigest(header: header)
        let scan = try scanRecords(bytes, from: UInt64(SegmentHeader.size), firstLSN: header.firstLSN) { found in
            found.header.withUnsafeBytes { digest.add(recordHeader: $0, checksum: found.checksum) }
            try visit(found.record, found.offset)
        }
        let chain = digest
        return SegmentScan(
            header: header, end: scan.end, endLSN: scan.endLSN, records: scan.records, digest: digest.finalize(), chain: chain
        )
    }
}

/// A segment file as log bytes.
private struct FileLogBytes: LogBytes {
    let file: any StorageFile
    let count: UInt64

    func read(count: Int, at offset: UInt64) throws -> [UInt8] { try file.read(count: count, at: offset) }
}
