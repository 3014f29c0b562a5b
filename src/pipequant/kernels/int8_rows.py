"""The wrapper of `_native/int8_rows.c`: per-row symmetric int8 with quanto's, torchao's or bitsandbytes'
bytes. Why a kernel, and the checks against the libraries: `pipequant.backends.int8_rows`."""

from __future__ import annotations

from typing import Literal

import torch

from . import SOURCE_DTYPES, KernelInputError, buffer_problem, native

Library = Literal["quanto", "torchao", "bitsandbytes"]

#: the weight dtypes the kernel reads
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def problem(weight: torch.Tensor) -> str | None:
    """Why the kernel cannot quantize `weight` (it reads contiguous 2-D float32 or bfloat16 CPU
    matrices), or None if it can."""
    if weight.dim() != 2:
        return f"the weight has {weight.dim()} dimensions; the kernel quantizes the rows of a matrix"
    return buffer_problem(weight, "the weight", WEIGHT_DTYPES)


def quantize(library: Library, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`library`'s per-row int8 of `weight`: (int8 data of its shape, scale of shape (rows, 1)); the
    scale is in the weight's dtype for quanto, float32 for torchao and bitsandbytes."""
    if library not in ("quanto", "torchao", "bitsandbytes"):
        raise KernelInputError(f"no int8 kernel for {library!r}; there are quanto, torchao and bitsandbytes")
    reason = problem(weight)
    if reason is not None:
        raise KernelInputError(reason)
    rows, columns = weight.shape
    data = torch.empty((rows, columns), dtype=torch.int8)
    scale = torch.empty((rows, 1), dtype=weight.dtype if library == "quanto" else torch.float32)
    getattr(native(), f"{library}_int8")(
        weight.data_ptr(),
        SOURCE_DTYPES[weight.dtype],
        rows,
        columns,
        data.data_ptr(),
        scale.data_ptr(),
        torch.get_num_threads(),
    )
    return data, scale
