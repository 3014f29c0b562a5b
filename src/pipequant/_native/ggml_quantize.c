/* GGML block quantization on CPU, for every block type, by the two families of quantizers declared
 * in ggml_quantize.h. Wrapped by pipequant/kernels/ggml.py, for the codecs in
 * pipequant/backends/gguf/codecs (the types whose `compiled_quantizer` is set). */
#include "kernels.h" /* first: it includes Python.h */

#include "ggml_quantize.h"
#include "parallel.h"

PyObject *ggml_quantize(PyObject *self, PyObject *args) {
    (void)self;
    int type, dtype, threads, portable = 0;
    unsigned long long source, out;
    Py_ssize_t blocks;
    if (!PyArg_ParseTuple(args, "iKinKi|p", &type, &source, &dtype, &blocks, &out, &threads, &portable)) return NULL;
    quantize_job work = {type, ggml_block_bytes(type), (const void *)(uintptr_t)source, (enum source_dtype)dtype,
                         (uint8_t *)(uintptr_t)out};
    /* the family by block size: 32 weights, or a superblock of QK_K (the float types have no quantizer here) */
    const int weights = ggml_block_weights(type);
    const range_fn kquants = portable ? run_kquant_blocks_portable : run_kquant_blocks;
    const range_fn run = weights == 32 ? run_legacy_blocks : weights == QK_K ? kquants : NULL;
    if (run == NULL) {
        PyErr_Format(PyExc_ValueError, "GGML type %d has no compiled quantizer", type);
        return NULL;
    }
    if (dtype < FLOAT32 || dtype > FLOAT16) {
        PyErr_SetString(PyExc_ValueError, "the source must be float32 (0), bfloat16 (1) or float16 (2)");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run_parallel(run, &work, blocks, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
