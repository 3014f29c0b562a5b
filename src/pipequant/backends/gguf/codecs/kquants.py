"""The K-quant codecs (Q2_K..Q6_K): gguf-py's layouts and llama.cpp's reference quantizers.

gguf-py can only decode K-quants. Encoding reproduces ``quantize_row_q{2..6}_K_ref`` from
llama.cpp's ``ggml-quants.c`` with its helpers ``make_qkx2_quants`` (Q2_K, Q4_K, Q5_K),
``make_q3_quants`` (Q3_K) and ``make_qx_quants`` (Q6_K), aiming at byte-identical output
to llama.cpp built for x86-64 (no FMA contraction). The scale searches are vectorized
across sub-blocks; to make that possible and exact:

* A chunk of blocks is transposed to ``(n, S)``: one column per sub-block of ``n``
  weights. Per-sub-block values are ``(S,)`` rows that broadcast over the columns.
* Sums are accumulated row by row (:func:`_seq_sum`), like the C loops: float32
  addition is not associative and ``torch.sum`` uses another order.
* ``nearest_int`` (add 1.5 * 2**23, keep the mantissa) rounds half to even, which is
  ``torch.round`` for the bounded arguments the searches produce; ``sqrtf`` needs
  :func:`_sqrt`.
* Branches become masks: every candidate is evaluated for all sub-blocks and accepted
  where C would accept it. Instead of copying the candidate levels each time, the
  accepted ``(iscale, min)`` is recorded and the levels are recomputed once at the end.

Blocks no checkpoint holds (NaN or inf weights, weights near float32's limits, sub-blocks of
subnormals) can come out with other bytes than llama.cpp's here: C's comparisons skip NaN where
torch's reductions propagate it, and ``nearest_int`` wraps around where ``torch.round`` does not.
The compiled CPU kernels (``pipequant/_native/kquants.c``) match llama.cpp on those too.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .base import GGMLQuant, absmax_signed, div, fp16_bytes, fp16_value, pack_bits, scale_into, unpack_bits
from .table import QK_K

GROUP_MAX_EPS = 1e-15
"""Sub-blocks with max |x| below this are stored as zeros (ggml-quants.c)."""

_U8 = 0xFF


def _columns(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``(nb, QK_K)`` -> ``(n, nb * QK_K // n)``: sub-block ``s`` of the chunk is column ``s``."""
    return blocks.reshape(-1, n).t().contiguous()


def _rows(levels: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_columns` for the final levels, as uint8 ``(nb, QK_K)``."""
    return levels.to(torch.int8).view(torch.uint8).t().reshape(-1, QK_K)


@functools.cache
def _zero_index(n: int, device: torch.device) -> torch.Tensor:
    """Index for :func:`_seq_sum`'s ``index_add_`` (cached: it runs thousands of times)."""
    return torch.zeros(n, dtype=torch.long, device=device)


def _loop_sum(t: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """:func:`_seq_sum` as a plain loop of vectorized adds (any device)."""
    for row in t.unbind(-2):
        acc += row
    return acc


@functools.cache
def _cpu_index_add_is_sequential() -> bool:
    """Whether this torch's CPU ``index_add_`` adds duplicate-index rows in order.

    That is an implementation detail (it is today), so it is checked once against the
    plain loop on data where any reordering would change float32 results.
    """
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 32, 257, generator=gen) * torch.rand(2, 32, 257, generator=gen).pow(8) * 1e4
    fast = torch.zeros(2, 1, 257).index_add_(1, _zero_index(32, t.device), t)[:, 0]
    return torch.equal(fast, _loop_sum(t, torch.zeros(2, 257)))


def _seq_sum(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``s = 0; for v in t: s += v`` over the weights axis (dim -2) of ``(..., n, S)``.

    This is C's order; float32 addition is not associative and ``torch.sum`` reduces in
    another (blocked) order. On CPU, ``index_add_`` with an all-zero index runs exactly
    this loop in C++ (2-3x faster than a Python loop for cache-sized chunks); other
    devices may use atomics in any order, so they loop explicitly.
    """
    shape = (*t.shape[:-2], t.shape[-1])
    acc = (t.new_empty(shape) if out is None else out).zero_()
    if t.device.type == "cpu" and _cpu_index_add_is_sequential():
        acc.unsqueeze(-2).index_add_(-2, _zero_index(t.shape[-2], t.device), t)
        return acc
    return _loop_sum(t, acc)


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """Exact ``nearest_int`` including its wrap-around for ``|x| > 2**22``, as int32."""
    return ((x + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf``.

    torch's CPU float32 sqrt (MKL VML) is off by one ulp for ~0.7% of inputs; a float64
    sqrt rounded to float32 is exact (a float32 square root is never close enough to a
    float32 rounding midpoint for the float64 error to matter).
    """
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def _max_positive(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; for s in v: if s > m: m = s`` over dim 1, keepdim."""
    m = v.amax(1, keepdim=True)
    return torch.where(m > 0, m, 0.0)


def _make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` for every column: returns (scale, -min, levels in 0..nmax)."""
    n, s = x.shape
    lo = x.amin(0)
    lo = torch.where(lo > 0, 0.0, lo)
    hi = x.amax(0)
    sum_w, sum_x = _seq_sum(torch.stack((w, w * x)))  # C starts from w[0], x[0]*w[0]: same

    levels = torch.empty_like(x)
    err = torch.empty_like(x)
    prods = x.new_empty((3, n, s))
    wl, wll, wlx = prods.unbind(0)

    def quantize_levels(base: torch.Tensor, iscale: torch.Tensor) -> torch.Tensor:
        torch.sub(x, base, out=levels)
        return levels.mul_(iscale).round_().clamp_(0, nmax)

    def error(scale: torch.Tensor, mn: torch.Tensor, out: torch.Tensor) -> None:
        torch.mul(levels, scale, out=err)
        err.add_(mn).sub_(x)
        if use_mad:
            err.abs_()
        else:
            err.mul_(err)
        _seq_sum(err.mul_(w), out)

    # Search state, accepted candidate by candidate: rows are error, scale, iscale and
    # min used for the levels (to recompute them at the end), and the new min.
    err_, scale_, iscale_, base_, min_ = range(5)
    state = x.new_empty((5, s))
    cand = torch.empty_like(state)
    iscale = div(float(nmax), hi - lo)
    scale = iscale.reciprocal()
    quantize_levels(lo, iscale)
    error(scale, lo, state[err_])
    torch.stack((scale, iscale, lo, lo), out=state[scale_:])
    for step in range(nstep + 1):
        mn = state[min_]
        rng = hi - mn
        numerator = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        iscale = torch.div(torch.full_like(rng, float(numerator)), rng, out=cand[iscale_])
        quantize_levels(mn, iscale)
        torch.mul(w, levels, out=wl)
        torch.mul(wl, levels, out=wll)
        torch.mul(wl, x, out=wlx)
        sum_l, sum_l2, sum_xl = _seq_sum(prods).unbind(0)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        torch.where(this_min > 0, sum_xl / sum_l2, this_scale, out=cand[scale_])
        torch.clamp(this_min, max=0, out=cand[min_])  # zero's sign never matters downstream
        error(cand[scale_], cand[min_], cand[err_])
        cand[base_] = mn
        state = torch.where((det > 0) & (cand[err_] < state[err_]), cand, state)

    _, scale, best_iscale, best_base, mn = state.unbind(0)
    quantize_levels(best_base, best_iscale)
    # hi == lo: C returns early with L = 0, scale 0 (1/inf above) and min untouched.
    degenerate = hi == lo
    if degenerate.any():
        levels[:, degenerate] = 0
    return scale, -mn, levels


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(do_rmse=true)`` for every column: (scale, levels in 0..2*nmax-1).

    The refinement is a coordinate descent in which each weight sees the sums updated by
    the previous one, so it runs weight by weight (16 per pass, up to 5 passes) across
    sub-blocks. C stops a sub-block after a pass without changes (another pass would
    change nothing), so each pass only runs on the sub-blocks the previous pass changed:
    about 20% after the first pass, 5% after the second.
    """
    big = absmax_signed(x, 0).squeeze(0)
    zero = big.abs() < GROUP_MAX_EPS
    levels = torch.mul(x, div(float(-nmax), big)).round_().clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sums = _seq_sum(torch.stack((wx * levels, w * levels * levels)))
    columns = torch.arange(x.shape[1], device=x.device)
    xs, ws, wxs, ls, (sumlx, suml2) = x, w, wx, levels.clone(), sums
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[0]):
            li, wi, wxi = ls[i], ws[i], wxs[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = _nearest_int(xs[i] * sl2 / slx).clamp_(-nmax, nmax - 1).to(x.dtype)
            new_slx = slx + wxi * new_l
            new_sl2 = sl2 + wi * new_l * new_l
            better = new_slx * new_slx * suml2 > sumlx * sumlx * new_sl2
            accept = (slx > 0) & (new_l != li) & (new_sl2 > 0) & better
            ls[i] = torch.where(accept, new_l, li)
            sumlx = torch.where(accept, new_slx, sumlx)
            suml2 = torch.where(accept, new_sl2, suml2)
            changed |= accept
        levels[:, columns] = ls
        sums[:, columns] = torch.stack((sumlx, suml2))
        if not changed.any():
            break
        keep = changed.nonzero().squeeze(1)
        columns, xs, ws, wxs, ls = columns[keep], xs[:, keep], ws[:, keep], wxs[:, keep], ls[:, keep]
        sumlx, suml2 = sumlx[keep], suml2[keep]
    sumlx, suml2 = sums
    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    levels.add_(nmax)
    if zero.any():
        levels[:, zero] = 0
    return scale.masked_fill_(zero, 0), levels


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(rmse_type=1, qw=NULL)`` for every column: (scale, levels in 0..2*nmax-1)."""
    n, s = x.shape
    big = absmax_signed(x, 0).squeeze(0)
    zero = big.abs() < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    levels = torch.empty_like(x)
    prods = x.new_empty((2, n, s))
    wxl, wll = prods.unbind(0)

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.mul(x, iscale, out=levels).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, levels, out=wxl)
        torch.mul(w, levels, out=wll).mul_(levels)
        sumlx, suml2 = _seq_sum(prods).unbind(0)
        return sumlx, suml2

    iscale = div(float(-nmax), big)
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    best_iscale = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = div(float(-(np.float32(nmax) + np.float32(0.1) * np.float32(step))), big)
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    torch.mul(x, best_iscale, out=levels).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    if zero.any():
        levels[:, zero] = 0
    return scale.masked_fill_(zero, 0), levels


def _requantize(
    x: torch.Tensor, levels: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, lo: int, hi: int
) -> torch.Tensor:
    """Final levels from the stored (rounded) scales: ``nearest_int((x + dm) / d)``.

    C skips sub-blocks whose decoded scale is 0 and keeps the search's levels there;
    ``lo`` is the offset that makes levels unsigned.
    """
    num = x if dm is None else x + dm
    new = torch.div(num, d).round_().clamp_(lo, hi).sub_(lo)
    skipped = d == 0
    if skipped.any():
        new[:, skipped] = levels[:, skipped]
    return new


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit scales and mins (int32, ``(nb, 8)``) -> 12 bytes."""
    lo4 = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid4 = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi4 = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat((lo4, mid4, hi4), 1).to(torch.uint8)


def _unpack_k4_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12 scale bytes -> (scales, mins) as ``(nb, 8)`` uint8 (gguf-py ``get_scale_min``)."""
    d, m, m_d = raw[:, :4], raw[:, 4:8], raw[:, 8:]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), 1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), 1)
    return sc, mn


class _KQuant(GGMLQuant):
    """A K-quant type. On CPU, quantization runs llama.cpp's reference algorithm compiled
    (`pipequant/_native/kquants.c`: the same bytes as the torch code here, 10-25x faster on
    one core, and spread over torch's threads); on other devices, or without the compiled
    module, the torch code below."""

    compiled_quantizer = True


class _SuperblockQuant(_KQuant):
    """Shared part of Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins."""

    nmax: int
    rmin: float
    nstep: int
    quantize_chunk = 512
    dequantize_chunk = 4096

    @classmethod
    def _quantize_levels(cls, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nb, QK_K)`` -> (header bytes d|dmin|scales ``(nb, 16)``, levels ``(nb, QK_K)``)."""
        nb = blocks.shape[0]
        x = _columns(blocks, 32)
        sum_x2 = _seq_sum(x * x)
        w = _sqrt(div(sum_x2, 32.0)) + x.abs()
        scales, mins, levels = _make_qkx2_quants(x, w, cls.nmax, cls.rmin, 0.1, cls.nstep, False)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), 0.0)
        inv_min = torch.where(max_min > 0, div(63.0, max_min), 0.0)
        # C stores nearest_int() into a uint8 before MIN(63, .).
        ls = (torch.round(inv_scale * scales).to(torch.int32) & _U8).clamp_(max=63)
        lm = (torch.round(inv_min * mins).to(torch.int32) & _U8).clamp_(max=63)
        d = fp16_bytes(div(max_scale, 63.0))
        dmin = fp16_bytes(div(max_min, 63.0))
        sub_d = (fp16_value(d) * ls).view(-1)
        sub_dm = (fp16_value(dmin) * lm).view(-1)
        levels = _requantize(x, levels, sub_d, sub_dm, 0, cls.nmax)
        return torch.cat((d, dmin, _pack_k4_scales(ls, lm)), 1), _rows(levels)

    @classmethod
    def _scales(cls, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sub-block ``(d * scale, dmin * min)`` as ``(nb, 8, 1)`` float32."""
        d = fp16_value(blocks[:, :2])
        dmin = fp16_value(blocks[:, 2:4])
        sc, mn = _unpack_k4_scales(blocks[:, 4:16])
        return (d * sc).unsqueeze(2), (dmin * mn).unsqueeze(2)


class Q4_K(_SuperblockQuant, type_name="Q4_K"):
    nmax, rmin, nstep = 15, -1.0, 20

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        header, levels = cls._quantize_levels(blocks)
        qs = pack_bits(levels.view(-1, 2, 32), 4).view(-1, 128)
        return torch.cat((header, qs), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d, dm = cls._scales(blocks)
        q = unpack_bits(blocks[:, 16:].reshape(-1, 32), 4).view(-1, 8, 32)
        scale_into(out, q, d, sub=dm)


class Q5_K(_SuperblockQuant, type_name="Q5_K"):
    nmax, rmin, nstep = 31, -0.5, 15

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        header, levels = cls._quantize_levels(blocks)
        qh = pack_bits((levels >> 4).view(-1, 8, 32), 1)
        qs = pack_bits((levels & 0xF).view(-1, 2, 32), 4).view(-1, 128)
        return torch.cat((header, qh, qs), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        d, dm = cls._scales(blocks)
        qh = unpack_bits(blocks[:, 16:48], 1, at=4)
        ql = unpack_bits(blocks[:, 48:].reshape(-1, 32), 4).view(-1, 8, 32)
        scale_into(out, ql | qh, d, sub=dm)


class Q2_K(_KQuant, type_name="Q2_K"):
    quantize_chunk = 1024
    dequantize_chunk = 4096

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        x = _columns(blocks, 16)
        scales, mins, levels = _make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.view(nb, 16), mins.view(nb, 16)
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        ls = torch.where(max_scale > 0, torch.round(div(15.0, max_scale) * scales), 0.0).to(torch.int32)
        lm = torch.where(max_min > 0, torch.round(div(15.0, max_min) * mins), 0.0).to(torch.int32)
        sc = ((ls & _U8) | (lm << 4)) & _U8
        d = fp16_bytes(div(max_scale, 15.0))
        dmin = fp16_bytes(div(max_min, 15.0))
        sub_d = (fp16_value(d) * (sc & 0xF)).view(-1)
        sub_dm = (fp16_value(dmin) * (sc >> 4)).view(-1)
        levels = _rows(_requantize(x, levels, sub_d, sub_dm, 0, 3))
        qs = pack_bits(levels.view(-1, 4, 32), 2).view(-1, 64)
        return torch.cat((sc.to(torch.uint8), qs, d, dmin), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        sc = blocks[:, :16]
        dl = (fp16_value(blocks[:, 80:82]) * (sc & 0xF)).unsqueeze(2)
        ml = (fp16_value(blocks[:, 82:84]) * (sc >> 4)).unsqueeze(2)
        q = unpack_bits(blocks[:, 16:80].reshape(-1, 32), 2).view(-1, 16, 16)
        scale_into(out, q, dl, sub=ml)


class Q3_K(_KQuant, type_name="Q3_K"):
    quantize_chunk = 2048  # the weight-by-weight refinement favors long rows of sub-blocks
    dequantize_chunk = 4096

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        x = _columns(blocks, 16)
        scales, levels = _make_q3_quants(x, 4)
        scales = scales.view(nb, 16)
        max_scale = absmax_signed(scales, 1)
        nonzero = max_scale != 0
        iscale = div(-32.0, max_scale)
        ls = torch.where(nonzero, torch.round(iscale * scales).clamp_(-32, 31) + 32, 0.0).to(torch.int32)
        low = ls & 0xF
        sc = torch.cat((low[:, :8] | (low[:, 8:] << 4), pack_bits((ls >> 4).view(-1, 4, 4), 2)), 1)
        d = fp16_bytes(torch.where(nonzero, iscale.reciprocal(), 0.0))
        sub_d = (fp16_value(d) * (ls - 32)).view(-1)
        levels = _rows(_requantize(x, levels, sub_d, None, -4, 3))
        hmask = pack_bits((levels >> 2).view(-1, 8, 32), 1)
        qs = pack_bits((levels & 3).view(-1, 4, 32), 2).view(-1, 64)
        return torch.cat((hmask, qs, sc.to(torch.uint8), d), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        raw = blocks[:, 96:108]
        low = unpack_bits(raw[:, :8], 4).reshape(-1, 16)
        high = unpack_bits(raw[:, 8:], 2).reshape(-1, 16)
        scales = (low | (high << 4)).view(torch.int8) - 32
        dl = (fp16_value(blocks[:, 108:110]) * scales).unsqueeze(2)
        ql = unpack_bits(blocks[:, 32:96].reshape(-1, 32), 2).view(-1, 16, 16)
        # The high bit is stored inverted: a set bit means no -4 offset.
        qh = unpack_bits(blocks[:, :32] ^ _U8, 1, at=2).view(-1, 16, 16)
        scale_into(out, ql.view(torch.int8) - qh.view(torch.int8), dl)


class Q6_K(_KQuant, type_name="Q6_K"):
    quantize_chunk = 512
    dequantize_chunk = 4096

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        nb = blocks.shape[0]
        x = _columns(blocks, 16)
        scales, levels = _make_qx_quants(x, 32)
        scales = scales.view(nb, 16)
        max_scale = absmax_signed(scales, 1)
        iscale = div(-128.0, max_scale)
        d = fp16_bytes(iscale.reciprocal())
        # C: int8_t scale = MIN(127, nearest_int(.)), wrapping like a C int8 store.
        ls = torch.round(iscale * scales).clamp_(max=127).to(torch.int32)
        ls = ((ls + 128) & _U8) - 128
        sub_d = (fp16_value(d) * ls).view(-1)
        levels = _rows(_requantize(x, levels, sub_d, None, -32, 31))
        ql = pack_bits((levels & 0xF).view(-1, 2, 64), 4).view(-1, 128)
        qh = pack_bits((levels >> 4).view(-1, 4, 32), 2).view(-1, 64)
        out = torch.cat((ql, qh, ls.to(torch.int8).view(torch.uint8), d), 1)
        # C writes an all-zero block when every sub-block scale is ~0.
        return out.masked_fill_(max_scale.abs() < GROUP_MAX_EPS, 0)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        dl = (fp16_value(blocks[:, 208:210]) * blocks[:, 192:208].view(torch.int8)).unsqueeze(2)
        ql = unpack_bits(blocks[:, :128].reshape(-1, 64), 4).view(-1, 8, 32)
        qh = unpack_bits(blocks[:, 128:192].reshape(-1, 32), 2, at=4).view(-1, 8, 32)
        q = (ql | qh).view(torch.int8).sub_(32)
        scale_into(out, q.view(-1, 16, 16), dl)


CODECS: tuple[type[GGMLQuant], ...] = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
