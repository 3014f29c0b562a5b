"""Components saved already quantized: find their config and rebuild their layers from stored bytes.

A component folder whose config.json carries a ``quantization_config`` (written by `save_pipeline`,
or by diffusers / transformers) holds its quantized layers as the backend stored them. The loader
builds the model on the meta device and hands each such layer's tensors to the backend's
`restore`, so no full-precision weight is ever made and no quantizer runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backends import config_from_dict
from .backends.base import Backend, BackendConfig, LayerState, QuantizationConfigError
from .checkpoint import Checkpoint, CheckpointError


def stored_quantization_config(folder: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` entry of `folder`/config.json, or None when it has none."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from error
    return config.get("quantization_config") if isinstance(config, dict) else None


def saved_config(folder: Path, given: BackendConfig | None) -> BackendConfig | None:
    """The config a component folder was saved quantized with (None: full-precision weights).

    A `given` config that would quantize differently is an error, raised before any weight is read.
    """
    stored = stored_quantization_config(folder)
    if stored is None:
        return None
    saved = config_from_dict(stored, context=str(folder / "config.json"))
    if given is not None:
        problems = saved.differences(given)
        if problems:
            raise QuantizationConfigError(
                f"{folder} is saved already quantized with {saved!r}, and the quantization config given for it "
                f"differs ({'; '.join(problems)}). Pass no config for this component (the saved one is used), "
                "or load the full-precision original to quantize it another way."
            )
    return saved


def saved_layers(model: nn.Module, checkpoint: Checkpoint, backend: Backend) -> dict[str, dict[str, str]]:
    """Layer name -> {tensor name relative to the layer: stored key}, for each layer stored quantized.

    Stored keys are grouped under the longest module name they start with (allowing the
    base-model prefix on either side, as the streaming loader does); the backend decides which
    groups are its quantized state.
    """
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    owner_of: dict[str, str] = {}
    for name in modules:
        if not name:
            continue
        for candidate in (name, f"{prefix}.{name}" if prefix else None, name.removeprefix(f"{prefix}.")):
            if candidate:
                owner_of.setdefault(candidate, name)
    groups: dict[str, dict[str, str]] = {}
    for key in checkpoint.keys():
        parts = key.split(".")
        for end in range(len(parts) - 1, 0, -1):
            stored_name = ".".join(parts[:end])
            if stored_name in owner_of:
                groups.setdefault(owner_of[stored_name], {})[".".join(parts[end:])] = key
                break
    return {name: tensors for name, tensors in groups.items() if backend.stored_as_quantized(tensors, modules[name])}


def restore_layer(
    module: nn.Module,
    name: str,
    stored: dict[str, str],
    checkpoint: Checkpoint,
    *,
    backend: Backend,
    config: BackendConfig,
    dtype: torch.dtype | None,
    device: torch.device,
) -> nn.Module:
    """One quantized layer rebuilt from its stored tensors; its plain parameters (bias) cast to `dtype`."""
    metadata_prefix = f"{name}."
    metadata = {
        key.removeprefix(metadata_prefix): value
        for key, value in checkpoint.metadata().items()
        if key.startswith(metadata_prefix)
    }
    # each read is memory of its own (never a view into a file's map, whose offsets quantized kernels
    # may not accept: quanto's int8 CPU matmul crashed on them)
    tensors = {relative: checkpoint.read(key, device) for relative, key in stored.items()}
    state = LayerState(tensors, metadata)
    try:
        layer = backend.restore(module, state, config, device)
    except ValueError as error:
        raise CheckpointError(
            f"{checkpoint.folder}: layer {name!r} cannot be rebuilt from its stored {backend.name} state ({error}). "
            "The weights and config.json come from different models, or a file is incomplete."
        ) from error
    for param_name, param in list(layer.named_parameters(recurse=False)):
        plain = type(param) is nn.Parameter and type(param.data) is torch.Tensor
        if plain and dtype is not None and param.is_floating_point() and param.dtype != dtype:
            setattr(layer, param_name, nn.Parameter(param.data.to(dtype), requires_grad=False))
    return layer
