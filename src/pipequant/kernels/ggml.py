"""The wrapper of `_native/ggml_quantize.c` (with `ggml_legacy.c`, `kquants.c`) and `_native/ggml_dequantize.c`:
GGML blocks to and from weights on CPU, with the bytes of the torch codecs in `pipequant.backends.gguf.codecs`
(which use it, and say why it is exact)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import SOURCE_DTYPES, KernelInputError, buffer_problem, check_buffer, native

if TYPE_CHECKING:
    from ..backends.gguf.codecs.table import GGMLType

#: the dtypes the dequantizer writes
DEQUANTIZED_DTYPES = (torch.float32, torch.bfloat16)


def quantize_problem(source: torch.Tensor) -> str | None:
    """Why the quantizer cannot read `source` (contiguous float32, bfloat16 or float16 in CPU memory), or None."""
    return buffer_problem(source, "the weights", SOURCE_DTYPES)


def quantize(ggml_type: GGMLType, source: torch.Tensor, out: torch.Tensor, portable: bool = False) -> None:
    """Write the GGML blocks of `source` (whole blocks of weights, any shape) into `out` (uint8, one
    `type_size` run of bytes per block). Block types only: F32, F16 and BF16 have no quantizer here.

    The K-quants are compiled for AVX-512 and AVX2 x86-64 CPUs besides any CPU, and run by the build
    this CPU can run; `portable` runs the build for any CPU instead, which writes the same bytes (the
    tests check it on machines whose CPU picks another)."""
    reason = quantize_problem(source)
    if reason is not None:
        raise KernelInputError(reason)
    blocks = _whole_blocks(source.numel(), ggml_type.block_size, f"{ggml_type.name} weights")
    check_buffer(out, f"the {ggml_type.name} output", (torch.uint8,), blocks * ggml_type.type_size)
    native().ggml_quantize(
        ggml_type.type_id,
        source.data_ptr(),
        SOURCE_DTYPES[source.dtype],
        blocks,
        out.data_ptr(),
        torch.get_num_threads(),
        portable,
    )


def dequantize_problem(raw: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why the dequantizer cannot turn `raw` into `dtype` (contiguous uint8 CPU bytes into float32 or
    bfloat16), or None."""
    if dtype not in DEQUANTIZED_DTYPES:
        return f"the dequantizer writes float32 or bfloat16, not {dtype}"
    return buffer_problem(raw, "the GGML bytes", (torch.uint8,))


def dequantize(ggml_type: GGMLType, raw: torch.Tensor, out: torch.Tensor) -> None:
    """Write the weights of the GGML blocks `raw` (uint8, whole blocks) into `out` (float32 or bfloat16,
    `block_size` values per block)."""
    reason = dequantize_problem(raw, out.dtype)
    if reason is not None:
        raise KernelInputError(reason)
    blocks = _whole_blocks(raw.numel(), ggml_type.type_size, f"{ggml_type.name} bytes")
    check_buffer(out, "the output", DEQUANTIZED_DTYPES, blocks * ggml_type.block_size)
    native().ggml_dequantize(
        ggml_type.type_id, raw.data_ptr(), blocks, out.data_ptr(), out.dtype == torch.bfloat16, torch.get_num_threads()
    )


def _whole_blocks(count: int, per_block: int, what: str) -> int:
    if count % per_block:
        raise KernelInputError(f"{count} {what} are not whole blocks of {per_block}")
    return count // per_block
