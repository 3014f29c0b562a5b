"""The per-layer quantization step, shared by the streaming loader and in-memory quantization.

Both paths decide which layers to quantize with `quantization_targets` and quantize each one with
its backend's `quantize`, so a pipeline quantized in memory holds the same layers as one
quantized while loading.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import torch
from torch import nn

from .backends import backend_for
from .backends.base import Backend, BackendConfig, matches_module_pattern
from .devices import check_device
from .markers import mark_quantized

RECORD_ATTRIBUTE = "pipequant_record"
#: the `BackendConfig` a quantized layer was made with, kept on the layer: fusing a LoRA into it quantizes again
#: with the same settings, and only layers carrying it get pipequant's LoRA layer (see `pipequant.lora`)
LAYER_CONFIG_ATTRIBUTE = "pipequant_config"


@dataclasses.dataclass
class QuantizationRecord:
    """What was done to a component, kept on its root module for reports and saving."""

    config: BackendConfig
    backend: str
    quantized_layers: int
    #: bytes of the component's parameters and buffers before quantization, in the load dtype
    full_precision_nbytes: int
    #: logical parameter count (quantized layers counted by their original shape)
    parameter_count: int


def record_quantization(
    model: nn.Module, record: QuantizationRecord, *, dtype: torch.dtype | None, pre_quantized: bool
) -> None:
    """Mark `model` quantized, for pipequant (`record`) and, as diffusers / transformers mark the models they
    quantize, for them and peft (see `markers`). The one place every quantized or restored model passes."""
    setattr(model, RECORD_ATTRIBUTE, record)
    keep = keep_in_fp32_patterns(model)
    mark_quantized(model, record.config, dtype=dtype, pre_quantized=pre_quantized, keep_in_fp32=keep)


def quantization_record(model: Any) -> QuantizationRecord | None:
    """How `model` was quantized; None when it was not, or has been dequantized since (``model.dequantize()``,
    which goes through the library's quantizer and clears ``is_quantized`` but knows nothing of the record)."""
    record = getattr(model, RECORD_ATTRIBUTE, None)
    return record if record is not None and getattr(model, "is_quantized", True) else None


def _fp32_lists(model: nn.Module) -> tuple[list[str], list[str]]:
    keep: Any = getattr(model, "_keep_in_fp32_modules", None) or ()
    strict: Any = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    return list(keep), list(strict)


def keep_in_fp32_patterns(model: nn.Module) -> list[str]:
    """Modules the model class keeps in float32 (e.g. T5's `wo`): never quantized, as diffusers and
    transformers leave them out of quantization too."""
    keep, strict = _fp32_lists(model)
    return keep + strict


def float32_patterns(model: nn.Module, dtype: torch.dtype | None) -> list[str]:
    """Modules the model's own `from_pretrained` would load in float32 at `dtype`.

    diffusers upcasts `_keep_in_fp32_modules` at any dtype; transformers only at float16, and its
    `_keep_in_fp32_modules_strict` at float16 and bfloat16. Following each library's rule keeps a
    streamed component identical to one its own library loads.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    keep, strict = _fp32_lists(model)
    from_transformers = type(model).__module__.startswith("transformers")
    if from_transformers and dtype == torch.bfloat16:
        keep = []
    return keep + strict


def quantization_targets(model: nn.Module, backend: Backend, config: BackendConfig) -> set[str]:
    """Dotted names of the layers `backend` will replace, decided the same way for every path."""
    keep = keep_in_fp32_patterns(model)
    return {
        name
        for name, module in model.named_modules()
        if name and backend.takes(name, module, config) and not matches_module_pattern(name, keep)
    }


def replace_module(model: nn.Module, name: str, new: nn.Module, config: BackendConfig) -> None:
    """Put the quantized layer `new`, made with `config`, where `name` was, in the same train/eval mode (kernels
    pick their path by it)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, child).training)
    setattr(new, LAYER_CONFIG_ATTRIBUTE, config)
    if importlib.util.find_spec("peft") is not None:
        from .lora import register_with_peft

        register_with_peft()
    setattr(parent, child, new)


def quantize_model(model: nn.Module, config: BackendConfig, device: torch.device | str | None = None) -> nn.Module:
    """Quantize a model already in memory, layer by layer, in place; returns it.

    Each full-precision weight is released as soon as its quantized layer replaces it. Layers
    stay on the device they are on unless `device` is given.
    """
    if quantization_record(model) is not None or getattr(model, "is_quantized", False):
        how = quantization_record(model)
        how = how.config if how is not None else getattr(model, "quantization_method", "another library")
        raise ValueError(
            f"This {type(model).__name__} is already quantized ({how!r}); quantize a full-precision copy instead."
        )
    device = None if device is None else check_device(device)
    backend = backend_for(config)
    backend.require()
    targets = quantization_targets(model, backend, config)
    full_nbytes, count = _full_precision_size(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for name in sorted(targets, key=_module_order(model)):
        module = model.get_submodule(name)
        layer_device = torch.device(device) if device is not None else module.weight.device
        backend.check_device(config, layer_device)
        replace_module(model, name, backend.quantize(name, module, config, layer_device), config)
    record = QuantizationRecord(config, backend.name, len(targets), full_nbytes, count)
    record_quantization(model, record, dtype=dtype, pre_quantized=False)
    return model


def _module_order(model: nn.Module):
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return order.__getitem__


def _full_precision_size(model: nn.Module) -> tuple[int, int]:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    params = {id(p): p for p in model.parameters()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return nbytes, sum(p.numel() for p in params.values())
