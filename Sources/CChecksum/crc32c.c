#include "CChecksum.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Reflected CRC32C polynomial: bit i is the coefficient of x^(31-i).
#define POLY 0x82F63B78u

static uint32_t table[8][256];
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int hardware;
// x^(2^k) mod P, reflected, for k = 0...63: powers of x by squaring, for combining CRCs.
static uint32_t squares[64];

#if defined(__x86_64__)
// Three streams of STRIDE bytes each are checksummed at once (the crc32 instruction has a latency
// of three cycles and a throughput of one), then combined: crc(A || B) = crc(A) * x^(8|B|) ^ crc(B).
enum { LONG_STRIDE = 1024, SHORT_STRIDE = 128 };
static uint64_t long_shift[2], short_shift[2];
// Buffers of at least FOLD_MINIMUM bytes go through four 512-bit lanes of carry-less folding where
// the CPU has AVX-512 and VPCLMULQDQ (each multiply-add moves 16 bytes 256 bytes further, 16 at a
// time), then the crc32 instruction over the last 16 bytes. FOLD_DISTANCES are the distances in
// bits a fold moves data; fold_constants[i] are the two multipliers for FOLD_DISTANCES[i].
enum { FOLD_MINIMUM = 256 };
enum { FOLD_2048, FOLD_1536, FOLD_1024, FOLD_512, FOLD_384, FOLD_256, FOLD_128, FOLD_COUNT };
static const uint64_t FOLD_DISTANCES[FOLD_COUNT] = {2048, 1536, 1024, 512, 384, 256, 128};
static uint64_t fold_constants[FOLD_COUNT][2];
static int folding;
#endif

// a * b mod P, both reflected (bit 31 is x^0), one bit of `a` at a time.
static uint32_t multiply(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (uint32_t bit = 0x80000000u; bit != 0; bit >>= 1) {
        if (a & bit) product ^= b;
        b = (b >> 1) ^ (POLY & (0u - (b & 1u)));
    }
    return product;
}

// x^n mod P, reflected, by squares: one multiplication per set bit of n.
static uint32_t x_to_the_power(uint64_t n) {
    uint32_t value = 0x80000000u;  // x^0
    for (int k = 0; n != 0; k++, n >>= 1) {
        if (n & 1) value = multiply(squares[k], value);
    }
    return value;
}

static void initialize(void) {
    squares[0] = 0x40000000u;  // x^1
    for (int k = 1; k < 64; k++) squares[k] = multiply(squares[k - 1], squares[k - 1]);
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t crc = i;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (POLY & (0u - (crc & 1u)));
        table[0][i] = crc;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    hardware = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul");
    // A carry-less product of two reflected 32-bit values is the product times x (as a reflected
    // 64-bit value), and crc32 of a 64-bit value multiplies by x^32: shifting a CRC over n bytes
    // therefore takes the constant x^(8n - 33).
    long_shift[0] = x_to_the_power(8 * LONG_STRIDE - 33);
    long_shift[1] = x_to_the_power(16 * LONG_STRIDE - 33);
    short_shift[0] = x_to_the_power(8 * SHORT_STRIDE - 33);
    short_shift[1] = x_to_the_power(16 * SHORT_STRIDE - 33);
    folding = hardware && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
    // A 16-byte block's first 8 bytes are the high-order half: moving the block d bits on
    // multiplies them by x^(d+64) and the second half by x^d, less the 33 of the shift above.
    for (int i = 0; i < FOLD_COUNT; i++) {
        fold_constants[i][0] = x_to_the_power(FOLD_DISTANCES[i] + 64 - 33);
        fold_constants[i][1] = x_to_the_power(FOLD_DISTANCES[i] - 33);
    }
#endif
}

static uint32_t software(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        word ^= crc;
        crc = table[7][word & 0xFF] ^ table[6][(word >> 8) & 0xFF] ^ table[5][(word >> 16) & 0xFF] ^
              table[4][(word >> 24) & 0xFF] ^ table[3][(word >> 32) & 0xFF] ^ table[2][(word >> 40) & 0xFF] ^
              table[1][(word >> 48) & 0xFF] ^ table[0][word >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2,pclmul"))) static uint32_t shift(uint32_t crc, uint64_t constant) {
    __m128i product = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)crc), _mm_cvtsi64_si128((long long)constant), 0);
    return (uint32_t)__builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(product));
}

__attribute__((target("sse4.2,pclmul"))) static uint64_t interleaved(
    uint64_t c0, const unsigned char **pointer, size_t *remaining, size_t stride, const uint64_t constants[2]
) {
    const unsigned char *p = *pointer;
    size_t n = *remaining;
    while (n >= 3 * stride) {
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < stride; i += 8) {
            uint64_t w0, w1, w2;
            memcpy(&w0, p + i, 8);
            memcpy(&w1, p + stride + i, 8);
            memcpy(&w2, p + 2 * stride + i, 8);
            c0 = __builtin_ia32_crc32di(c0, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
        }
        c0 = shift((uint32_t)c0, constants[1]) ^ shift((uint32_t)c1, constants[0]) ^ c2;
        p += 3 * stride;
        n -= 3 * stride;
    }
    *pointer = p;
    *remaining = n;
    return c0;
}

__attribute__((target("sse4.2,pclmul"))) static uint32_t accelerated(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    c = interleaved(c, &p, &n, LONG_STRIDE, long_shift);
    c = interleaved(c, &p, &n, SHORT_STRIDE, short_shift);
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

#if defined(__x86_64__)
#define FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))

// `block` moved on by the distance whose multipliers `constants` holds (both halves of every lane),
// added to `onto` (0x96: three-way exclusive or).
FOLD_TARGET static inline __m512i fold512(__m512i block, __m512i constants, __m512i onto) {
    return _mm512_ternarylogic_epi64(
        _mm512_clmulepi64_epi128(block, constants, 0x00), _mm512_clmulepi64_epi128(block, constants, 0x11), onto, 0x96
    );
}

FOLD_TARGET static inline __m128i fold128(__m128i block, int distance) {
    __m128i constants = _mm_loadu_si128((const __m128i *)fold_constants[distance]);
    return _mm_xor_si128(_mm_clmulepi64_si128(block, constants, 0x00), _mm_clmulepi64_si128(block, constants, 0x11));
}

FOLD_TARGET static inline __m512i broadcast(int distance) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)fold_constants[distance]));
}

// At least FOLD_MINIMUM bytes. The CRC register is added to the first four bytes; folding keeps
// the remainder modulo P of everything before the block it folds into, so the crc32 instruction
// over the last 16-byte block (from 0) and the tail finishes the checksum.
FOLD_TARGET static uint32_t folded(uint32_t crc, const unsigned char *p, size_t n) {
    __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)crc)));
    __m512i x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128), x3 = _mm512_loadu_si512(p + 192);
    p += 256;
    n -= 256;
    const __m512i by2048 = broadcast(FOLD_2048);
    while (n >= 256) {
        x0 = fold512(x0, by2048, _mm512_loadu_si512(p));
        x1 = fold512(x1, by2048, _mm512_loadu_si512(p + 64));
        x2 = fold512(x2, by2048, _mm512_loadu_si512(p + 128));
        x3 = fold512(x3, by2048, _mm512_loadu_si512(p + 192));
        p += 256;
        n -= 256;
    }
    const __m512i by512 = broadcast(FOLD_512);
    x3 = fold512(x0, broadcast(FOLD_1536), fold512(x1, broadcast(FOLD_1024), fold512(x2, by512, x3)));
    while (n >= 64) {
        x3 = fold512(x3, by512, _mm512_loadu_si512(p));
        p += 64;
        n -= 64;
    }
    __m128i v = _mm_xor_si128(fold128(_mm512_extracti32x4_epi32(x3, 0), FOLD_384), fold128(_mm512_extracti32x4_epi32(x3, 1), FOLD_256));
    v = _mm_xor_si128(v, fold128(_mm512_extracti32x4_epi32(x3, 2), FOLD_128));
    v = _mm_xor_si128(v, _mm512_extracti32x4_epi32(x3, 3));
    while (n >= 16) {
        v = _mm_xor_si128(fold128(v, FOLD_128), _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    uint64_t c = __builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(v));
    c = __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(v, 1));
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t cchecksum_crc32c(uint32_t crc, const void *data, size_t length, cchecksum_path path) {
    pthread_once(&once, initialize);
    crc = ~crc;
#if defined(__x86_64__)
    if (folding && path == CCHECKSUM_FASTEST && length >= FOLD_MINIMUM) return ~folded(crc, data, length);
    if (hardware && path != CCHECKSUM_PORTABLE) return ~accelerated(crc, data, length);
#endif
    return ~software(crc, data, length);
}

// crc(A || B) = crc(A) * x^(8|B|) + crc(B) mod P: the pre- and post-inversions cancel.
uint32_t cchecksum_crc32c_combine(uint32_t first, uint32_t second, size_t second_length, cchecksum_path path) {
    if (second_length == 0) return first ^ second;
    pthread_once(&once, initialize);
    uint64_t bits = 8 * (uint64_t)second_length;
#if defined(__x86_64__)
    if (hardware && path != CCHECKSUM_PORTABLE && bits >= 33) {
        // The shift constant for a length costs a dozen multiplications; a writer's records mostly
        // share a few lengths, so each thread keeps the last one.
        static _Thread_local uint64_t cached_bits = 0;
        static _Thread_local uint64_t cached_constant = 0;
        if (cached_bits != bits) {
            cached_constant = x_to_the_power(bits - 33);
            cached_bits = bits;
        }
        return shift(first, cached_constant) ^ second;
    }
#endif
    return multiply(x_to_the_power(bits), first) ^ second;
}
