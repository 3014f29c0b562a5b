"""`GGUFLinear`: a linear layer that keeps its weight as raw GGML blocks and dequantizes per call.

The weight is stored exactly as a .gguf file holds it (uint8, one row of blocks per output
feature), so loading a file copies bytes and writing one copies them back, with no re-quantization
either way. Each forward dequantizes (compiled kernel on CPU) to `compute_dtype` and runs `F.linear`:
memory is the quantized size, at the price of a dequantization per call, as in ComfyUI-GGUF and
diffusers' GGUF layers. The dequantization is a torch custom operator (`ops.py`), so `torch.compile`
traces the layer into one graph.

A GGML type stores rows in blocks (32 weights, 256 for the K-quants); a layer whose input size is
not a multiple gets the type llama.cpp's quantizer picks for such rows instead, or F16/BF16 when
no block type fits (`config.fitting_type`). That is announced (`GGUFTypeFallbackWarning`, naming the layer and both
types) and kept on the layer (`requested_type`) for reports: `type_fallbacks(model)`.

The weight is a `GGUFParameter`, diffusers' class for GGUF weights: diffusers' LoRA loaders tell a GGUF weight
(whose shape counts bytes) by that class and read the layer's real shape from its `quant_shape`, so
`pipe.load_lora_weights` sizes a LoRA for our layers as for diffusers' own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.quantizers.gguf.utils import GGUFParameter as DiffusersGGUFParameter
from gguf import GGMLQuantizationType
from torch import nn

from .codecs import block_size, quantize
from .config import fitting_type, row_nbytes
from .ops import gguf_dequantize


class GGUFTypeFallbackWarning(UserWarning):
    """A layer was stored in another GGML type than asked, because its rows do not fit the type's blocks."""


class GGUFParameter(DiffusersGGUFParameter):
    """diffusers' `GGUFParameter` (raw GGML blocks with `quant_type` and `quant_shape`), with two of its failures
    fixed: rebuilt from one of its own kind without `quant_type` (`copy.deepcopy` and accelerate's
    `set_module_tensor_to_device` call ``type(weight)(data, requires_grad)``) it keeps the type, where diffusers'
    class fails on `GGML_QUANT_SIZES[None]`; and an op's result is a `GGUFParameter` only while it is still blocks
    (uint8, with a last dimension of bytes), where diffusers' class wraps every result and fails on 0-dim ones
    (``(weight == other).all()``).

    The class keeps diffusers' name on purpose: diffusers' LoRA code recognises GGUF weights by
    ``weight.__class__.__name__ == "GGUFParameter"``.
    """

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False, quant_type: GGMLQuantizationType | None = None):
        quant_type = quant_type if quant_type is not None else getattr(data, "quant_type", None)
        if quant_type is None:
            raise ValueError("a GGUFParameter needs the GGML type of its blocks: pass quant_type")
        return super().__new__(cls, data, requires_grad, quant_type)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        quant_type = cls._extract_quant_type(args)

        def blocks(value: Any) -> Any:
            is_blocks = isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() > 0
            return cls(value, quant_type=quant_type) if is_blocks and quant_type is not None else value

        return type(result)(map(blocks, result)) if type(result) in (list, tuple) else blocks(result)


class GGUFLinear(nn.Module):
    """A linear layer over raw GGML blocks: `weight` is a uint8 ``(out_features, bytes per row)`` `GGUFParameter`.

    `ggml_type` is the type the bytes are in; `requested_type` is the type asked for when a
    fallback replaced it (None otherwise). The bias stays a plain tensor in `compute_dtype`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ggml_type: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        requested_type: str | None = None,
    ) -> None:
        super().__init__()
        expected = (out_features, row_nbytes(ggml_type, in_features))
        if in_features % block_size(ggml_type) or weight.dtype != torch.uint8 or tuple(weight.shape) != expected:
            raise ValueError(
                f"a {ggml_type} weight of shape {(out_features, in_features)} is uint8 {expected}; "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"the bias has shape {tuple(bias.shape)}, the layer {out_features} outputs")
        self.in_features = in_features
        self.out_features = out_features
        self.ggml_type = ggml_type
        self.requested_type = requested_type
        self.compute_dtype = compute_dtype
        # a parameter, as diffusers' GGUF weights: accelerate's sequential offload keeps buffers on the accelerator
        self.weight = GGUFParameter(weight, quant_type=GGMLQuantizationType[ggml_type])
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        # the plain tensor: through the subclass, every op's result would be wrapped as a GGUFParameter again
        raw = self.weight.as_tensor()
        return gguf_dequantize(raw, self.ggml_type, self.out_features, self.in_features, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        fallback = f" (asked {self.requested_type})" if self.requested_type else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"type={self.ggml_type}{fallback}, compute_dtype={self.compute_dtype}"
        )


def quantize_linear(
    linear: nn.Linear, requested: str, compute_dtype: torch.dtype | None, name: str, device: torch.device
) -> GGUFLinear:
    """`linear` (with real weights) as a `GGUFLinear` of type `requested`, or of the type that fits its rows.

    `compute_dtype=None` computes in the dtype the weights come in.
    """
    weight = linear.weight.data
    stored = fitting_type(requested, linear.in_features, weight.dtype)
    if stored != requested:
        warnings.warn(
            f"GGUF: layer {name!r} has rows of {linear.in_features} weights, not a multiple of the {requested} "
            f"block size {block_size(requested)}; it is stored as {stored} instead.",
            GGUFTypeFallbackWarning,
            stacklevel=2,
        )
    raw = quantize(weight.to(device), stored)
    bias = None if linear.bias is None else linear.bias.data.to(device)
    return GGUFLinear(
        linear.in_features,
        linear.out_features,
        stored,
        raw,
        bias,
        compute_dtype or weight.dtype,
        requested_type=requested if stored != requested else None,
    )


def type_fallbacks(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{layer name: (requested type, stored type)}`` for every layer a fallback changed."""
    return {
        name: (module.requested_type, module.ggml_type)
        for name, module in model.named_modules()
        if isinstance(module, GGUFLinear) and module.requested_type is not None
    }
