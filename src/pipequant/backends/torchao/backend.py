"""The "torchao" backend: torchao's own `quantize_` applied to each layer as it streams in.

Layers stay `nn.Linear` whose weight is a torchao tensor subclass (`Int8Tensor`, `Float8Tensor`, ...), exactly
what `quantize_` makes of a full-precision model, so torchao's kernels run them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...meta_modules import meta_linear
from ..base import Backend, LayerState, QuantizationConfigError, stored_linear
from . import saving
from .config import TorchAoConfig
from .names import CPU_TYPES
from .quantize import quantize_layer, quantize_linear

#: the names `pipequant.presets` offers as modes ("torchao-int8wo", ...)
_MODE_TYPES = ("int8wo", "int8dq", "int4dq", "float8wo", "uint4wo")


class TorchAoBackend(Backend[TorchAoConfig]):
    name = "torchao"
    config_class = TorchAoConfig
    module_name = "torchao"
    pip_extra = "torchao"
    cli_help = "torchao tensor-subclass weights (quant_type, e.g. int8wo, int8dq, float8wo, uint4wo)"
    presets = {f"torchao-{quant_type}": {"quant_type": quant_type} for quant_type in _MODE_TYPES}
    plan_candidates = ("torchao-int8wo",)

    def check_device(self, config: TorchAoConfig, device: torch.device) -> None:
        family = config.family
        if family is None:
            return  # a torchao class we have no record of: torchao itself decides
        if device.type == "cpu" and not family.runs_on_cpu:
            raise QuantizationConfigError(
                f"torchao quant_type {config.label!r} cannot run on cpu: {family.cpu_problem}. "
                f"Nearest that runs on cpu: {family.cpu_instead}. "
                f"Types that run on cpu: {', '.join(CPU_TYPES)}."
            )
        if device.type == "cuda" and family.min_cuda_capability is not None:
            capability = torch.cuda.get_device_capability(device)
            if capability < family.min_cuda_capability:
                need = ".".join(map(str, family.min_cuda_capability))
                raise QuantizationConfigError(
                    f"torchao quant_type {config.label!r} needs a GPU of compute capability {need}+, and {device} "
                    f"has {capability[0]}.{capability[1]}. Use {family.cpu_instead} instead."
                )

    def quantize(self, module_name: str, module: nn.Linear, config: TorchAoConfig, device: torch.device) -> nn.Module:
        """torchao's `quantize_` on the layer, by the fastest path that gives its bytes (see `quantize`)."""
        return quantize_linear(module, config, device)

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Linear, config: TorchAoConfig, dtype: torch.dtype
    ) -> int:
        """torchao's own `quantize_` on a layer of the same shape on the meta device: its tensor
        subclasses get their real inner shapes and dtypes without a byte of data, for any config.

        Types whose quantizer needs CUDA kernels (int4wo, float8dq) refuse the meta device; for
        them this raises `QuantizationConfigError`.
        """
        meta = meta_linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        try:
            return self.layer_nbytes(quantize_layer(meta.weight, meta.bias, config, torch.device("meta")))
        except (RuntimeError, ValueError) as error:
            raise QuantizationConfigError(
                f"cannot estimate the size of torchao {config.label!r} layers: quantizing on the "
                f"meta device failed ({error})"
            ) from error

    def is_quantized(self, module: nn.Module) -> bool:
        from torchao.utils import TorchAOBaseTensor

        return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize()

    # --- saving and restoring (see Backend): torchao's own safetensors flattening, no pickle ---

    # --- saving and restoring (see Backend): torchao's own safetensors flattening, no pickle (see `saving`) ---

    def save_layer(self, module: nn.Module) -> LayerState:
        return saving.save_layer(module)

    def checkpoint_metadata(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
        return saving.checkpoint_metadata(tensors, metadata)

    def restore(self, module: nn.Module, state: LayerState, config: TorchAoConfig, device: torch.device) -> nn.Module:
        return saving.restore_linear(stored_linear(module, self.name), state, device)
