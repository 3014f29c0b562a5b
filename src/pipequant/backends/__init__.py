"""The registry of backends: name -> `Backend`, and config class -> backend.

Backend modules import their third-party library only when a layer is quantized, so every
config class is importable (and validated) without the library installed.
"""

from __future__ import annotations

from .base import Backend, BackendConfig, MissingBackendError, QuantizationConfigError
from .bitsandbytes import BACKENDS as _BITSANDBYTES

_REGISTRY: dict[str, Backend] = {backend.name: backend for backend in (*_BITSANDBYTES,)}


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


__all__ = [
    "Backend",
    "BackendConfig",
    "MissingBackendError",
    "QuantizationConfigError",
    "backend_for",
    "backend_names",
    "config_classes",
    "get_backend",
]
