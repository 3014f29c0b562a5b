"""The "gguf" backend: full-precision linear layers become `GGUFLinear` layers of GGML blocks.

The layer's type depends on its name (`type_rules`), which `Backend.quantize` is given.

A quantized layer is stored (in pipequant's safetensors folders, and in the view a .gguf file is
read through, see `reader.py`) as ``weight`` (the raw blocks), ``weight_type`` (the GGML type id,
a 0-d int32 tensor, which also tells a stored GGUF layer from a plain one) and ``bias``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from ..base import Backend, LayerState, QuantizationConfigError, linear_like, stored_linear
from .codecs.table import GGML_TYPES
from .config import GGUFQuantizationConfig, fitting_type, row_nbytes

TYPE_TENSOR = "weight_type"
#: per-layer metadata of a stored layer
COMPUTE_DTYPE_KEY = "compute_dtype"
REQUESTED_TYPE_KEY = "requested_type"


def type_id(name: str) -> int:
    from gguf import GGMLQuantizationType

    return int(GGMLQuantizationType[name])


def type_name(type_id_value: int) -> str:
    """The name of a GGML type id pipequant's codecs read; ValueError for any other."""
    from gguf import GGMLQuantizationType

    try:
        name = GGMLQuantizationType(type_id_value).name
    except ValueError:
        name = f"unknown type id {type_id_value}"
    if name not in GGML_TYPES:
        raise ValueError(f"GGML type {name} is not one pipequant can read (it reads {', '.join(GGML_TYPES)})")
    return name


class GGUFBackend(Backend[GGUFQuantizationConfig]):
    name = "gguf"
    config_class = GGUFQuantizationConfig
    module_name = "gguf"
    pip_extra = "gguf"
    cli_help = "GGML blocks in GGUFLinear (quant_type, e.g. Q4_K, Q6_K, Q8_0; type_rules per layer)"
    presets = {f"gguf-{quant_type}": {"quant_type": quant_type} for quant_type in GGML_TYPES}
    plan_candidates = ("gguf-Q8_0", "gguf-Q6_K", "gguf-Q4_K")

    def check_device(self, config: GGUFQuantizationConfig, device: torch.device) -> None:
        """The codecs are plain torch and run anywhere; what is refused is quantizing without a type."""
        _require_quant_type(config)

    def library_quantizer(self, library_config: Any, *, pre_quantized: bool) -> Any:
        """diffusers' GGUF quantizer, with a `dequantize` that knows our layers (see `library_quantizer.py`)."""
        from .library_quantizer import GGUFLayersQuantizer

        return GGUFLayersQuantizer(library_config)

    def quantize(
        self, module_name: str, module: nn.Linear, config: GGUFQuantizationConfig, device: torch.device
    ) -> nn.Module:
        from .linear import quantize_linear

        return quantize_linear(module, config.type_for(module_name), config.compute_dtype, module_name, device)

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Linear, config: GGUFQuantizationConfig, dtype: torch.dtype
    ) -> int:
        """Exact: the rows of the type the layer gets (fallbacks included) plus the bias in the compute dtype."""
        _require_quant_type(config)
        stored = fitting_type(config.type_for(module_name), module.in_features, dtype)
        bias = 0 if module.bias is None else module.out_features * (config.compute_dtype or dtype).itemsize
        return module.out_features * row_nbytes(stored, module.in_features) + bias

    def is_quantized(self, module: nn.Module) -> bool:
        from .linear import GGUFLinear

        return isinstance(module, GGUFLinear)

    def requantized(self, module: nn.Module, weight: torch.Tensor, config: GGUFQuantizationConfig) -> nn.Module:
        """In the layer's own GGML type and compute dtype: a layer read from a .gguf file may hold any type."""
        from .linear import quantize_linear

        return quantize_linear(linear_like(module, weight), module.ggml_type, module.compute_dtype, "", weight.device)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        """In the layer's compute dtype: the dtype a `GGUFLinear` is quantized from when the config sets none."""
        return module.dequantized_weight()

    def layer_nbytes(self, module: nn.Module) -> int:
        """The raw blocks plus the bias."""
        return sum(t.numel() * t.element_size() for t in (module.weight, module.bias) if t is not None)

    def save_layer(self, module: nn.Module) -> LayerState:
        tensors = {"weight": module.weight, TYPE_TENSOR: torch.tensor(type_id(module.ggml_type), dtype=torch.int32)}
        if module.bias is not None:
            tensors["bias"] = module.bias
        metadata = {COMPUTE_DTYPE_KEY: str(module.compute_dtype).removeprefix("torch.")}
        if module.requested_type is not None:
            metadata[REQUESTED_TYPE_KEY] = module.requested_type
        return LayerState(tensors, metadata)

    def stored_as_quantized(self, names: Collection[str], module: nn.Module) -> bool:
        return TYPE_TENSOR in names

    def restore(
        self, module: nn.Module, state: LayerState, config: GGUFQuantizationConfig, device: torch.device
    ) -> nn.Module:
        """The `GGUFLinear` for the stored blocks; compute dtype from the config, else as stored, else float32."""
        from .linear import GGUFLinear

        module = stored_linear(module, "GGUF")
        tensors = dict(state.tensors)
        if set(tensors) - {"weight", TYPE_TENSOR, "bias"} or not {"weight", TYPE_TENSOR} <= set(tensors):
            raise ValueError(
                f"not a GGUF layer: expected weight, {TYPE_TENSOR} and optionally bias; found {sorted(tensors)}"
            )
        if (module.bias is None) != ("bias" not in tensors):
            raise ValueError("the stored layer and the model disagree on whether the layer has a bias")
        ggml_type = type_name(int(tensors[TYPE_TENSOR].item()))
        compute = config.compute_dtype or _dtype(state.metadata.get(COMPUTE_DTYPE_KEY)) or torch.float32
        bias = tensors.get("bias")
        return GGUFLinear(
            module.in_features,
            module.out_features,
            ggml_type,
            tensors["weight"].to(device),
            None if bias is None else bias.to(device),
            compute,
            requested_type=state.metadata.get(REQUESTED_TYPE_KEY),
        )


def _require_quant_type(config: GGUFQuantizationConfig) -> None:
    if config.quant_type is None:
        raise QuantizationConfigError(
            "This GGUFQuantizationConfig has no quant_type, so, like diffusers' GGUFQuantizationConfig, it only "
            "loads .gguf files (e.g. load_pipeline(path, transformer='model.gguf', ...)). To quantize "
            f"full-precision weights give quant_type, e.g. GGUFQuantizationConfig(quant_type='Q4_K'); types: "
            f"{', '.join(GGML_TYPES)}."
        )


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


BACKENDS: tuple[Backend, ...] = (GGUFBackend(),)
