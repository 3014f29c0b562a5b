"""Load one model from a single .gguf file: built on the meta device, filled layer by layer from the map.

The file is opened memory-mapped (`GGUFFile`); the model is built from a config.json folder or
from the config pipequant wrote into the file, and then streamed exactly as a saved quantized
component is (`stream_model(saved=True)`): each GGUF layer is rebuilt from its own bytes, copied out
of the map one layer at a time, and every other tensor is read and cast like a safetensors weight.

Which config applies: the one given, else the one pipequant saved in the file, else a default.
A .gguf file's layers keep the types they were stored in, so a config that asks for `quant_type`
or `type_rules` other than the file's is refused, as are `modules_to_not_convert` that name layers
the file holds quantized; `compute_dtype` is free.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...backends import config_from_dict, get_backend
from ...backends.base import BackendConfig, QuantizationConfigError
from ...backends.gguf.config import GGUFQuantizationConfig
from ...checkpoint import CheckpointError
from ...streaming import build_empty_model, stream_model
from ...ui import ProgressCallback


def is_gguf_file(value: Any) -> bool:
    """Whether a component given to `load_pipeline` (or a path given to `load_model`) names a .gguf file."""
    return isinstance(value, (str, os.PathLike)) and os.fspath(value).lower().endswith(".gguf")


def load_gguf_model(
    model_class: type[nn.Module],
    path: str | Path,
    quantization_config: BackendConfig | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    on_layer: ProgressCallback | None = None,
    config_folder: str | Path | None = None,
) -> nn.Module:
    """`model_class` with the weights of the .gguf file `path` (see the module docstring).

    The architecture comes from `config_folder`'s config.json when given, else from the file
    (files pipequant wrote carry it). `torch_dtype` is the dtype of the plain tensors; by default
    the one the file records, else the compute dtype, else float32 (diffusers' default).
    """
    from .reader import GGUFCheckpoint, GGUFFile

    get_backend("gguf").require()
    if quantization_config is not None and not isinstance(quantization_config, GGUFQuantizationConfig):
        raise QuantizationConfigError(
            f"{path} is a GGUF file; its config must be a GGUFQuantizationConfig (or none), "
            f"not {type(quantization_config).__name__}."
        )
    file = GGUFFile(path)
    config = _config_for(file, quantization_config)
    model = _build(model_class, file, config_folder)
    checkpoint = GGUFCheckpoint(file, {name for name, module in model.named_modules() if type(module) is nn.Linear})
    excluded = sorted(layer for layer in checkpoint.gguf_layers if config.excluded(layer))
    if excluded:
        raise QuantizationConfigError(
            f"modules_to_not_convert names layers {path} holds quantized ({', '.join(excluded[:5])}); a .gguf file's "
            "layers load as they were stored. Drop those patterns, or load a full-precision checkpoint instead."
        )
    dtype = torch_dtype or file.metadata.dtype or config.compute_dtype or torch.float32
    config = dataclasses.replace(config, compute_dtype=config.compute_dtype or dtype)
    return stream_model(
        model,
        checkpoint,
        config=config,
        dtype=dtype,
        device=torch.device(device or "cpu"),
        on_layer=on_layer,
        saved=True,
    )


def _config_for(file, given: GGUFQuantizationConfig | None) -> GGUFQuantizationConfig:
    stored = file.metadata.quantization_config
    saved = None if stored is None else config_from_dict(stored, context=f"{file.path} (pipequant.quantization_config)")
    if saved is not None and not isinstance(saved, GGUFQuantizationConfig):
        raise CheckpointError(f"{file.path}: its pipequant.quantization_config is not a GGUF config ({saved!r}).")
    if given is None:
        return saved or GGUFQuantizationConfig()
    asked = (given.quant_type, given.type_rules)
    if given.quant_type is not None and (saved is None or asked != (saved.quant_type, saved.type_rules)):
        stored_as = (
            "" if saved is None else f", written with quant_type={saved.quant_type!r}, type_rules={saved.type_rules!r}"
        )
        raise QuantizationConfigError(
            f"{file.path} is already quantized ({file.describe_types()}{stored_as}), and its layers load in the types "
            f"they were stored in; the config asks for quant_type={given.quant_type!r}, "
            f"type_rules={given.type_rules!r}. "
            "quant_type and type_rules are for quantizing full-precision weights: leave them out for a .gguf file, "
            "e.g. GGUFQuantizationConfig(compute_dtype=torch.bfloat16)."
        )
    return given


def _build(model_class: type[nn.Module], file, config_folder: str | Path | None) -> nn.Module:
    """The empty model, from `config_folder`'s config.json, else from the config saved in the file."""
    stored_class = file.metadata.model_class
    if stored_class is not None and stored_class.rpartition(".")[2] != model_class.__name__:
        raise CheckpointError(f"{file.path} holds a {stored_class}, not a {model_class.__name__}.")
    shapes = [piece.shape for piece in file.pieces.values()]
    if config_folder is not None:
        return build_empty_model(model_class, Path(config_folder), shapes)
    config = file.metadata.model_config
    if config is None:
        raise CheckpointError(
            f"{file.path} carries no model config (pipequant did not write it), so the architecture is unknown: pass "
            "config_folder=<folder with the model's config.json> (load_pipeline uses the component's folder)."
        )
    return build_empty_model(model_class, config, shapes, f"{file.path} (pipequant.model_config)")
