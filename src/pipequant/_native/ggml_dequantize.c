/* GGML block dequantization for every type pipequant reads, in one pass over the blocks.
 *
 * Wrapped by pipequant/kernels/ggml.py, for the codecs in pipequant/backends/gguf/codecs on CPU (their
 * torch code runs elsewhere, and is the readable statement of each layout). Every value is computed
 * with gguf-py's float32 operations in gguf-py's order (a product, then at most one addition or
 * subtraction, never fused: built with -ffp-contract=off), so the results are bit-exact with
 * gguf.quants.dequantize.
 * The output is float32, or bfloat16 rounded as torch rounds (nearest even, NaN -> 0x7FC0), which
 * saves the GGUF layer a separate conversion pass in every forward.
 *
 * Blocks are split between threads (parallel.h). Into fresh output pages a second thread gains
 * little (the kernel zeroing the pages is most of the time), into pages already mapped it halves
 * the time.
 */
#include "kernels.h" /* first: it includes Python.h */

#include "common.h"
#include "parallel.h"

/* --- one block each, into `y` (block-size floats) --- */

INLINE void q8_0(const uint8_t *b, float *y) {
    const float d = load_half(b);
    for (int i = 0; i < 32; i++) y[i] = (float)(int8_t)b[2 + i] * d;
}

INLINE void q4_0(const uint8_t *b, float *y) {
    const float d = load_half(b);
    const uint8_t *qs = b + 2;
    for (int i = 0; i < 16; i++) {
        y[i] = d * (float)((qs[i] & 0xF) - 8);
        y[i + 16] = d * (float)((qs[i] >> 4) - 8);
    }
}

INLINE void q4_1(const uint8_t *b, float *y) {
    const float d = load_half(b), m = load_half(b + 2);
    const uint8_t *qs = b + 4;
    for (int i = 0; i < 16; i++) {
        y[i] = d * (float)(qs[i] & 0xF) + m;
        y[i + 16] = d * (float)(qs[i] >> 4) + m;
    }
}

INLINE void q5_0(const uint8_t *b, float *y) {
    const float d = load_half(b);
    const uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
    const uint8_t *qs = b + 6;
    for (int i = 0; i < 16; i++) {
        y[i] = d * (float)((int)((qs[i] & 0xF) | (((qh >> i) & 1) << 4)) - 16);
        y[i + 16] = d * (float)((int)((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16);
    }
}

INLINE void q5_1(const uint8_t *b, float *y) {
    const float d = load_half(b), m = load_half(b + 2);
    const uint32_t qh = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
    const uint8_t *qs = b + 8;
    for (int i = 0; i < 16; i++) {
        y[i] = d * (float)((qs[i] & 0xF) | (((qh >> i) & 1) << 4)) + m;
        y[i + 16] = d * (float)((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) + m;
    }
}

/* In the K-quants' bit planes, sub-block j of 16 weights (of 32 in Q4_K / Q5_K) is one run of
 * consecutive bytes read at one shift; the loops go sub-block by sub-block so that each inner loop
 * is a plain vectorizable pass over a run of bytes. */

INLINE void q2_k(const uint8_t *b, float *y) {
    const uint8_t *scales = b, *qs = b + 16;
    const float d = load_half(b + 80), dmin = load_half(b + 82);
    for (int j = 0; j < 16; j++) {
        const float dl = d * (float)(scales[j] & 0xF), ml = dmin * (float)(scales[j] >> 4);
        const uint8_t *q = qs + (j / 8) * 32 + (j % 2) * 16;
        const int shift = 2 * ((j / 2) % 4);
        for (int l = 0; l < 16; l++) y[j * 16 + l] = dl * (float)((q[l] >> shift) & 3) - ml;
    }
}

INLINE void q3_k(const uint8_t *b, float *y) {
    const uint8_t *hmask = b, *qs = b + 32, *scales = b + 96;
    const float d = load_half(b + 108);
    for (int j = 0; j < 16; j++) {
        const int low_scale = (j < 8 ? scales[j] : scales[j - 8] >> 4) & 0xF;
        const int high_scale = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
        const float dl = d * (float)((int8_t)(low_scale | (high_scale << 4)) - 32);
        const uint8_t *q = qs + (j / 8) * 32 + (j % 2) * 16, *h = hmask + (j % 2) * 16;
        const int shift = 2 * ((j / 2) % 4), bit = j / 2;
        for (int l = 0; l < 16; l++) {
            const int offset = 4 - 4 * ((h[l] >> bit) & 1); /* a set bit means no -4 offset */
            y[j * 16 + l] = dl * (float)(((q[l] >> shift) & 3) - offset);
        }
    }
}

/* Q4_K / Q5_K: 6-bit scale and min of sub-block j (gguf-py's get_scale_min) */
INLINE void scale_min_k4(int j, const uint8_t *q, int *scale, int *min) {
    if (j < 4) {
        *scale = q[j] & 63;
        *min = q[j + 4] & 63;
    } else {
        *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

INLINE void q4_k(const uint8_t *b, float *y) {
    const float d = load_half(b), dmin = load_half(b + 2);
    const uint8_t *qs = b + 16;
    for (int j = 0; j < 8; j++) {
        int scale, min;
        scale_min_k4(j, b + 4, &scale, &min);
        const float dl = d * (float)scale, ml = dmin * (float)min;
        const int g = j / 2, shift = 4 * (j % 2);
        for (int l = 0; l < 32; l++) y[j * 32 + l] = dl * (float)((qs[g * 32 + l] >> shift) & 0xF) - ml;
    }
}

INLINE void q5_k(const uint8_t *b, float *y) {
    const float d = load_half(b), dmin = load_half(b + 2);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int j = 0; j < 8; j++) {
        int scale, min;
        scale_min_k4(j, b + 4, &scale, &min);
        const float dl = d * (float)scale, ml = dmin * (float)min;
        const int g = j / 2, shift = 4 * (j % 2);
        for (int l = 0; l < 32; l++) {
            const int q = ((qs[g * 32 + l] >> shift) & 0xF) | (((qh[l] >> j) & 1) << 4);
            y[j * 32 + l] = dl * (float)q - ml;
        }
    }
}

INLINE void q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *scales = (const int8_t *)(b + 192);
    const float d = load_half(b + 208);
    for (int j = 0; j < 16; j++) {
        const float dl = d * (float)scales[j];
        const int k = j % 8; /* sub-block within its half of the block */
        const uint8_t *low = ql + (j / 8) * 64 + (k % 4) * 16, *high = qh + (j / 8) * 32 + (k % 2) * 16;
        const int low_shift = 4 * (k / 4), high_shift = 2 * (k / 2);
        for (int l = 0; l < 16; l++) {
            const int q = ((low[l] >> low_shift) & 0xF) | (((high[l] >> high_shift) & 3) << 4);
            y[j * 16 + l] = dl * (float)((int8_t)q - 32);
        }
    }
}

typedef struct {
    int type;
    int block_size, block_bytes;
    const uint8_t *raw;
    void *out;
    int bf16_out;
} job;

/* torch's float -> bfloat16: round to nearest even; NaN becomes 0x7FC0 */
INLINE uint16_t to_bf16(float value) { return value != value ? 0x7FC0u : (uint16_t)(bf16_rounded_bits(value) >> 16); }

INLINE void store(const job *work, int64_t first, const float *values, int count) {
    if (work->bf16_out) {
        uint16_t *out = (uint16_t *)work->out + first;
        for (int i = 0; i < count; i++) out[i] = to_bf16(values[i]);
    } else {
        memcpy((float *)work->out + first, values, (size_t)count * sizeof(float));
    }
}

/* the plain float types: their "blocks" are single values, converted in runs of QK_K, straight
 * into a float32 output */
INLINE void float_values(const job *work, int64_t begin, int64_t end) {
    float staged[QK_K];
    uint16_t halves[QK_K];
    for (int64_t start = begin; start < end; start += QK_K) {
        const int count = (int)(end - start < QK_K ? end - start : QK_K);
        const uint8_t *in = work->raw + start * work->block_bytes;
        float *values = work->bf16_out ? staged : (float *)work->out + start;
        if (work->type == F32) {
            memcpy(values, in, (size_t)count * sizeof(float));
        } else {
            memcpy(halves, in, (size_t)count * sizeof(uint16_t));
            if (work->type == F16) {
                for (int i = 0; i < count; i++) values[i] = half_to_float(halves[i]);
            } else {
                for (int i = 0; i < count; i++) values[i] = from_bits((uint32_t)halves[i] << 16);
            }
        }
        if (work->bf16_out) store(work, start, staged, count);
    }
}

/* each type's loop written out, so that its block function is inlined into every clone */
#define EACH_BLOCK(decode)                                                                        \
    if (!work->bf16_out) {                                                                        \
        for (int64_t i = begin; i < end; i++) {                                                   \
            decode(work->raw + i * work->block_bytes, (float *)work->out + i * work->block_size); \
        }                                                                                         \
    } else { /* QK_K values at a time, converted in one loop */                                   \
        const int per_run = QK_K / work->block_size;                                              \
        for (int64_t i = begin; i < end; i += per_run) {                                          \
            const int count = end - i < per_run ? (int)(end - i) : per_run;                       \
            for (int k = 0; k < count; k++) {                                                     \
                decode(work->raw + (i + k) * work->block_bytes, values + k * work->block_size);   \
            }                                                                                     \
            store(work, i * work->block_size, values, count * work->block_size);                  \
        }                                                                                         \
    }                                                                                             \
    break;

BLOCK_KERNEL static void run_blocks(void *context, int64_t begin, int64_t end) {
    const job *work = context;
    float values[QK_K];
    switch (work->type) {
        case Q8_0: EACH_BLOCK(q8_0)
        case Q4_0: EACH_BLOCK(q4_0)
        case Q4_1: EACH_BLOCK(q4_1)
        case Q5_0: EACH_BLOCK(q5_0)
        case Q5_1: EACH_BLOCK(q5_1)
        case Q2_K: EACH_BLOCK(q2_k)
        case Q3_K: EACH_BLOCK(q3_k)
        case Q4_K: EACH_BLOCK(q4_k)
        case Q5_K: EACH_BLOCK(q5_k)
        case Q6_K: EACH_BLOCK(q6_k)
        default: float_values(work, begin, end);
    }
}

PyObject *ggml_dequantize(PyObject *self, PyObject *args) {
    (void)self;
    int type, bf16_out, threads;
    unsigned long long raw, out;
    Py_ssize_t blocks;
    if (!PyArg_ParseTuple(args, "iKnKii", &type, &raw, &blocks, &out, &bf16_out, &threads)) return NULL;
    job work = {type, ggml_block_weights(type), ggml_block_bytes(type), (const uint8_t *)(uintptr_t)raw,
                (void *)(uintptr_t)out, bf16_out};
    if (work.block_bytes == 0) {
        PyErr_Format(PyExc_ValueError, "no dequantizer for GGML type %d", type);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    const size_t out_bytes = (size_t)work.block_size * (bf16_out ? 2 : 4);
    run_parallel_paged(run_blocks, &work, blocks, threads, work.out, out_bytes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
