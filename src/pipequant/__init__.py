"""pipequant: load diffusers pipelines and quantize chosen components while they stream in.

``pipequant.DiffusionPipeline``, ``pipequant.FluxPipeline`` and every other diffusers pipeline class
name are stand-ins whose ``from_pretrained`` loads through pipequant (see `drop_in`).
"""

from typing import Any

from .backends.base import MissingBackendError, QuantizationConfigError
from .backends.bitsandbytes import BitsAndBytesConfig
from .backends.gguf.config import GGUFQuantizationConfig
from .backends.quanto import QuantoConfig
from .backends.torchao import TorchAoConfig
from .checkpoint import CheckpointError
from .component_classes import allow_library
from .config import PipelineQuantizationConfig
from .devices import DeviceError
from .formats.gguf.saving import export_gguf, save_gguf
from .loading import PipelineFolderError, load_model, load_pipeline, quantize_pipeline
from .planning import BudgetError, plan
from .planning.sizing import estimate
from .quality import compare
from .quantizing import quantize_model
from .saving import save_model, save_pipeline

__all__ = [
    "BitsAndBytesConfig",
    "BudgetError",
    "CheckpointError",
    "DeviceError",
    "DiffusionPipeline",
    "GGUFQuantizationConfig",
    "MissingBackendError",
    "PipelineFolderError",
    "PipelineQuantizationConfig",
    "QuantizationConfigError",
    "QuantoConfig",
    "TorchAoConfig",
    "allow_library",
    "compare",
    "estimate",
    "export_gguf",
    "load_model",
    "load_pipeline",
    "plan",
    "quantize_model",
    "quantize_pipeline",
    "save_gguf",
    "save_model",
    "save_pipeline",
]


def __getattr__(name: str) -> Any:
    """diffusers' pipeline classes by name (``DiffusionPipeline``, ``FluxPipeline``, ...), as pipequant stand-ins."""
    if name.endswith("Pipeline") and not name.startswith("_"):
        from .drop_in import stand_in

        return stand_in(name)
    raise AttributeError(f"module 'pipequant' has no attribute {name!r}")
