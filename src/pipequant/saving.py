"""Write a pipeline, or one model, in the diffusers folder layout, quantized components included.

A quantized component is written as its backend stores each layer (`Backend.save_layer`), in
safetensors, with a ``quantization_config`` entry in its config.json; `load_pipeline` rebuilds
those layers from the stored bytes without quantizing again. For bitsandbytes the tensor names
and the config entry are the ones diffusers and transformers write, so each library reads what
the other wrote. Everything else is saved by its own ``save_pretrained``.

Writes are atomic: everything goes to a hidden temporary folder beside the target, which is
put in place only when complete (model_index.json / config.json are written last, so even a
left-over temporary folder does not look complete), in one atomic exchange on Linux (see
`atomic.py`, which also says how other systems recover). A failed or killed save leaves an
existing target as it was, and the next save to the target removes what a killed one left.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from torch import nn

from .aligned_safetensors import save_aligned
from .atomic import recover, replace_folder, temporary_prefix
from .backends import get_backend
from .backends.base import Backend
from .quantizing import QuantizationRecord, quantization_record
from .streaming import tied_groups

#: largest safetensors file of a component before it is sharded (with an index json), as diffusers' default
DEFAULT_MAX_SHARD_SIZE = "10GB"


def save_pipeline(
    pipe: Any, out_dir: str | Path, overwrite: bool = False, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Save a diffusers pipeline (quantized components included) to `out_dir`; returns the folder.

    A non-empty `out_dir` is refused unless `overwrite`; it is replaced only once the new folder is complete.
    """
    out = Path(out_dir)
    with _atomic_folder(out, overwrite) as tmp:
        for name, component in pipe.components.items():
            if component is not None:
                save_component(component, tmp / name, max_shard_size)
        pipe.save_config(tmp)  # model_index.json, last
    return out


def save_model(
    model: nn.Module,
    out_dir: str | Path,
    overwrite: bool = False,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save one model (a pipeline component) to its own folder, atomically as `save_pipeline`; returns it."""
    out = Path(out_dir)
    with _atomic_folder(out, overwrite) as tmp:
        save_component(model, tmp, max_shard_size)
    return out


def save_component(component: Any, folder: Path, max_shard_size: int | str) -> None:
    """One component into `folder`: quantized models by their backend, everything else by its library."""
    record: QuantizationRecord | None = quantization_record(component)
    if record is not None:
        _save_quantized(component, record, folder, max_shard_size)
    elif isinstance(component, nn.Module) and hasattr(component, "save_pretrained"):
        component.save_pretrained(folder, max_shard_size=max_shard_size)
        if getattr(component, "is_quantized", None) is False:
            _drop_quantization_config(folder)
    elif hasattr(component, "save_pretrained"):
        component.save_pretrained(folder)
    else:
        raise TypeError(f"Cannot save a {type(component).__name__}: it has no save_pretrained.")


def _drop_quantization_config(folder: Path) -> None:
    """A dequantized model (``model.dequantize()``) keeps its library's ``config.quantization_config``, which
    its ``save_pretrained`` writes; the weights are full precision, so the entry would make a reload wrong."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_quantized(model: nn.Module, record: QuantizationRecord, folder: Path, max_shard_size: int | str) -> None:
    backend = get_backend(record.backend)
    if type(backend).restore is Backend.restore:
        raise NotImplementedError(
            f"Saving {record.backend} components is not supported yet: pipequant could not load them back."
        )
    tensors, metadata = _quantized_state(model, backend)
    metadata.update(backend.checkpoint_metadata(tensors, metadata))
    folder.mkdir(parents=True, exist_ok=True)
    weights_name = "diffusion_pytorch_model" if _is_diffusers_model(model) else "model"
    _write_safetensors(tensors, metadata, folder, weights_name, max_shard_size)
    _write_config(model, record, folder)


def _quantized_state(model: nn.Module, backend: Backend) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors to store, named as in the model's state dict, and the layers' metadata.

    Quantized layers as the backend stores them; everything else as its own parameters and
    persistent buffers. Tied weights are stored once, under the name the libraries keep.
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    quantized: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{layer}.") for layer in quantized):
            continue  # inside a quantized layer, stored by the backend with it
        prefix = f"{name}." if name else ""
        if backend.is_quantized(module):
            quantized.append(name)
            state = backend.save_layer(module)
            tensors.update({prefix + key: value for key, value in state.tensors.items()})
            metadata.update({prefix + key: value for key, value in state.metadata.items()})
            continue
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for key, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None and key not in non_persistent:
                tensors[prefix + key] = tensor
    for group in tied_groups(model):
        for alias in group[1:]:
            tensors.pop(alias, None)
    return tensors, metadata


def _write_safetensors(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    folder: Path,
    weights_name: str,
    max_shard_size: int | str,
) -> None:
    """One file, or shards with the index json diffusers and transformers read.

    Layer metadata goes into every shard's header: it is small, and a reader then needs no index.
    """
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=weights_name + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {name: tensors[name].detach().to("cpu").contiguous() for name in names}
        save_aligned(shard, folder / filename, {"format": "pt", **metadata})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        index_path = folder / f"{weights_name}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _is_diffusers_model(model: nn.Module) -> bool:
    return hasattr(model, "save_config") and hasattr(model, "from_config")


def _write_config(model: nn.Module, record: QuantizationRecord, folder: Path) -> None:
    """The model's own config.json, plus the ``quantization_config`` entry that marks it saved quantized."""
    if _is_diffusers_model(model):
        model.save_config(folder)
    elif hasattr(getattr(model, "config", None), "save_pretrained"):
        model.config.save_pretrained(folder)
    else:
        raise TypeError(
            f"Cannot save a quantized {type(model).__name__}: it is neither a diffusers nor a transformers model, "
            "so it has no config.json to load it from."
        )
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = record.config.to_dict()
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a temporary folder beside `out`; when the block succeeds it replaces `out`."""
    recover(out)  # first: a save killed mid-replace may have left the old target aside
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(out), dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        replace_folder(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished folder, or the old one after an exchange
