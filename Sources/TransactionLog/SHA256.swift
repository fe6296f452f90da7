import CChecksum

/// SHA-256 (FIPS 180-4), incremental. The log hashes record headers and checksums with it (a few
/// dozen bytes per record, one block function call per record); the block function runs on the
/// CPU's SHA extensions where it has them (`CChecksum`), which keeps the format module free of a
/// crypto library.
public struct SHA256: Sendable {
    private var state: (UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32) = (
        0x6a09_e667, 0xbb67_ae85, 0x3c6e_f372, 0xa54f_f53a, 0x510e_527f, 0x9b05_688c, 0x1f83_d9ab, 0x5be0_cd19
    )
    /// The partial block: 64 bytes.
    private var block: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
    private var blockCount = 0
    private var totalBytes: UInt64 = 0
    private let implementation: ChecksumImplementation

    public init(implementation: ChecksumImplementation = .fastest) {
        self.implementation = implementation
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard var source = bytes.baseAddress, !bytes.isEmpty else { return }
        totalBytes &+= UInt64(bytes.count)
        var remaining = bytes.count
        if blockCount > 0 {
            let take = min(64 - blockCount, remaining)
            withUnsafeMutableBytes(of: &block) { ($0.baseAddress! + blockCount).copyMemory(from: source, byteCount: take) }
            blockCount += take
            source += take
            remaining -= take
            guard blockCount == 64 else { return }
            withUnsafeBytes(of: block) { compress($0.baseAddress!, blocks: 1) }
            blockCount = 0
        }
        let whole = remaining / 64
        if whole > 0 {
            compress(source, blocks: whole)
            source += whole * 64
            remaining -= whole * 64
        }
        if remaining > 0 {
            withUnsafeMutableBytes(of: &block) { $0.baseAddress!.copyMemory(from: source, byteCount: remaining) }
            blockCount = remaining
        }
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// The 32-byte digest; the hasher is consumed.
    public consuming func finalize() -> [UInt8] {
        let bitLength = totalBytes &* 8
        var padding: [UInt8] = [0x80]
        let used = (blockCount + 1) % 64
        padding += [UInt8](repeating: 0, count: used <= 56 ? 56 - used : 120 - used)
        for shift in stride(from: 56, through: 0, by: -8) { padding.append(UInt8(truncatingIfNeeded: bitLength >> UInt64(shift))) }
        update(padding)
        var out: [UInt8] = []
        out.reserveCapacity(32)
        for word in [state.0, state.1, state.2, state.3, state.4, state.5, state.6, state.7] {
            out += [UInt8(word >> 24), UInt8(truncatingIfNeeded: word >> 16), UInt8(truncatingIfNeeded: word >> 8), UInt8(truncatingIfNeeded: word)]
        }
        return out
    }

    public static func hash(_ bytes: [UInt8], implementation: ChecksumImplementation = .fastest) -> [UInt8] {
        var hasher = SHA256(implementation: implementation)
        hasher.update(bytes)
        return hasher.finalize()
    }

    private mutating func compress(_ data: UnsafeRawPointer, blocks: Int) {
        let path = implementation.path
        withUnsafeMutableBytes(of: &state) { words in
            cchecksum_sha256_blocks(words.baseAddress!.assumingMemoryBound(to: UInt32.self), data, blocks, path)
        }
    }
}

/// The hash chain over a resource's segments: the digest of a segment covers the digest before it,
/// the segment header and every record's header and checksum (the checksum covers the payload).
/// Two hosts whose segments carry the same digest share the same history up to that point.
public struct HistoryDigest: Sendable {
    private var hasher = SHA256()

    /// Starts the digest of the segment with `header` (its `previousDigest` chains the history).
    public init(header: SegmentHeader) {
        hasher.update(header.encoded())
    }

    /// Adds one record, given as its on-disk bytes (header, payload, trailer).
    public mutating func add(recordHeader: UnsafeRawBufferPointer, checksum: UInt32) {
        hasher.update(recordHeader)
        withUnsafeBytes(of: checksum.littleEndian) { hasher.update($0) }
    }

    /// The 16-byte digest the next segment's header carries as `previousDigest`.
    public consuming func finalize() -> [UInt8] {
        Array(hasher.finalize().prefix(16))
    }

    /// The digest before the first segment of a history.
    public static let genesis = [UInt8](repeating: 0, count: 16)
}
