/* The two families of GGML block quantizers behind ggml_quantize (ggml_quantize.c): the 32-weight
 * types (ggml_legacy.c) and the K-quants (kquants.c). */
#ifndef PIPEQUANT_GGML_QUANTIZE_H
#define PIPEQUANT_GGML_QUANTIZE_H

#include "common.h"

typedef struct {
    int type, block_bytes;
    const void *source;
    enum source_dtype dtype;
    uint8_t *out;
} quantize_job;

/* blocks [begin, end) of a quantize_job (the parallel.h range_fn shape) */
void run_legacy_blocks(void *context, int64_t begin, int64_t end);
/* the K-quants by the build for this CPU (kquants.c), or by the build for any CPU (the same bytes) */
void run_kquant_blocks(void *context, int64_t begin, int64_t end);
void run_kquant_blocks_portable(void *context, int64_t begin, int64_t end);
#if PIPEQUANT_X86_BUILDS
void run_kquant_blocks_avx2(void *context, int64_t begin, int64_t end);
void run_kquant_blocks_avx512(void *context, int64_t begin, int64_t end);
#endif

#endif
