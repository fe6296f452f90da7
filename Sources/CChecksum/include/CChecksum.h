#ifndef CCHECKSUM_H
#define CCHECKSUM_H

// CRC32C (Castagnoli) for log records: the SSE4.2 crc32 instruction where the CPU has it,
// a table otherwise. In C because Swift cannot target one function at SSE4.2 with a runtime check.

#include <stddef.h>
#include <stdint.h>

/// Continues `crc` (0 to start) over `length` bytes. Standard CRC32C: pre- and post-inverted.
uint32_t cchecksum_crc32c(uint32_t crc, const void *data, size_t length);

#endif
