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

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...backends import get_backend
from ...backends.base import QuantizationConfigError
from ...backends.gguf.config import GGUFQuantizationConfig, fitting_type, row_nbytes
from ...checkpoint import SAFETENSORS_DTYPES, ComponentCheckpoint
from ...markers import mark_quantized
from ...meta_modules import meta_linear
from ...quantizing import QuantizationRecord, keep_in_fp32_patterns, quantization_record
from ...restoring import stored_quantization_config
from ...streaming import (
    build_empty_model,
    match_keys,
    record_load_dtype,
    return_freed_memory,
    stored_shapes,
    tied_groups,
)
from ...tensor_loading import TensorLoading
from .metadata import FLUX_ARCHITECTURE, OWN_ARCHITECTURE, VERSION, PipequantMetadata
from .writer import LazyPart, StoredTensor, to_bfl_layout, write_gguf

LAYOUTS = ("auto", "bfl", "diffusers")
_PLAIN_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TYPE_DTYPES = {name: dtype for dtype, name in _PLAIN_TYPES.items()}


def save_gguf(model: nn.Module, path: str | Path, *, layout: str = "auto", overwrite: bool = False) -> Path:
    """Write `model` (GGUF-quantized, or full precision) to the .gguf file `path`; returns the path.

    `layout`: "bfl" (Flux transformers only: the names other tools load), "diffusers" (the model's
    own tensor names), or "auto" (bfl for a Flux transformer, diffusers otherwise). An existing file
    is refused unless `overwrite`; it is replaced only by a complete new file.
    """
    path = _checked_path(path, layout)
    record: QuantizationRecord | None = quantization_record(model)
    if record is not None and record.backend != "gguf":
        raise ValueError(
            f"This {type(model).__name__} is quantized with {record.backend}; a .gguf file holds GGUF layers and plain "
            "tensors only. Quantize the full-precision model with GGUFQuantizationConfig(quant_type=...) instead."
        )
    tensors, metadata = _stored_state(model)
    metadata.quantization_config = None if record is None else record.config.to_dict()
    tensors, architecture, fields = _laid_out(type(model).__name__, tensors, metadata, layout)
    return write_gguf(path, tensors, architecture=architecture, fields=fields, overwrite=overwrite)


def export_gguf(
    model_class: type[nn.Module],
    folder: str | Path,
    config: GGUFQuantizationConfig,
    path: str | Path,
    *,
    torch_dtype: torch.dtype | None = None,
    layout: str = "auto",
    overwrite: bool = False,
) -> Path:
    """`save_gguf(load_model(model_class, folder, config, torch_dtype=torch_dtype), path, ...)`, byte for byte,
    without the model in memory: each layer is read, quantized and written when the writer reaches it.

    The model is built on the meta device; every tensor's type and size follow from its shape and
    `config` before any weight is read, so the header is written first and the data section is then
    filled one tensor at a time (a stacked BFL tensor at most), with the checkpoint read ahead in the
    file's order. Memory stays near one layer for a model of any size; `pipequant quantize --out x.gguf`
    uses it.
    """
    path, folder = _checked_path(path, layout), Path(folder)
    if not isinstance(config, GGUFQuantizationConfig):
        raise QuantizationConfigError(
            f"export_gguf writes GGUF layers; its config is a GGUFQuantizationConfig, not {type(config).__name__}."
        )
    if stored_quantization_config(folder) is not None:
        raise QuantizationConfigError(
            f"{folder} is saved already quantized; export_gguf quantizes full-precision folders. Load it and write "
            "it with save_gguf(load_model(...), path) instead (GGUF folders only)."
        )
    backend = get_backend("gguf")
    backend.require()
    backend.check_device(config, torch.device("cpu"))
    checkpoint = ComponentCheckpoint(folder)
    model = build_empty_model(model_class, folder, stored_shapes(checkpoint))
    key_map = match_keys(model, checkpoint)
    loading = TensorLoading.planned(model, torch_dtype, config)
    # the config the loaded model would carry, which the file's model config repeats
    record_load_dtype(model, torch_dtype)
    mark_quantized(model, config, dtype=torch_dtype, pre_quantized=False, keep_in_fp32=keep_in_fp32_patterns(model))
    reads = _OrderedReads(checkpoint, key_map, loading, config)
    tensors, metadata = _stored_state(model, planned=reads)
    metadata.quantization_config = config.to_dict()
    tensors, architecture, fields = _laid_out(model_class.__name__, tensors, metadata, layout)
    with reads.ahead(tensors):
        return write_gguf(path, tensors, architecture=architecture, fields=fields, overwrite=overwrite)


def _checked_path(path: str | Path, layout: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path}: a GGUF file's name ends in .gguf (the loaders tell the format by it).")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; use one of {', '.join(LAYOUTS)}.")
    return path


def _laid_out(
    class_name: str, tensors: dict[str, StoredTensor], metadata: PipequantMetadata, layout: str
) -> tuple[dict[str, StoredTensor], str, dict[str, str]]:
    """The tensors under the names of `layout`, the file's architecture and its metadata fields."""
    chosen = layout if layout != "auto" else ("bfl" if class_name == "FluxTransformer2DModel" else "diffusers")
    if chosen == "bfl":
        try:
            tensors = to_bfl_layout(tensors)
        except ValueError as error:
            raise ValueError(f"Cannot write {class_name} in the BFL layout: {error}.") from error
    metadata.layout = chosen
    fields = {VERSION: version("pipequant"), **metadata.to_strings()}
    architecture = FLUX_ARCHITECTURE if chosen == "bfl" else OWN_ARCHITECTURE
    return tensors, architecture, fields


def _stored_state(
    model: nn.Module, planned: _OrderedReads | None = None
) -> tuple[dict[str, StoredTensor], PipequantMetadata]:
    """Every tensor to write under its state-dict name, and what the metadata says about the model.

    `model` holds its weights (GGUF layers quantized), or, with `planned`, is on the meta device: then
    the GGUF layers are the ones `planned`'s config quantizes, and every tensor's bytes are made on demand.
    """
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
            if module.bias is not None:
                tensors[prefix + "bias"] = _plain(prefix + "bias", module.bias)
            requested = module.requested_type
        elif planned is not None and planned.quantized(name):
            requested = planned.config.type_for(name)
            ggml_type = fitting_type(requested, module.in_features, planned.dtype(name, "weight"))
            makers = planned.layer_parts(name, has_bias=module.bias is not None)
            reads = tuple(prefix + part for part in makers)  # what making either part reads: the whole layer
            shape = (module.out_features, row_nbytes(ggml_type, module.in_features))
            tensors[prefix + "weight"] = StoredTensor(ggml_type, [LazyPart(shape, makers["weight"], reads)])
            if module.bias is not None:
                qtype, byte_shape = _plain_type(prefix + "bias", (module.out_features,), torch.float32)
                tensors[prefix + "bias"] = StoredTensor(qtype, [LazyPart(byte_shape, makers["bias"], reads)])
            requested = requested if ggml_type != requested else None
        else:
            non_persistent = getattr(module, "_non_persistent_buffers_set", set())
            for key, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is not None and key not in non_persistent:
                    dtype = tensor.dtype if planned is None else planned.dtype(name, key)
                    tensors[prefix + key] = _plain(prefix + key, tensor, planned)
                    plain_dtypes[dtype] += tensor.numel()
            continue
        metadata.gguf_layers.add(name)
        if requested is not None:
            metadata.type_fallbacks[name] = requested
    for group in tied_groups(model):
        for alias in group[1:]:
            tensors.pop(alias, None)
    metadata.dtype = plain_dtypes.most_common(1)[0][0] if plain_dtypes else None
    return tensors, metadata


def _plain(name: str, tensor: torch.Tensor, planned: _OrderedReads | None = None) -> StoredTensor:
    """`tensor` as a plain GGUF tensor; with `planned`, `tensor` is on the meta device and its bytes are read
    when the writer reaches them."""
    if planned is None:
        data = _plain_bytes(name, tensor.detach().to("cpu"))
        return StoredTensor(_plain_type(name, tuple(tensor.shape), tensor.dtype)[0], [data])
    module_name, _, key = name.rpartition(".")
    qtype, byte_shape = _plain_type(name, tuple(tensor.shape), planned.dtype(module_name, key))
    return StoredTensor(qtype, [LazyPart(byte_shape, lambda: _plain_bytes(name, planned.read(name)), (name,))])


def _plain_type(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[str, tuple[int, ...]]:
    """The GGML type and the byte shape (see `StoredTensor`) a tensor of `shape` and `dtype` is written with:
    1-D tensors (norms, biases) as F32, lossless, as the tools expect; a 0-d tensor as one element."""
    if dtype not in _PLAIN_TYPES:
        raise ValueError(f"tensor {name!r} is {dtype}; a .gguf file stores float32, float16 or bfloat16 tensors")
    shape = shape or (1,)
    stored = torch.float32 if len(shape) == 1 else dtype
    return _PLAIN_TYPES[stored], (*shape[:-1], shape[-1] * stored.itemsize)


def _plain_bytes(name: str, tensor: torch.Tensor) -> np.ndarray:
    """The bytes `_plain_type` describes, uint8."""
    qtype, _ = _plain_type(name, tuple(tensor.shape), tensor.dtype)
    data = tensor.reshape(tensor.shape or (1,)).to(_TYPE_DTYPES[qtype])
    return data.contiguous().view(torch.uint8).numpy()


class _OrderedReads:
    """The checkpoint tensors `export_gguf` reads, loaded and quantized as `load_model` loads them with `config`,
    read ahead in write order."""

    def __init__(
        self,
        checkpoint: ComponentCheckpoint,
        key_map: dict[str, str],
        loading: TensorLoading,
        config: GGUFQuantizationConfig,
    ) -> None:
        self._checkpoint = checkpoint
        self._key_map = key_map
        self._loading = loading
        self.config = config

    def quantized(self, module_name: str) -> bool:
        return self._loading.quantized(module_name)

    def dtype(self, module_name: str, tensor_name: str) -> torch.dtype:
        """The dtype the tensor has once loaded."""
        full_name = f"{module_name}.{tensor_name}" if module_name else tensor_name
        if full_name not in self._key_map:
            raise ValueError(
                f"{self._checkpoint.folder} holds no {full_name!r} (the model makes it when built), so it cannot be "
                "exported without building the model: use save_gguf(load_model(...), path) instead."
            )
        key = self._key_map[full_name]
        return self._loading.stored_dtype(module_name, SAFETENSORS_DTYPES[self._checkpoint.dtype(key)])

    def read(self, full_name: str) -> torch.Tensor:
        """The tensor, in its load dtype; possibly a view of the file, as the writer drops it once written."""
        key = self._key_map[full_name]
        return self._loading.cast_stored(full_name.rpartition(".")[0], self._checkpoint.read(key, transient=True))

    def layer_parts(self, module_name: str, *, has_bias: bool) -> dict[str, Callable[[], np.ndarray]]:
        """Makers of the GGUF layer's bytes, "weight" (its GGML blocks) and "bias" (a plain tensor), from the
        layer the backend makes while loading (same codec, fallback and bias dtype). The layer is made when the
        first of its parts is reached and kept until the other is."""
        names = ("weight", "bias") if has_bias else ("weight",)
        left: dict[str, torch.Tensor] = {}  # the parts of the made layer not yet written

        def maker(tensor_name: str) -> Callable[[], np.ndarray]:
            def make() -> np.ndarray:
                if not left:
                    layer = self._quantized(module_name, has_bias)
                    left.update({name: getattr(layer, name) for name in names})
                tensor = left.pop(tensor_name)
                return tensor.numpy() if tensor_name == "weight" else _plain_bytes(module_name, tensor)

            return make

        return {name: maker(name) for name in names}

    def _quantized(self, module_name: str, has_bias: bool) -> nn.Module:
        # the last layer's full-precision weight and blocks are written and freed: hand their pages back, as the
        # loader does per layer (see `streaming.return_freed_memory`)
        return_freed_memory()
        prefix = f"{module_name}." if module_name else ""
        weight = self.read(prefix + "weight")
        linear = meta_linear(weight.shape[1], weight.shape[0], bias=has_bias)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(self.read(prefix + "bias"), requires_grad=False)
        return get_backend("gguf").quantize(module_name, linear, self.config, torch.device("cpu"))

    @contextlib.contextmanager
    def ahead(self, tensors: dict[str, StoredTensor]) -> Iterator[None]:
        """Read ahead in the order the writer makes `tensors` reads them (BFL stacking keeps each tensor's parts in
        order): a range asked for out of that order is read by the writer itself, while the disk waits (the 12 B
        Q4_K export read 7.6 s of its 82 s so, when q, k and v weights were read ahead in order but each layer read
        its bias too)."""
        parts = [part for tensor in tensors.values() for part in tensor.parts if isinstance(part, LazyPart)]
        sources = dict.fromkeys(source for part in parts for source in part.sources)  # each at its first read
        with self._checkpoint.read_ahead([self._key_map[source] for source in sources]):
            yield


def _model_config(model: nn.Module) -> dict | None:
    """The config the model is built from: diffusers' ``config.json`` content, or a transformers config as a dict."""
    if hasattr(model, "to_json_string") and hasattr(model, "from_config"):  # a diffusers model
        return json.loads(model.to_json_string())
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        return json.loads(config.to_json_string(use_diff=False))
    return None
