"""The 32-weight block types Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 (llama.cpp's "legacy" quants), with
gguf-py's layouts and arithmetic: byte-identical with ``gguf.quants.quantize``. On CPU the compiled
quantizer (`_native/ggml_legacy.c`) gives the same bytes."""

from __future__ import annotations

import torch

from .base import (
    GGMLQuant,
    absmax_signed,
    div,
    fp16_bytes,
    fp16_value,
    min_max,
    pack_bits,
    round_away,
    scale_into,
    unpack_bits,
)
from .floats import F16


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``1 / d``, with 0 where ``d == 0`` (``np.where(d == 0, 0, 1 / d)``)."""
    return torch.where(d == 0, 0.0, d.reciprocal())


class Q8_0(GGMLQuant, type_name="Q8_0"):
    compiled_quantizer = True

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


class Q4_0(GGMLQuant, type_name="Q4_0"):
    compiled_quantizer = True

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = div(_argmax_of_abs(blocks), -8.0)
        q = (blocks * _inverse(d)).add_(8.5).trunc_().clamp_(0, 15).to(torch.int8).view(torch.uint8)
        return torch.cat((F16.quantize_blocks(d), _nibbles(q)), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = unpack_bits(blocks[:, 2:], 4).view(torch.int8).sub_(8)
        scale_into(out, q.view(-1, 32), fp16_value(blocks[:, :2]))


class Q4_1(GGMLQuant, type_name="Q4_1"):
    compiled_quantizer = True

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


class Q5_0(GGMLQuant, type_name="Q5_0"):
    compiled_quantizer = True

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        d = div(_argmax_of_abs(blocks), -16.0)
        q = (blocks * _inverse(d)).add_(16.5).trunc_().clamp_(0, 31).to(torch.int8).view(torch.uint8)
        return torch.cat((F16.quantize_blocks(d), *_pack_q5(q)), 1)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        q = _unpack_q5(blocks[:, 2:6], blocks[:, 6:]).view(torch.int8).sub_(16)
        scale_into(out, q, fp16_value(blocks[:, :2]))


class Q5_1(GGMLQuant, type_name="Q5_1"):
    compiled_quantizer = True

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


CODECS: tuple[type[GGMLQuant], ...] = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
