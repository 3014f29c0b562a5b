"""What each component will hold once loaded, known before a single weight is read.

`estimate` builds each model on the meta device as the streaming loader does, lets
`TensorLoading` pick the layers to quantize exactly as the loader picks them, sizes each of
those with its backend's `estimate_layer_nbytes`, and every other tensor from its shape and the dtype
the loader gives it (the safetensors header's dtype, cast to the load dtype, float32 where the model's
own library keeps it). The rows are `report.ComponentMemory`, the rows `memory_report` gives for the
loaded pipeline, so an estimate and a measurement compare field by field.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..backends import backend_for
from ..backends.base import BackendConfig, QuantizationConfigError
from ..checkpoint import SAFETENSORS_DTYPES, ComponentCheckpoint
from ..config import PipelineQuantizationConfig, as_pipeline_config
from ..devices import check_device
from ..loading import read_pipeline_index, resolve_pipeline_folder
from ..report import ComponentMemory
from ..restoring import stored_quantization_config
from ..streaming import build_empty_model, match_keys, stored_shapes
from ..tensor_loading import TensorLoading


def estimate(
    path: str | Path,
    config: PipelineQuantizationConfig | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> list[ComponentMemory]:
    """Per model component, the bytes `load_pipeline(path, config, torch_dtype)` would hold, and before quantizing.

    Reads only config files and safetensors headers. Raises the loader's own errors (a config
    that does not fit the pipeline or `device`, weights that do not fit their config) and
    `QuantizationConfigError` for a component saved already quantized, whose size is what is stored.
    """
    config = as_pipeline_config(config)
    target = check_device(device)
    folder = resolve_pipeline_folder(path)
    index = read_pipeline_index(folder)
    models, others = index.split_components()
    configs = config.resolve(models, others) if config is not None else {}
    for component_config in configs.values():
        backend = backend_for(component_config)
        backend.require()
        backend.check_device(component_config, target)
    return [
        estimate_component(name, index.component_class(name), folder / name, configs.get(name), torch_dtype)
        for name in models
    ]


def estimate_component(
    name: str,
    model_class: type[nn.Module],
    folder: Path,
    config: BackendConfig | None,
    torch_dtype: torch.dtype | None,
) -> ComponentMemory:
    """One component's row of `estimate`; `config=None` sizes it unquantized."""
    if stored_quantization_config(folder) is not None:
        raise QuantizationConfigError(
            f"{folder} is saved already quantized; pipequant estimates full-precision folders. Its size in "
            "memory is what its safetensors files hold."
        )
    layout = ModelLayout(model_class, folder, torch_dtype, config)
    backend = backend_for(config) if config is not None else None
    targets = layout.loading.targets
    seen: set[int] = set()
    after = 0
    dtypes: Counter[str] = Counter()
    for module_name, module in layout.model.named_modules():
        if module_name in targets:
            assert backend is not None and config is not None
            seen.update(id(t) for t in module.parameters(recurse=False))
            after += backend.estimate_layer_nbytes(module_name, module, config, layout.dtype_of(module_name, "weight"))
            continue
        for tensor_name, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            dtype = layout.dtype_of(module_name, tensor_name)
            after += tensor.numel() * dtype.itemsize
            if dtype.is_floating_point:
                dtypes[str(dtype).removeprefix("torch.")] += tensor.numel()
    before, parameters = layout.full_precision_size() if backend is not None else (after, layout.parameter_count())
    return ComponentMemory(
        name=name,
        class_name=model_class.__name__,
        parameters=parameters,
        dtype=dtypes.most_common(1)[0][0] if dtypes else "-",
        backend=backend.name if backend is not None else "-",
        quantized_layers=len(targets),
        bytes_before=before,
        bytes_after=after,
    )


class ModelLayout:
    """A model on the meta device with its checkpoint's keys and the dtype each tensor is loaded in.

    Dtypes and quantized layers are the streaming loader's own (`TensorLoading`), from the
    checkpoint's headers instead of its tensors.
    """

    def __init__(
        self,
        model_class: type[nn.Module],
        folder: Path,
        torch_dtype: torch.dtype | None,
        config: BackendConfig | None = None,
    ) -> None:
        self.checkpoint = ComponentCheckpoint(folder)
        self.model = build_empty_model(model_class, folder, stored_shapes(self.checkpoint))
        if hasattr(self.model, "tie_weights"):  # as the loader does at the end: tied tensors are one tensor
            self.model.tie_weights()
        #: the loader's rule for this model: each tensor's dtype, and the layers `config` quantizes
        self.loading = TensorLoading.planned(self.model, torch_dtype, config)
        key_map = match_keys(self.model, self.checkpoint)
        self._stored_key: dict[int, str] = {}  # tensor id -> its checkpoint key (tied tensors share one)
        for full_name, tensor in self._named_tensors():
            if full_name in key_map:
                self._stored_key[id(tensor)] = key_map[full_name]
        self._read_names = set(key_map)

    def stored_key(self, tensor: torch.Tensor) -> str | None:
        """The checkpoint key `tensor` (of the meta model) is read from; None for a non-persistent buffer."""
        return self._stored_key.get(id(tensor))

    def stored_dtype(self, tensor: torch.Tensor) -> torch.dtype | None:
        key = self.stored_key(tensor)
        return None if key is None else SAFETENSORS_DTYPES[self.checkpoint.dtype(key)]

    def dtype_of(self, module_name: str, tensor_name: str) -> torch.dtype:
        """The dtype `module_name`.`tensor_name` has once loaded."""
        module = self.model.get_submodule(module_name) if module_name else self.model
        tensor = module._parameters.get(tensor_name)
        if tensor is None:
            tensor = module._buffers[tensor_name]
        stored = self.stored_dtype(tensor)
        if stored is None:  # a non-persistent buffer, made when the model was built
            return self.loading.built_dtype(module_name, tensor.dtype)
        return self.loading.stored_dtype(module_name, stored)

    def full_precision_size(self) -> tuple[int, int]:
        """(bytes of every stored tensor in its load dtype, parameters read), as the loader counts them."""
        nbytes = parameters = 0
        for full_name, tensor in self._named_tensors():
            if full_name not in self._read_names:
                continue
            module_name, _, tensor_name = full_name.rpartition(".")
            nbytes += tensor.numel() * self.dtype_of(module_name, tensor_name).itemsize
            if isinstance(tensor, nn.Parameter):
                parameters += tensor.numel()
        return nbytes, parameters

    def parameter_count(self) -> int:
        """Parameters, each tied one once."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def _named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter and buffer by full name, tied ones under each of their names."""
        for module_name, module in self.model.named_modules():
            for tensor_name, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is not None:
                    yield (f"{module_name}.{tensor_name}" if module_name else tensor_name), tensor
