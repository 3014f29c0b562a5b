/* The K-quant quantizers (kquants_body.h) for x86-64 CPUs with AVX2; kquants.c runs them there. */
#include "ggml_quantize.h"

#if PIPEQUANT_X86_BUILDS
#pragma GCC target("avx2")
#define KQUANT_BLOCKS run_kquant_blocks_avx2
#include "kquants_body.h"
#endif
