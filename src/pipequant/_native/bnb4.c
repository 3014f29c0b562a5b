/* bitsandbytes' 4-bit blockwise quantization (nf4, fp4) in one pass, with bitsandbytes' exact bytes.
 *
 * Wrapped by pipequant/kernels/bnb4.py; pipequant/backends/bnb_chunked.py checks the first blocks of
 * every weight against bitsandbytes' own quantize_4bit. The arithmetic is that of bitsandbytes' CPU kernel
 * (backends/default/ops.py): per block of `blocksize` weights in float32, absmax = max |x|;
 * scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1), and for a trailing partial block
 * clamp(x / max(absmax, 1e-38), -1, 1), whose stored absmax is the clamped one; the 4-bit code is
 * the number of code midpoints below the scaled value (torch.bucketize), mapped through `order`
 * for fp4; two codes per byte, the first in the high nibble, an odd count padded with the code of
 * 0. The midpoints and order come from bitsandbytes itself. Blocks are split between threads.
 */
#include "kernels.h" /* first: it includes Python.h */

#include <math.h>

#include "common.h"
#include "parallel.h"

#define MAX_BLOCKSIZE 4096

typedef struct {
    const void *source;
    enum source_dtype dtype;
    int64_t count;
    int blocksize;
    const float *bounds; /* the 15 midpoints between sorted code values */
    const int32_t *order; /* code index of each bucket; NULL for nf4, whose code is sorted */
    uint8_t *packed;
    float *absmax;
} job;

/* torch.clamp(value, -1, 1): a NaN stays NaN */
INLINE float clamp_unit(float value) { return value < -1.0f ? -1.0f : (value > 1.0f ? 1.0f : value); }

BLOCK_KERNEL static void run_blocks(void *context, int64_t begin, int64_t end) {
    const job *work = context;
    float converted[MAX_BLOCKSIZE], scaled[MAX_BLOCKSIZE + 1], bounds[15];
    uint8_t codes[MAX_BLOCKSIZE + 1];
    memcpy(bounds, work->bounds, sizeof bounds);
    for (int64_t b = begin; b < end; b++) {
        const int64_t start = b * work->blocksize;
        const int length = (int)(work->count - start < work->blocksize ? work->count - start : work->blocksize);
        const float *x = source_values(work->source, work->dtype, start, length, converted);
        uint32_t largest = 0; /* as bits: non-negative floats order like them, and a NaN is above inf */
        for (int i = 0; i < length; i++) {
            const uint32_t magnitude = to_bits(x[i]) & 0x7FFFFFFFu;
            largest = magnitude > largest ? magnitude : largest;
        }
        const float absmax = from_bits(largest);
        const float floor_absmax = absmax < 1e-38f ? 1e-38f : absmax;
        if (length == work->blocksize) {
            work->absmax[b] = absmax;
            const float inverse = 1.0f / floor_absmax;
            for (int i = 0; i < length; i++) scaled[i] = clamp_unit(x[i] * inverse);
        } else { /* the trailing partial block: a division, and the clamped absmax is stored */
            work->absmax[b] = floor_absmax;
            for (int i = 0; i < length; i++) scaled[i] = clamp_unit(x[i] / floor_absmax);
        }
        int count = length;
        if (length % 2) scaled[count++] = 0.0f; /* the pad of an odd count */
        /* the bucket of each value: how many midpoints lie below it (a pass per midpoint vectorizes) */
        memset(codes, 0, (size_t)count);
        for (int k = 0; k < 15; k++) {
            for (int i = 0; i < count; i++) codes[i] += bounds[k] < scaled[i];
        }
        if (work->order) {
            for (int i = 0; i < count; i++) codes[i] = (uint8_t)work->order[codes[i]];
        }
        for (int i = 0; i < count; i += 2) work->packed[start / 2 + i / 2] = (uint8_t)((codes[i] << 4) | codes[i + 1]);
    }
}

PyObject *bnb4_quantize(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long source, bounds, order, packed, absmax;
    int dtype, blocksize, threads;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "KinKKiKKi", &source, &dtype, &count, &bounds, &order, &blocksize, &packed, &absmax,
                          &threads)) {
        return NULL;
    }
    if (blocksize < 2 || blocksize > MAX_BLOCKSIZE || blocksize % 2) {
        PyErr_Format(PyExc_ValueError, "blocksize %d: expected an even size up to %d", blocksize, MAX_BLOCKSIZE);
        return NULL;
    }
    if (dtype < FLOAT32 || dtype > FLOAT16) {
        PyErr_SetString(PyExc_ValueError, "the source must be float32 (0), bfloat16 (1) or float16 (2)");
        return NULL;
    }
    job work = {(const void *)(uintptr_t)source, (enum source_dtype)dtype, count, blocksize,
                (const float *)(uintptr_t)bounds, (const int32_t *)(uintptr_t)order, (uint8_t *)(uintptr_t)packed,
                (float *)(uintptr_t)absmax};
    const int64_t blocks = (count + blocksize - 1) / blocksize;
    Py_BEGIN_ALLOW_THREADS
    run_parallel(run_blocks, &work, blocks, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
