"""The registry of backends: every backend listed once, found by name or by its config.

Everything else reads a backend from here: `PipelineQuantizationConfig` (``quant_backend`` names),
`pipequant.presets` (named modes and the planner's default candidates), the command line (help texts),
saved folders (``quant_method``) and `MissingBackendError` (the pip extra). Backend modules import
their third-party library only when a layer is quantized, so every config class is importable (and
validated) without the library installed.

Adding a backend is one new module or package under ``backends/`` plus one line in `_PACKAGES`:

1. A config: a dataclass subclassing `BackendConfig`, with ``quant_method`` (what a saved config.json says),
   its options validated in ``__post_init__`` without the library, and, where diffusers or transformers have
   an equivalent, ``foreign_class_names`` / ``from_foreign`` / ``to_library``.
2. A backend: ``class MyBackend(Backend[MyConfig])`` implementing ``quantize``, ``is_quantized``,
   ``dequantized_weight``, ``estimate_layer_nbytes`` (and ``restore``, to save), and declaring ``name``,
   ``config_class``, ``module_name`` (the library's import name), ``pip_extra``, ``cli_help``, ``presets``
   (named modes, ``"prefix-type"``), ``plan_candidates`` and, if its name implies options,
   ``simple_form_defaults``.
3. A module-level ``BACKENDS = (MyBackend(),)`` in the module or the package's ``__init__``, and the module's
   name in `_PACKAGES` below.
4. Its library as the extra ``pip_extra`` names in pyproject.toml's ``[project.optional-dependencies]`` (and in
   ``all``); tests/backends/test_registry.py checks that every declared extra exists.
5. Tests in ``tests/backends/test_<name>.py``, mirroring the module; the checks every backend must pass
   (``each_backend`` in tests/conftest.py) take one more config there. Export the config from ``pipequant``
   if it is public API.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .base import Backend, BackendConfig, LayerState, MissingBackendError, QuantizationConfigError

#: the backend modules and packages, each with its ``BACKENDS``, in the order listings show backends and modes
_PACKAGES = ("bitsandbytes", "torchao", "quanto", "gguf")

_REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for package in _PACKAGES
    for backend in importlib.import_module(f".{package}", __name__).BACKENDS
}


def backends() -> list[Backend]:
    """Every backend, in registry order."""
    return list(_REGISTRY.values())


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
    by_method = {cls.quant_method: cls for cls in config_classes()}
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
    "backends",
    "config_classes",
    "config_from_dict",
    "get_backend",
]
