"""How each tensor of a model is loaded: the dtype it ends up in, and whether its layer is quantized.

The streaming loader applies this rule while it reads, and `planning.sizing` applies it to a model
on the meta device to know the loaded size before reading anything; both ask this one object, so
an estimate and a load cannot disagree.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from .backends import backend_for
from .backends.base import BackendConfig, matches_module_pattern
from .quantizing import float32_patterns, quantization_targets


class TensorLoading:
    """The load rule for one model at one load dtype.

    A stored floating tensor is cast to the load dtype, or to float32 in the modules the model's own
    library keeps in float32 (`quantizing.float32_patterns`); other stored tensors keep their dtype. A
    non-persistent buffer (made when the model was built, stored nowhere) is cast to the load dtype,
    except in those float32 modules, where it keeps the dtype it was built with. `targets` are the
    layers the backend quantizes (or, for a saved component, restores).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, targets: Collection[str] = ()) -> None:
        self.dtype = dtype
        self.keep_fp32 = float32_patterns(model, dtype)
        self.targets = set(targets)

    @classmethod
    def planned(cls, model: nn.Module, dtype: torch.dtype | None, config: BackendConfig | None) -> TensorLoading:
        """The rule for quantizing `model` with `config` while loading (None: nothing is quantized)."""
        targets = quantization_targets(model, backend_for(config), config) if config is not None else ()
        return cls(model, dtype, targets)

    def _in_fp32(self, module_name: str) -> bool:
        return matches_module_pattern(module_name, self.keep_fp32)

    def module_dtype(self, module_name: str) -> torch.dtype | None:
        """The dtype floating tensors stored for `module_name` are cast to (None: kept as stored)."""
        return torch.float32 if self._in_fp32(module_name) else self.dtype

    def stored_dtype(self, module_name: str, stored: torch.dtype) -> torch.dtype:
        """The dtype of a tensor of `module_name` stored as `stored`, once loaded."""
        load = self.module_dtype(module_name)
        return load if stored.is_floating_point and load is not None else stored

    def built_dtype(self, module_name: str, built: torch.dtype) -> torch.dtype:
        """The dtype of a non-persistent buffer of `module_name` built as `built`, once loaded."""
        load = None if self._in_fp32(module_name) else self.dtype
        return load if built.is_floating_point and load is not None else built

    def cast_stored(self, module_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, read from the checkpoint for `module_name`, in its load dtype."""
        return _to(tensor, self.stored_dtype(module_name, tensor.dtype))

    def cast_built(self, module_name: str, buffer: torch.Tensor) -> torch.Tensor:
        """The non-persistent `buffer` of `module_name` in its load dtype."""
        return _to(buffer, self.built_dtype(module_name, buffer.dtype))

    def quantized(self, module_name: str) -> bool:
        return module_name in self.targets


def _to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
