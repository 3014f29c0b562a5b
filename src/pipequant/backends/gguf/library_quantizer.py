"""diffusers' GGUF config and quantizer, taught pipequant's `GGUFLinear` layers and settings.

diffusers' `GGUFQuantizer` is the closest object diffusers has for a GGUF model, and the one its
code checks for (`hf_quantizer`, `is_serializable` False, `is_compileable`), but its `dequantize`
only finds diffusers' own GGUF layers (a `GGUFParameter` weight) and would leave ours in place while
saying the model is no longer quantized. This subclass changes only that: each `GGUFLinear` becomes
an `nn.Linear` holding its dequantized weight. transformers has no GGUF quantizer (it dequantizes
.gguf files on load), so transformers models quantized to GGUF carry this one too.

diffusers' `GGUFQuantizationConfig` is likewise extended, not replaced: it gains our `quant_type` and
`type_rules`, and its `to_dict` names `compute_dtype` instead of holding a torch dtype, which JSON
cannot write (diffusers never saves a GGUF model; pipequant does, and a model's config must serialize).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.quantizers.gguf.gguf_quantizer import GGUFQuantizer
from diffusers.quantizers.quantization_config import GGUFQuantizationConfig
from torch import nn

from ...meta_modules import meta_linear
from .linear import GGUFLinear


class GGUFLayersConfig(GGUFQuantizationConfig):
    def __init__(
        self,
        compute_dtype: torch.dtype,
        quant_type: str | None = None,
        type_rules: dict[str, str] | None = None,
        modules_to_not_convert: list[str] | None = None,
    ) -> None:
        super().__init__(compute_dtype=compute_dtype)
        self.quant_type = quant_type
        self.type_rules = type_rules
        self.modules_to_not_convert = modules_to_not_convert

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        return out


class GGUFLayersQuantizer(GGUFQuantizer):
    def dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """As diffusers' `dequantize`; `dtype` (transformers' keyword) is the dtype of the dequantized layers."""
        self._dequantize_dtype = dtype
        return super().dequantize(model)

    def _dequantize(self, model: nn.Module) -> nn.Module:
        dtype = getattr(self, "_dequantize_dtype", None)
        for name, module in list(model.named_modules()):
            if not isinstance(module, GGUFLinear):
                continue
            weight = module.dequantized_weight()
            linear = meta_linear(
                module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype or weight.dtype
            )
            linear.weight = nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to(linear.weight.dtype), requires_grad=False)
            linear.train(module.training)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        return model
