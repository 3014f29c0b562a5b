"""The compiled kernels (C sources in `src/pipequant/_native`, built by setup.py at install).

setup.py marks them optional, so an install without a C compiler still works: each caller then
runs its slower code (the libraries' own int8 quantizers, the torch GGUF codecs), and the first
use says so once.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def compiled(name: str) -> ModuleType | None:
    """`pipequant._<name>`, or None (with a warning, once per kernel) where it was not built."""
    try:
        return importlib.import_module(f"pipequant._{name}")
    except ImportError:
        warnings.warn(
            f"pipequant's compiled kernel {name!r} is not built (no C compiler at install?); the slower code "
            "path runs instead. Reinstall pipequant with a C compiler at hand to build it.",
            stacklevel=2,
        )
        return None
