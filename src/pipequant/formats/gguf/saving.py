"""`save_gguf`: write one model (a pipeline component) to a single .gguf file.

GGUF layers are written as their raw blocks, byte for byte; every other tensor as a plain F32,
F16 or BF16 tensor (1-D tensors as F32, lossless, as the community files store norms and biases).
A Flux transformer is written in the original BFL layout by default, the tensor names ComfyUI-GGUF
and stable-diffusion.cpp load (and diffusers' single-file loader converts): its q/k/v (and
single-block mlp) rows are stacked into one tensor, which raw GGML rows allow without
re-quantizing. Every other model keeps its diffusers / transformers tensor names. pipequant's
metadata (see `backends/gguf/metadata.py`) makes `load_model` / `load_pipeline` rebuild the model
exactly from the file alone.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from .metadata import FLUX_ARCHITECTURE, OWN_ARCHITECTURE, VERSION, PipequantMetadata
from .writer import StoredTensor, to_bfl_layout, write_gguf
from ...quantizing import QuantizationRecord, quantization_record
from ...streaming import tied_groups

LAYOUTS = ("auto", "bfl", "diffusers")
_PLAIN_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_gguf(model: nn.Module, path: str | Path, *, layout: str = "auto", overwrite: bool = False) -> Path:
    """Write `model` (GGUF-quantized, or full precision) to the .gguf file `path`; returns the path.

    `layout`: "bfl" (Flux transformers only: the names other tools load), "diffusers" (the model's
    own tensor names), or "auto" (bfl for a Flux transformer, diffusers otherwise). An existing file
    is refused unless `overwrite`; it is replaced only by a complete new file.
    """
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path}: a GGUF file's name ends in .gguf (the loaders tell the format by it).")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; use one of {', '.join(LAYOUTS)}.")
    record: QuantizationRecord | None = quantization_record(model)
    if record is not None and record.backend != "gguf":
        raise ValueError(
            f"This {type(model).__name__} is quantized with {record.backend}; a .gguf file holds GGUF layers and plain "
            "tensors only. Quantize the full-precision model with GGUFQuantizationConfig(quant_type=...) instead."
        )
    tensors, metadata = _stored_state(model)
    chosen = layout if layout != "auto" else ("bfl" if type(model).__name__ == "FluxTransformer2DModel" else "diffusers")
    if chosen == "bfl":
        try:
            tensors = to_bfl_layout(tensors)
        except ValueError as error:
            raise ValueError(f"Cannot write {type(model).__name__} in the BFL layout: {error}.") from error
    metadata.layout = chosen
    metadata.quantization_config = None if record is None else record.config.to_dict()
    fields = {VERSION: version("pipequant"), **metadata.to_strings()}
    architecture = FLUX_ARCHITECTURE if chosen == "bfl" else OWN_ARCHITECTURE
    return write_gguf(path, tensors, architecture=architecture, fields=fields, overwrite=overwrite)


def _stored_state(model: nn.Module) -> tuple[dict[str, StoredTensor], PipequantMetadata]:
    """Every tensor to write under its state-dict name, and what the metadata says about the model."""
    from ...backends.gguf.linear import GGUFLinear

    tensors: dict[str, StoredTensor] = {}
    plain_dtypes: Counter[torch.dtype] = Counter()
    metadata = PipequantMetadata(
        model_class=f"{type(model).__module__.split('.')[0]}.{type(model).__name__}",
        model_config=_model_config(model),
        gguf_layers=set(),
    )
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, GGUFLinear):
            tensors[prefix + "weight"] = StoredTensor(module.ggml_type, [module.weight.detach().cpu().numpy()])
            metadata.gguf_layers.add(name)
            if module.requested_type is not None:
                metadata.type_fallbacks[name] = module.requested_type
            if module.bias is not None:
                tensors[prefix + "bias"] = _plain(prefix + "bias", module.bias)
            continue
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for key, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None and key not in non_persistent:
                tensors[prefix + key] = _plain(prefix + key, tensor)
                plain_dtypes[tensor.dtype] += tensor.numel()
    for group in tied_groups(model):
        for alias in group[1:]:
            tensors.pop(alias, None)
    metadata.dtype = plain_dtypes.most_common(1)[0][0] if plain_dtypes else None
    return tensors, metadata


def _plain(name: str, tensor: torch.Tensor) -> StoredTensor:
    if tensor.dtype not in _PLAIN_TYPES:
        raise ValueError(f"tensor {name!r} is {tensor.dtype}; a .gguf file stores float32, float16 or bfloat16 tensors")
    data = tensor.detach().to("cpu").reshape(tensor.shape or (1,))
    if data.dim() == 1:
        data = data.float()  # 1-D tensors (norms, biases) are F32 in GGUF files, as the tools expect
    qtype = _PLAIN_TYPES[data.dtype]
    return StoredTensor(qtype, [data.contiguous().view(torch.uint8).numpy()])


def _model_config(model: nn.Module) -> dict | None:
    """The config the model is built from: diffusers' ``config.json`` content, or a transformers config as a dict."""
    if hasattr(model, "to_json_string") and hasattr(model, "from_config"):  # a diffusers model
        return json.loads(model.to_json_string())
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        return json.loads(config.to_json_string(use_diff=False))
    return None
