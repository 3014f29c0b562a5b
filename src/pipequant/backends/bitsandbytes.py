"""bitsandbytes 4-bit (nf4/fp4) and 8-bit (LLM.int8) layers, on CPU and CUDA.

diffusers refuses bitsandbytes without a GPU; bitsandbytes itself quantizes and runs on CPU, so
we talk to it directly. The layers we make are bitsandbytes' own `Linear4bit` / `Linear8bitLt`
with its parameter types, so its kernels run them and their state dicts are its format.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from .base import Backend, BackendConfig, QuantizationConfigError, dtype_from_any, matches_module_pattern

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
    def backend_name(self) -> str:  # type: ignore[override]
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


class BitsAndBytes4bitBackend(Backend):
    name = "bitsandbytes_4bit"
    config_class = BitsAndBytesConfig
    module_name = "bitsandbytes"
    pip_extra = "bitsandbytes"
    simple_form_defaults = {"load_in_4bit": True}

    def quantize(self, module: nn.Module, config: BackendConfig, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb

        assert isinstance(config, BitsAndBytesConfig) and isinstance(module, nn.Linear)
        storage = config.bnb_4bit_quant_storage or torch.uint8
        packed, quant_state = bnb.functional.quantize_4bit(
            module.weight.data.to(device).contiguous(),
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
        )
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=quant_state,
            blocksize=quant_state.blocksize,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = quant_state
        _copy_bias(module, layer, device)
        return layer

    def is_quantized(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)


class BitsAndBytes8bitBackend(Backend):
    name = "bitsandbytes_8bit"
    config_class = BitsAndBytesConfig
    module_name = "bitsandbytes"
    pip_extra = "bitsandbytes"
    simple_form_defaults = {"load_in_8bit": True}

    def quantize(self, module: nn.Module, config: BackendConfig, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb

        assert isinstance(config, BitsAndBytesConfig) and isinstance(module, nn.Linear)
        # Int8Params.to() quantizes only when moving off the CPU-resident copy; calling the
        # functional API directly works the same wherever the weight already is.
        weight = module.weight.data.to(device=device, dtype=torch.float16).contiguous()
        int8_weight, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight)
        del weight
        layer = bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            has_fp16_weights=False,
            threshold=config.llm_int8_threshold,
            device="meta",
        )
        param = bnb.nn.Int8Params(int8_weight, requires_grad=False, has_fp16_weights=False)
        param.CB = int8_weight
        param.SCB = row_scales
        layer.weight = param
        _copy_bias(module, layer, device)
        return layer

    def is_quantized(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear8bitLt)


def _copy_bias(source: nn.Linear, target: nn.Module, device: torch.device) -> None:
    if source.bias is not None:
        target.bias = nn.Parameter(source.bias.data.to(device), requires_grad=False)


BACKENDS: tuple[Backend, ...] = (BitsAndBytes4bitBackend(), BitsAndBytes8bitBackend())
