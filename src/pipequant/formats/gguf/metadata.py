"""What a .gguf file says besides its tensors: the keys other tools read, and pipequant's own.

Other tools: ComfyUI-GGUF checks ``general.architecture`` against the architectures it knows
("flux", "sd1", "sdxl", ...; none or "pig" makes it guess from tensor names) and stable-diffusion.cpp
tells the model from tensor names alone; both expect Flux in the BFL layout (see `flux_names.py`).
``general.quantization_version`` and ``general.file_type`` are written as llama.cpp's tools write them.

pipequant's keys (``pipequant.*``, JSON strings) make loading back exact without any other file:
the model class and its config, the quantization config, the dtype of the plain tensors (1-D
tensors are stored as F32, as the community files do, whatever dtype they had), which linear
layers are GGUF layers (a layer stored as F16 can be either) and which types fell back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

#: general.architecture for files no other tool opens (anything but Flux in the BFL layout)
OWN_ARCHITECTURE = "pipequant"
FLUX_ARCHITECTURE = "flux"

VERSION = "pipequant.version"
LAYOUT = "pipequant.layout"
MODEL_CLASS = "pipequant.model_class"
MODEL_CONFIG = "pipequant.model_config"
QUANTIZATION_CONFIG = "pipequant.quantization_config"
DTYPE = "pipequant.dtype"
GGUF_LAYERS = "pipequant.gguf_layers"
TYPE_FALLBACKS = "pipequant.type_fallbacks"

#: llama.cpp's general.file_type for the type most weights are in (K-quants: its uniform "_S" variant)
FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q2_K": "MOSTLY_Q2_K",
    "Q3_K": "MOSTLY_Q3_K_S",
    "Q4_K": "MOSTLY_Q4_K_S",
    "Q5_K": "MOSTLY_Q5_K_S",
    "Q6_K": "MOSTLY_Q6_K",
}


@dataclasses.dataclass
class PipequantMetadata:
    """pipequant's keys of one file; all None for files other tools wrote."""

    layout: str | None = None
    model_class: str | None = None
    model_config: dict[str, Any] | None = None
    quantization_config: dict[str, Any] | None = None
    dtype: torch.dtype | None = None
    gguf_layers: set[str] | None = None
    type_fallbacks: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        values = {
            LAYOUT: self.layout,
            MODEL_CLASS: self.model_class,
            MODEL_CONFIG: _json(self.model_config),
            QUANTIZATION_CONFIG: _json(self.quantization_config),
            DTYPE: None if self.dtype is None else str(self.dtype).removeprefix("torch."),
            GGUF_LAYERS: _json(None if self.gguf_layers is None else sorted(self.gguf_layers)),
            TYPE_FALLBACKS: _json(self.type_fallbacks),
        }
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def from_strings(cls, fields: dict[str, str]) -> PipequantMetadata:
        """Parse the keys; ValueError names a key that is not what pipequant writes.

        Each value's type is checked: the file is untrusted, and a model config that is a string
        instead of an object would be taken for a path or a Hub repo id by the model's library.
        """
        layers = _loads(fields, GGUF_LAYERS, list, str)
        dtype = fields.get(DTYPE)
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"its {DTYPE} is {dtype!r}, not one of {', '.join(_DTYPES)}")
        layout = fields.get(LAYOUT)
        if layout not in (None, "bfl", "diffusers"):
            raise ValueError(f"its {LAYOUT} is {layout!r}, not 'bfl' or 'diffusers'")
        return cls(
            layout=layout,
            model_class=fields.get(MODEL_CLASS),
            model_config=_loads(fields, MODEL_CONFIG, dict),
            quantization_config=_loads(fields, QUANTIZATION_CONFIG, dict),
            dtype=None if dtype is None else _DTYPES[dtype],
            gguf_layers=None if layers is None else set(layers),
            type_fallbacks=_loads(fields, TYPE_FALLBACKS, dict, str) or {},
        )


#: the dtypes of plain tensors pipequant writes, by the name `to_strings` gives them
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _loads(fields: dict[str, str], key: str, kind: type, item: type | None = None) -> Any:
    """The JSON value of `key` (None when absent), which must be a `kind` of `item` values (list items, dict values)."""
    if key not in fields:
        return None
    try:
        value = json.loads(fields[key])
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser's stack
        raise ValueError(f"its {key} is not JSON ({type(error).__name__}: {error})") from None
    items = value.values() if isinstance(value, dict) else value
    if not isinstance(value, kind) or (item is not None and not all(isinstance(v, item) for v in items)):
        what = kind.__name__ if item is None else f"{kind.__name__} of {item.__name__}"
        raise ValueError(f"its {key} is a JSON {type(value).__name__}, not a {what}")
    return value
