"""GGML block quantization codecs written with plain torch ops.

The layout and the arithmetic follow gguf-py's ``gguf/quants.py`` (one class per type,
``quantize_blocks``/``dequantize_blocks`` on a batch of blocks), so that:

* ``dequantize`` is bit-exact with ``gguf.quants.dequantize`` for every type, and
* ``quantize`` is byte-identical with ``gguf.quants.quantize`` where gguf-py has a quantizer
  (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). The K-quants, which gguf-py cannot
  produce, live in :mod:`.kquants` and follow llama.cpp's ``quantize_row_q*_K_ref``.

Only device-agnostic torch ops are used, so the codecs run on CPU or CUDA. Exactness
needs some care because torch is not numpy/C:

* every float op is a separate, unfused float32 op, in the C/numpy evaluation order;
* ``scalar / tensor`` is avoided (torch evaluates it as ``tensor.reciprocal() * scalar``),
  as is ``tensor / python_scalar`` (CUDA turns it into a multiply by the reciprocal):
  :func:`div` always divides by a tensor;
* round-half-away-from-zero (C ``roundf``) is built from ``trunc`` since ``torch.round``
  rounds half to even.

Tensors are processed in chunks of blocks sized for the CPU caches, and on CPU in one
thread (see :func:`_serial_cpu` for why).

On CPU, dequantization and the block-type quantizers (Q8_0..Q5_1, the K-quants) run
compiled kernels instead (``src/pipequant/_native``) that give the same bytes; these torch
codecs run on other devices (and without the kernels) and remain the readable statement of
each layout.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from types import ModuleType
from typing import ClassVar

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ...kernels import SOURCE_DTYPES, compiled

_ggml_dequantize = compiled("ggml_dequantize")
#: the compiled quantizer of every block type on CPU (pipequant/_native/ggml_quantize.c), or None
block_quantizer = compiled("ggml_quantize")

QuantType = str | GGMLQuantizationType

_REGISTRY: dict[GGMLQuantizationType, type[GGMLQuant]] = {}


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


@contextlib.contextmanager
def _serial_cpu(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU ops on the calling thread only; the thread count is restored after.

    The codecs are sequences of many cache-sized ops. Every op that torch spreads over its
    OpenMP threads ends at a barrier, and on a busy machine each barrier waits for a
    descheduled thread: on the 2-core target at load ~3 that made dequantization 40x and
    K-quant quantization 20-50x slower than one thread, while an idle machine gains at most
    2x (1.3x for the K-quant searches) from the second core. Callers that want more cores
    can run several tensors in parallel threads (torch ops release the GIL).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_NUMPY_DTYPES = {torch.uint8: np.uint8, torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def result_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A result buffer. On CPU numpy allocates it: numpy asks the kernel for transparent huge
    pages on large arrays and torch does not, so filling a fresh 36 MB output takes far fewer
    page faults (measured: dequantization 1.3-1.8x faster on a 3072x3072 tensor)."""
    if device.type != "cpu" or dtype not in _NUMPY_DTYPES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype])).view(dtype)


class GGMLQuant(ABC):
    """One GGML storage type: ``block_size`` weights are stored in ``type_size`` bytes.

    Subclasses implement the codec for a batch of blocks; the base class reshapes tensors
    into blocks and feeds them in chunks, so each step's intermediates stay cache-sized
    (the K-quant searches make hundreds of passes over their inputs).
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    quantize_chunk: ClassVar[int] = 8192
    dequantize_chunk: ClassVar[int] = 8192
    #: the compiled module whose ``quantize`` encodes this type on CPU, with the same bytes
    #: (``pipequant/_native``); None: the torch code below everywhere
    compiled_quantizer: ClassVar[ModuleType | None] = None

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: object) -> None:
        """Register a concrete codec; intermediate helper classes pass no ``qtype``."""
        super().__init_subclass__(**kwargs)
        if qtype is None:
            return
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        _REGISTRY[qtype] = cls

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
        if cls.compiled_quantizer is not None and rows.device.type == "cpu" and rows.dtype in SOURCE_DTYPES:
            source = rows.contiguous()
            cls.compiled_quantizer.quantize(
                int(cls.qtype), source.data_ptr(), SOURCE_DTYPES[source.dtype], out.shape[0], out.data_ptr(),
                torch.get_num_threads(),
            )
            return out.view(rows.shape[0], -1)
        step = cls.quantize_chunk
        with _serial_cpu(rows.device):
            blocks = rows.reshape(-1, cls.block_size)
            for start in range(0, blocks.shape[0], step):
                out[start : start + step] = cls.quantize_blocks(blocks[start : start + step].to(torch.float32))
        return out.view(rows.shape[0], -1)

    @classmethod
    def dequantize_rows(cls, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Flat uint8 -> flat ``dtype`` weights. On CPU, into float32 or bfloat16, by the compiled
        kernel (`pipequant/_native/ggml_dequantize.c`: the same values, in one pass)."""
        blocks = raw.view(-1, cls.type_size)
        out = result_buffer((blocks.shape[0], cls.block_size), dtype, raw.device)
        if _ggml_dequantize is not None and raw.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            _ggml_dequantize.dequantize(
                int(cls.qtype), blocks.data_ptr(), blocks.shape[0], out.data_ptr(), dtype == torch.bfloat16,
                torch.get_num_threads(),
            )
            return out.view(-1)
        step = cls.dequantize_chunk
        with _serial_cpu(raw.device):
            for start in range(0, blocks.shape[0], step):
                cls.dequantize_blocks(blocks[start : start + step], out[start : start + step])
        return out.view(-1)


class F32(GGMLQuant, qtype=GGMLQuantizationType.F32):
    quantize_chunk = dequantize_chunk = 1 << 22

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks.view(torch.float32))


class F16(GGMLQuant, qtype=GGMLQuantizationType.F16):
    quantize_chunk = dequantize_chunk = 1 << 22

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        out = blocks.to(torch.float16).view(torch.int16)
        nan = torch.isnan(blocks)
        if nan.any():
            # numpy keeps a NaN's payload as is (torch sets the quiet bit): sign, all-ones
            # exponent, top 10 payload bits, and bit 0 if those are all zero.
            bits = blocks.view(torch.int32)
            half = ((bits >> 16) & 0x8000) | 0x7C00 | ((bits & 0x7FFFFF) >> 13)
            half = torch.where((half & 0x3FF) == 0, half | 1, half).to(torch.int16)
            out = torch.where(nan, half, out)
        return out.view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks.view(torch.float16))


class BF16(GGMLQuant, qtype=GGMLQuantizationType.BF16):
    quantize_chunk = dequantize_chunk = 1 << 22

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        out = blocks.to(torch.bfloat16).view(torch.int16)
        nan = torch.isnan(blocks)
        if nan.any():
            # ggml (and gguf-py) keep sign and top payload bits and set the quiet bit;
            # torch returns the canonical NaN instead.
            quiet = ((blocks.view(torch.int32) >> 16) | 0x40).to(torch.int16)
            out = torch.where(nan, quiet, out)
        return out.view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks.view(torch.bfloat16))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``1 / d``, with 0 where ``d == 0`` (``np.where(d == 0, 0, 1 / d)``)."""
    return torch.where(d == 0, 0.0, d.reciprocal())


class Q8_0(GGMLQuant, qtype=GGMLQuantizationType.Q8_0):
    compiled_quantizer = block_quantizer

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = div(blocks.abs().amax(1, keepdim=True), 127.0)
        qs = round_away(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
        return torch.cat((fp16_bytes(d), qs), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        scale_into(out, blocks[:, 2:].view(torch.int8), fp16_value(blocks[:, :2]))


def _argmax_of_abs(blocks: torch.Tensor) -> torch.Tensor:
    """gguf-py's ``take_along_axis(x, abs(x).argmax())`` (keepdim): `absmax_signed`, except that a NaN
    is the largest, the block's first one, sign and payload kept (torch's amax returns its own NaN).
    The scale stored from it keeps them too (`F16.quantize_blocks`, numpy's conversion)."""
    largest = absmax_signed(blocks, 1)
    nan = torch.isnan(largest).view(-1)
    if nan.any():
        rows = nan.nonzero().squeeze(1)
        sub = blocks[rows]
        largest[rows] = sub.gather(1, torch.isnan(sub).to(torch.uint8).argmax(1, keepdim=True))
    return largest


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(n, 32)`` 4-bit values -> 16 bytes: weight j in the low, j + 16 in the high nibble."""
    return q[:, :16] | (q[:, 16:] << 4)


class Q4_0(GGMLQuant, qtype=GGMLQuantizationType.Q4_0):
    compiled_quantizer = block_quantizer

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = div(_argmax_of_abs(blocks), -8.0)
        q = (blocks * _inverse(d)).add_(8.5).trunc_().clamp_(0, 15).to(torch.int8).view(torch.uint8)
        return torch.cat((F16.quantize_blocks(d), _nibbles(q)), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = unpack_bits(blocks[:, 2:], 4).view(torch.int8).sub_(8)
        scale_into(out, q.view(-1, 32), fp16_value(blocks[:, :2]))


class Q4_1(GGMLQuant, qtype=GGMLQuantizationType.Q4_1):
    compiled_quantizer = block_quantizer

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        lo, hi = min_max(blocks)
        d = div(hi - lo, 15.0)
        q = (blocks - lo).mul_(_inverse(d)).add_(0.5).trunc_().clamp_(0, 15).to(torch.int8).view(torch.uint8)
        return torch.cat((fp16_bytes(d), fp16_bytes(lo), _nibbles(q)), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = unpack_bits(blocks[:, 4:], 4).view(-1, 32)
        scale_into(out, q, fp16_value(blocks[:, :2]), add=fp16_value(blocks[:, 2:4]))


def _pack_q5(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5-bit values ``(n, 32)`` -> (qh: bit j of a little-endian u32 = high bit of q[j], qs)."""
    high = (q >> 4).view(-1, 4, 8)
    return pack_bits(high.transpose(1, 2), 1), _nibbles(q & 0x0F)


_BIT_OF_BYTE = 0x8040201008040201 - (1 << 64)  # byte i keeps bit i (as a signed int64)


def _unpack_q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_q5`: ``(n, 32)`` uint8 values in 0..31.

    Bit j of qh goes to weight j: each qh byte is replicated into the 8 bytes of an
    int64, byte i keeps bit i, and adding 0x7F per byte moves any set bit to bit 7,
    which is then shifted to bit 4 (3 ops on 8 weights at a time).
    """
    spread = (qh.to(torch.int64) * 0x0101010101010101) & _BIT_OF_BYTE
    high = ((spread + 0x7F7F7F7F7F7F7F7F) >> 3) & 0x1010101010101010
    return unpack_bits(qs, 4).view(-1, 32) | high.view(torch.uint8).view(-1, 32)


class Q5_0(GGMLQuant, qtype=GGMLQuantizationType.Q5_0):
    compiled_quantizer = block_quantizer

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = div(_argmax_of_abs(blocks), -16.0)
        q = (blocks * _inverse(d)).add_(16.5).trunc_().clamp_(0, 31).to(torch.int8).view(torch.uint8)
        return torch.cat((F16.quantize_blocks(d), *_pack_q5(q)), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = _unpack_q5(blocks[:, 2:6], blocks[:, 6:]).view(torch.int8).sub_(16)
        scale_into(out, q, fp16_value(blocks[:, :2]))


class Q5_1(GGMLQuant, qtype=GGMLQuantizationType.Q5_1):
    compiled_quantizer = block_quantizer

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        lo, hi = min_max(blocks)
        d = div(hi - lo, 31.0)
        q = (blocks - lo).mul_(_inverse(d)).add_(0.5).trunc_().clamp_(0, 31).to(torch.int8).view(torch.uint8)
        return torch.cat((fp16_bytes(d), fp16_bytes(lo), *_pack_q5(q)), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = _unpack_q5(blocks[:, 4:8], blocks[:, 8:])
        scale_into(out, q, fp16_value(blocks[:, :2]), add=fp16_value(blocks[:, 2:4]))


def resolve(qtype: QuantType) -> type[GGMLQuant]:
    """The codec class for a type name (any case) or ``GGMLQuantizationType``."""
    if isinstance(qtype, str):
        member = GGMLQuantizationType.__members__.get(qtype.upper())
    else:
        member = qtype if isinstance(qtype, GGMLQuantizationType) else None
    if member not in _REGISTRY:
        raise ValueError(f"unsupported GGML type {qtype!r}; valid types: {', '.join(GGML_TYPES)}")
    return _REGISTRY[member]


def block_size(qtype: QuantType) -> int:
    """Weights per block (a row length must be a multiple of it)."""
    return resolve(qtype).block_size


def type_size(qtype: QuantType) -> int:
    """Bytes per block."""
    return resolve(qtype).type_size


def _check_row(codec: type[GGMLQuant], row: int, shape: tuple[int, ...]) -> None:
    if 0 in shape:
        raise ValueError(f"shape {shape} has no elements; a GGML tensor holds at least one block")
    if row % codec.block_size:
        raise ValueError(f"row length {row} is not a multiple of the {codec.qtype.name} block size {codec.block_size}")


def quantize(tensor: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    """Quantize along the last dim; returns uint8 ``(rows, bytes_per_row)`` like gguf-py.

    Any float dtype is accepted; the math runs in float32 on the tensor's device.
    """
    codec = resolve(qtype)
    row = tensor.shape[-1] if tensor.dim() else 1
    _check_row(codec, row, tuple(tensor.shape))
    return codec.quantize_rows(tensor.reshape(-1, row))


def dequantize(
    raw: torch.Tensor, qtype: QuantType, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode GGML bytes (uint8, ``(rows, bytes_per_row)`` or flat) into a ``shape`` tensor."""
    codec = resolve(qtype)
    shape = tuple(shape)
    row = shape[-1] if shape else 1
    _check_row(codec, row, shape)
    numel = 1
    for dim in shape:
        numel *= dim
    expected = numel // codec.block_size * codec.type_size
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        raise ValueError(
            f"{codec.qtype.name} data for shape {shape} must be {expected} uint8 bytes, got {raw.numel()} {raw.dtype}"
        )
    raw = raw.contiguous()
    if raw.storage_offset() % 8:  # a slice at an odd byte: the torch codecs view it as wider words
        raw = raw.clone()
    return codec.dequantize_rows(raw.view(-1), dtype).view(shape)


from . import kquants as _kquants  # noqa: E402,F401  (registers Q2_K..Q6_K)

GGML_TYPES: tuple[str, ...] = tuple(qtype.name for qtype in sorted(_REGISTRY))
"""Names of the supported types, in GGML type-id order."""
