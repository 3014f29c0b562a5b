"""The wrapper of `_native/bnb4.c`: bitsandbytes' 4-bit blockwise codes (nf4, fp4) in one pass. How
the bytes are checked against bitsandbytes, and its slower path: `pipequant.backends.bnb_chunked`."""

from __future__ import annotations

import torch

from . import SOURCE_DTYPES, KernelInputError, buffer_problem, check_buffer, native

#: the largest block the kernel takes (MAX_BLOCKSIZE in bnb4.c)
MAX_BLOCKSIZE = 4096
#: the 4-bit code has 16 values, so 15 midpoints between them
CODE_VALUES = 16


def problem(values: torch.Tensor, blocksize: int) -> str | None:
    """Why the kernel cannot quantize `values` in blocks of `blocksize` (it reads a contiguous 1-D
    float32, bfloat16 or float16 CPU tensor, in blocks of an even size up to 4096), or None if it can."""
    if values.dim() != 1:
        return f"the values have {values.dim()} dimensions; the kernel takes them flat"
    if not 2 <= blocksize <= MAX_BLOCKSIZE or blocksize % 2:
        return f"blocksize {blocksize}: the kernel takes an even size up to {MAX_BLOCKSIZE}"
    return buffer_problem(values, "the values", SOURCE_DTYPES)


def quantize(
    values: torch.Tensor, blocksize: int, bounds: torch.Tensor, order: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, two per byte, shape (ceil(n / 2), 1) uint8; float32 absmax per block) of `values`.

    `bounds`: the 15 float32 midpoints between the sorted code values; `order`: the code index of each
    of the 16 buckets as int32, or None where the code is sorted (nf4).
    """
    reason = problem(values, blocksize)
    if reason is not None:
        raise KernelInputError(reason)
    check_buffer(bounds, "bounds", (torch.float32,), CODE_VALUES - 1)
    if order is not None:
        check_buffer(order, "order", (torch.int32,), CODE_VALUES)
    count = values.numel()
    packed = torch.empty(((count + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(count // -blocksize), dtype=torch.float32)
    native().bnb4_quantize(
        values.data_ptr(),
        SOURCE_DTYPES[values.dtype],
        count,
        bounds.data_ptr(),
        0 if order is None else order.data_ptr(),
        blocksize,
        packed.data_ptr(),
        absmax.data_ptr(),
        torch.get_num_threads(),
    )
    return packed, absmax
