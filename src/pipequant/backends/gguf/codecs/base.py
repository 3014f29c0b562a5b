"""What every GGML codec shares: the `GGMLQuant` base class (one subclass per type, sizes from
`table`), and the exact float32 helpers the codecs are written with.

The codecs use only device-agnostic torch ops, so they run on CPU or CUDA. Exactness needs some
care because torch is not numpy/C:

* every float op is a separate, unfused float32 op, in the C/numpy evaluation order;
* ``scalar / tensor`` is avoided (torch evaluates it as ``tensor.reciprocal() * scalar``),
  as is ``tensor / python_scalar`` (CUDA turns it into a multiply by the reciprocal):
  :func:`div` always divides by a tensor;
* round-half-away-from-zero (C ``roundf``) is built from ``trunc`` since ``torch.round``
  rounds half to even.

Tensors are processed in chunks of blocks sized for the CPU caches, and on CPU in one
thread (`kernels.torch_on_one_thread` says why). On CPU, dequantization and the block-type
quantizers run the compiled kernels instead (`pipequant.kernels.ggml`), which give the same bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from .... import kernels
from ....kernels import ggml
from .table import GGML_TYPE_TABLE, GGMLType


def div(num: torch.Tensor | float, den: torch.Tensor | float) -> torch.Tensor:
    """IEEE float32 ``num / den`` like C, whichever operand is a Python number.

    torch computes ``number / tensor`` as ``tensor.reciprocal() * number`` (two roundings)
    and CUDA computes ``tensor / number`` as a multiply by ``1 / number``; both can differ
    from the C result in the last bit, so the number is materialized as a tensor first.
    """
    if not isinstance(num, torch.Tensor):
        num = torch.full_like(den, num)
    if not isinstance(den, torch.Tensor):
        den = torch.full_like(num, den)
    return torch.div(num, den)


_BELOW_HALF = torch.tensor(0.5 - 2**-25, dtype=torch.float32)  # the float32 just below 0.5


def round_away(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` / gguf-py ``np_roundf`` (half away from zero), exactly, in 3 ops.

    ``trunc(x + copysign(0.5, x))`` is wrong for x = 0.49999997 (the sum rounds up to 1);
    adding the float just below 0.5 instead is exact for every float32 (checked
    exhaustively for |x| < 2**24; above that all floats are integers).
    """
    return torch.copysign(_BELOW_HALF, x).add_(x).trunc_()


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``(n, 1)`` float32 -> ``(n, 2)`` little-endian IEEE half bytes (round to nearest even)."""
    return x.to(torch.float16).view(torch.uint8)


def fp16_value(raw: torch.Tensor) -> torch.Tensor:
    """``(n, 2)`` half bytes (any row stride) -> ``(n, 1)`` float32."""
    return raw.view(torch.float16).to(torch.float32)


_WORD_TYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def unpack_bits(raw: torch.Tensor, bits: int, at: int = 0) -> torch.Tensor:
    """``(n, k)`` bytes -> ``(n, 8 // bits, k)`` uint8 fields, lowest bits first.

    This is the interleaving every GGML type uses: field ``j`` of a run of bytes holds
    one contiguous run of weights. The bytes are processed as whole words (SWAR: a
    shift plus a repeated-byte mask extracts one field from up to 8 bytes at once),
    copied first so the words are aligned. Each field is written straight into its
    slot of the result (``torch.stack`` copies every small piece separately, which is
    slower). ``at`` places each field at that bit of its byte instead of bit 0, for
    high-bit planes that are OR-ed onto the low bits (it saves a shift of the result).
    """
    n, k = raw.shape
    size = next(size for size in (8, 4, 2, 1) if k % size == 0)
    words = torch.empty((n, k // size), dtype=_WORD_TYPES[size], device=raw.device)
    words.view(torch.uint8).copy_(raw)
    mask = int.from_bytes(bytes([((1 << bits) - 1) << at]) * size, "little")
    if mask >= 1 << (8 * size - 1):
        mask -= 1 << (8 * size)  # the same bits as a signed word
    fields = torch.empty((n, 8 // bits, k // size), dtype=words.dtype, device=raw.device)
    for j, shift in enumerate(range(-at, 8 - at, bits)):
        moved = words >> shift if shift > 0 else words << -shift if shift < 0 else words
        torch.bitwise_and(moved, mask, out=fields[:, j])
    return fields.view(torch.uint8)


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_bits`: ``(n, 8 // bits, k)`` fields -> ``(n, k)`` bytes."""
    out = fields[:, 0].clone()
    for j in range(1, fields.shape[1]):
        out |= fields[:, j] << (bits * j)
    return out


def absmax_signed(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The value of largest magnitude along ``dim`` of a 2-D tensor (keepdim), with its sign.

    When both signs reach it (or all values are zero) the first one wins, as with
    numpy's ``argmax`` and C's strict ``>`` scan. ``argmax`` is 30x slower than
    ``amax``/``amin`` on CPU, so it only runs on those (rare) tied lines.
    """
    hi = x.amax(dim, keepdim=True)
    lo = x.amin(dim, keepdim=True)
    out = torch.where(hi >= -lo, hi, lo)
    tie = (hi == -lo).view(-1)
    if tie.any():
        lines = tie.nonzero().squeeze(1)
        sub = x[lines] if dim == 1 else x[:, lines].t()
        out.view(-1)[lines] = sub.gather(1, sub.abs().argmax(1, keepdim=True)).view(-1)
    return out


def min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row min and max (keepdim); on ties the first value wins, like llama.cpp's scan.

    Ties only matter for the sign of a zero: ``amin``/``amax`` (and numpy's SIMD
    reductions) return either zero depending on lane order, so rows whose min or max
    is zero are resolved with (slow) ``argmin``/``argmax``.
    """
    lo = x.amin(1, keepdim=True)
    hi = x.amax(1, keepdim=True)
    zero = ((lo == 0) | (hi == 0)).view(-1)
    if zero.any():
        rows = zero.nonzero().squeeze(1)
        sub = x[rows]
        lo[rows] = sub.gather(1, sub.argmin(1, keepdim=True))
        hi[rows] = sub.gather(1, sub.argmax(1, keepdim=True))
    return lo, hi


def scale_into(
    out: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    add: torch.Tensor | None = None,
    sub: torch.Tensor | None = None,
) -> None:
    """``out = q * d (+ add | - sub)`` in float32, in gguf-py's operation order.

    Written straight into ``out`` (a chunk of the result) when it is float32, which
    saves a full pass over the output; other dtypes get a float32 result converted.
    """
    res = out.view(q.shape) if out.dtype == torch.float32 else q.new_empty(q.shape, dtype=torch.float32)
    # Convert first: a mixed integer * float mul takes a slow, unvectorized path.
    res.copy_(q).mul_(d)
    if add is not None:
        res.add_(add)
    if sub is not None:
        res.sub_(sub)
    if out.dtype != torch.float32:
        out.copy_(res.view(out.shape))


_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def result_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A result buffer. On CPU numpy allocates it: numpy asks the kernel for transparent huge
    pages on large arrays and torch does not, so filling a fresh 36 MB output takes far fewer
    page faults (measured: dequantization 1.3-1.8x faster on a 3072x3072 tensor)."""
    if device.type != "cpu" or dtype not in _NUMPY_DTYPES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype])).view(dtype)


class GGMLQuant(ABC):
    """The codec of one GGML storage type: ``block_size`` weights are stored in ``type_size`` bytes.

    One subclass per type, as gguf-py's ``quants.py`` has (``class Q8_0(GGMLQuant, type_name="Q8_0")``).
    Subclasses implement the codec for a batch of blocks; the base class reshapes tensors
    into blocks and feeds them in chunks, so each step's intermediates stay cache-sized
    (the K-quant searches make hundreds of passes over their inputs).
    """

    ggml_type: ClassVar[GGMLType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    quantize_chunk: ClassVar[int] = 8192
    dequantize_chunk: ClassVar[int] = 8192
    #: whether the compiled quantizer (`kernels.ggml.quantize`) encodes this type on CPU, with the
    #: same bytes; False: the torch code below everywhere
    compiled_quantizer: ClassVar[bool] = False

    def __init_subclass__(cls, type_name: str | None = None, **kwargs: object) -> None:
        """A concrete codec names its type (its sizes come from `GGML_TYPE_TABLE`); intermediate helper
        classes name none."""
        super().__init_subclass__(**kwargs)
        if type_name is None:
            return
        cls.ggml_type = GGML_TYPE_TABLE[type_name]
        cls.block_size, cls.type_size = cls.ggml_type.block_size, cls.ggml_type.type_size

    @classmethod
    @abstractmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """``(n, block_size)`` float32 -> ``(n, type_size)`` uint8."""

    @classmethod
    @abstractmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """``(n, type_size)`` uint8 -> ``out``, ``(n, block_size)`` of any float dtype.

        Values are computed in float32 exactly as gguf-py does, then stored in ``out``.
        """

    @classmethod
    def quantize_rows(cls, rows: torch.Tensor) -> torch.Tensor:
        """``(r, k)`` floats -> ``(r, k // block_size * type_size)`` uint8."""
        out = result_buffer((rows.numel() // cls.block_size, cls.type_size), torch.uint8, rows.device)
        source = rows.contiguous()
        if cls.compiled_quantizer and kernels.compiled() is not None and ggml.quantize_problem(source) is None:
            ggml.quantize(cls.ggml_type, source, out)
            return out.view(rows.shape[0], -1)
        step = cls.quantize_chunk
        with kernels.torch_on_one_thread(rows.device):
            blocks = source.reshape(-1, cls.block_size)
            for start in range(0, blocks.shape[0], step):
                out[start : start + step] = cls.quantize_blocks(blocks[start : start + step].to(torch.float32))
        return out.view(rows.shape[0], -1)

    @classmethod
    def dequantize_rows(cls, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Flat contiguous uint8 -> flat ``dtype`` weights. On CPU, into float32 or bfloat16, by the
        compiled kernel (`kernels.ggml.dequantize`: the same values, in one pass)."""
        blocks = raw.view(-1, cls.type_size)
        out = result_buffer((blocks.shape[0], cls.block_size), dtype, raw.device)
        if kernels.compiled() is not None and ggml.dequantize_problem(raw, dtype) is None:
            ggml.dequantize(cls.ggml_type, raw, out)
            return out.view(-1)
        step = cls.dequantize_chunk
        with kernels.torch_on_one_thread(raw.device):
            for start in range(0, blocks.shape[0], step):
                cls.dequantize_blocks(blocks[start : start + step], out[start : start + step])
        return out.view(-1)
