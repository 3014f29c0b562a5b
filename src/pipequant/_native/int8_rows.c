/* Per-row symmetric int8 quantization in one pass, with quanto's, torchao's and bitsandbytes' exact arithmetic.
 *
 * Wrapped by pipequant/kernels/int8_rows.py; pipequant/backends/int8_rows.py documents why and checks
 * the bytes. Each function takes raw pointers to contiguous CPU buffers (a torch tensor's data_ptr()),
 * a row-major weight of `rows` x `columns` in float32 or bfloat16 (common.h's source_dtype), and a
 * thread count; it releases the GIL and splits the rows between threads (parallel.h).
 *
 * Floats are handled through their bit patterns where that is exact: a bf16 value is the top half
 * of a float32, and non-negative floats order like their bits, so a row's absolute maximum is an
 * integer maximum (a NaN compares above inf and so propagates, as torch's amax does).
 */
#include "kernels.h" /* first: it includes Python.h */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* rintf and the float-to-int conversions vectorize only from SSE4.1; the loader picks the best copy */
#define ROW_KERNEL __attribute__((target_clones("arch=x86-64-v4", "avx2", "sse4.1", "default")))
#else
#define ROW_KERNEL
#endif

/* the float rounded to the nearest bfloat16, ties to even, as torch rounds a bf16 result. No NaN
 * case: the NaNs arithmetic makes here are quiet (bit 22 set), so they stay NaN or become -0, and
 * to_int8 sends both to 0, as torch does with the NaN. */
INLINE float round_to_bf16(float value) { return from_bits(bf16_rounded_bits(value)); }

/* round half to even, clamp to [-128, 127]; NaN becomes 0, as torch's cast of a NaN does here */
INLINE int8_t to_int8(float value) {
    float rounded = rintf(value);
    float clamped = rounded < -128.0f ? -128.0f : (rounded > 127.0f ? 127.0f : rounded);
    return value == value ? (int8_t)(int32_t)clamped : 0;
}

enum library { QUANTO, TORCHAO, BITSANDBYTES };

typedef struct {
    enum library library;
    const void *weight;
    int bf16;
    int64_t columns;
    int8_t *data;
    void *scale;
} job;

/* --- one row, for each weight dtype. quanto: scale = absmax / 127 and data = round(weight / scale),
 * each rounded to the weight's dtype. torchao: scale = max(absmax / 127.5 in the weight's dtype, 2^-23)
 * kept in float32, and data = round(weight * (1 / scale)) in float32. */

ROW_KERNEL static void bf16_row(enum library library, const uint16_t *row, int64_t columns, int8_t *data, void *scale_out,
                                int64_t index) {
    uint16_t largest = 0;
    for (int64_t c = 0; c < columns; c++) {
        uint16_t magnitude = row[c] & 0x7FFFu;
        largest = magnitude > largest ? magnitude : largest;
    }
    float absmax = from_bits((uint32_t)largest << 16);
    if (library == QUANTO) {
        float scale = round_to_bf16(absmax / 127.0f);
        ((uint16_t *)scale_out)[index] = (uint16_t)(to_bits(scale) >> 16);
        for (int64_t c = 0; c < columns; c++) {
            data[c] = to_int8(round_to_bf16(from_bits((uint32_t)row[c] << 16) / scale));
        }
    } else {
        float scale = round_to_bf16(absmax / 127.5f);
        if (scale < 0x1p-23f) scale = 0x1p-23f; /* torch.clamp keeps a NaN, as this comparison does */
        ((float *)scale_out)[index] = scale;
        float inverse = 1.0f / scale;
        for (int64_t c = 0; c < columns; c++) {
            data[c] = to_int8(from_bits((uint32_t)row[c] << 16) * inverse);
        }
    }
}

ROW_KERNEL static void float32_row(enum library library, const uint32_t *row, int64_t columns, int8_t *data,
                                   void *scale_out, int64_t index) {
    uint32_t largest = 0;
    for (int64_t c = 0; c < columns; c++) {
        uint32_t magnitude = row[c] & 0x7FFFFFFFu;
        largest = magnitude > largest ? magnitude : largest;
    }
    float absmax = from_bits(largest);
    if (library == QUANTO) {
        float scale = absmax / 127.0f;
        ((float *)scale_out)[index] = scale;
        for (int64_t c = 0; c < columns; c++) data[c] = to_int8(from_bits(row[c]) / scale);
    } else {
        float scale = absmax / 127.5f;
        if (scale < 0x1p-23f) scale = 0x1p-23f;
        ((float *)scale_out)[index] = scale;
        float inverse = 1.0f / scale;
        for (int64_t c = 0; c < columns; c++) data[c] = to_int8(from_bits(row[c]) * inverse);
    }
}

/* bitsandbytes (LLM.int8, as Linear8bitLt stores it): the weight rounded to float16 first, as
 * pipequant hands it over; scale = the row's absmax in float32, data = round(weight * multiplier)
 * with multiplier = (1 / absmax) * 127, the two roundings of torch's 127.0 / tensor. */
/* the row's values as float32: ROW_VALUE(c) for a bf16 (bits) or float32 row */
#define BITSANDBYTES_ROW(name, element_type, ROW_VALUE)                                                            \
    ROW_KERNEL static void name(const element_type *row, int64_t columns, int8_t *data, float *scale_out,         \
                                int64_t index) {                                                                  \
        uint32_t largest = 0; /* as bits: non-negative floats order like them, and a NaN is above inf */           \
        for (int64_t c = 0; c < columns; c++) {                                                                    \
            const uint32_t magnitude = to_bits(round_to_half(ROW_VALUE(c))) & 0x7FFFFFFFu;                         \
            largest = magnitude > largest ? magnitude : largest;                                                   \
        }                                                                                                          \
        const float absmax = from_bits(largest);                                                                   \
        scale_out[index] = absmax;                                                                                 \
        const float multiplier = (1.0f / absmax) * 127.0f;                                                         \
        for (int64_t c = 0; c < columns; c++) data[c] = to_int8(round_to_half(ROW_VALUE(c)) * multiplier);         \
    }

#define BF16_VALUE(c) from_bits((uint32_t)row[c] << 16)
#define FLOAT32_VALUE(c) from_bits(row[c])
BITSANDBYTES_ROW(bitsandbytes_bf16_row, uint16_t, BF16_VALUE)
BITSANDBYTES_ROW(bitsandbytes_float32_row, uint32_t, FLOAT32_VALUE)

static void run_rows(void *context, int64_t first_row, int64_t end_row) {
    const job *work = context;
    for (int64_t r = first_row; r < end_row; r++) {
        int8_t *data = work->data + r * work->columns;
        if (work->library == BITSANDBYTES) {
            if (work->bf16) {
                bitsandbytes_bf16_row((const uint16_t *)work->weight + r * work->columns, work->columns, data, work->scale, r);
            } else {
                bitsandbytes_float32_row((const uint32_t *)work->weight + r * work->columns, work->columns, data, work->scale, r);
            }
        } else if (work->bf16) {
            bf16_row(work->library, (const uint16_t *)work->weight + r * work->columns, work->columns, data, work->scale, r);
        } else {
            float32_row(work->library, (const uint32_t *)work->weight + r * work->columns, work->columns, data, work->scale, r);
        }
    }
}

static PyObject *quantize(enum library library, PyObject *args) {
    unsigned long long weight, data, scale;
    Py_ssize_t rows, columns;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, "KinnKKi", &weight, &dtype, &rows, &columns, &data, &scale, &threads)) return NULL;
    if (dtype != FLOAT32 && dtype != BFLOAT16) {
        PyErr_SetString(PyExc_ValueError, "the weight must be float32 (0) or bfloat16 (1)");
        return NULL;
    }
    job work = {library, (const void *)(uintptr_t)weight, dtype == BFLOAT16, columns, (int8_t *)(uintptr_t)data,
                (void *)(uintptr_t)scale};
    Py_BEGIN_ALLOW_THREADS
    run_parallel(run_rows, &work, rows, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject *quanto_int8(PyObject *self, PyObject *args) {
    (void)self;
    return quantize(QUANTO, args);
}

PyObject *bitsandbytes_int8(PyObject *self, PyObject *args) {
    (void)self;
    return quantize(BITSANDBYTES, args);
}

PyObject *torchao_int8(PyObject *self, PyObject *args) {
    (void)self;
    return quantize(TORCHAO, args);
}
