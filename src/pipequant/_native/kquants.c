/* The K-quant quantizers (kquants_body.h) built for any CPU, and run_kquant_blocks, which runs the
 * build for the CPU it finds: kquants_avx512.c or kquants_avx2.c on x86-64 (GCC) where the CPU has
 * the instructions, this one elsewhere. All three write the same bytes.
 *
 * Three translation units rather than target_clones (the other kernels' BLOCK_KERNEL): the AVX2
 * intrinsics of kquants_body.h can only be compiled where their target is the whole unit's. */
#define KQUANT_BLOCKS run_kquant_blocks_portable
#include "kquants_body.h"

void run_kquant_blocks(void *context, int64_t begin, int64_t end) {
#if PIPEQUANT_X86_BUILDS
    __builtin_cpu_init(); /* at once where already done (libgcc's constructor) */
    if (__builtin_cpu_supports("x86-64-v4")) {
        run_kquant_blocks_avx512(context, begin, end);
        return;
    }
    if (__builtin_cpu_supports("avx2")) {
        run_kquant_blocks_avx2(context, begin, end);
        return;
    }
#endif
    run_kquant_blocks_portable(context, begin, end);
}
