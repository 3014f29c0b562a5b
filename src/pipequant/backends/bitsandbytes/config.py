"""`BitsAndBytesConfig`: the settings of both bitsandbytes backends, with diffusers' and transformers' keyword names.

Validated without bitsandbytes installed; `to_dict` / `from_dict` are those libraries' ``quantization_config``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..base import BackendConfig, QuantizationConfigError, dtype_from_any, library_module, matches_module_pattern

_QUANT_TYPES = ("nf4", "fp4")
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(repr=False)
class BitsAndBytesConfig(BackendConfig):
    """bitsandbytes settings, with the keyword names of diffusers' and transformers' class.

    Exactly one of `load_in_4bit` / `load_in_8bit` is set. `compute_dtype` is accepted as a
    synonym of `bnb_4bit_compute_dtype`, because users write it and transformers drops it silently.
    """

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: torch.dtype | str | None = None
    bnb_4bit_quant_storage: torch.dtype | str | None = None
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_has_fp16_weight: bool = False
    compute_dtype: dataclasses.InitVar[torch.dtype | str | None] = None

    foreign_class_names: ClassVar[tuple[str, ...]] = ("BitsAndBytesConfig",)
    quant_method: ClassVar[str] = "bitsandbytes"

    def __post_init__(self, compute_dtype: torch.dtype | str | None) -> None:
        if self.load_in_4bit == self.load_in_8bit:
            raise QuantizationConfigError(
                "BitsAndBytesConfig needs exactly one of load_in_4bit=True or load_in_8bit=True."
            )
        if self.bnb_4bit_quant_type not in _QUANT_TYPES:
            raise QuantizationConfigError(
                f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not a bitsandbytes 4-bit type; "
                f"use one of {', '.join(_QUANT_TYPES)}."
            )
        compute_dtype = dtype_from_any(compute_dtype, "compute_dtype")
        self.bnb_4bit_compute_dtype = dtype_from_any(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        if compute_dtype is not None:
            if self.bnb_4bit_compute_dtype not in (None, compute_dtype):
                raise QuantizationConfigError(
                    f"compute_dtype={compute_dtype} and bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype} "
                    "disagree; give only bnb_4bit_compute_dtype."
                )
            self.bnb_4bit_compute_dtype = compute_dtype
        storage = dtype_from_any(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage")
        if storage not in (None, *_STORAGE_DTYPES):
            raise QuantizationConfigError(
                f"bnb_4bit_quant_storage={storage} is not supported; use one of "
                f"{', '.join(str(d).removeprefix('torch.') for d in _STORAGE_DTYPES)}."
            )
        self.bnb_4bit_quant_storage = storage
        if self.llm_int8_has_fp16_weight:
            raise QuantizationConfigError(
                "llm_int8_has_fp16_weight=True keeps full-precision weights and quantizes them on every "
                "forward, which saves no memory; pipequant stores int8 weights. Leave it False."
            )

    @property
    def backend_name(self) -> str:
        return "bitsandbytes_4bit" if self.load_in_4bit else "bitsandbytes_8bit"

    @classmethod
    def field_names(cls) -> list[str]:
        return [*super().field_names(), "compute_dtype"]

    def excluded(self, module_name: str) -> bool:
        patterns = [*(self.modules_to_not_convert or ()), *(self.llm_int8_skip_modules or ())]
        return matches_module_pattern(module_name, patterns)

    @classmethod
    def from_foreign(cls, foreign: Any) -> BitsAndBytesConfig:
        if getattr(foreign, "llm_int8_enable_fp32_cpu_offload", False):
            raise QuantizationConfigError(
                "llm_int8_enable_fp32_cpu_offload=True is for device maps that offload layers; pipequant "
                "places whole components. Keep layers in full precision with modules_to_not_convert instead."
            )
        skip = getattr(foreign, "llm_int8_skip_modules", None)
        return cls(
            load_in_4bit=bool(foreign.load_in_4bit),
            load_in_8bit=bool(foreign.load_in_8bit),
            bnb_4bit_quant_type=foreign.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=bool(foreign.bnb_4bit_use_double_quant),
            bnb_4bit_compute_dtype=foreign.bnb_4bit_compute_dtype,
            bnb_4bit_quant_storage=foreign.bnb_4bit_quant_storage,
            llm_int8_threshold=float(foreign.llm_int8_threshold),
            llm_int8_skip_modules=list(skip) if skip else None,
            llm_int8_has_fp16_weight=bool(foreign.llm_int8_has_fp16_weight),
        )

    def to_dict(self) -> dict[str, Any]:
        """The dict diffusers' and transformers' `BitsAndBytesConfig.to_dict` write, key for key.

        Both libraries read it back, so a component we save loads in them too. Our
        `modules_to_not_convert` goes into `llm_int8_skip_modules`, the only skip list they store;
        a compute dtype left unset stays null (they read null as float32; bitsandbytes then
        follows the input dtype, which is what the layers we made did).
        """
        skip = [*(self.modules_to_not_convert or ()), *(self.llm_int8_skip_modules or ())]
        storage = self.bnb_4bit_quant_storage or torch.uint8
        compute = self.bnb_4bit_compute_dtype
        return {
            "_load_in_4bit": self.load_in_4bit,
            "_load_in_8bit": self.load_in_8bit,
            "bnb_4bit_compute_dtype": None if compute is None else _dtype_name(compute),
            "bnb_4bit_quant_storage": _dtype_name(storage),
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "llm_int8_skip_modules": skip or None,
            "llm_int8_threshold": self.llm_int8_threshold,
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
            "quant_method": "bitsandbytes",
        }

    def to_library(self, library: str, dtype: torch.dtype | None) -> Any:
        """diffusers' or transformers' `BitsAndBytesConfig` with the settings `to_dict` writes."""
        settings = {key: value for key, value in self.to_dict().items() if not key.startswith("_")}
        settings.pop("quant_method")
        return library_module(library).BitsAndBytesConfig(**settings)

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], *, context: str) -> BitsAndBytesConfig:
        """Read what `to_dict`, diffusers or transformers wrote.

        Keys about how a model is placed at load time (``llm_int8_enable_fp32_cpu_offload``) and
        keys newer library versions may add are ignored: the stored tensors define the layers.
        """
        skip = stored.get("llm_int8_skip_modules")
        try:
            return cls(
                load_in_4bit=bool(stored.get("load_in_4bit", stored.get("_load_in_4bit", False))),
                load_in_8bit=bool(stored.get("load_in_8bit", stored.get("_load_in_8bit", False))),
                bnb_4bit_quant_type=stored.get("bnb_4bit_quant_type", "fp4"),
                bnb_4bit_use_double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)),
                bnb_4bit_compute_dtype=stored.get("bnb_4bit_compute_dtype"),
                bnb_4bit_quant_storage=stored.get("bnb_4bit_quant_storage"),
                llm_int8_threshold=float(stored.get("llm_int8_threshold", 6.0)),
                llm_int8_skip_modules=list(skip) if skip else None,
                llm_int8_has_fp16_weight=bool(stored.get("llm_int8_has_fp16_weight", False)),
            )
        except QuantizationConfigError as error:
            raise QuantizationConfigError(f"{context}: {error}") from error

    def differences(self, given: BackendConfig) -> list[str]:
        """Only the settings of this config's mode count; an unset compute dtype on `given` takes the saved one."""
        if not isinstance(given, BitsAndBytesConfig) or given.backend_name != self.backend_name:
            return super().differences(given)
        if self.load_in_8bit:
            names = ["llm_int8_threshold"]
        else:
            names = ["bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage"]
            if given.bnb_4bit_compute_dtype is not None:
                names.append("bnb_4bit_compute_dtype")
        saved, wanted = self.to_dict(), given.to_dict()
        return [f"{k}: saved {saved[k]!r}, given {wanted[k]!r}" for k in names if saved[k] != wanted[k]]


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")
