"""bitsandbytes quantization in chunks: the same bytes, a fraction of the temporary memory.

bitsandbytes quantizes a whole weight at once, making float32 and int32 temporaries about eight
times the size of a bf16 layer; for the largest layer of a model that sets the loader's peak
memory. Both of its formats are blockwise (4-bit: blocks of 64 elements; 8-bit: one scale per
row), so calling bitsandbytes' own functions on slices that end on block boundaries gives
byte-identical results while only one slice's temporaries exist at a time.
"""

from __future__ import annotations

import torch

#: elements per slice: about 4 MB of float32 temporaries per step
CHUNK_ELEMENTS = 1 << 20


def quantize_4bit(
    weight: torch.Tensor,
    *,
    quant_type: str,
    compress_statistics: bool,
    quant_storage: torch.dtype,
    blocksize: int = 64,
    chunk_elements: int = CHUNK_ELEMENTS,
):
    """What `bitsandbytes.functional.quantize_4bit` returns, computed one slice at a time."""
    import bitsandbytes.functional as F

    flat = weight.reshape(-1)
    step = max(blocksize, chunk_elements // blocksize * blocksize)
    packed_parts, absmax_parts = [], []
    starts = list(range(0, flat.numel(), step))
    for i, start in enumerate(starts):
        # the last slice takes the remainder too, so a trailing partial block is handled as bitsandbytes does
        end = flat.numel() if i == len(starts) - 1 else start + step
        packed, state = F.quantize_4bit(
            flat[start:end], blocksize=blocksize, compress_statistics=False, quant_type=quant_type, quant_storage=quant_storage
        )
        packed_parts.append(packed)
        absmax_parts.append(state.absmax)
    packed = torch.cat(packed_parts)
    absmax = torch.cat(absmax_parts)
    code = F.get_4bit_type(quant_type, device=weight.device)
    if not compress_statistics:
        return packed, F.QuantState(
            absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, code=code, quant_type=quant_type
        )
    # the same second-level quantization of the block scales as bitsandbytes' quantize_4bit
    offset = absmax.mean()
    quantized_absmax, nested_state = F.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, F.QuantState(
        absmax=quantized_absmax,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        code=code,
        quant_type=quant_type,
        offset=offset,
        state2=nested_state,
    )


def int8_vectorwise_quant(weight: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, per-row scales) as `bitsandbytes.functional.int8_vectorwise_quant` of the float16 weight."""
    import bitsandbytes.functional as F

    rows, columns = weight.shape
    int8_weight = torch.empty((rows, columns), dtype=torch.int8, device=weight.device)
    row_scales = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(1, chunk_elements // columns)
    for start in range(0, rows, step):
        part = weight[start : start + step].to(torch.float16)
        int8_part, scales, _ = F.int8_vectorwise_quant(part)
        int8_weight[start : start + step] = int8_part
        row_scales[start : start + step] = scales
    return int8_weight, row_scales
