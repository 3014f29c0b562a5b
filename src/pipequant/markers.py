"""What diffusers and transformers set on a model they quantized, set on every model pipequant quantizes.

Their code, and peft's, decides by these attributes whether a model is quantized and how:

* diffusers' `ModelMixin.to` / `.half()` / `.float()` refuse a dtype cast when ``is_quantized``;
  `DiffusionPipeline.to(dtype)` leaves bitsandbytes models alone (``is_loaded_in_4bit`` /
  ``is_loaded_in_8bit`` with ``quantization_method == "bitsandbytes"``) and moves them with care;
* peft's LoRA layers read ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``, and for torchao merge
  through ``hf_quantizer.quantization_config.get_apply_tensor_subclass()``;
* ``model.dequantize()`` calls ``hf_quantizer.dequantize``; saving reads ``config.quantization_config``.

So a pipequant model gets the same: ``hf_quantizer`` (the library's own quantizer object for the
backend, see `Backend.library_quantizer`), ``is_quantized``, ``quantization_method``, the
bitsandbytes flags, and ``config.quantization_config`` as the library's own config object (see
`BackendConfig.to_library`). diffusers models get diffusers' objects, transformers models
transformers' (GGUF excepted: transformers has none, see `backends/gguf/library_quantizer.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backends import backend_for
from .backends.base import BackendConfig


def model_library(model: nn.Module) -> str | None:
    """ "diffusers" or "transformers" for their models; None for any other module (no library reads markers there)."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        return "diffusers"
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return "transformers"
    return None


def mark_quantized(
    model: nn.Module,
    config: BackendConfig,
    *,
    dtype: torch.dtype | None,
    pre_quantized: bool,
    keep_in_fp32: list[str],
) -> None:
    """Set on `model` what its library's ``from_pretrained(quantization_config=...)`` sets.

    `pre_quantized` is the library's meaning: the weights were stored quantized (restored), not
    quantized while loading. `dtype` is the load dtype (diffusers records it as
    ``_pre_quantization_dtype``); `keep_in_fp32` the model's float32 modules, which the library's
    quantizer lists among the modules it did not convert.
    """
    library = model_library(model)
    if library is None:
        return
    library_config = config.to_library(library, dtype)
    quantizer = backend_for(config).library_quantizer(library_config, pre_quantized=pre_quantized)
    skipped = getattr(library_config, "llm_int8_skip_modules", None) or getattr(
        library_config, "modules_to_not_convert", None
    )
    quantizer.modules_to_not_convert = [*(skipped or ()), *keep_in_fp32]

    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = library_config.quant_method
    for bits in (4, 8):
        if getattr(library_config, f"load_in_{bits}bit", False):
            setattr(model, f"is_loaded_in_{bits}bit", True)
            if library == "diffusers":
                setattr(model, f"is_{bits}bit_serializable", quantizer.is_serializable)
    if library == "diffusers":
        model.register_to_config(quantization_config=library_config, _pre_quantization_dtype=dtype)
    else:
        _mark_transformers_config(model, library_config)


def _mark_transformers_config(model: nn.Module, library_config: Any) -> None:
    """As transformers' `HfQuantizer.postprocess_model`: the config object, and ``_is_quantized`` on every
    submodel's config (which its loading and DeepSpeed code read)."""
    from transformers import PreTrainedModel

    model.config.quantization_config = library_config
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True
