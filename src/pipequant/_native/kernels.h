/* The functions of the module pipequant._kernels (kernels.c holds its one method table), one group
 * per source file. Each takes raw addresses of contiguous CPU buffers; pipequant/kernels/ has one
 * Python wrapper per group, which checks every buffer's device, dtype, layout and size before the
 * call (the C side trusts them) and is the only Python code that handles the addresses. */
#ifndef PIPEQUANT_KERNELS_H
#define PIPEQUANT_KERNELS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* int8_rows.c: per-row int8, with quanto's, torchao's and bitsandbytes' bytes */
PyObject *quanto_int8(PyObject *self, PyObject *args);
PyObject *torchao_int8(PyObject *self, PyObject *args);
PyObject *bitsandbytes_int8(PyObject *self, PyObject *args);

/* bnb4.c: bitsandbytes' 4-bit blockwise codes */
PyObject *bnb4_quantize(PyObject *self, PyObject *args);

/* ggml_quantize.c (with ggml_legacy.c and kquants.c), ggml_dequantize.c: GGML blocks */
PyObject *ggml_quantize(PyObject *self, PyObject *args);
PyObject *ggml_dequantize(PyObject *self, PyObject *args);

#endif
