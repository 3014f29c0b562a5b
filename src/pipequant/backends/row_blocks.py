"""Quantizing a weight a block of rows at a time, with the library's own quantizer.

Per-row formats (bitsandbytes int8; torchao's int8 / float8 / intx tensors; quanto's weights,
scaled per row or per group within a row) compute each row's values from that row alone, so
calling the library's quantizer on consecutive row blocks and stacking the results gives
exactly the bytes of one whole-weight call. It is also faster: on a whole Flux weight (75 MB
in bf16) each of the quantizer's elementwise passes streams the weight and its float32
temporaries through memory, while a block of a few MB stays in the caches for all of them.
Measured on one 3072 x 12288 bf16 weight, 2 idle cores: quanto int8 0.17 s -> 0.07 s, quanto
int4 0.27 -> 0.17, torchao int8 0.25 -> 0.12, bitsandbytes int8 0.26 -> 0.12; same bytes.
Only one block's temporaries exist at a time, which also keeps the loader's peak low.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: elements per block: 4 MB of float32 temporaries; measured best of 2^16..2^21 for all three
#: libraries (smaller blocks pay torchao's per-call Python cost, larger ones leave the caches)
BLOCK_ELEMENTS = 1 << 20

#: elements per block on a GPU: no cache to fit, but whole-weight temporaries (several float32
#: copies of the largest layer) would count against the GPU peak; few blocks keep the per-call
#: Python cost small (torchao's `quantize_` takes about half a millisecond). Not yet timed on a GPU.
GPU_BLOCK_ELEMENTS = 1 << 24


class NotRowSeparable(ValueError):
    """The quantizer's output for a block of rows is not one row per row (a per-tensor scale,
    a packing across rows): the weight has to be quantized whole."""


def rows_per_block(weight: torch.Tensor, device: torch.device, align: int = 1) -> int:
    """Rows per block for quantizing `weight` on `device`: a multiple of `align`, at least `align`."""
    elements = BLOCK_ELEMENTS if device.type == "cpu" else GPU_BLOCK_ELEMENTS
    rows = max(1, elements // max(1, weight[0].numel()))
    return max(align, rows // align * align)


def quantize_by_rows(
    weight: torch.Tensor,
    quantize_rows: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    device: torch.device,
    align: int = 1,
) -> list[torch.Tensor]:
    """Each output of `quantize_rows(weight[block])`, stacked over the blocks along dim 0.

    `quantize_rows` returns tensors whose first dimension is the block's row count. Every block
    starts at a multiple of `align` rows (for packings that interleave rows within tiles). Raises
    `NotRowSeparable` after the first block if it does not (nothing else has been computed).
    """
    rows = weight.shape[0]
    outputs: list[torch.Tensor] = []
    for start, end in _block_bounds(rows, rows_per_block(weight, device, align)):
        parts = quantize_rows(weight[start:end])
        if any(part.dim() == 0 or part.shape[0] != end - start for part in parts):
            shapes = [tuple(part.shape) for part in parts]
            raise NotRowSeparable(f"a block of {end - start} rows quantized to tensors of shapes {shapes}")
        if not outputs:
            outputs = [torch.empty((rows, *part.shape[1:]), dtype=part.dtype, device=part.device) for part in parts]
        for output, part in zip(outputs, parts):
            output[start:end] = part
    return outputs


def _block_bounds(rows: int, step: int) -> list[tuple[int, int]]:
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] == 1:
        starts.pop()  # the last block takes a single leftover row: quanto treats a one-row tensor as per-tensor
    return list(zip(starts, starts[1:] + [rows]))
