/* The K-quant quantizers (kquants_body.h) for x86-64 CPUs with AVX-512 (x86-64-v4: 32 vector
 * registers and mask registers for the same 8-lane code); kquants.c runs them there. */
#include "ggml_quantize.h"

#if PIPEQUANT_X86_BUILDS
#pragma GCC target("arch=x86-64-v4")
#define KQUANT_BLOCKS run_kquant_blocks_avx512
#include "kquants_body.h"
#endif
