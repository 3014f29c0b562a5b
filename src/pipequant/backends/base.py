"""The one small interface between the loader and every quantization backend.

The loader knows a backend only through `Backend`: which layers it takes, how to quantize one
layer whose weights are already materialized, and how many bytes a quantized layer really holds.
Backend configs are plain dataclasses that can be built and validated without the backend's
library installed, so a config error shows up before any import or weight read.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn


class QuantizationConfigError(ValueError):
    """A quantization config that cannot work; the message names the problem and the fix."""


class MissingBackendError(ImportError):
    """The library a backend needs is not installed; the message names the pip package."""


_GLOB_CHARS = frozenset("*?[")


def matches_module_pattern(module_name: str, patterns: Iterable[str]) -> bool:
    """True when `module_name` is, or lies under, a module named by one of `patterns`.

    One rule for every backend (diffusers matches differently per backend): a plain name matches
    a module whose dotted name equals it or ends with ``.name``, and everything below that module;
    a pattern with glob characters (``* ? [``) is matched against the full dotted name, and
    likewise covers everything below a matching module.
    """
    parts = module_name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
                return True
        else:
            if any(prefix == pattern or prefix.endswith("." + pattern) for prefix in prefixes):
                return True
    return False


def dtype_from_any(value: Any, field_name: str) -> torch.dtype | None:
    """Accept a torch dtype or its name ("bfloat16", "torch.float16"), as configs on disk store names."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        candidate = getattr(torch, name, None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise QuantizationConfigError(
        f"{field_name}={value!r} is not a torch dtype; pass e.g. torch.bfloat16 or 'bfloat16'."
    )


@dataclasses.dataclass(repr=False)
class BackendConfig:
    """Base of every backend's config: the fields all backends share.

    `modules_to_not_convert` keeps matching layers in full precision (see `matches_module_pattern`).
    """

    backend_name: ClassVar[str]

    modules_to_not_convert: list[str] | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], *, context: str) -> BackendConfig:
        """Build from user keywords, turning an unknown key into an error that suggests the nearest one."""
        valid = cls.field_names()
        for key in kwargs:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise QuantizationConfigError(
                    f"{context}: {cls.__name__} takes no option {key!r}.{hint} "
                    f"Valid options: {', '.join(valid)}."
                )
        return cls(**kwargs)

    #: class names of diffusers'/transformers' configs this class converts from (see `from_foreign`)
    foreign_class_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_foreign(cls, foreign: Any) -> BackendConfig:
        """Convert a diffusers or transformers config object, refusing any setting we would drop."""
        raise NotImplementedError(f"{cls.__name__} converts no foreign config")

    def excluded(self, module_name: str) -> bool:
        return matches_module_pattern(module_name, self.modules_to_not_convert or ())

    def __repr__(self) -> str:
        """Only the options that differ from their defaults, so a config reads like the call that made it."""
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            if value != default:
                shown.append(f"{field.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (dtypes as names), as stored in a saved component's config.json."""
        out: dict[str, Any] = {"quant_method": self.backend_name}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out


class Backend(ABC):
    """One quantization backend: which layers it takes and how it quantizes one of them."""

    name: ClassVar[str]
    config_class: ClassVar[type[BackendConfig]]
    #: import name and pip extra of the library the backend runs on
    module_name: ClassVar[str]
    pip_extra: ClassVar[str]
    #: what the backend's name implies in the simple form when quant_kwargs leave it out
    simple_form_defaults: ClassVar[dict[str, Any]] = {}

    def require(self) -> None:
        """Fail early, naming the package, when the backend's library is missing."""
        if importlib.util.find_spec(self.module_name) is None:
            raise MissingBackendError(
                f"The {self.name!r} backend needs the {self.module_name!r} package, which is not installed. "
                f"Install it with: pip install 'pipequant[{self.pip_extra}]'"
            )

    def check_device(self, config: BackendConfig, device: torch.device) -> None:
        """Refuse, before any weight is read, a config that cannot run on `device`."""

    def takes(self, module_name: str, module: nn.Module, config: BackendConfig) -> bool:
        """Whether this backend quantizes `module` (built on the meta device or real)."""
        return type(module) is nn.Linear and not config.excluded(module_name)

    @abstractmethod
    def quantize(self, module: nn.Module, config: BackendConfig, device: torch.device) -> nn.Module:
        """Quantize one layer whose weights are real (on `device`); returns the module to put in its place.

        The full-precision weights may be released by the caller as soon as this returns.
        """

    @abstractmethod
    def is_quantized(self, module: nn.Module) -> bool:
        """Whether `module` is a layer this backend produced."""

    def layer_nbytes(self, module: nn.Module) -> int:
        """Bytes a quantized layer really holds (packed data plus scales), not its logical shape."""
        return sum(tensor_nbytes(t) for t in module.state_dict().values())


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Real storage bytes of a tensor, looking inside tensor subclasses that wrap packed data."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(tensor, name)) for name in inner_names)
    return tensor.numel() * tensor.element_size()
