/* GGML's 32-weight block quantizers (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), with gguf-py's exact bytes.
 *
 * Used by pipequant/backends/gguf/codecs/legacy.py on CPU (its torch codecs, which give the same bytes,
 * run elsewhere). The arithmetic is gguf-py's (gguf/quants.py), in float32 and in its order:
 *   Q8_0: d = absmax / 127, q = roundf(x * (1 / d)) (half away from zero, as np_roundf);
 *   Q4_0 / Q5_0: m = the value of largest magnitude (the first on ties), d = m / -8 (-16),
 *         q = trunc(x * (1 / d) + 8.5 (16.5)), at most 15 (31);
 *   Q4_1 / Q5_1: d = (max - min) / 15 (31), q = trunc((x - min) * (1 / d) + 0.5), at most 15 (31);
 * with 1 / d taken as 0 where d is 0, and the scales stored as float16 (nearest even).
 * A NaN in a block makes its scale NaN as in numpy (argmax takes the first NaN, which keeps its sign;
 * min and max give the positive quiet NaN) and every level 0 (numpy's cast of NaN to an integer on
 * the machines we build for; in C the cast would be undefined, so it is spelled out). The one
 * difference: a NaN scale is stored as float16 0x7E00 with its sign, without the float's other
 * payload bits, which only NaNs made on purpose carry (arithmetic makes the default NaN).
 * ggml_quantize.c splits the blocks between threads.
 */
#include <math.h>

#include "ggml_quantize.h"

#define QK 32 /* weights per block of every type here (common.h) */

INLINE float inverse_or_zero(float d) { return d == 0.0f ? 0.0f : 1.0f / d; }

/* trunc(v) as a level in 0..top; NaN (a NaN scale, or inf * 0) is level 0 as numpy casts it */
INLINE uint8_t level(float v, int top) {
    if (isnan(v)) return 0;
    const int32_t truncated = (int32_t)v; /* the sums are never negative, and at most top + 1 */
    return (uint8_t)(truncated < top ? truncated : top);
}

/* the value of largest magnitude, the first one on ties (numpy's argmax of abs, where NaN is largest) */
INLINE float signed_absmax(const float *x) {
    float largest = x[0], magnitude = fabsf(x[0]);
    for (int i = 0; i < QK; i++) {
        if (isnan(x[i])) return x[i];
    }
    for (int i = 1; i < QK; i++) {
        if (fabsf(x[i]) > magnitude) {
            magnitude = fabsf(x[i]);
            largest = x[i];
        }
    }
    return largest;
}

/* min and max, the first one on ties (so the sign of a zero is the first zero's); with a NaN both are
 * the positive quiet NaN numpy's reductions return, whatever the NaN's sign and payload */
INLINE void min_max(const float *x, float *min, float *max) {
    for (int i = 0; i < QK; i++) {
        if (isnan(x[i])) {
            *min = *max = from_bits(0x7FC00000u);
            return;
        }
    }
    *min = *max = x[0];
    for (int i = 1; i < QK; i++) {
        if (x[i] < *min) *min = x[i];
        if (x[i] > *max) *max = x[i];
    }
}

/* q of the 32 weights: the low 4 bits packed two per byte, then (5-bit types) the high bits */
INLINE void pack_nibbles(const uint8_t *q, uint8_t *out) {
    for (int i = 0; i < QK / 2; i++) out[i] = (uint8_t)((q[i] & 0xF) | (q[i + QK / 2] << 4));
}

INLINE void pack_high_bits(const uint8_t *q, uint8_t *out) {
    uint32_t bits = 0;
    for (int i = 0; i < QK; i++) bits |= (uint32_t)(q[i] >> 4) << i;
    for (int k = 0; k < 4; k++) out[k] = (uint8_t)(bits >> (8 * k));
}

INLINE void q8_0(const float *x, uint8_t *out) {
    uint32_t largest = 0; /* |x| as bits: non-negative floats order like them */
    for (int i = 0; i < QK; i++) {
        const uint32_t magnitude = to_bits(x[i]) & 0x7FFFFFFFu;
        largest = magnitude > largest ? magnitude : largest;
    }
    const float d = from_bits(largest) / 127;
    const float id = inverse_or_zero(d);
    int8_t q[QK];
    for (int i = 0; i < QK; i++) {
        /* gguf-py's np_roundf, half away from zero: adding the float just below 0.5 and truncating is
         * exact for every float (the sum rounds up exactly when the fraction is 0.5 or more) */
        const float v = x[i] * id;
        const int32_t rounded = (int32_t)(fabsf(v) + 0.49999997f);
        q[i] = (int8_t)(v < 0 ? -rounded : rounded);
    }
    memcpy(out + 2, q, QK);
    store_half(out, d);
}

/* Q4_0 (levels 16) and Q5_0 (levels 32) */
INLINE void symmetric(const float *x, uint8_t *out, int levels) {
    uint8_t q[QK];
    const float d = signed_absmax(x) / (float)(-levels / 2);
    const float id = inverse_or_zero(d);
    const float offset = (float)(levels / 2) + 0.5f;
    for (int i = 0; i < QK; i++) q[i] = level(x[i] * id + offset, levels - 1);
    store_half(out, d);
    if (levels == 16) {
        pack_nibbles(q, out + 2);
    } else {
        pack_high_bits(q, out + 2);
        pack_nibbles(q, out + 6);
    }
}

/* Q4_1 (levels 16) and Q5_1 (levels 32) */
INLINE void with_min(const float *x, uint8_t *out, int levels) {
    uint8_t q[QK];
    float min, max;
    min_max(x, &min, &max);
    const float d = (max - min) / (float)(levels - 1);
    const float id = inverse_or_zero(d);
    for (int i = 0; i < QK; i++) q[i] = level((x[i] - min) * id + 0.5f, levels - 1);
    store_half(out, d);
    store_half(out + 2, min);
    if (levels == 16) {
        pack_nibbles(q, out + 4);
    } else {
        pack_high_bits(q, out + 4);
        pack_nibbles(q, out + 8);
    }
}

BLOCK_KERNEL void run_legacy_blocks(void *context, int64_t begin, int64_t end) {
    const quantize_job *work = context;
    float x[QK];
    for (int64_t b = begin; b < end; b++) {
        const float *block = source_values(work->source, work->dtype, b * QK, QK, x);
        uint8_t *out = work->out + b * work->block_bytes;
        switch (work->type) {
            case Q8_0: q8_0(block, out); break;
            case Q4_0: symmetric(block, out, 16); break;
            case Q5_0: symmetric(block, out, 32); break;
            case Q4_1: with_min(block, out, 16); break;
            default: with_min(block, out, 32);
        }
    }
}
