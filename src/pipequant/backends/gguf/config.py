"""`GGUFQuantizationConfig`: diffusers' GGUF config, plus what it takes to make GGUF weights ourselves.

diffusers' `GGUFQuantizationConfig(compute_dtype)` only loads files someone else quantized. Ours
adds `quant_type` (quantize full-precision weights on the fly, streaming or in memory) and
`type_rules` (per-layer types, so sensitive layers keep more bits). Without `quant_type` a config
can only load .gguf files, exactly like diffusers' class; using it on a full-precision component
is an error that asks for a `quant_type`, raised before any weight is read.

Importable without the ``gguf`` package: the types and their block sizes come from
`codecs.table`, so configs are validated, and layer types and sizes decided (`fitting_type`), without it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..base import BackendConfig, QuantizationConfigError, dtype_from_any, matches_module_pattern
from .codecs.table import GGML_TYPE_TABLE, GGML_TYPES

#: what llama.cpp's quantizer uses for rows that K-quant blocks do not divide (it has IQ4_NL for
#: Q2_K/Q3_K, which pipequant's codecs lack; Q4_0 is the same size); then F16/BF16
_BLOCK32_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fitting_type(requested: str, row_length: int, source_dtype: torch.dtype) -> str:
    """`requested` if `row_length` divides into its blocks, else the nearest type that fits.

    The last resort is BF16 for bfloat16 weights (lossless) and F16 otherwise, as llama.cpp does.
    """
    for candidate in (requested, _BLOCK32_FALLBACK.get(requested)):
        if candidate is not None and row_length % GGML_TYPE_TABLE[candidate].block_size == 0:
            return candidate
    return "BF16" if source_dtype == torch.bfloat16 else "F16"


def row_nbytes(qtype: str, row_length: int) -> int:
    """Bytes of one row of `row_length` weights in `qtype` (a multiple of its block size)."""
    ggml_type = GGML_TYPE_TABLE[qtype]
    return row_length // ggml_type.block_size * ggml_type.type_size


def check_type_name(value: Any, field_name: str) -> str:
    """A GGML type name in its canonical spelling ("q4_k" -> "Q4_K"), or an error naming the valid ones."""
    name = value.upper() if isinstance(value, str) else value
    if name in GGML_TYPES:
        return name
    close = difflib.get_close_matches(str(name), GGML_TYPES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise QuantizationConfigError(
        f"{field_name}={value!r} is not a GGML type pipequant can write.{hint} Valid types: {', '.join(GGML_TYPES)}."
    )


@dataclasses.dataclass(repr=False)
class GGUFQuantizationConfig(BackendConfig):
    """GGUF settings; `compute_dtype` comes first, as in diffusers' class.

    * `compute_dtype`: the dtype each layer dequantizes to and multiplies in. None: the dtype the
      layer's weights were loaded in (on the fly), or the load dtype of a .gguf file.
    * `quant_type`: the GGML type to quantize full-precision weights to (F32 F16 BF16 Q8_0 Q4_0 Q4_1
      Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K). A layer whose rows do not divide into the type's blocks
      gets the nearest type that fits, with a warning (see `GGUFLinear`). Leave it None to load
      .gguf files, whose layers keep the types they were stored with.
    * `type_rules`: ``{"module pattern": "Q8_0"}``, first match wins, with the pattern rules of
      `modules_to_not_convert` (a plain name matches that module and its suffix; globs match the
      full dotted name); layers no rule matches get `quant_type`.
    """

    quant_method: ClassVar[str] = "gguf"
    foreign_class_names: ClassVar[tuple[str, ...]] = ("GGUFQuantizationConfig",)

    compute_dtype: torch.dtype | str | None = None
    quant_type: str | None = None
    type_rules: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.compute_dtype = dtype_from_any(self.compute_dtype, "compute_dtype")
        if self.compute_dtype not in (None, *_COMPUTE_DTYPES):
            raise QuantizationConfigError(
                f"compute_dtype={self.compute_dtype} cannot run a GGUF layer; use torch.float32, torch.float16 "
                "or torch.bfloat16."
            )
        if self.quant_type is not None:
            self.quant_type = check_type_name(self.quant_type, "quant_type")
        if self.type_rules is not None:
            if not isinstance(self.type_rules, Mapping):
                raise QuantizationConfigError(
                    f"type_rules must be a dict {{module pattern: GGML type}}, not {self.type_rules!r}."
                )
            if self.quant_type is None:
                raise QuantizationConfigError(
                    "type_rules refine quant_type for matching layers; give quant_type too (the type of every "
                    "layer no rule matches), e.g. GGUFQuantizationConfig(quant_type='Q4_K', type_rules=...)."
                )
            self.type_rules = {
                str(pattern): check_type_name(qtype, f"type_rules[{pattern!r}]")
                for pattern, qtype in self.type_rules.items()
            }

    def type_for(self, module_name: str) -> str:
        """The GGML type `module_name` is quantized to, before any fallback for its row length."""
        assert self.quant_type is not None
        for pattern, qtype in (self.type_rules or {}).items():
            if matches_module_pattern(module_name, [pattern]):
                return qtype
        return self.quant_type

    @classmethod
    def from_foreign(cls, foreign: Any) -> GGUFQuantizationConfig:
        """diffusers' config carries `compute_dtype` (float32 when unset) and nothing to quantize with.

        The result loads .gguf files only (no `quant_type`), as the original does.
        """
        skip = getattr(foreign, "modules_to_not_convert", None)
        return cls(compute_dtype=foreign.compute_dtype, modules_to_not_convert=list(skip) if skip else None)

    def to_library(self, library: str, dtype: torch.dtype | None) -> Any:
        """diffusers' `GGUFQuantizationConfig` carrying our settings too (see `library_quantizer.py`), for
        transformers models as well: transformers has no GGUF quantization config (it dequantizes .gguf
        files on load). ``compute_dtype`` is the one the layers use."""
        from .library_quantizer import GGUFLayersConfig

        return GGUFLayersConfig(
            compute_dtype=self.compute_dtype or dtype or torch.float32,
            quant_type=self.quant_type,
            type_rules=dict(self.type_rules) if self.type_rules else None,
            modules_to_not_convert=list(self.modules_to_not_convert) if self.modules_to_not_convert else None,
        )

    def differences(self, given: BackendConfig) -> list[str]:
        """Types must agree; a compute dtype left unset on `given` takes the saved one."""
        if not isinstance(given, GGUFQuantizationConfig):
            return super().differences(given)
        names = ["quant_type", "type_rules"]
        if given.compute_dtype is not None:
            names.append("compute_dtype")
        saved, wanted = self.to_dict(), given.to_dict()
        return [f"{k}: saved {saved[k]!r}, given {wanted[k]!r}" for k in names if saved[k] != wanted[k]]
