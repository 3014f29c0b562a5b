"""Build a model on the meta device and stream its weights in, one layer at a time.

Peak memory is the quantized model plus one layer in full precision: each layer's tensors are
read from the memory-mapped safetensors, quantized if the backend takes the layer, and the
full-precision copy is dropped before the next layer is read. diffusers and transformers instead
materialize the whole full-precision state first (or need a GPU for bitsandbytes).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from .backends import backend_for
from .backends.base import BackendConfig
from .checkpoint import Checkpoint, CheckpointError
from .config_bounds import check_config_fits
from .meta_modules import no_init_on_meta
from .quantizing import QuantizationRecord, record_quantization, replace_module
from .restoring import restore_layer, saved_layers
from .tensor_loading import TensorLoading
from .ui import ProgressCallback


def build_empty_model(
    model_class: type[nn.Module],
    config: Path | dict[str, Any],
    shapes: list[tuple[int, ...]],
    source: str = "the model config",
) -> nn.Module:
    """The model with its parameters on the meta device, from `config`: a folder with a config.json, or the
    config itself as a dict (as a .gguf file carries it; `source` names where it came from in errors).

    The config is first checked against the stored tensors' `shapes` (`config_bounds`), so a config that
    cannot fit the weights fails before the build costs anything. Buffers are real (created on the
    CPU), as accelerate's `init_empty_weights` leaves them, so non-persistent buffers (position ids,
    rotary tables) that no checkpoint holds are ready; the parameters' initialisers are skipped (`meta_modules`).
    """
    if isinstance(config, Path):
        source = str(config / "config.json")
    if hasattr(model_class, "load_config") and hasattr(model_class, "from_config"):  # a diffusers model
        settings = model_class.load_config(config) if isinstance(config, Path) else config
        check_config_fits(settings, shapes, source)
        with init_empty_weights(), no_init_on_meta():
            return model_class.from_config(settings)
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise CheckpointError(
            f"{model_class.__name__} is neither a diffusers nor a transformers model; pipequant cannot build it "
            "from a config. Load it yourself and pass it to load_pipeline as a component."
        )
    built = config_class.from_pretrained(config) if isinstance(config, Path) else config_class.from_dict(config)
    check_config_fits(built.to_dict(), shapes, source)
    with init_empty_weights(), no_init_on_meta():
        return model_class(built)


def stored_shapes(checkpoint: Checkpoint) -> list[tuple[int, ...]]:
    """The shape of every tensor `checkpoint` holds (from its headers), for `build_empty_model`."""
    return [checkpoint.shape(key) for key in checkpoint.keys()]


def stream_model(
    model: nn.Module,
    checkpoint: Checkpoint,
    *,
    config: BackendConfig | None,
    dtype: torch.dtype | None,
    device: torch.device,
    on_layer: ProgressCallback | None = None,
    saved: bool = False,
) -> nn.Module:
    """Fill a meta-device `model` from `checkpoint`, quantizing layers as `config` says, in place.

    With `saved`, the checkpoint holds layers already quantized with `config` (see `restoring.py`):
    each is rebuilt from its stored tensors by the backend, and nothing is quantized.
    """
    backend = backend_for(config) if config is not None else None
    stored = saved_layers(model, checkpoint, backend) if saved and backend is not None else {}
    loading = TensorLoading(model, dtype, stored) if saved else TensorLoading.planned(model, dtype, config)
    key_map = match_keys(model, checkpoint, skip=stored)

    owners = [(name, module) for name, module in model.named_modules() if _own_state_names(module)]
    reads = [_layer_reads(name, module, key_map, stored) for name, module in owners]
    with checkpoint.read_ahead([key for keys in reads for key in keys.values()]) as ahead:
        full_nbytes = 0
        parameter_count = 0
        for done, ((name, module), layer_reads) in enumerate(zip(owners, reads), start=1):
            if name in stored:
                assert backend is not None and config is not None
                for tensor in module.parameters(recurse=False):
                    full_nbytes += tensor.numel() * (dtype or tensor.dtype).itemsize
                    parameter_count += tensor.numel()
                layer = restore_layer(
                    module, name, stored[name], checkpoint, backend=backend, config=config, dtype=dtype, device=device
                )
                replace_module(model, name, layer, config)
                if on_layer is not None:
                    on_layer(done, len(owners))
                continue
            is_param = _own_state_names(module)
            quantized = loading.quantized(name)
            for tensor_name, key in layer_reads.items():
                # a quantized layer's tensors are dropped once quantized: they may be views of the file
                tensor = loading.cast_stored(name, checkpoint.read(key, device, transient=quantized))
                if is_param[tensor_name]:
                    module._parameters[tensor_name] = nn.Parameter(tensor, requires_grad=False)
                    parameter_count += tensor.numel()
                else:
                    module._buffers[tensor_name] = tensor
                full_nbytes += tensor.numel() * tensor.element_size()
            if quantized:
                assert backend is not None and config is not None
                layer = backend.quantize(name, module, config, device)
                replace_module(model, name, layer, config)
                if layer is not module:  # `owners` still holds the old layer: drop its full-precision tensors now
                    module._parameters.clear()
                ahead.copy_mapped([*layer.parameters(), *layer.buffers()])
                return_freed_memory()
            if on_layer is not None:
                on_layer(done, len(owners))

    _finish_buffers(model, loading, device)
    record_load_dtype(model, dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _check_nothing_left_on_meta(model, checkpoint)
    model.eval()
    if backend is not None and config is not None:
        record = QuantizationRecord(config, backend.name, len(loading.targets), full_nbytes, parameter_count)
        record_quantization(model, record, dtype=dtype, pre_quantized=saved)
    return model


def record_load_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """What transformers' from_pretrained records of the load dtype in the model's config (and saves with it)."""
    if dtype is not None and hasattr(getattr(model, "config", None), "dtype"):
        model.config.dtype = dtype


def _layer_reads(
    name: str, module: nn.Module, key_map: dict[str, str], stored: dict[str, dict[str, str]]
) -> dict[str, str]:
    """What `stream_model` reads for one layer, in order: its tensor name -> the checkpoint key.

    A stored quantized layer's own stored tensors; otherwise the layer's own parameters and persistent
    buffers, less tied ones (absent from `key_map`, filled by `tie_weights`).
    """
    if name in stored:
        return stored[name]
    prefix = f"{name}." if name else ""
    full_names = {tensor_name: prefix + tensor_name for tensor_name in _own_state_names(module)}
    return {tensor_name: key_map[full] for tensor_name, full in full_names.items() if full in key_map}


def return_freed_memory() -> None:
    """Hand the heap pages freed with the last full-precision layer back to the OS.

    glibc keeps freed chunks below its (self-raising) mmap threshold in the heap, where the small,
    long-lived quantized tensors interleave with them; without a trim the process keeps about one
    extra layer-sized hole per layer, and peak memory drifts above the quantized size.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim()


def count_layers(model: nn.Module) -> int:
    """How many modules own tensors: the unit of streaming progress."""
    return sum(1 for module in model.modules() if _own_state_names(module))


def _own_state_names(module: nn.Module) -> dict[str, bool]:
    """The module's own saved tensors: name -> is a parameter (False: a persistent buffer)."""
    names = {name: True for name, param in module._parameters.items() if param is not None}
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in non_persistent:
            names[name] = False
    return names


def _expected_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """(keys the checkpoint must hold, tied keys it may leave out)."""
    tied: set[str] = set()
    for group in tied_groups(model):
        tied.update(group[1:])
    expected = set(model.state_dict(keep_vars=True).keys())
    return expected, tied


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter; all but the first may be absent from a checkpoint."""
    mapping = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5: {target: source}
    if isinstance(mapping, dict):
        return [[source, target] for target, source in mapping.items()]
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def match_keys(
    model: nn.Module, checkpoint: Checkpoint, skip: dict[str, dict[str, str]] | None = None
) -> dict[str, str]:
    """Model key -> checkpoint key, allowing the base-model prefix on one side only.

    Missing and unexpected keys are an error naming them: a checkpoint that does not fit its
    config would otherwise leave random or meta weights behind. The tensors of layers in `skip`
    (stored quantized: layer name -> its stored keys) are left to the backend that restores them.
    """
    skip = skip or {}
    expected, tied = _expected_keys(model)
    expected = {key for key in expected if key.rpartition(".")[0] not in skip}
    stored = set(checkpoint.keys()) - {key for keys in skip.values() for key in keys.values()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    key_map: dict[str, str] = {}
    for key in expected:
        for candidate in (
            key,
            f"{prefix}.{key}" if prefix else None,
            key.removeprefix(f"{prefix}.") if prefix else None,
        ):
            if candidate in stored:
                key_map[key] = candidate
                break
    missing = sorted(k for k in expected - set(key_map) - tied if not _ignored(model, "missing", k))
    # Older checkpoints store buffers that are non-persistent now (BERT's position_ids); the model
    # makes those itself, and transformers skips them too.
    non_persistent = _non_persistent_buffer_names(model, prefix)
    unexpected = sorted(
        k for k in stored - set(key_map.values()) - non_persistent if not _ignored(model, "unexpected", k)
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys the model needs ({_sample(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys the model does not have ({_sample(unexpected)})")
    if problems:
        raise CheckpointError(
            f"{checkpoint.folder}: the weights do not fit {type(model).__name__} built from its config.json: "
            + "; ".join(problems)
            + ". The config and the weights come from different models, or a file is incomplete."
        )
    for key, stored_key in key_map.items():
        tensor = model.get_parameter(key) if _is_param(model, key) else model.get_buffer(key)
        want, have = tuple(tensor.shape), checkpoint.shape(stored_key)
        if want != have:
            raise CheckpointError(
                f"{checkpoint.file_of(stored_key)}: tensor {stored_key!r} has shape {have}, but the model built "
                f"from config.json expects {want}. The config and the weights come from different models."
            )
        if tensor.is_floating_point() != checkpoint.is_floating(stored_key):
            kind = "floating-point" if tensor.is_floating_point() else f"{tensor.dtype}"
            raise CheckpointError(
                f"{checkpoint.file_of(stored_key)}: tensor {stored_key!r} is stored as {checkpoint.dtype(stored_key)}, "
                f"but the model's {key!r} is {kind}. The file is corrupt or was edited; replace it with a "
                "complete copy."
            )
    return key_map


def _is_param(model: nn.Module, key: str) -> bool:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return name in module._parameters


def _non_persistent_buffer_names(model: nn.Module, prefix: str) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        for buffer_name in getattr(module, "_non_persistent_buffers_set", ()):
            key = f"{module_name}.{buffer_name}" if module_name else buffer_name
            names.update({key, f"{prefix}.{key}"} if prefix else {key})
    return names


def _ignored(model: nn.Module, kind: str, key: str) -> bool:
    patterns = getattr(model, f"_keys_to_ignore_on_load_{kind}", None) or ()
    return any(re.search(pattern, key) for pattern in patterns)


def _sample(keys: list[str]) -> str:
    shown = ", ".join(keys[:5])
    return shown + (f", ... and {len(keys) - 5} more" if len(keys) > 5 else "")


def _finish_buffers(model: nn.Module, loading: TensorLoading, device: torch.device) -> None:
    """Non-persistent buffers were made on the CPU at build time: cast and move them like the weights."""
    for name, module in model.named_modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for buffer_name in non_persistent:
            buffer = module._buffers.get(buffer_name)
            if buffer is None:
                continue
            module._buffers[buffer_name] = loading.cast_built(name, buffer).to(device)


def _check_nothing_left_on_meta(model: nn.Module, checkpoint: Checkpoint) -> None:
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(
            f"{checkpoint.folder}: no weights were found for {_sample(left)}; the checkpoint is incomplete."
        )
