"""torchao weight quantization, applied by torchao's own `quantize_` to each layer as it streams in.

Layers stay `nn.Linear` whose weight is a torchao tensor subclass (`Int8Tensor`, `Float8Tensor`,
...), exactly what `quantize_` makes of a full-precision model, so torchao's kernels run them.

Users write what diffusers' `TorchAoConfig` took: a short name (``"int8wo"``) or torchao's old
function name (``"int8_weight_only"``) with its keyword options, or a torchao config object. The
names map onto torchao 0.18's config classes in `QUANT_TYPES`; which classes run on which device
is in `_FAMILIES`, so an impossible choice fails before any weight is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from . import int8_rows, row_blocks
from .base import Backend, BackendConfig, LayerState, QuantizationConfigError, dtype_from_any, library_module


@dataclasses.dataclass(frozen=True)
class _Family:
    """What one torchao config class accepts and where it runs."""

    options: tuple[str, ...]
    #: the torchao field our `group_size` option becomes (as `PerGroup(n)`); None: torchao's own `group_size`
    group_size_into: str | None = None
    runs_on_cpu: bool = True
    min_cuda_capability: tuple[int, int] | None = None
    #: why it cannot run on CPU, and the names to offer there instead
    cpu_problem: str = ""
    cpu_instead: str = ""


_INT8WO = "Int8WeightOnlyConfig"
_INT8DQ = "Int8DynamicActivationInt8WeightConfig"
_INT4WO = "Int4WeightOnlyConfig"
_INTXWO = "IntxWeightOnlyConfig"
_INT8DA_INTXW = "Int8DynamicActivationIntxWeightConfig"
_FLOAT8WO = "Float8WeightOnlyConfig"
_FLOAT8DQ = "Float8DynamicActivationFloat8WeightConfig"
_FLOAT8DA_INT4W = "Float8DynamicActivationInt4WeightConfig"

_UNPACKED_NOTE = "torchao stores it one value per byte, so it saves no memory over int8wo"

_FAMILIES: dict[str, _Family] = {
    _INT8WO: _Family(("group_size", "granularity", "set_inductor_config"), group_size_into="granularity"),
    _INT8DQ: _Family(("granularity", "act_mapping_type", "weight_only_decode", "set_inductor_config")),
    _FLOAT8WO: _Family(("weight_dtype", "granularity", "set_inductor_config")),
    _INTXWO: _Family(
        ("weight_dtype", "group_size", "granularity", "mapping_type", "scale_dtype"), group_size_into="granularity"
    ),
    _INT8DA_INTXW: _Family(
        ("weight_dtype", "group_size", "weight_granularity", "weight_mapping_type", "weight_scale_dtype", "act_mapping_type"),
        group_size_into="weight_granularity",
    ),
    _INT4WO: _Family(
        ("group_size", "int4_packing_format", "int4_choose_qparams_algorithm", "set_inductor_config"),
        runs_on_cpu=False,
        cpu_problem="torchao's int4 weight-only layouts need CUDA kernels (tinygemm, mslk)",
        cpu_instead=f"'uint4wo' (4-bit values in groups of 64; {_UNPACKED_NOTE}) or 'int8wo'",
    ),
    _FLOAT8DQ: _Family(
        ("activation_dtype", "weight_dtype", "granularity", "mm_config", "kernel_preference", "set_inductor_config"),
        runs_on_cpu=False,
        min_cuda_capability=(8, 9),
        cpu_problem="torchao's float8 dynamic activation quantization needs a CUDA GPU of compute capability 8.9+",
        cpu_instead="'float8wo' (float8 weights, full-precision activations) or 'int8dq'",
    ),
    _FLOAT8DA_INT4W: _Family(
        (),  # no name maps here; known so that the object form is refused on CPU too
        runs_on_cpu=False,
        min_cuda_capability=(8, 9),
        cpu_problem="torchao's float8 x int4 kernel needs a CUDA GPU",
        cpu_instead="'int4dq' or 'int8dq'",
    ),
}

_FLOAT8DQ_E4M3 = {"activation_dtype": "float8_e4m3fn", "weight_dtype": "float8_e4m3fn"}

#: every quant_type name -> (torchao config class, options the name fixes; user options override them)
QUANT_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "int8wo": (_INT8WO, {}),
    "int8_weight_only": (_INT8WO, {}),
    "int8dq": (_INT8DQ, {}),
    "int8_dynamic_activation_int8_weight": (_INT8DQ, {}),
    # diffusers' int4 weight-only used the tinygemm layout; torchao 0.18's default ("plain") needs mslk
    "int4wo": (_INT4WO, {"int4_packing_format": "tile_packed_to_4d"}),
    "int4_weight_only": (_INT4WO, {"int4_packing_format": "tile_packed_to_4d"}),
    "int4dq": (_INT8DA_INTXW, {"weight_dtype": "int4", "group_size": 32}),
    "int8_dynamic_activation_int4_weight": (_INT8DA_INTXW, {"weight_dtype": "int4", "group_size": 32}),
    # as in diffusers: the short name means e5m2, the long name torchao's default (e4m3)
    "float8wo": (_FLOAT8WO, {"weight_dtype": "float8_e5m2"}),
    "float8wo_e5m2": (_FLOAT8WO, {"weight_dtype": "float8_e5m2"}),
    "float8wo_e4m3": (_FLOAT8WO, {"weight_dtype": "float8_e4m3fn"}),
    "float8_weight_only": (_FLOAT8WO, {}),
    "float8dq": (_FLOAT8DQ, {}),
    "float8_dynamic_activation_float8_weight": (_FLOAT8DQ, {}),
    "float8dq_e4m3": (_FLOAT8DQ, dict(_FLOAT8DQ_E4M3)),
    "float8dq_e4m3_tensor": (_FLOAT8DQ, {**_FLOAT8DQ_E4M3, "granularity": "tensor"}),
    "float8dq_e4m3_row": (_FLOAT8DQ, {**_FLOAT8DQ_E4M3, "granularity": "row"}),
    # diffusers' uintx_weight_only: asymmetric groups of 64, here on torchao 0.18's intx layout
    **{
        f"uint{bits}wo": (_INTXWO, {"weight_dtype": f"int{bits}", "mapping_type": "asymmetric", "group_size": 64})
        for bits in range(1, 8)
    },
    "intx_weight_only": (_INTXWO, {}),
}

_DTYPE_OPTIONS = frozenset({"weight_dtype", "activation_dtype", "scale_dtype", "weight_scale_dtype"})
_MAPPING_OPTIONS = frozenset({"mapping_type", "act_mapping_type", "weight_mapping_type"})
_GRANULARITY_OPTIONS = frozenset({"granularity", "weight_granularity"})
_PER_FQN_CLASSES = frozenset({"FqnToConfig", "ModuleFqnToConfig", "AOPerModuleConfig"})
#: transformers' options for quantizing embeddings, which pipequant never does
_EMBEDDING_FLAGS = ("include_input_output_embeddings", "untie_embedding_weights")


@dataclasses.dataclass(repr=False, init=False)
class TorchAoConfig(BackendConfig):
    """torchao settings, written as for diffusers' `TorchAoConfig(quant_type, modules_to_not_convert, **kwargs)`.

    `quant_type` is a name from `QUANT_TYPES` (options as keywords or in `quant_type_kwargs`, the key
    diffusers serializes them under) or a torchao config object such as `Int8WeightOnlyConfig()`.
    Names and option names are checked here, without torchao; option values are checked by building
    the torchao config, here too when torchao is installed.
    """

    backend_name: ClassVar[str] = "torchao"
    foreign_class_names: ClassVar[tuple[str, ...]] = ("TorchAoConfig",)

    quant_type: Any
    quant_type_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __init__(
        self,
        quant_type: Any,
        modules_to_not_convert: list[str] | None = None,
        quant_type_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.modules_to_not_convert = modules_to_not_convert
        self.quant_type = quant_type
        self.quant_type_kwargs = _merge_options(quant_type_kwargs or {}, kwargs)
        if isinstance(quant_type, str):
            self._check_name_and_options()
        else:
            self._check_torchao_object()
        self._torchao_config = self._build() if importlib.util.find_spec("torchao") is not None else None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], *, context: str) -> TorchAoConfig:
        if "quant_type" not in kwargs:
            raise QuantizationConfigError(
                f"{context}: torchao needs quant_type, e.g. {{'quant_type': 'int8wo'}}. Types: {', '.join(QUANT_TYPES)}."
            )
        return cls(**kwargs)

    @classmethod
    def from_foreign(cls, foreign: Any) -> TorchAoConfig:
        """diffusers' or transformers' `TorchAoConfig`; embedding quantization (transformers) is refused."""
        _refuse_embedding_flags({flag: getattr(foreign, flag, False) for flag in _EMBEDDING_FLAGS})
        skip = getattr(foreign, "modules_to_not_convert", None)
        return cls(
            foreign.quant_type,
            modules_to_not_convert=list(skip) if skip else None,
            quant_type_kwargs=dict(getattr(foreign, "quant_type_kwargs", None) or {}),
        )

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], *, context: str) -> TorchAoConfig:
        """A saved ``quantization_config``: ours, or diffusers' / transformers' (a torchao object as
        ``{"default": <torchao's config_to_dict>}``, and transformers' embedding flags)."""
        kwargs = {key: value for key, value in stored.items() if key != "quant_method"}
        _refuse_embedding_flags({flag: kwargs.pop(flag, False) for flag in _EMBEDDING_FLAGS})
        quant_type = kwargs.get("quant_type")
        if isinstance(quant_type, Mapping):
            if set(quant_type) != {"default"}:
                raise QuantizationConfigError(
                    f"{context}: quant_type holds per-module torchao configs ({', '.join(quant_type)}); pipequant "
                    "applies one config per component."
                )
            from torchao.core.config import config_from_dict

            kwargs["quant_type"] = config_from_dict(quant_type["default"])
        return cls.from_kwargs(kwargs, context=context)

    def to_library(self, library: str, dtype: torch.dtype | None) -> Any:
        """diffusers' or transformers' `TorchAoConfig` around the torchao object this config applies, so
        their code (diffusers' saving, peft's ``get_apply_tensor_subclass``) sees the same torchao config."""
        skip = list(self.modules_to_not_convert) if self.modules_to_not_convert else None
        return library_module(library).TorchAoConfig(self.torchao_config(), modules_to_not_convert=skip)

    @property
    def label(self) -> str:
        """How messages name the type: the name as written, or the torchao class."""
        return self.quant_type if isinstance(self.quant_type, str) else type(self.quant_type).__name__

    @property
    def family(self) -> _Family | None:
        """What we know of the torchao class behind this config; None for classes we have no record of."""
        name = QUANT_TYPES[self.quant_type][0] if isinstance(self.quant_type, str) else type(self.quant_type).__name__
        return _FAMILIES.get(name)

    def torchao_config(self) -> Any:
        """The torchao config object that `quantize_` applies to each layer."""
        if self._torchao_config is None:
            self._torchao_config = self._build()
        return self._torchao_config

    def to_dict(self) -> dict[str, Any]:
        """What diffusers' `TorchAoConfig.to_dict` writes, key for key: the torchao object this config applies
        (a name with its options built into one) as ``{"default": <torchao's config_to_dict>}``.

        diffusers >= 0.37 reads only this form, so a component pipequant saves loads there too; `from_dict`
        still reads the name form (``"quant_type": "int8wo"``) pipequant wrote before.
        """
        from torchao.core.config import config_to_dict

        skip = list(self.modules_to_not_convert) if self.modules_to_not_convert else None
        return {
            "modules_to_not_convert": skip,
            "quant_method": self.backend_name,
            "quant_type": {"default": config_to_dict(self.torchao_config())},
        }

    def _check_name_and_options(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            close = difflib.get_close_matches(self.quant_type, QUANT_TYPES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise QuantizationConfigError(
                f"Unknown torchao quant_type {self.quant_type!r}.{hint} Valid types: {', '.join(QUANT_TYPES)}; "
                "or pass a torchao config object such as torchao.quantization.Int8WeightOnlyConfig()."
            )
        family = self.family
        assert family is not None
        for key in self.quant_type_kwargs:
            if key not in family.options:
                close = difflib.get_close_matches(key, family.options, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise QuantizationConfigError(
                    f"torchao quant_type {self.quant_type!r} takes no option {key!r}.{hint} "
                    f"Its options: {', '.join(family.options)}."
                )

    def _check_torchao_object(self) -> None:
        from_torchao = type(self.quant_type).__module__.split(".")[0] == "torchao"
        if not from_torchao or not hasattr(self.quant_type, "__dataclass_fields__"):
            raise QuantizationConfigError(
                f"quant_type must be a name ({', '.join(QUANT_TYPES)}) or a torchao config object, "
                f"not {type(self.quant_type).__name__}."
            )
        if type(self.quant_type).__name__ in _PER_FQN_CLASSES:
            raise QuantizationConfigError(
                f"quant_type={type(self.quant_type).__name__}(...) picks configs by module name inside one model; "
                "pipequant applies one config per component. Use quant_mapping={component: TorchAoConfig(...)} and "
                "modules_to_not_convert instead."
            )
        if self.quant_type_kwargs:
            raise QuantizationConfigError(
                f"Options {sorted(self.quant_type_kwargs)} go into the torchao object itself, e.g. "
                f"{type(self.quant_type).__name__}(...), not into TorchAoConfig."
            )

    def _build(self) -> Any:
        if not isinstance(self.quant_type, str):
            return self.quant_type
        import torchao.quantization as torchao_quantization

        class_name, preset = QUANT_TYPES[self.quant_type]
        family = self.family
        assert family is not None
        if family.group_size_into in self.quant_type_kwargs:  # the user's granularity replaces the name's group size
            preset = {key: value for key, value in preset.items() if key != "group_size"}
        options = {**preset, **self.quant_type_kwargs}
        try:
            kwargs = _torchao_kwargs(options, family)
            return getattr(torchao_quantization, class_name)(**kwargs)
        except (AssertionError, ValueError, TypeError, KeyError) as error:
            raise QuantizationConfigError(
                f"torchao rejects quant_type {self.quant_type!r} with options {self.quant_type_kwargs}: {error}"
            ) from error


def _refuse_embedding_flags(flags: dict[str, Any]) -> None:
    for flag, value in flags.items():
        if value:
            raise QuantizationConfigError(
                f"TorchAoConfig({flag}=True): pipequant quantizes linear layers only and keeps embeddings in "
                f"full precision. Drop {flag}."
            )


def _merge_options(serialized: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    both = sorted(key for key in serialized.keys() & given.keys() if serialized[key] != given[key])
    if both:
        raise QuantizationConfigError(
            f"Options {both} are given both as keywords and in quant_type_kwargs, with different values; give each once."
        )
    return {**serialized, **given}


def _torchao_kwargs(options: dict[str, Any], family: _Family) -> dict[str, Any]:
    """Our option values (names like "int4", "asymmetric", "row", a group size) as torchao's objects."""
    from torchao.quantization.granularity import PerGroup, PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    kwargs = dict(options)
    if family.group_size_into is not None and "group_size" in kwargs:
        if family.group_size_into in kwargs:
            raise ValueError(f"give group_size or {family.group_size_into}, not both")
        kwargs[family.group_size_into] = PerGroup(kwargs.pop("group_size"))
    granularities = {"tensor": PerTensor(), "row": PerRow()}
    for key, value in kwargs.items():
        if key in _DTYPE_OPTIONS:
            kwargs[key] = dtype_from_any(value, key)
        elif key in _MAPPING_OPTIONS and isinstance(value, str):
            names = [m.name.lower() for m in MappingType]
            if value.lower() not in names:
                raise ValueError(f"{key}={value!r} is not one of {', '.join(names)}")
            kwargs[key] = MappingType[value.upper()]
        elif key in _GRANULARITY_OPTIONS and isinstance(value, str):
            if value not in granularities:
                raise ValueError(f"{key}={value!r}: give 'tensor', 'row', group_size=N or a torchao granularity object")
            kwargs[key] = granularities[value]
    return kwargs


def _quantize_layer(
    weight: torch.Tensor, bias: torch.Tensor | None, config: TorchAoConfig, device: torch.device
) -> nn.Module:
    """`quantize_` on a new layer holding `weight` and `bias`, inside a one-layer wrapper.

    A new layer, because `quantize_` swaps weights in place and the caller may clear the old
    layer's parameters once this returns; a wrapper, so a config that swaps the module itself
    (not just its weight) works too.
    """
    from torchao.quantization import quantize_

    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    layer.bias = bias
    wrapper = nn.Sequential(layer)
    try:
        quantize_(wrapper, config.torchao_config(), device=device)
    except (AssertionError, ImportError, NotImplementedError) as error:
        raise QuantizationConfigError(
            f"torchao cannot apply quant_type {config.label!r} to a {weight.dtype} layer "
            f"({in_features} -> {out_features}) on {device}: {error}"
        ) from error
    return wrapper[0]


def _quantize_by_rows(module: nn.Linear, config: TorchAoConfig, device: torch.device) -> nn.Module:
    """`_quantize_layer` on blocks of rows, their inner tensors stacked into one torchao tensor.

    Raises `row_blocks.NotRowSeparable` (after one block) unless the first block comes back as a
    plain `nn.Linear` holding a torchao tensor whose quantization blocks are single rows
    (``block_size[0] == 1``) with every inner tensor one row per weight row.
    """
    first: list[tuple[nn.Module, list[str], dict]] = []  # the first block's layer, inner tensor names, attributes

    def quantize_rows(rows: torch.Tensor) -> list[torch.Tensor]:
        layer, names, attributes = _row_template(rows, config, device)
        if not first:
            first.append((layer, names, attributes))
        elif attributes != first[0][2]:
            raise row_blocks.NotRowSeparable("blocks of rows quantized with different attributes")
        return [getattr(layer.weight, name) for name in names]

    inner = row_blocks.quantize_by_rows(module.weight.detach(), quantize_rows, device)
    return _assemble(*first[0], inner, module, device)


def _quantize_int8_rows(module: nn.Linear, config: TorchAoConfig, device: torch.device) -> nn.Module | None:
    """torchao's per-row int8 tensor (int8wo, int8dq) computed by `int8_rows` in one compiled pass.

    torchao quantizes the first two rows itself: that gives the layer and the tensor's attributes,
    and checks that our kernel gives the same bytes with this torchao version and config. None
    (use torchao) where the format is not plain per-row symmetric int8, or the check fails.
    """
    from torchao.quantization import Int8Tensor

    weight = module.weight.detach()
    if device.type != "cpu" or weight.shape[0] < 2:
        return None
    try:
        with kernels.torch_on_one_thread():
            layer, names, attributes = _row_template(weight[:2], config, device)
    except row_blocks.NotRowSeparable:
        return None
    template = layer.weight
    plain_int8 = (
        type(template) is Int8Tensor
        and names == ["qdata", "scale", "zero_point"]
        and list(attributes.get("block_size", ())) == [1, weight.shape[1]]
        and not attributes.get("reduce_range")
        and not template.zero_point.any()
    )
    if not plain_int8:
        return None
    fused = kernels.checked(
        kernel=int8_rows.torchao_int8_rows,
        library=lambda head: (template.qdata, template.scale),  # torchao's own bytes for the head, computed above
        weight=weight,
        head=weight[:2],
        library_name="torchao",
    )
    if fused is None:
        return None
    data, scale = fused
    zero_point = torch.zeros(scale.shape, dtype=template.zero_point.dtype)
    return _assemble(layer, names, attributes, [data, scale, zero_point], module, device)


def _row_template(rows: torch.Tensor, config: TorchAoConfig, device: torch.device) -> tuple[nn.Module, list[str], dict]:
    """torchao's layer for `rows`, with its weight's inner tensor names and attributes; raises
    `row_blocks.NotRowSeparable` unless that weight is quantized in blocks of single rows."""
    from torchao.utils import TorchAOBaseTensor

    layer = _quantize_layer(rows, None, config, device)
    weight = layer.weight
    if type(layer) is not nn.Linear or not isinstance(weight, TorchAOBaseTensor):
        raise row_blocks.NotRowSeparable(f"torchao made a {type(layer).__name__} holding a {type(weight).__name__}")
    names, attributes = weight.__tensor_flatten__()
    block_size = attributes.get("block_size") if isinstance(attributes, dict) else None
    if block_size is None or block_size[0] != 1:
        raise row_blocks.NotRowSeparable(f"{type(weight).__name__} has blocks of {block_size}")
    return layer, names, attributes


def _assemble(
    layer: nn.Module, names: list[str], attributes: dict, inner: list[torch.Tensor], module: nn.Linear, device: torch.device
) -> nn.Module:
    """`layer` (torchao's, for some of the rows; it keeps whatever torchao set on it) holding the
    torchao tensor made of `inner`, for the whole of `module`'s weight, and `module`'s bias."""
    weight = type(layer.weight).__tensor_unflatten__(
        dict(zip(names, inner)), attributes, module.weight.shape, module.weight.stride()
    )
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to(device), requires_grad=module.bias.requires_grad)
    layer.out_features = module.out_features
    return layer


_CPU_TYPES = [name for name, (class_name, _) in QUANT_TYPES.items() if _FAMILIES[class_name].runs_on_cpu]


class TorchAoBackend(Backend):
    name = "torchao"
    config_class = TorchAoConfig
    module_name = "torchao"
    pip_extra = "torchao"

    def check_device(self, config: BackendConfig, device: torch.device) -> None:
        assert isinstance(config, TorchAoConfig)
        family = config.family
        if family is None:
            return  # a torchao class we have no record of: torchao itself decides
        if device.type == "cpu" and not family.runs_on_cpu:
            raise QuantizationConfigError(
                f"torchao quant_type {config.label!r} cannot run on cpu: {family.cpu_problem}. "
                f"Nearest that runs on cpu: {family.cpu_instead}. "
                f"Types that run on cpu: {', '.join(_CPU_TYPES)}."
            )
        if device.type == "cuda" and family.min_cuda_capability is not None:
            capability = torch.cuda.get_device_capability(device)
            if capability < family.min_cuda_capability:
                need = ".".join(map(str, family.min_cuda_capability))
                raise QuantizationConfigError(
                    f"torchao quant_type {config.label!r} needs a GPU of compute capability {need}+, and {device} "
                    f"has {capability[0]}.{capability[1]}. Use {family.cpu_instead} instead."
                )

    def quantize(self, module_name: str, module: nn.Module, config: BackendConfig, device: torch.device) -> nn.Module:
        """torchao's `quantize_` on the layer, a block of rows at a time where the format is per row;
        per-row int8 by our compiled kernel (`int8_rows`), checked against torchao on two rows.

        Blocks of rows give the same tensors as one call on the whole weight, several times faster
        (see `row_blocks`); formats with a per-tensor scale or a packing across rows take the whole.
        """
        assert isinstance(config, TorchAoConfig) and isinstance(module, nn.Linear)
        layer = _quantize_int8_rows(module, config, device)
        if layer is not None:
            return layer
        if row_blocks.rows_per_block(module.weight, device) < module.out_features:
            try:
                return _quantize_by_rows(module, config, device)
            except row_blocks.NotRowSeparable:
                pass
        return _quantize_layer(module.weight, module.bias, config, device)

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Module, config: BackendConfig, dtype: torch.dtype
    ) -> int:
        """torchao's own `quantize_` on a layer of the same shape on the meta device: its tensor
        subclasses get their real inner shapes and dtypes without a byte of data, for any config.

        Types whose quantizer needs CUDA kernels (int4wo, float8dq) refuse the meta device; for
        them this raises `QuantizationConfigError`.
        """
        assert isinstance(module, nn.Linear)
        meta = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=dtype)
        try:
            return self.layer_nbytes(_quantize_layer(meta.weight, meta.bias, config, torch.device("meta")))
        except (RuntimeError, ValueError) as error:
            raise QuantizationConfigError(
                f"cannot estimate the size of torchao {getattr(config, 'label', config)!r} layers: quantizing on the "
                f"meta device failed ({error})"
            ) from error

    def is_quantized(self, module: nn.Module) -> bool:
        from torchao.utils import TorchAOBaseTensor

        return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize()

    # --- saving and restoring (see Backend): torchao's own safetensors flattening, no pickle ---

    def save_layer(self, module: nn.Module) -> LayerState:
        """The weight's inner tensors (``_weight_qdata``, ``_weight_scale``, ...) and its attributes as JSON."""
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        try:
            flat, metadata = flatten_tensor_state_dict({f"{_LAYER}.weight": module.weight})
        except ValueError as error:  # a tensor subclass torchao's safetensors support does not cover
            raise NotImplementedError(
                f"torchao cannot save a {type(module.weight).__name__} weight: {error}"
            ) from error
        tensors = {key.removeprefix(f"{_LAYER}."): value for key, value in flat.items()}
        if module.bias is not None:
            tensors["bias"] = module.bias.detach()
        return LayerState(tensors, {"weight": metadata[f"{_LAYER}.weight"]})

    def checkpoint_metadata(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
        """The rest of what torchao's `flatten_tensor_state_dict` writes for a whole model: ``tensor_names``, every
        tensor of the state dict by its unflattened name, and ``{"_type": "Tensor"}`` for each plain one.

        diffusers takes ``tensor_names`` as the list of the checkpoint's keys; without it, it loads the
        flattened parts as unknown keys and leaves the quantized layers with random weights.
        """
        # "<layer>.weight" is stored as parts "<layer>._weight_<part>" (torchao's naming)
        flattened = {_part_prefix(*name.rpartition(".")[::2]) for name in metadata}
        plain = [key for key in tensors if _part_prefix(*key.rpartition(".")[::2], part=True) not in flattened]
        plain_type = json.dumps({"_type": torch.Tensor.__name__})
        return {"tensor_names": json.dumps([*metadata, *plain]), **dict.fromkeys(plain, plain_type)}

    def restore(
        self, module: nn.Module, state: LayerState, config: BackendConfig, device: torch.device
    ) -> nn.Module:
        """The stored weight rebuilt by torchao's `unflatten_tensor_state_dict`, on an `nn.Linear` made on meta."""
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        assert isinstance(module, nn.Linear)
        tensors = dict(state.tensors)
        bias = tensors.pop("bias", None)
        if "weight" not in state.metadata:
            raise ValueError(f"no torchao weight metadata stored for the layer (tensors {sorted(state.tensors)})")
        metadata = {f"{_LAYER}.weight": state.metadata["weight"], "tensor_names": f'["{_LAYER}.weight"]'}
        weights, leftover = unflatten_tensor_state_dict({f"{_LAYER}.{k}": v for k, v in tensors.items()}, metadata)
        if leftover or f"{_LAYER}.weight" not in weights:
            raise ValueError(f"the stored tensors {sorted(state.tensors)} are not one torchao weight")
        weight = weights[f"{_LAYER}.weight"]
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise ValueError(
                f"the stored weight has shape {tuple(weight.shape)}, the layer "
                f"{(module.out_features, module.in_features)}"
            )
        layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(device), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
        return layer


#: the layer name torchao's (whole-model) flattening is given for one layer, stripped again after
_LAYER = "layer"


def _part_prefix(layer: str, leaf: str, part: bool = False) -> str | None:
    """torchao's "<layer>._<attribute>_" for tensor `leaf` of `layer`; with `part`, `leaf` is a stored part
    ("_weight_qdata") and the prefix is read from it (None when it is not one)."""
    if part:
        if not leaf.startswith("_") or "_" not in leaf[1:]:
            return None
        leaf = leaf[1:].split("_", 1)[0]
    return f"{layer}._{leaf}_" if layer else f"_{leaf}_"


BACKENDS: tuple[Backend, ...] = (TorchAoBackend(),)
