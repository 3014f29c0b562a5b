"""The registry of backends: name -> `Backend`, and config class -> backend.

Backend modules import their third-party library only when a layer is quantized, so every
config class is importable (and validated) without the library installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Backend, BackendConfig, LayerState, MissingBackendError, QuantizationConfigError
from .bitsandbytes import BACKENDS as _BITSANDBYTES
from .gguf.backend import BACKENDS as _GGUF
from .quanto import BACKENDS as _QUANTO
from .torchao import BACKENDS as _TORCHAO

_REGISTRY: dict[str, Backend] = {backend.name: backend for backend in (*_BITSANDBYTES, *_TORCHAO, *_QUANTO, *_GGUF)}


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QuantizationConfigError(
            f"Unknown quantization backend {name!r}. Valid backends: {', '.join(backend_names())}."
        ) from None


def backend_for(config: BackendConfig) -> Backend:
    return get_backend(config.backend_name)


def config_classes() -> list[type[BackendConfig]]:
    """Each backend config class once, in registry order."""
    return list(dict.fromkeys(backend.config_class for backend in _REGISTRY.values()))


def config_from_dict(stored: Mapping[str, Any], *, context: str) -> BackendConfig:
    """The backend config a saved component's ``quantization_config`` describes, found by its ``quant_method``."""
    if not isinstance(stored, Mapping):
        raise QuantizationConfigError(f"{context}: quantization_config must be a JSON object, not {stored!r}.")
    method = stored.get("quant_method")
    by_method = {cls.quant_method or cls.backend_name: cls for cls in config_classes()}
    if method not in by_method:
        raise QuantizationConfigError(
            f"{context}: quant_method {method!r} is not a quantization backend pipequant can load. "
            f"Known quant_method values: {', '.join(sorted(by_method))}."
        )
    return by_method[method].from_dict(stored, context=context)


__all__ = [
    "Backend",
    "BackendConfig",
    "LayerState",
    "MissingBackendError",
    "QuantizationConfigError",
    "backend_for",
    "backend_names",
    "config_classes",
    "config_from_dict",
    "get_backend",
]
