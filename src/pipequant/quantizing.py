"""The per-layer quantization step, shared by the streaming loader and in-memory quantization.

Both paths decide which layers to quantize with `quantization_targets` and quantize each one with
its backend's `quantize`, so a pipeline quantized in memory holds the same layers as one
quantized while loading.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .backends import backend_for
from .backends.base import Backend, BackendConfig, matches_module_pattern

RECORD_ATTRIBUTE = "pipequant_record"


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


def keep_in_fp32_patterns(model: nn.Module) -> list[str]:
    """Modules the model class itself keeps in float32 (e.g. T5's `wo`): never quantized, never downcast."""
    patterns: Any = getattr(model, "_keep_in_fp32_modules", None) or ()
    return list(patterns)


def quantization_targets(model: nn.Module, backend: Backend, config: BackendConfig) -> set[str]:
    """Dotted names of the layers `backend` will replace, decided the same way for every path."""
    keep = keep_in_fp32_patterns(model)
    return {
        name
        for name, module in model.named_modules()
        if name and backend.takes(name, module, config) and not matches_module_pattern(name, keep)
    }


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module, config: BackendConfig, device: torch.device | str | None = None
) -> nn.Module:
    """Quantize a model already in memory, layer by layer, in place; returns it.

    Each full-precision weight is released as soon as its quantized layer replaces it. Layers
    stay on the device they are on unless `device` is given.
    """
    if hasattr(model, RECORD_ATTRIBUTE):
        raise ValueError(
            f"This {type(model).__name__} is already quantized ({getattr(model, RECORD_ATTRIBUTE).config!r}); "
            "quantize a full-precision copy instead."
        )
    backend = backend_for(config)
    backend.require()
    targets = quantization_targets(model, backend, config)
    full_nbytes, count = _full_precision_size(model)
    for name in sorted(targets, key=_module_order(model)):
        module = model.get_submodule(name)
        layer_device = torch.device(device) if device is not None else module.weight.device
        backend.check_device(config, layer_device)
        replace_module(model, name, backend.quantize(module, config, layer_device))
    setattr(
        model,
        RECORD_ATTRIBUTE,
        QuantizationRecord(config, backend.name, len(targets), full_nbytes, count),
    )
    return model


def _module_order(model: nn.Module):
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return order.__getitem__


def _full_precision_size(model: nn.Module) -> tuple[int, int]:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    params = {id(p): p for p in model.parameters()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return nbytes, sum(p.numel() for p in params.values())
