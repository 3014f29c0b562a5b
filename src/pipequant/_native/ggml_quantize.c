/* The module pipequant._ggml_quantize: GGML block quantization on CPU, for every block type, by
 * the two families of quantizers declared in ggml_quantize.h. Used by
 * pipequant/backends/gguf/quants.py (the `compiled_quantizer` of the block types). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "ggml_quantize.h"
#include "parallel.h"

static PyObject *quantize(PyObject *self, PyObject *args) {
    (void)self;
    int type, dtype, threads;
    unsigned long long source, out;
    Py_ssize_t blocks;
    if (!PyArg_ParseTuple(args, "iKinKi", &type, &source, &dtype, &blocks, &out, &threads)) return NULL;
    quantize_job work = {type, legacy_block_bytes(type), (const void *)(uintptr_t)source, (enum source_dtype)dtype,
                         (uint8_t *)(uintptr_t)out};
    range_fn run = run_legacy_blocks;
    if (work.block_bytes == 0) {
        work.block_bytes = kquant_block_bytes(type);
        run = run_kquant_blocks;
    }
    if (work.block_bytes == 0) {
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

static PyMethodDef methods[] = {
    {"quantize", quantize, METH_VARARGS,
     "quantize(ggml_type, source_ptr, source_dtype, blocks, out_ptr, threads): blocks of weights (float32 0, "
     "bfloat16 1, float16 2) into GGML blocks of that type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ggml_quantize", "GGML block quantizers.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ggml_quantize(void) { return PyModule_Create(&module); }
