import CChecksum

/// Which implementation a checksum runs on: the fastest the CPU supports, or the portable one
/// (tests compare the two on the same bytes).
public enum ChecksumImplementation: Sendable {
    case fastest
    case portable

    var path: cchecksum_path { self == .fastest ? CCHECKSUM_FASTEST : CCHECKSUM_PORTABLE }
}

/// CRC32C (Castagnoli): the SSE4.2 crc32 instruction in three interleaved streams where the CPU
/// has it and PCLMULQDQ, a table otherwise.
public enum CRC32C {
    public static func checksum(
        _ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0, implementation: ChecksumImplementation = .fastest
    ) -> UInt32 {
        cchecksum_crc32c(crc, bytes.baseAddress, bytes.count, implementation.path)
    }

    public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0, implementation: ChecksumImplementation = .fastest) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: crc, implementation: implementation) }
    }

    /// The checksum of A followed by B, from `first` (A's checksum), `second` (B's) and B's length.
    public static func combine(
        _ first: UInt32, _ second: UInt32, secondLength: Int, implementation: ChecksumImplementation = .fastest
    ) -> UInt32 {
        cchecksum_crc32c_combine(first, second, secondLength, implementation.path)
    }
}
