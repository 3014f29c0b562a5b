"""The GGUF backend: GGML codecs over one type table (`codecs/`, bit-compatible with gguf-py and llama.cpp),
the `GGUFLinear` layer and its torch custom op (`ops`). Reading and writing .gguf files is
`pipequant.formats.gguf`'s.

The names below are imported on first use, so `GGUFQuantizationConfig` (in `.config`) can be built and
validated, and the backend registered, without importing the codecs or the ``gguf`` package.
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
