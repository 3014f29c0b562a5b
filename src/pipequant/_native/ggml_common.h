/* What the GGML kernels (kquants.c, ggml_dequantize.c) share: type numbers, float bit helpers, and
 * the macros that build their loops for several x86 targets. */
#ifndef PIPEQUANT_GGML_COMMON_H
#define PIPEQUANT_GGML_COMMON_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* the block loops run in AVX2 / AVX-512 registers where the CPU has them; the loader picks the copy */
#define BLOCK_KERNEL __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define BLOCK_KERNEL
#endif
/* for everything a BLOCK_KERNEL calls: inlined into each of its copies, so compiled for that target */
#define INLINE static inline __attribute__((always_inline))

#define QK_K 256

/* GGML type numbers, as gguf's GGMLQuantizationType */
enum {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

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

INLINE float load_half(const uint8_t *in) { return half_to_float((uint16_t)(in[0] | (in[1] << 8))); }

#endif
