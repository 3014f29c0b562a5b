"""Per-row symmetric int8 quantization in one compiled pass, with the exact bytes of quanto, torchao
and bitsandbytes (LLM.int8).

The libraries' int8 quantizers are chains of torch ops: abs, amax, a division, round,
clamp, a cast; each streams the weight (or a float32 copy of it) through memory once more, and
their temporaries are what make a streaming loader's peak memory drift. A compiled loop reads a
row once (it stays in the L1 cache for the second look), writes only the int8 result, and
allocates nothing: on a 3072 x 12288 bf16 weight on 2 cores, about 0.02 s against 0.07 s for
quanto's own ops on row blocks (0.17 s whole) and 0.25 s for torchao's. Nothing maintained ships
such a kernel for these formats, hence ours, in C (`pipequant/_native/int8_rows.c`, built at install,
called through `pipequant.kernels.int8_rows`).
It is C and not numba because numba's import and cache load cost about 0.5 s per process, more
than the kernel saves on a model of a few hundred million parameters.

The arithmetic repeats each library's float operations and roundings step by step (bf16 results
rounded to nearest even, as torch rounds them), so the bytes are identical; the backends also
check the first rows of every layer against the library's own call (`kernels.agrees`), and the tests
compare whole weights. Only contiguous CPU matrices in bfloat16 or float32 take this path;
anything else, or an install without the compiled module, returns None and the caller uses the library.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import int8_rows as kernel


def quanto_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What quanto's absmax optimizer and `quantize_symmetric` give for an int8 weight scaled per row:
    (int8 data, scale of shape (rows, 1) in the weight's dtype). None where this path does not apply."""
    return _run("quanto", weight)


def torchao_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What torchao's `Int8Tensor.from_hp(weight, PerRow())` holds: (int8 data, float32 scale of
    shape (rows, 1)); its zero point is all zeros. None where this path does not apply."""
    return _run("torchao", weight)


def bitsandbytes_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What bitsandbytes' `int8_vectorwise_quant` gives for the weight rounded to float16 (as
    `Linear8bitLt` stores it): (int8 data, float32 absmax per row, shape (rows,))."""
    fused = _run("bitsandbytes", weight)
    return None if fused is None else (fused[0], fused[1].view(-1))


def _run(library: kernel.Library, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if kernels.compiled() is None or kernel.problem(weight) is not None:
        return None
    return kernel.quantize(library, weight)
