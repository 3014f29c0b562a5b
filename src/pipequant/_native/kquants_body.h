/* GGML K-quant quantizers (Q2_K..Q6_K), following llama.cpp's reference algorithm
 * (ggml-quants.c: quantize_row_qN_K_ref with make_qkx2_quants, make_q3_quants, make_qx_quants).
 *
 * Used by pipequant/backends/gguf/codecs/kquants.py, which keeps the torch version of the same algorithm
 * for other devices and explains the block layouts. Every float operation is the reference's, in
 * its order (per vector lane, see below), so the bytes are llama.cpp's; built with
 * -ffp-contract=off (no fused multiply-adds) like llama.cpp's x86-64 reference. ggml_quantize.c
 * splits the superblocks of 256 weights between threads.
 *
 * Compiled once per instruction set: kquants.c (any CPU, and the choice between the builds),
 * kquants_avx2.c and kquants_avx512.c (GCC on x86-64), each naming its entry KQUANT_BLOCKS first.
 * Where the build has AVX2, a few lane operations below are single instructions (the rounding,
 * max, min and the any-lane test); elsewhere they are spelled out with the same results.
 */
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "ggml_quantize.h"

#ifndef KQUANT_BLOCKS
#error "define KQUANT_BLOCKS, the name of this build's run_kquant_blocks, before including kquants_body.h"
#endif

#define GROUP_MAX_EPS 1e-15f

INLINE int max_int(int a, int b) { return a > b ? a : b; }
INLINE int min_int(int a, int b) { return a < b ? a : b; }

/* llama.cpp's nearest_int: round half to even through the float's mantissa (exact for |x| < 2^22) */
INLINE int nearest_int(float value) {
    float shifted = value + 12582912.0f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    return (bits & 0x007FFFFF) - 0x00400000;
}

/* --- the searches for one sub-block's scale (and min) --- */

/* Sixteen sub-blocks at a time: two groups of eight, one sub-block per vector lane (GCC vector
 * extensions: one AVX2 register in the AVX2 and AVX-512 builds, two SSE registers elsewhere). Each lane
 * runs the reference's loop for its sub-block with the same float operations in the same order,
 * so the results are the scalar code's bit for bit; the reference's branches become per-lane
 * selects. Measured on one core: 4-7x the scalar code's throughput.
 *
 * The reference's sums run one add after another, so a single group's search waits on the adds'
 * latency; the two groups' operations, interleaved in each loop, fill that wait. Together with
 * the float rounding of rounded_clamped and the levels recomputed once at the end (instead of
 * copied at every improvement), measured on one core: Q2_K..Q6_K 1.04-1.24x over one group at a
 * time. One group of sixteen lanes (AVX-512 registers) was slower: GCC 12 turns some of its
 * selects into scalar code. Measured and not kept, on one Zen 4 core (no faster, within 2%): four
 * groups (Q4_K four superblocks at a time, Q3_K two), x - min computed in the candidate loop
 * instead of kept per weight, branchless updates of the best candidate, the candidate loop split
 * by rounding_exact, and stopping an error sum once every lane is past its best (in 54% of the
 * groups' candidates some lane is better, and the others pass their best within the last weights). */
#define LANES 8
#define GROUPS 2
#define SUBBLOCKS (LANES * GROUPS)
typedef float lanes_f __attribute__((vector_size(32)));
typedef int32_t lanes_i __attribute__((vector_size(32)));

INLINE lanes_f splat(float value) {
    lanes_f out;
    for (int lane = 0; lane < LANES; lane++) out[lane] = value;
    return out;
}

INLINE lanes_i splat_int(int32_t value) {
    lanes_i out;
    for (int lane = 0; lane < LANES; lane++) out[lane] = value;
    return out;
}

INLINE lanes_f select_float(lanes_i mask, lanes_f a, lanes_f b) { return (lanes_f)(((lanes_i)a & mask) | ((lanes_i)b & ~mask)); }
INLINE lanes_i select_int(lanes_i mask, lanes_i a, lanes_i b) { return (a & mask) | (b & ~mask); }
INLINE lanes_f absolute(lanes_f value) { return (lanes_f)((lanes_i)value & splat_int(0x7FFFFFFF)); }
INLINE lanes_f to_float(lanes_i value) { return __builtin_convertvector(value, lanes_f); }

INLINE int any_lane(lanes_i mask) {
#ifdef __AVX2__
    return !_mm256_testz_si256((__m256i)mask, (__m256i)mask);
#else
    int any = 0;
    for (int lane = 0; lane < LANES; lane++) any |= mask[lane];
    return any;
#endif
}

/* nearest_int, then clamped to [lo, hi] */
INLINE lanes_i nearest_clamped(lanes_f value, int lo, int hi) {
    lanes_i bits = (lanes_i)(value + splat(12582912.0f));
    lanes_i l = (bits & splat_int(0x007FFFFF)) - splat_int(0x00400000);
    l = select_int(l < splat_int(lo), splat_int(lo), l);
    return select_int(l > splat_int(hi), splat_int(hi), l);
}

/* nearest_int, then clamped to [lo, hi], as floats: exact where |value| < 2^22 and, for lo < 0, not
 * NaN. There rounding to an integer, half to even, is nearest_int (beyond, nearest_int returns other
 * numbers, which nearest_clamped reproduces); without AVX, adding and subtracting 1.5 * 2^23 rounds
 * so. Max and min are the selects below as the x86 instructions define them (a NaN gives lo, as the
 * select does and, for lo = 0, nearest_int; -0 gives +0). With AVX2, measured on one core: Q4_K
 * 1.12x the add and subtract and the selects. */
INLINE lanes_f rounded_clamped(lanes_f value, float lo, float hi) {
#ifdef __AVX2__
    __m256 rounded = _mm256_round_ps((__m256)value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return (lanes_f)_mm256_min_ps(_mm256_max_ps(rounded, (__m256)splat(lo)), (__m256)splat(hi));
#else
    lanes_f rounded = (value + splat(12582912.0f)) - splat(12582912.0f);
    lanes_f l = select_float(rounded > splat(lo), rounded, splat(lo));
    return select_float(l < splat(hi), l, splat(hi));
#endif
}

/* element i of group g's sub-blocks (sub-block g * LANES + lane, each n long, one after another
 * from x) in lane `lane` of out[g][i] */
INLINE void transpose_in(int n, const float *x, lanes_f (*out)[32]) {
    for (int g = 0; g < GROUPS; g++) {
        for (int i = 0; i < n; i++) {
            for (int lane = 0; lane < LANES; lane++) out[g][i][lane] = x[(g * LANES + lane) * n + i];
        }
    }
}

/* the largest |x - min| over a sub-block, from its smallest and largest x (x - min rounds monotonically) */
INLINE lanes_f largest_shift(lanes_f smallest, lanes_f largest, lanes_f min) {
    lanes_f above = absolute(largest - min), below = absolute(smallest - min);
    return select_float(above > below, above, below);
}

/* The levels make_qkx2_quants chose for each of 16 sub-blocks, kept as the candidate they came from:
 * clamp(nearest_int(iscale * (x - shift)), 0, nmax), or all 0 where the sub-block is flat. The
 * quantizers recompute nearly every level from the rounded scales, so only a sub-block whose
 * rounded scale is 0 needs these (qkx2_levels): computing them for all, and moving them out of
 * the lanes, was measured at 1.12x Q4_K's time on one core, together with the weights computed
 * in the lanes (make_qkx2_quants_x16). */
typedef struct {
    float iscale[SUBBLOCKS], shift[SUBBLOCKS];
    int flat[SUBBLOCKS];
} qkx2_best;

/* sub-block k's levels (its n weights x) into L, by the float operations of the search */
INLINE void qkx2_levels(const qkx2_best *best, int k, int n, int nmax, const float *x, uint8_t *L) {
    for (int i = 0; i < n; i++) {
        const int l = nearest_int(best->iscale[k] * (x[i] - best->shift[k]));
        L[i] = best->flat[k] ? 0 : (uint8_t)max_int(0, min_int(nmax, l));
    }
}

/* make_qkx2_quants for the 16 sub-blocks of x (each n <= 32 weights long), with the weights of
 * Q4_K / Q5_K (rms_weights: sqrt(mean x^2) + |x| per sub-block) or of Q2_K (|x|): their scales
 * and mins (the reference's return value and *the_min) and the best candidate's levels */
INLINE void make_qkx2_quants_x16(int n, int nmax, const float *x, int rms_weights, qkx2_best *best, float *scales,
                                 float *mins, float rmin, float rdelta, int nstep, int use_mad) {
    lanes_f xs[GROUPS][32], ws[GROUPS][32], shifted[GROUPS][32]; /* shifted: x - min for the current min */
    lanes_f candidate[GROUPS][32];
    lanes_f min[GROUPS], max[GROUPS], smallest[GROUPS], sum_w[GROUPS], sum_x[GROUPS], scale[GROUPS];
    lanes_f best_error[GROUPS], reach[GROUPS], flat_min[GROUPS];
    lanes_f best_iscale[GROUPS], best_shift[GROUPS]; /* the best levels: nearest_int(best_iscale * (x - best_shift)) */
    lanes_i flat[GROUPS];
    transpose_in(n, x, xs);
    const lanes_f zero = splat(0.f);
    for (int g = 0; g < GROUPS; g++) {
        if (rms_weights) {
            lanes_f sum_x2 = zero, av_x;
            for (int i = 0; i < n; ++i) sum_x2 += xs[g][i] * xs[g][i];
            sum_x2 = sum_x2 / splat((float)n);
            for (int lane = 0; lane < LANES; lane++) av_x[lane] = sqrtf(sum_x2[lane]);
            for (int i = 0; i < n; ++i) ws[g][i] = av_x + absolute(xs[g][i]);
        } else {
            for (int i = 0; i < n; ++i) ws[g][i] = absolute(xs[g][i]);
        }
        min[g] = max[g] = xs[g][0];
        sum_w[g] = ws[g][0];
        sum_x[g] = sum_w[g] * xs[g][0];
        for (int i = 1; i < n; ++i) {
            min[g] = select_float(xs[g][i] < min[g], xs[g][i], min[g]);
            max[g] = select_float(xs[g][i] > max[g], xs[g][i], max[g]);
            lanes_f w = ws[g][i];
            sum_w[g] += w;
            sum_x[g] += w * xs[g][i];
        }
        smallest[g] = min[g];
        min[g] = select_float(min[g] > zero, zero, min[g]);
        flat[g] = max[g] == min[g]; /* the reference returns early: levels 0, scale 0 */
        flat_min[g] = min[g];
        lanes_f iscale = splat((float)nmax) / (max[g] - min[g]);
        scale[g] = splat(1.f) / iscale;
        best_iscale[g] = iscale;
        best_shift[g] = min[g];
        best_error[g] = zero;
        for (int i = 0; i < n; ++i) shifted[g][i] = xs[g][i] - min[g];
        for (int i = 0; i < n; ++i) {
            lanes_f l = to_float(nearest_clamped(iscale * shifted[g][i], 0, nmax));
            lanes_f diff = scale[g] * l + min[g] - xs[g][i];
            diff = use_mad ? absolute(diff) : diff * diff;
            best_error[g] += ws[g][i] * diff;
        }
        reach[g] = largest_shift(smallest[g], max[g], min[g]); /* bounds |iscale * shifted| by iscale * reach */
    }
    for (int is = 0; is <= nstep; ++is) {
        lanes_f iscale[GROUPS], sum_l[GROUPS], sum_l2[GROUPS], sum_xl[GROUPS], cur_error[GROUPS];
        int rounding_exact = 1; /* the float rounding holds in every lane (flat lanes are discarded; NaN fails) */
        for (int g = 0; g < GROUPS; g++) {
            iscale[g] = splat(rmin + rdelta * is + nmax) / (max[g] - min[g]);
            rounding_exact &= !any_lane(~((iscale[g] * reach[g] < splat(0x1p22f)) | flat[g]));
            sum_l[g] = sum_l2[g] = sum_xl[g] = cur_error[g] = zero;
        }
        for (int i = 0; i < n; ++i) {
            for (int g = 0; g < GROUPS; g++) {
                lanes_f l = rounding_exact ? rounded_clamped(iscale[g] * shifted[g][i], 0.f, (float)nmax)
                                           : to_float(nearest_clamped(iscale[g] * shifted[g][i], 0, nmax));
                candidate[g][i] = l;
                lanes_f w = ws[g][i];
                sum_l[g] += w * l;
                sum_l2[g] += w * l * l;
                sum_xl[g] += w * l * xs[g][i];
            }
        }
        lanes_f D[GROUPS], this_scale[GROUPS], this_min[GROUPS];
        for (int g = 0; g < GROUPS; g++) {
            D[g] = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g];
            this_scale[g] = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / D[g];
            this_min[g] = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / D[g];
            lanes_i positive_min = this_min[g] > zero;
            this_min[g] = select_float(positive_min, zero, this_min[g]);
            this_scale[g] = select_float(positive_min, sum_xl[g] / sum_l2[g], this_scale[g]);
        }
        for (int i = 0; i < n; ++i) {
            for (int g = 0; g < GROUPS; g++) {
                lanes_f diff = this_scale[g] * candidate[g][i] + this_min[g] - xs[g][i];
                diff = use_mad ? absolute(diff) : diff * diff;
                cur_error[g] += ws[g][i] * diff;
            }
        }
        for (int g = 0; g < GROUPS; g++) {
            lanes_i better = (D[g] > zero) & (cur_error[g] < best_error[g]);
            if (!any_lane(better)) continue;
            best_iscale[g] = select_float(better, iscale[g], best_iscale[g]);
            best_shift[g] = select_float(better, min[g], best_shift[g]);
            best_error[g] = select_float(better, cur_error[g], best_error[g]);
            scale[g] = select_float(better, this_scale[g], scale[g]);
            min[g] = select_float(better, this_min[g], min[g]);
            for (int i = 0; i < n; ++i) shifted[g][i] = xs[g][i] - min[g];
            reach[g] = largest_shift(smallest[g], max[g], min[g]);
        }
    }
    for (int g = 0; g < GROUPS; g++) {
        min[g] = select_float(flat[g], flat_min[g], min[g]);
        scale[g] = select_float(flat[g], zero, scale[g]);
        for (int lane = 0; lane < LANES; lane++) {
            const int k = g * LANES + lane;
            scales[k] = scale[g][lane];
            mins[k] = -min[g][lane];
            best->iscale[k] = best_iscale[g][lane];
            best->shift[k] = best_shift[g][lane];
            best->flat[k] = flat[g][lane];
        }
    }
}

/* the value of largest magnitude in each lane (the first one on ties, as the reference's strict
 * comparison), and that magnitude */
INLINE lanes_f signed_absmax_lanes(int n, const lanes_f *xs, lanes_f *magnitude) {
    lanes_f max = splat(0.f), amax = splat(0.f);
    for (int i = 0; i < n; ++i) {
        lanes_f ax = absolute(xs[i]);
        lanes_i larger = ax > amax;
        amax = select_float(larger, ax, amax);
        max = select_float(larger, xs[i], max);
    }
    *magnitude = amax;
    return max;
}

/* The first guess of make_q3_quants and make_qx_quants for a group of 8 sub-blocks of 16 (one per
 * lane): levels nearest_int(-nmax / max * x) in [-nmax, nmax - 1], max the value of largest
 * magnitude (and that magnitude), and the sums weighted by x^2. Returns the lanes whose sub-block is negligible (the
 * reference returns levels 0 and scale 0 for them). */
INLINE lanes_i first_guess_lanes(int nmax, const lanes_f *xs, lanes_i *levels, lanes_f *sumlx, lanes_f *suml2,
                                 lanes_f *max, lanes_f *magnitude) {
    enum { n = 16 };
    lanes_f amax;
    *max = signed_absmax_lanes(n, xs, &amax);
    *magnitude = amax;
    lanes_f iscale = splat((float)-nmax) / *max;
    *sumlx = *suml2 = splat(0.f);
    for (int i = 0; i < n; ++i) {
        levels[i] = nearest_clamped(iscale * xs[i], -nmax, nmax - 1);
        lanes_f l = to_float(levels[i]);
        lanes_f w = xs[i] * xs[i];
        *sumlx += w * xs[i] * l;
        *suml2 += w * l * l;
    }
    return amax < splat(GROUP_MAX_EPS);
}

/* scales and levels (made unsigned by + nmax) of group g's sub-blocks of 16 out of the lanes; 0
 * for the negligible */
INLINE void store_signed_lanes(int g, int nmax, const lanes_i *levels, lanes_f scale, lanes_i negligible, int8_t *L,
                               float *scales) {
    for (int lane = 0; lane < LANES; lane++) {
        const int k = g * LANES + lane;
        scales[k] = negligible[lane] ? 0.f : scale[lane];
        for (int i = 0; i < 16; i++) L[k * 16 + i] = negligible[lane] ? 0 : (int8_t)(levels[i][lane] + nmax);
    }
}

/* make_q3_quants with do_rmse for the 16 sub-blocks of 16 weights of x: their scales, and levels
 * in 0..2*nmax-1. The refinement passes run while any lane still changes; a lane whose pass
 * changed nothing stops there, as the reference does. */
INLINE void make_q3_quants_x16(int nmax, const float *x, int8_t *L, float *scales) {
    enum { n = 16 };
    lanes_f xs[GROUPS][32], max[GROUPS], sumlx[GROUPS], suml2[GROUPS];
    lanes_i levels[GROUPS][n], negligible[GROUPS], active[GROUPS];
    transpose_in(n, x, xs);
    const lanes_f zero = splat(0.f);
    for (int g = 0; g < GROUPS; g++) {
        lanes_f amax;
        negligible[g] = first_guess_lanes(nmax, xs[g], levels[g], &sumlx[g], &suml2[g], &max[g], &amax);
        active[g] = ~negligible[g];
    }
    for (int itry = 0; itry < 5; ++itry) {
        lanes_i changed[GROUPS];
        for (int g = 0; g < GROUPS; g++) changed[g] = splat_int(0);
        for (int i = 0; i < n; ++i) {
            for (int g = 0; g < GROUPS; g++) {
                lanes_f w = xs[g][i] * xs[g][i];
                lanes_f l = to_float(levels[g][i]);
                lanes_f slx = sumlx[g] - w * xs[g][i] * l;
                lanes_f sl2 = suml2[g] - w * l * l;
                lanes_i new_l = nearest_clamped(xs[g][i] * sl2 / slx, -nmax, nmax - 1);
                lanes_f new_lf = to_float(new_l);
                lanes_f new_slx = slx + w * xs[g][i] * new_lf;
                lanes_f new_sl2 = sl2 + w * new_lf * new_lf;
                lanes_i accept = active[g] & (slx > zero) & (new_l != levels[g][i]) & (new_sl2 > zero) &
                                 (new_slx * new_slx * suml2[g] > sumlx[g] * sumlx[g] * new_sl2);
                levels[g][i] = select_int(accept, new_l, levels[g][i]);
                sumlx[g] = select_float(accept, new_slx, sumlx[g]);
                suml2[g] = select_float(accept, new_sl2, suml2[g]);
                changed[g] |= accept;
            }
        }
        int any_active = 0;
        for (int g = 0; g < GROUPS; g++) {
            active[g] &= changed[g];
            any_active |= any_lane(active[g]);
        }
        if (!any_active) break;
    }
    for (int g = 0; g < GROUPS; g++) {
        lanes_f scale = select_float(suml2[g] > zero, sumlx[g] / suml2[g], zero);
        store_signed_lanes(g, nmax, levels[g], scale, negligible[g], L, scales);
    }
}

/* make_qx_quants (rmse_type 1, no importance weights) for the 16 sub-blocks of 16 weights of x:
 * their scales, and levels in 0..2*nmax-1. The candidates' levels by rounded_clamped where that is
 * exact in every lane that counts (|iscale * x| < 2^22, no NaN; the negligible lanes are discarded),
 * with the weights x^2 and x^2 * x computed once instead of in every candidate: measured on one
 * core, Q6_K 1.3x. */
INLINE void make_qx_quants_x16(int nmax, const float *x, int8_t *L, float *scales) {
    enum { n = 16 };
    lanes_f xs[GROUPS][32], max[GROUPS], amax[GROUPS], sumlx[GROUPS], suml2[GROUPS], scale[GROUPS], best[GROUPS];
    lanes_f w[GROUPS][n], wx[GROUPS][n], candidate[GROUPS][n];
    lanes_i levels[GROUPS][n], negligible[GROUPS], unordered[GROUPS];
    transpose_in(n, x, xs);
    const lanes_f zero = splat(0.f);
    for (int g = 0; g < GROUPS; g++) {
        negligible[g] = first_guess_lanes(nmax, xs[g], levels[g], &sumlx[g], &suml2[g], &max[g], &amax[g]);
        scale[g] = select_float(suml2[g] != zero, sumlx[g] / suml2[g], zero);
        best[g] = scale[g] * sumlx[g];
        unordered[g] = splat_int(0);
        for (int i = 0; i < n; ++i) {
            w[g][i] = xs[g][i] * xs[g][i];
            wx[g][i] = w[g][i] * xs[g][i];
            unordered[g] |= xs[g][i] != xs[g][i];
        }
    }
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        lanes_f iscale[GROUPS];
        int rounding_exact = 1;
        for (int g = 0; g < GROUPS; g++) {
            iscale[g] = splat(-(nmax + 0.1f * is)) / max[g];
            sumlx[g] = suml2[g] = zero;
            lanes_i exact = (absolute(iscale[g]) * amax[g] < splat(0x1p22f)) & ~unordered[g];
            rounding_exact &= !any_lane(~(exact | negligible[g]));
        }
        for (int i = 0; i < n; ++i) {
            for (int g = 0; g < GROUPS; g++) {
                lanes_f l = rounding_exact ? rounded_clamped(iscale[g] * xs[g][i], (float)-nmax, (float)(nmax - 1))
                                           : to_float(nearest_clamped(iscale[g] * xs[g][i], -nmax, nmax - 1));
                candidate[g][i] = l;
                sumlx[g] += wx[g][i] * l;
                suml2[g] += w[g][i] * l * l;
            }
        }
        for (int g = 0; g < GROUPS; g++) {
            lanes_i better = (suml2[g] > zero) & (sumlx[g] * sumlx[g] > best[g] * suml2[g]);
            if (!any_lane(better)) continue;
            for (int i = 0; i < n; ++i) {
                levels[g][i] = select_int(better, __builtin_convertvector(candidate[g][i], lanes_i), levels[g][i]);
            }
            scale[g] = select_float(better, sumlx[g] / suml2[g], scale[g]);
            best[g] = select_float(better, scale[g] * sumlx[g], best[g]);
        }
    }
    for (int g = 0; g < GROUPS; g++) store_signed_lanes(g, nmax, levels[g], scale[g], negligible[g], L, scales);
}

/* --- one superblock of 256 weights each --- */

/* the value of largest magnitude among n (the first one on ties, as the reference's strict
 * comparison), and that magnitude */
INLINE float largest_magnitude(int n, const float *values, float *magnitude) {
    float largest = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        if (fabsf(values[i]) > amax) {
            amax = fabsf(values[i]);
            largest = values[i];
        }
    }
    *magnitude = amax;
    return largest;
}

INLINE void quantize_q2_K(const float *x, uint8_t *out) {
    uint8_t *scales_out = out, *qs = out + 16, *d_out = out + 80, *dmin_out = out + 82;
    uint8_t L[QK_K];
    float mins[QK_K / 16], scales[QK_K / 16];
    qkx2_best best;
    const float q4scale = 15.f;
    float max_scale = 0, max_min = 0;
    make_qkx2_quants_x16(16, 3, x, 0, &best, scales, mins, -0.5f, 0.1f, 15, 1);
    for (int j = 0; j < QK_K / 16; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    if (max_scale > 0) {
        float iscale = q4scale / max_scale;
        for (int j = 0; j < QK_K / 16; ++j) scales_out[j] = (uint8_t)nearest_int(iscale * scales[j]);
        store_half(d_out, max_scale / q4scale);
    } else {
        for (int j = 0; j < QK_K / 16; ++j) scales_out[j] = 0;
        store_half(d_out, 0.f);
    }
    if (max_min > 0) {
        float iscale = q4scale / max_min;
        for (int j = 0; j < QK_K / 16; ++j) scales_out[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
        store_half(dmin_out, max_min / q4scale);
    } else {
        store_half(dmin_out, 0.f);
    }
    for (int j = 0; j < QK_K / 16; ++j) {
        const float d = load_half(d_out) * (scales_out[j] & 0xF);
        if (!d) {
            qkx2_levels(&best, j, 16, 3, x + 16 * j, L + 16 * j);
            continue;
        }
        const float dm = load_half(dmin_out) * (scales_out[j] >> 4);
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int((x[16 * j + ii] + dm) / d);
            L[16 * j + ii] = (uint8_t)max_int(0, min_int(3, l));
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

INLINE void quantize_q3_K(const float *x, uint8_t *out) {
    uint8_t *hmask = out, *qs = out + 32, *scales_out = out + 96, *d_out = out + 108;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    make_q3_quants_x16(4, x, L, scales);
    float amax;
    const float max_scale = largest_magnitude(QK_K / 16, scales, &amax);
    memset(scales_out, 0, 12);
    if (max_scale) {
        float iscale = -32.f / max_scale;
        for (int j = 0; j < QK_K / 16; ++j) {
            int8_t l = (int8_t)nearest_int(iscale * scales[j]);
            l = (int8_t)(max_int(-32, min_int(31, l)) + 32);
            if (j < 8) {
                scales_out[j] = l & 0xF;
            } else {
                scales_out[j - 8] |= (uint8_t)((l & 0xF) << 4);
            }
            l >>= 4;
            scales_out[j % 4 + 8] |= (uint8_t)(l << (2 * (j / 4)));
        }
        store_half(d_out, 1 / iscale);
    } else {
        store_half(d_out, 0.f);
    }
    for (int j = 0; j < QK_K / 16; ++j) {
        int8_t sc = (int8_t)(j < 8 ? scales_out[j] & 0xF : scales_out[j - 8] >> 4);
        sc = (int8_t)((sc | (((scales_out[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
        float d = load_half(d_out) * sc;
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(max_int(-4, min_int(3, l)) + 4);
        }
    }
    memset(hmask, 0, QK_K / 8);
    int m = 0;
    uint8_t hm = 1;
    for (int j = 0; j < QK_K; ++j) {
        if (L[j] > 3) {
            hmask[m] |= hm;
            L[j] -= 4;
        }
        if (++m == QK_K / 8) {
            m = 0;
            hm <<= 1;
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

/* one Q4_K / Q5_K superblock's header from its sub-blocks' scales and mins, and its final levels */
INLINE void k4_header(const float *x, const float *scales, const float *mins, const qkx2_best *best, int first,
                      uint8_t *out, uint8_t *L, int nmax) {
    uint8_t *scales_out = out + 4;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < QK_K / 32; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t ls = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t lm = (uint8_t)nearest_int(inv_min * mins[j]);
        ls = ls < 63 ? ls : 63;
        lm = lm < 63 ? lm : 63;
        if (j < 4) {
            scales_out[j] = ls;
            scales_out[j + 4] = lm;
        } else {
            scales_out[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            scales_out[j - 4] |= (uint8_t)((ls >> 4) << 6);
            scales_out[j - 0] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    store_half(out, max_scale / 63.f);
    store_half(out + 2, max_min / 63.f);
    for (int j = 0; j < QK_K / 32; ++j) {
        uint8_t sc, m;
        if (j < 4) {
            sc = scales_out[j] & 63;
            m = scales_out[j + 4] & 63;
        } else {
            sc = (uint8_t)((scales_out[j + 4] & 0xF) | ((scales_out[j - 4] >> 6) << 4));
            m = (uint8_t)((scales_out[j + 4] >> 4) | ((scales_out[j - 0] >> 6) << 4));
        }
        const float d = load_half(out) * sc;
        if (!d) {
            qkx2_levels(best, first + j, 32, nmax, x + 32 * j, L + 32 * j);
            continue;
        }
        const float dm = load_half(out + 2) * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)max_int(0, min_int(nmax, l));
        }
    }
}

/* Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes; the 16 sub-blocks
 * of two superblocks at a time (x: 512 weights) into out[0] and out[1], their levels into L */
INLINE void quantize_k4(const float *x, uint8_t *const *out, uint8_t *L, int nmax, float rmin, int nstep) {
    float mins[SUBBLOCKS], scales[SUBBLOCKS];
    qkx2_best best;
    make_qkx2_quants_x16(32, nmax, x, 1, &best, scales, mins, rmin, 0.1f, nstep, 0);
    for (int s = 0; s < 2; s++) k4_header(x + s * QK_K, scales + 8 * s, mins + 8 * s, &best, 8 * s, out[s], L + s * QK_K, nmax);
}

INLINE void quantize_q4_K(const float *x, uint8_t *const *out) {
    uint8_t L[2][QK_K];
    quantize_k4(x, out, L[0], 15, -1.f, 20);
    for (int s = 0; s < 2; s++) {
        uint8_t *q = out[s] + 16;
        for (int j = 0; j < QK_K; j += 64) {
            for (int l = 0; l < 32; ++l) q[l] = (uint8_t)(L[s][j + l] | (L[s][j + l + 32] << 4));
            q += 32;
        }
    }
}

INLINE void quantize_q5_K(const float *x, uint8_t *const *out) {
    uint8_t L[2][QK_K];
    quantize_k4(x, out, L[0], 31, -0.5f, 15);
    for (int s = 0; s < 2; s++) {
        uint8_t *qh = out[s] + 16, *ql = out[s] + 48;
        memset(qh, 0, QK_K / 8);
        uint8_t m1 = 1, m2 = 2;
        for (int n = 0; n < QK_K; n += 64) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[s][n + j];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                int l2 = L[s][n + j + 32];
                if (l2 > 15) {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = (uint8_t)(l1 | (l2 << 4));
            }
            m1 <<= 2;
            m2 <<= 2;
            ql += 32;
        }
    }
}

INLINE void quantize_q6_K(const float *x, uint8_t *out) {
    uint8_t *ql = out, *qh = out + 128, *scales_out = out + 192, *d_out = out + 208;
    int8_t L[QK_K];
    float scales[QK_K / 16];
    make_qx_quants_x16(32, x, L, scales);
    float max_abs_scale;
    const float max_scale = largest_magnitude(QK_K / 16, scales, &max_abs_scale);
    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(out, 0, Q6_K_BYTES);
        return;
    }
    float iscale = -128.f / max_scale;
    store_half(d_out, 1 / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) scales_out[ib] = (uint8_t)(int8_t)min_int(127, nearest_int(iscale * scales[ib]));
    for (int j = 0; j < QK_K / 16; ++j) {
        float d = load_half(d_out) * (int8_t)scales_out[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            L[16 * j + ii] = (int8_t)(max_int(-32, min_int(31, l)) + 32);
        }
    }
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l + 0] & 0xF;
            const uint8_t q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF;
            const uint8_t q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                              ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

/* --- blocks of any input dtype, split between threads --- */

/* each type's loop written out, so that its quantizer is inlined into KQUANT_BLOCKS */
#define EACH_BLOCK(quantize_block)                                                                      \
    for (int64_t b = begin; b < end; b++) {                                                             \
        const float *block = source_values(work->source, work->dtype, b * QK_K, QK_K, x);               \
        quantize_block(block, work->out + b * work->block_bytes);                                       \
    }                                                                                                   \
    break;

/* two superblocks at a time, for the quantizers of 8 sub-blocks of 32; an odd last superblock is
 * quantized twice over, into a scratch block the second time */
#define EACH_PAIR(quantize_pair)                                                                          \
    for (int64_t b = begin; b < end; b += 2) {                                                            \
        uint8_t *outs[2] = {work->out + b * work->block_bytes, spare};                                    \
        const float *pair = x;                                                                            \
        if (b + 1 < end) {                                                                                \
            outs[1] = work->out + (b + 1) * work->block_bytes;                                            \
            pair = source_values(work->source, work->dtype, b * QK_K, 2 * QK_K, x);                       \
        } else {                                                                                          \
            const float *last = source_values(work->source, work->dtype, b * QK_K, QK_K, x);              \
            if (last != x) memcpy(x, last, QK_K * sizeof(float));                                         \
            memcpy(x + QK_K, x, QK_K * sizeof(float));                                                    \
        }                                                                                                 \
        quantize_pair(pair, outs);                                                                        \
    }                                                                                                     \
    break;

void KQUANT_BLOCKS(void *context, int64_t begin, int64_t end) {
    const quantize_job *work = context;
    float x[2 * QK_K];
    uint8_t spare[Q5_K_BYTES];
    switch (work->type) {
        case Q2_K: EACH_BLOCK(quantize_q2_K)
        case Q3_K: EACH_BLOCK(quantize_q3_K)
        case Q4_K: EACH_PAIR(quantize_q4_K)
        case Q5_K: EACH_PAIR(quantize_q5_K)
        default: EACH_BLOCK(quantize_q6_K)
    }
}
