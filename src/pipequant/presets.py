"""Named quantization modes ("bnb-nf4", "gguf-Q4_K", ...): short names for one backend config each.

The planner chooses among them, and the command line accepts them wherever it takes a backend
(``--config bnb-nf4:transformer``). Each backend declares its own (`Backend.presets`,
`Backend.plan_candidates`); this module lists them in registry order. Each call builds a fresh
config, since configs are mutable.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch

from .backends import backend_for, backends, get_backend
from .backends.base import BackendConfig, MissingBackendError, QuantizationConfigError
from .config import PipelineQuantizationConfig

#: mode name -> (backend name, its quant_kwargs in `PipelineQuantizationConfig`'s simple form)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    mode: (backend.name, dict(kwargs)) for backend in backends() for mode, kwargs in backend.presets.items()
}

#: what `plan` weighs by default: each backend's common modes, from 8 bits down to 4
PLAN_CANDIDATES: tuple[str, ...] = tuple(mode for backend in backends() for mode in backend.plan_candidates)


def preset(name: str) -> BackendConfig:
    """A new config for the mode `name`; an unknown name is an error listing the known ones."""
    backend_name, kwargs = _lookup(name)
    backend = get_backend(backend_name)
    return backend.config_class.from_kwargs({**backend.simple_form_defaults, **kwargs}, context=f"mode {name!r}")


def preset_pipeline_config(name: str, components: list[str] | None = None) -> PipelineQuantizationConfig:
    """The mode `name` for `components` (None: every model component), in `PipelineQuantizationConfig`'s simple form."""
    backend_name, kwargs = _lookup(name)
    return PipelineQuantizationConfig(
        quant_backend=backend_name, quant_kwargs=kwargs, components_to_quantize=components
    )


def _lookup(name: str) -> tuple[str, dict[str, Any]]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise QuantizationConfigError(f"Unknown quantization mode {name!r}.{hint} Modes: {', '.join(PRESETS)}.")
    backend_name, kwargs = PRESETS[name]
    return backend_name, dict(kwargs)


def usable(name: str, device: torch.device) -> bool:
    """Whether the mode's library is installed and the mode runs on `device`."""
    config = preset(name)
    backend = backend_for(config)
    try:
        backend.require()
        backend.check_device(config, device)
    except (MissingBackendError, QuantizationConfigError):
        return False
    return True
