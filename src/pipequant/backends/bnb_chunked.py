"""bitsandbytes 4-bit quantization without whole-weight temporaries: the same bytes.

bitsandbytes quantizes a whole weight at once, making float32 and int32 temporaries about eight
times the size of a bf16 layer; for the largest layer of a model that sets the loader's peak
memory. On CPU the compiled kernel (`pipequant/_native/bnb4.c`) repeats bitsandbytes' arithmetic
in one pass with no temporaries, after checking its first blocks against bitsandbytes (about
10x faster than bitsandbytes' own ops). Elsewhere, since the format is blockwise (blocks of 64
elements), bitsandbytes' own function runs on slices that end on block boundaries: byte-identical
results, while only one slice's temporaries exist at a time. (Its int8 format is per row: see
`row_blocks`.)
"""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels import bnb4

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
    compiled = _compiled_4bit(flat, blocksize, quant_type, quant_storage)
    if compiled is not None:
        packed, absmax = compiled
    else:
        packed, absmax = _by_slices(flat, blocksize, quant_type, quant_storage, chunk_elements)
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


def _by_slices(
    flat: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype, chunk_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' own quantize_4bit on block-aligned slices: (packed codes, absmax) of the whole."""
    import bitsandbytes.functional as F

    step = max(blocksize, chunk_elements // blocksize * blocksize)
    packed_parts, absmax_parts = [], []
    starts = list(range(0, flat.numel(), step))
    for i, start in enumerate(starts):
        # the last slice takes the remainder too, so a trailing partial block is handled as bitsandbytes does
        end = flat.numel() if i == len(starts) - 1 else start + step
        packed, state = F.quantize_4bit(
            flat[start:end],
            blocksize=blocksize,
            compress_statistics=False,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        packed_parts.append(packed)
        absmax_parts.append(state.absmax)
    return torch.cat(packed_parts), torch.cat(absmax_parts)


def _compiled_4bit(
    flat: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed codes, absmax) by the compiled kernel, if it applies and gives bitsandbytes' own
    bytes on the first two blocks; None otherwise."""

    def ours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return _run_4bit(values, blocksize, quant_type, quant_storage)

    def theirs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _by_slices(values, blocksize, quant_type, quant_storage, values.numel())

    return kernels.checked(
        kernel=ours, library=theirs, weight=flat, head=flat[: 2 * blocksize], library_name="bitsandbytes"
    )


def _run_4bit(
    flat: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The kernel's (packed, absmax), laid out as bitsandbytes' CPU quantize_4bit returns them; None
    where the kernel does not apply."""
    source = flat.contiguous()
    if kernels.compiled() is None or bnb4.problem(source, blocksize) is not None:
        return None
    bounds, order = _code_bounds(quant_type)
    packed, absmax = bnb4.quantize(source, blocksize, bounds, order)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


def _code_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The midpoints between bitsandbytes' sorted 4-bit code values, and (fp4) the code index of
    each bucket, as bitsandbytes' quantizer computes them; the order is None for nf4 (sorted)."""
    import bitsandbytes.functional as F

    code = F.get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)
    bounds = ((code[order[:-1]] + code[order[1:]]) / 2).contiguous()
    identity = torch.equal(order, torch.arange(len(code)))
    return bounds, None if identity else order.to(torch.int32).contiguous()
