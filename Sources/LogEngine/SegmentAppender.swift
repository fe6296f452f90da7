import BlockStore

#if canImport(Glibc)
import Glibc
#endif

/// Appends to a log segment through an aligned staging buffer, so that the segment can be written
/// with direct I/O: the bytes go from this buffer to the disk, and the log writer no longer copies
/// every record into fresh page-cache pages (that copy was its largest cost, BENCHMARKS.md).
///
/// Direct I/O writes whole aligned blocks. `flush` writes everything staged, the last block padded
/// with zeroes, and keeps that partial block staged: the next flush writes it again, with the same
/// bytes at the front, so a torn rewrite can only damage bytes that were never durable.
///
/// Used by one thread at a time: the log writer, or whoever creates a segment before it starts.
final class SegmentAppender: @unchecked Sendable {
    private let alignment = StorageAlignment.direct
    private let buffer: UnsafeMutableRawBufferPointer
    /// The file offset of `buffer[0]`: always aligned.
    private var blockStart: UInt64 = 0
    /// Staged bytes; `buffer[0..<fill]` belongs at `blockStart`.
    private var fill = 0

    /// `capacity` is rounded up to whole aligned blocks, at least two.
    init(capacity: Int = 2 << 20) {
        buffer = DirectIOMemory.allocate(max(2 * StorageAlignment.direct, StorageAlignment.roundUp(capacity)))
    }

    deinit { DirectIOMemory.deallocate(buffer) }

    /// Where the next appended byte goes.
    var position: UInt64 { blockStart + UInt64(fill) }

    /// The appender between two commits: where its staged partial block belongs, and that block's
    /// bytes (durable records, or a segment header being written).
    struct Mark {
        fileprivate let blockStart: UInt64
        fileprivate let partial: [UInt8]
    }

    /// What to return to if the commit that starts now fails.
    func mark() -> Mark {
        Mark(blockStart: blockStart, partial: Array(UnsafeRawBufferPointer(rebasing: buffer[0..<fill])))
    }

    /// Forgets everything staged or written since `mark`. A failed commit is then staged again at the
    /// offsets its records' LSNs give, not after the bytes of the failed attempt, and every byte that
    /// was not durable is written again (after a failed fdatasync the page cache cannot be trusted to
    /// still hold it dirty).
    func rewind(to mark: Mark) {
        blockStart = mark.blockStart
        fill = mark.partial.count
        mark.partial.withUnsafeBytes { partial in
            if let source = partial.baseAddress { buffer.baseAddress!.copyMemory(from: source, byteCount: partial.count) }
        }
    }

    /// Starts a new segment: the next byte goes to offset 0.
    func restart() {
        blockStart = 0
        fill = 0
    }

    /// Stages `bytes` at `position`, writing the staging buffer to `file` whenever it is full.
    func append(_ bytes: UnsafeRawBufferPointer, to file: any StorageFile) throws(SystemError) {
        var from = 0
        while from < bytes.count {
            let count = min(bytes.count - from, buffer.count - fill)
            (buffer.baseAddress! + fill).copyMemory(from: bytes.baseAddress! + from, byteCount: count)
            fill += count
            from += count
            if fill == buffer.count {
                try file.write([UnsafeRawBufferPointer(buffer)], at: blockStart)
                blockStart += UInt64(fill)
                fill = 0
            }
        }
    }

    func append(_ bytes: [UInt8], to file: any StorageFile) throws(SystemError) {
        var result: Result<Void, SystemError> = .success(())
        bytes.withUnsafeBytes { bytes in result = Result { () throws(SystemError) in try append(bytes, to: file) } }
        try result.get()
    }

    /// Writes every staged byte to `file`, the last block padded with zeroes, and returns the end of
    /// what the file now holds (`position` rounded up to a block).
    @discardableResult
    func flush(to file: any StorageFile) throws(SystemError) -> UInt64 {
        let padded = StorageAlignment.roundUp(fill)
        guard padded > 0 else { return blockStart }
        (buffer.baseAddress! + fill).initializeMemory(as: UInt8.self, repeating: 0, count: padded - fill)
        try file.write([UnsafeRawBufferPointer(rebasing: buffer[0..<padded])], at: blockStart)
        // Keep the partial last block staged; the whole blocks before it are done.
        let whole = fill / alignment * alignment
        if whole > 0 {
            (buffer.baseAddress!).copyMemory(from: buffer.baseAddress! + whole, byteCount: fill - whole)
            blockStart += UInt64(whole)
            fill -= whole
        }
        return blockStart + UInt64(padded - whole)
    }
}
