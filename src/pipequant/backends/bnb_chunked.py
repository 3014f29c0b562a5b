"""bitsandbytes 4-bit quantization in chunks: the same bytes, a fraction of the temporary memory.

bitsandbytes quantizes a whole weight at once, making float32 and int32 temporaries about eight
times the size of a bf16 layer; for the largest layer of a model that sets the loader's peak
memory. Its 4-bit format is blockwise (blocks of 64 elements), so calling bitsandbytes' own
function on slices that end on block boundaries gives byte-identical results while only one
slice's temporaries exist at a time. (Its int8 format is per row: see `row_blocks`.)
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

