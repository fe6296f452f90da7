#ifndef CCHECKSUM_H
#define CCHECKSUM_H

// Checksums for log records: CRC32C by carry-less folding on AVX-512 VPCLMULQDQ for buffers from
// 256 bytes, else the SSE4.2 crc32 instruction (three interleaved streams combined with PCLMULQDQ),
// where the CPU has them, a table otherwise; the SHA-256 block function
// on the SHA extensions where the CPU has them, portable C otherwise. In C because Swift cannot
// target one function at an instruction set extension with a runtime check.

#include <stddef.h>
#include <stdint.h>

/// Which implementation to use: the fastest the CPU supports, the portable one, or (CRC32C only)
/// the crc32 instruction without AVX-512 folding (tests compare them).
typedef enum { CCHECKSUM_FASTEST = 0, CCHECKSUM_PORTABLE = 1, CCHECKSUM_CRC32_INSTRUCTION = 2 } cchecksum_path;

/// Continues `crc` (0 to start) over `length` bytes. Standard CRC32C: pre- and post-inverted.
uint32_t cchecksum_crc32c(uint32_t crc, const void *data, size_t length, cchecksum_path path);

/// The CRC32C of A followed by B, from `first` (CRC32C of A), `second` (CRC32C of B) and B's
/// length: a checksum over bytes that were checksummed in two places.
uint32_t cchecksum_crc32c_combine(uint32_t first, uint32_t second, size_t second_length, cchecksum_path path);

/// Runs the SHA-256 compression function over `blocks` 64-byte blocks into `state` (FIPS 180-4).
void cchecksum_sha256_blocks(uint32_t state[8], const void *data, size_t blocks, cchecksum_path path);

#endif
