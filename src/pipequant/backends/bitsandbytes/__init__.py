"""bitsandbytes 4-bit (nf4/fp4) and 8-bit (LLM.int8) layers, on CPU and CUDA: two backends, one config.

diffusers refuses bitsandbytes without a GPU; bitsandbytes itself quantizes and runs on CPU, so
we talk to it directly. The layers we make are bitsandbytes' own `Linear4bit` / `Linear8bitLt`
with its parameter types, so its kernels run them and their state dicts are its format: the
tensor names and the ``quantization_config`` that diffusers and transformers save and load
(``weight``, ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...; ``weight``, ``SCB``).

`config` holds `BitsAndBytesConfig`; `backend_4bit` and `backend_8bit` one backend each.
"""

from __future__ import annotations

from ..base import Backend
from .backend_4bit import BitsAndBytes4bitBackend
from .backend_8bit import BitsAndBytes8bitBackend
from .config import BitsAndBytesConfig

BACKENDS: tuple[Backend, ...] = (BitsAndBytes4bitBackend(), BitsAndBytes8bitBackend())

__all__ = ["BACKENDS", "BitsAndBytes4bitBackend", "BitsAndBytes8bitBackend", "BitsAndBytesConfig"]
