"""GGUF backend: GGML quantization codecs in torch (bit-compatible with gguf-py/llama.cpp), the
`GGUFLinear` layer, and .gguf file reading and writing.

The codecs and the layer need the ``gguf`` package (its type tables); they are imported on first
use, so `GGUFQuantizationConfig` (in `.config`) can be built and validated without it installed, and the
backend (`.backend`, the registry's `BACKENDS`) registered.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "BACKENDS": ".backend",
    "GGML_TYPES": ".codecs",
    "block_size": ".codecs",
    "dequantize": ".codecs",
    "quantize": ".codecs",
    "type_size": ".codecs",
    "GGUFLinear": ".linear",
    "GGUFTypeFallbackWarning": ".linear",
    "type_fallbacks": ".linear",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = sorted(_LAZY)
