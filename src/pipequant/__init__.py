"""pipequant: load diffusers pipelines and quantize chosen components while they stream in."""

from .backends.base import MissingBackendError, QuantizationConfigError
from .backends.bitsandbytes import BitsAndBytesConfig
from .checkpoint import CheckpointError
from .config import PipelineQuantizationConfig
from .loading import PipelineFolderError, load_model, load_pipeline, quantize_pipeline
from .quantizing import quantize_model

__all__ = [
    "BitsAndBytesConfig",
    "CheckpointError",
    "MissingBackendError",
    "PipelineFolderError",
    "PipelineQuantizationConfig",
    "QuantizationConfigError",
    "load_model",
    "load_pipeline",
    "quantize_model",
    "quantize_pipeline",
]
