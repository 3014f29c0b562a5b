"""pipequant: load diffusers pipelines and quantize chosen components while they stream in."""

from .backends.base import MissingBackendError, QuantizationConfigError
from .backends.bitsandbytes import BitsAndBytesConfig
from .backends.gguf.config import GGUFQuantizationConfig
from .backends.quanto import QuantoConfig
from .backends.torchao import TorchAoConfig
from .checkpoint import CheckpointError
from .component_classes import allow_library
from .config import PipelineQuantizationConfig
from .gguf_saving import save_gguf
from .loading import PipelineFolderError, load_model, load_pipeline, quantize_pipeline
from .planning import BudgetError, plan
from .quality import compare
from .quantizing import quantize_model
from .saving import save_model, save_pipeline
from .sizing import estimate

__all__ = [
    "BitsAndBytesConfig",
    "BudgetError",
    "CheckpointError",
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
    "load_model",
    "load_pipeline",
    "plan",
    "quantize_model",
    "quantize_pipeline",
    "save_gguf",
    "save_model",
    "save_pipeline",
]
