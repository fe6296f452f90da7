import CChecksum

/// Which implementation a checksum runs on: the fastest the CPU supports, the portable one, or for
/// CRC32C the crc32 instruction without AVX-512 folding (tests compare them on the same bytes;
/// SHA-256 runs portable for it).
public enum ChecksumImplementation: Sendable, CaseIterable {
    case fastest
    case portable
    case crc32Instruction

    var path: cchecksum_path {
        switch self {
        case .fastest: CCHECKSUM_FASTEST
        case .portable: CCHECKSUM_PORTABLE
        case .crc32Instruction: CCHECKSUM_CRC32_INSTRUCTION
        }
    }
}

/// CRC32C (Castagnoli): from 256 bytes on, carry-less folding in 512-bit registers where the CPU
/// has AVX-512 and VPCLMULQDQ; the SSE4.2 crc32 instruction in three interleaved streams combined
/// with PCLMULQDQ where it has those; a table otherwise.
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
