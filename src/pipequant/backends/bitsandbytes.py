"""bitsandbytes 4-bit (nf4/fp4) and 8-bit (LLM.int8) layers, on CPU and CUDA.

diffusers refuses bitsandbytes without a GPU; bitsandbytes itself quantizes and runs on CPU, so
we talk to it directly. The layers we make are bitsandbytes' own `Linear4bit` / `Linear8bitLt`
with its parameter types, so its kernels run them and their state dicts are its format: the
tensor names and the ``quantization_config`` that diffusers and transformers save and load
(``weight``, ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...; ``weight``, ``SCB``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from . import bnb_chunked, int8_rows, row_blocks
from .base import (
    Backend,
    BackendConfig,
    LayerState,
    QuantizationConfigError,
    bias_nbytes,
    dtype_from_any,
    library_module,
    matches_module_pattern,
)

_QUANT_TYPES = ("nf4", "fp4")
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
# the quant-state tensors Linear4bit's state dict holds beside "weight" (nested: double quantization)
_4BIT_STATISTICS = frozenset({"weight.absmax", "weight.quant_map"})
_4BIT_NESTED = frozenset({"weight.nested_absmax", "weight.nested_quant_map"})
_4BIT_BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # double quantization: uint8 block scales, one float32 scale per 256 of them
_4BIT_CODE_NBYTES = 16 * 4  # the nf4/fp4 code book, float32
_NESTED_CODE_NBYTES = 256 * 4  # the 8-bit code book of the block scales, float32
_TYPICAL_OFFSET = 0.10000000149011612  # a float32 (0.1) as Python prints it, for the JSON state's length


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
    quant_method: ClassVar[str | None] = "bitsandbytes"

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


class BitsAndBytes4bitBackend(Backend):
    name = "bitsandbytes_4bit"
    config_class = BitsAndBytesConfig
    module_name = "bitsandbytes"
    pip_extra = "bitsandbytes"
    simple_form_defaults = {"load_in_4bit": True}

    def quantize(self, module_name: str, module: nn.Module, config: BackendConfig, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb

        assert isinstance(config, BitsAndBytesConfig) and isinstance(module, nn.Linear)
        storage = config.bnb_4bit_quant_storage or torch.uint8
        packed, quant_state = bnb_chunked.quantize_4bit(
            module.weight.data.to(device).contiguous(),
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
        )
        layer = _linear4bit(module, config, storage)
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

    def restore(
        self, module: nn.Module, state: LayerState, config: BackendConfig, device: torch.device
    ) -> nn.Module:
        """`Params4bit.from_prequantized` on the stored packed weight and quant-state tensors."""
        import bitsandbytes as bnb

        assert isinstance(config, BitsAndBytesConfig) and isinstance(module, nn.Linear)
        tensors = dict(state.tensors)
        packed = _pop_required(tensors, "weight")
        bias = tensors.pop("bias", None)
        packed_state = [k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")]
        statistics = set(tensors) - set(packed_state)
        if len(packed_state) != 1 or statistics not in (_4BIT_STATISTICS, _4BIT_STATISTICS | _4BIT_NESTED):
            raise ValueError(
                f"not a bitsandbytes 4-bit layer: expected weight, {', '.join(sorted(_4BIT_STATISTICS))}, "
                f"optionally {', '.join(sorted(_4BIT_NESTED))}, and one weight.quant_state.bitsandbytes__<type> "
                f"tensor; found {sorted(state.tensors)}"
            )
        stored_type = packed_state[0].rpartition("__")[2]
        if stored_type != config.bnb_4bit_quant_type:
            raise ValueError(f"the layer is stored as {stored_type}, but its config says {config.bnb_4bit_quant_type}")
        layer = _linear4bit(module, config, packed.dtype)
        layer.weight = bnb.nn.Params4bit.from_prequantized(packed, tensors, device=device, module=layer)
        shape = tuple(layer.weight.quant_state.shape)
        values = module.out_features * module.in_features
        if shape != (module.out_features, module.in_features) or packed.numel() * packed.element_size() * 2 != values:
            raise ValueError(
                f"the stored weight ({packed.numel() * packed.element_size()} bytes for shape {shape}) does not fit "
                f"the layer {(module.out_features, module.in_features)}"
            )
        _set_bias(layer, bias, device)
        return layer

    def is_quantized(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as F

        return F.dequantize_4bit(module.weight.data, module.weight.quant_state)

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Module, config: BackendConfig, dtype: torch.dtype
    ) -> int:
        """Packed nibbles, block scales (nested: uint8 plus their own scales), code book and bias.

        Exact but for the JSON quant state's double-quant offset, whose decimal digits vary by a
        few bytes per layer.
        """
        assert isinstance(config, BitsAndBytesConfig) and isinstance(module, nn.Linear)
        storage = config.bnb_4bit_quant_storage or torch.uint8
        # quantized in slices of whole blocks (bnb_chunked), which pack to exactly these sums
        numel = module.weight.numel()
        packed = (numel + 1) // (storage.itemsize * 2) * storage.itemsize
        blocks = -(numel // -_4BIT_BLOCKSIZE)
        state: dict[str, Any] = {
            "quant_type": config.bnb_4bit_quant_type,
            "blocksize": _4BIT_BLOCKSIZE,
            "dtype": str(dtype).strip("torch."),  # as bitsandbytes' QuantState.as_dict writes it
            "shape": [module.out_features, module.in_features],
        }
        scales = blocks * 4
        if config.bnb_4bit_use_double_quant:
            nested_blocks = -(blocks // -_NESTED_BLOCKSIZE)
            scales = blocks + nested_blocks * 4 + _NESTED_CODE_NBYTES
            state.update(nested_blocksize=_NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=_TYPICAL_OFFSET)
        return packed + scales + _4BIT_CODE_NBYTES + len(json.dumps(state)) + bias_nbytes(module, dtype)


def _int8_vectorwise_quant(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' LLM.int8 weight format (int8 rows, one float32 absmax per row) of float16 rows,
    as `Linear8bitLt` makes it."""
    import bitsandbytes.functional as F

    int8_rows, row_scales, _ = F.int8_vectorwise_quant(rows.to(torch.float16))
    return int8_rows, row_scales


class BitsAndBytes8bitBackend(Backend):
    name = "bitsandbytes_8bit"
    config_class = BitsAndBytesConfig
    module_name = "bitsandbytes"
    pip_extra = "bitsandbytes"
    simple_form_defaults = {"load_in_8bit": True}

    def quantize(self, module_name: str, module: nn.Module, config: BackendConfig, device: torch.device) -> nn.Module:
        assert isinstance(config, BitsAndBytesConfig) and isinstance(module, nn.Linear)
        # Int8Params.to() quantizes only when moving off the CPU-resident copy; calling the
        # functional API directly works the same wherever the weight already is.
        weight = module.weight.data.to(device)
        # the compiled kernel where it applies (CPU), checked against bitsandbytes on two rows
        compiled = kernels.checked(
            kernel=int8_rows.bitsandbytes_int8_rows,
            library=_int8_vectorwise_quant,
            weight=weight,
            head=weight[:2],
            library_name="bitsandbytes",
        )
        int8_weight, row_scales = compiled or row_blocks.quantize_by_rows(weight, _int8_vectorwise_quant, device)
        layer = _linear8bit(module, config, int8_weight, row_scales)
        _copy_bias(module, layer, device)
        return layer

    def restore(
        self, module: nn.Module, state: LayerState, config: BackendConfig, device: torch.device
    ) -> nn.Module:
        """An `Int8Params` on the stored int8 rows, with the stored row scales as its SCB."""
        assert isinstance(config, BitsAndBytesConfig) and isinstance(module, nn.Linear)
        tensors = dict(state.tensors)
        weight = _pop_required(tensors, "weight")
        row_scales = _pop_required(tensors, "SCB")
        bias = tensors.pop("bias", None)
        weight_format = tensors.pop("weight_format", None)  # written by bitsandbytes; 0 means row-major
        if tensors or weight.dtype != torch.int8:
            raise ValueError(
                f"not a bitsandbytes 8-bit layer: expected an int8 weight, SCB and weight_format, "
                f"found {sorted(state.tensors)} with a {weight.dtype} weight"
            )
        if weight_format is not None and int(weight_format.item()) != 0:
            raise ValueError(f"weight_format={int(weight_format.item())}; only row-major (0) weights are supported")
        if tuple(weight.shape) != (module.out_features, module.in_features) or tuple(row_scales.shape) != (
            module.out_features,
        ):
            raise ValueError(
                f"the stored weight {tuple(weight.shape)} and SCB {tuple(row_scales.shape)} do not fit the layer "
                f"{(module.out_features, module.in_features)}"
            )
        layer = _linear8bit(module, config, weight.to(device), row_scales.to(device))
        _set_bias(layer, bias, device)
        return layer

    def is_quantized(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear8bitLt)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        """float16, the dtype LLM.int8 quantizes from (`_int8_vectorwise_quant`). The first forward moves the row
        scales from the parameter to the layer's state."""
        import bitsandbytes.functional as F

        row_scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return F.int8_vectorwise_dequant(module.weight.data, row_scales).to(torch.float16)

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Module, config: BackendConfig, dtype: torch.dtype
    ) -> int:
        """int8 weight, a float32 scale per row (SCB), the one-byte weight_format, and the bias."""
        assert isinstance(module, nn.Linear)
        return module.weight.numel() + module.out_features * 4 + 1 + bias_nbytes(module, dtype)


def _linear4bit(module: nn.Linear, config: BitsAndBytesConfig, storage: torch.dtype) -> nn.Module:
    """An empty `Linear4bit` (on meta) of `module`'s shape, for a packed weight to be set on.

    bitsandbytes' own CPU path (on CPUs with AVX512-BF16) repacks the weight at the first forward
    and rounds its absmax to bfloat16; its state dict then undoes that only approximately (with
    double quantization the stored bytes change; without it the absmax comes back transposed,
    and the layer in memory is left broken). We turn that path off, so a layer saves exactly as
    it was quantized after any number of forwards. The general path it falls back to is as fast
    or faster for the hundreds of tokens per call of a diffusion model; the repacked path wins
    only for single-token calls.
    """
    import bitsandbytes as bnb

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
    layer.support_avx512bf16_for_cpu = False
    return layer


def _linear8bit(
    module: nn.Linear, config: BitsAndBytesConfig, int8_weight: torch.Tensor, row_scales: torch.Tensor
) -> nn.Module:
    import bitsandbytes as bnb

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
    return layer


def _pop_required(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"the stored layer has no {name!r} tensor (it holds {sorted(tensors)})")
    return tensors.pop(name)


def _copy_bias(source: nn.Linear, target: nn.Module, device: torch.device) -> None:
    if source.bias is not None:
        target.bias = nn.Parameter(source.bias.data.to(device), requires_grad=False)


def _set_bias(layer: nn.Module, bias: torch.Tensor | None, device: torch.device) -> None:
    """The stored bias on the rebuilt layer; a layer built with a bias needs one stored."""
    if (bias is None) != (layer.bias is None):
        raise ValueError("the stored layer and the model disagree on whether the layer has a bias")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device), requires_grad=False)


BACKENDS: tuple[Backend, ...] = (BitsAndBytes4bitBackend(), BitsAndBytes8bitBackend())
