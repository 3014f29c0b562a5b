/* The module pipequant._kernels: every compiled kernel behind one method table (kernels.h declares
 * them; each lives in its own source file). pipequant/kernels/ imports it on first use. */
#include "kernels.h"

static PyMethodDef methods[] = {
    {"quanto_int8", quanto_int8, METH_VARARGS,
     "quanto_int8(weight_ptr, source_dtype, rows, columns, data_ptr, scale_ptr, threads): quanto's int8 rows"},
    {"torchao_int8", torchao_int8, METH_VARARGS,
     "torchao_int8(weight_ptr, source_dtype, rows, columns, data_ptr, scale_ptr, threads): torchao's int8 rows"},
    {"bitsandbytes_int8", bitsandbytes_int8, METH_VARARGS,
     "bitsandbytes_int8(weight_ptr, source_dtype, rows, columns, data_ptr, scale_ptr, threads): LLM.int8 rows"},
    {"bnb4_quantize", bnb4_quantize, METH_VARARGS,
     "bnb4_quantize(source_ptr, source_dtype, count, bounds_ptr, order_ptr_or_0, blocksize, packed_ptr, "
     "absmax_ptr, threads): bitsandbytes' 4-bit codes, two per byte, and the float32 absmax of each block"},
    {"ggml_quantize", ggml_quantize, METH_VARARGS,
     "ggml_quantize(ggml_type, source_ptr, source_dtype, blocks, out_ptr, threads, portable=False): blocks of "
     "weights (float32 0, bfloat16 1, float16 2) into GGML blocks of that type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
     "Q2_K .. Q6_K); portable: the K-quants by their build for any CPU instead of this CPU's (same bytes)"},
    {"ggml_dequantize", ggml_dequantize, METH_VARARGS,
     "ggml_dequantize(ggml_type, raw_ptr, blocks, out_ptr, bf16_out, threads): GGML blocks into float32 (or "
     "bfloat16) values"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "pipequant's compiled kernels.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
