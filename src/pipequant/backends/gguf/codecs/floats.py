"""The float types F32, F16 and BF16: one weight per "block", stored as is (with gguf-py's NaN payloads)."""

from __future__ import annotations

import torch

from .base import GGMLQuant


class F32(GGMLQuant, type_name="F32"):
    quantize_chunk = dequantize_chunk = 1 << 22

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(blocks.view(torch.float32))


class F16(GGMLQuant, type_name="F16"):
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


class BF16(GGMLQuant, type_name="BF16"):
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


CODECS: tuple[type[GGMLQuant], ...] = (F32, F16, BF16)
