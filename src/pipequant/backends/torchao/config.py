"""`TorchAoConfig`: diffusers' `TorchAoConfig(quant_type, modules_to_not_convert, **kwargs)`, checked without torchao.

Names and option names are checked against `names`; option values by building the torchao config object
(when torchao is installed), whose `to_dict` form is what diffusers and transformers save.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..base import BackendConfig, QuantizationConfigError, dtype_from_any, library_module
from .names import FAMILIES, QUANT_TYPES, Family

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

    quant_method: ClassVar[str] = "torchao"
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
                f"{context}: torchao needs quant_type, e.g. {{'quant_type': 'int8wo'}}. Types: "
                f"{', '.join(QUANT_TYPES)}."
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
    def family(self) -> Family | None:
        """What we know of the torchao class behind this config; None for classes we have no record of."""
        name = QUANT_TYPES[self.quant_type][0] if isinstance(self.quant_type, str) else type(self.quant_type).__name__
        return FAMILIES.get(name)

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
            "quant_method": self.quant_method,
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
            f"Options {both} are given both as keywords and in quant_type_kwargs, with different values; give each "
            "once."
        )
    return {**serialized, **given}


def _torchao_kwargs(options: dict[str, Any], family: Family) -> dict[str, Any]:
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
