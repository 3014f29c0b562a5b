/* What the kernels share: the GGML types and their block sizes, float bit helpers (half and bfloat16 conversions as
 * torch and numpy round them), and the macros that build their loops for several x86 targets. */
#ifndef PIPEQUANT_COMMON_H
#define PIPEQUANT_COMMON_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* GCC on x86-64: kernels are also built for AVX2 and AVX-512 CPUs, and the one for the CPU runs */
#define PIPEQUANT_X86_BUILDS 1
/* the block loops run in AVX2 / AVX-512 registers where the CPU has them; the loader picks the copy */
#define BLOCK_KERNEL __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PIPEQUANT_X86_BUILDS 0
#define BLOCK_KERNEL
#endif
/* for everything a BLOCK_KERNEL calls: inlined into each of its copies, so compiled for that target */
#define INLINE static inline __attribute__((always_inline))

#define QK_K 256

/* The GGML types pipequant reads and writes, each GGML_TYPE(name, type id as gguf's GGMLQuantizationType,
 * weights per block, bytes per block), as gguf-py's GGML_QUANT_SIZES. The Python side has the same table
 * (pipequant/backends/gguf/codecs/table.py); tests/backends/gguf/codecs/test_table.py reads this list and
 * checks that the two agree. Everything below derives from it. */
#define GGML_TYPE_LIST(GGML_TYPE)  \
    GGML_TYPE(F32, 0, 1, 4)        \
    GGML_TYPE(F16, 1, 1, 2)        \
    GGML_TYPE(Q4_0, 2, 32, 18)     \
    GGML_TYPE(Q4_1, 3, 32, 20)     \
    GGML_TYPE(Q5_0, 6, 32, 22)     \
    GGML_TYPE(Q5_1, 7, 32, 24)     \
    GGML_TYPE(Q8_0, 8, 32, 34)     \
    GGML_TYPE(Q2_K, 10, QK_K, 84)  \
    GGML_TYPE(Q3_K, 11, QK_K, 110) \
    GGML_TYPE(Q4_K, 12, QK_K, 144) \
    GGML_TYPE(Q5_K, 13, QK_K, 176) \
    GGML_TYPE(Q6_K, 14, QK_K, 210) \
    GGML_TYPE(BF16, 30, 1, 2)

/* each type's number (Q4_K) and bytes per block (Q4_K_BYTES) */
#define GGML_TYPE_ID(name, id, weights, bytes) name = id,
#define GGML_TYPE_BYTES(name, id, weights, bytes) name##_BYTES = bytes,
enum { GGML_TYPE_LIST(GGML_TYPE_ID) };
enum { GGML_TYPE_LIST(GGML_TYPE_BYTES) };

/* weights per block of a type; 0 for a number that is not one of the types */
static inline int ggml_block_weights(int type) {
#define GGML_TYPE_WEIGHTS_CASE(name, id, weights, bytes) \
    case id: return weights;
    switch (type) { GGML_TYPE_LIST(GGML_TYPE_WEIGHTS_CASE) default: return 0; }
#undef GGML_TYPE_WEIGHTS_CASE
}

/* bytes per block of a type; 0 for a number that is not one of the types */
static inline int ggml_block_bytes(int type) {
#define GGML_TYPE_BYTES_CASE(name, id, weights, bytes) \
    case id: return bytes;
    switch (type) { GGML_TYPE_LIST(GGML_TYPE_BYTES_CASE) default: return 0; }
#undef GGML_TYPE_BYTES_CASE
}

INLINE float from_bits(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

INLINE uint32_t to_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* IEEE half -> float, exactly, without branches (so loops over it vectorize): the half's exponent
 * and mantissa bits, placed in a float and scaled by 2^112, are the value (subnormals included);
 * inf and NaN get the all-ones exponent back. */
INLINE float half_to_float(uint16_t half) {
    float magnitude = from_bits((uint32_t)(half & 0x7FFFu) << 13) * 0x1p112f;
    uint32_t bits = to_bits(magnitude);
    bits |= magnitude >= 65536.0f ? 0x7F800000u : 0u;
    return from_bits(bits | ((uint32_t)(half & 0x8000u) << 16));
}

/* float -> IEEE half, round to nearest even (subnormals, overflow to inf, NaN kept a NaN) */
INLINE uint16_t half_from_float(float value) {
    uint32_t bits = to_bits(value);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    bits &= 0x7FFFFFFFu;
    if (bits >= 0x47800000u) return sign | (bits > 0x7F800000u ? 0x7E00u : 0x7C00u); /* >= 65536, inf, NaN */
    if (bits < 0x38800000u) { /* below the smallest normal half: adding 0.5 lines the half's bits up, rounded */
        return sign | (uint16_t)(to_bits(from_bits(bits) + 0.5f) - 0x3F000000u);
    }
    uint32_t odd = (bits >> 13) & 1u;
    bits += 0xC8000FFFu + odd; /* exponent rebias by -112, plus rounding */
    return sign | (uint16_t)(bits >> 13);
}

/* the float rounded to the nearest float16 value (ties to even), as a float: what torch's
 * .to(float16) keeps of it, computed without branches so that loops over it vectorize. Adding and
 * subtracting c = 2^13 times the value's leading power of two (at least 2^-1, float16's subnormal
 * spacing times 2^23) rounds at float16's spacing; from 65520 up the result is inf. A NaN stays NaN. */
INLINE float round_to_half(float value) {
    const uint32_t bits = to_bits(value);
    const float magnitude = from_bits(bits & 0x7FFFFFFFu);
    const float scaled_leading = from_bits(bits & 0x7F800000u) * 8192.0f;
    const float c = scaled_leading > 0.5f ? scaled_leading : 0.5f;
    const float rounded = (magnitude + c) - c;
    const uint32_t result = to_bits(magnitude >= 65520.0f ? from_bits(0x7F800000u) : rounded);
    return from_bits(result | (bits & 0x80000000u));
}

/* the float's bits rounded to the nearest bfloat16 value, ties to even, as torch rounds to bfloat16:
 * the result in the upper 16 bits, zeros below. NaN is the caller's case (this may carry it to inf). */
INLINE uint32_t bf16_rounded_bits(float value) {
    const uint32_t bits = to_bits(value);
    return (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
}

/* the dtype of the weights a kernel reads, as the Python side numbers it */
enum source_dtype { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

/* values [start, start + count) of a float32, bfloat16 or float16 array as float32 (exactly): the
 * array itself when it is float32, else converted into x, one loop per dtype so each vectorizes */
INLINE const float *source_values(const void *source, enum source_dtype dtype, int64_t start, int count, float *x) {
    if (dtype == FLOAT32) return (const float *)source + start;
    const uint16_t *bits = (const uint16_t *)source + start;
    if (dtype == BFLOAT16) {
        for (int i = 0; i < count; i++) x[i] = from_bits((uint32_t)bits[i] << 16);
    } else {
        for (int i = 0; i < count; i++) x[i] = half_to_float(bits[i]);
    }
    return x;
}

/* a float16 field of a block, little-endian, rounded to nearest even */
INLINE void store_half(uint8_t *out, float value) {
    const uint16_t half = half_from_float(value);
    out[0] = (uint8_t)(half & 0xFF);
    out[1] = (uint8_t)(half >> 8);
}

INLINE float load_half(const uint8_t *in) { return half_to_float((uint16_t)(in[0] | (in[1] << 8))); }

#endif
