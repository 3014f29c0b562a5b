"""A `PipelineQuantizationConfig` written on the command line, or kept in a JSON file.

On the command line (``--config``), one of:

* ``MODE[:COMPONENTS]``: a named mode (`presets.PRESETS`: ``bnb-nf4``, ``gguf-Q4_K``, ...) for the
  comma-separated components, or for every model component when none are named;
* ``BACKEND[:COMPONENTS]``: a backend name (``bitsandbytes_4bit``, ...) with its defaults;
* ``PATH.json``: a file as `write_config` writes it (and `pipequant plan --out` does):
  ``{"component": {"quant_method": ..., options...}, ...}``, each value the ``quantization_config``
  dict a saved component's config.json holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from .backends import backend_names, config_from_dict
from .backends.base import QuantizationConfigError
from .config import PipelineQuantizationConfig
from .presets import PRESETS, preset_pipeline_config


def parse_config(spec: str) -> PipelineQuantizationConfig:
    """The config `spec` names (see the module docstring)."""
    if spec.endswith(".json"):
        return read_config(Path(spec))
    name, _, listed = spec.partition(":")
    components = [c.strip() for c in listed.split(",") if c.strip()] or None
    if name in PRESETS:
        return preset_pipeline_config(name, components)
    if name in backend_names():
        return PipelineQuantizationConfig(quant_backend=name, components_to_quantize=components)
    raise QuantizationConfigError(
        f"--config {spec!r}: {name!r} is neither a mode ({', '.join(PRESETS)}) nor a backend "
        f"({', '.join(backend_names())}), and not a .json file."
    )


def read_config(path: Path) -> PipelineQuantizationConfig:
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise QuantizationConfigError(f"{path}: cannot read a quantization config ({error}).") from error
    if not isinstance(stored, dict) or not stored:
        raise QuantizationConfigError(f"{path} must hold a JSON object {{component: quantization_config}}.")
    return PipelineQuantizationConfig(
        quant_mapping={name: config_from_dict(value, context=f"{path}: {name}") for name, value in stored.items()}
    )


def write_config(config: PipelineQuantizationConfig, path: Path) -> Path:
    """Write a per-component config (``quant_mapping``, as `plan` makes) in the format `read_config` reads."""
    if config.quant_mapping is None:
        raise ValueError("only a quant_mapping config can be written; its components must be named")
    path.write_text(json.dumps({name: cfg.to_dict() for name, cfg in config.quant_mapping.items()}, indent=2) + "\n")
    return path
