"""The one small interface between the loader and every quantization backend.

The loader knows a backend only through `Backend`: which layers it takes, how to quantize one
layer whose weights are already materialized, how many bytes a quantized layer really holds, and
how one quantized layer is stored and rebuilt from what was stored (see `LayerState`).
Backend configs are plain dataclasses that can be built and validated without the backend's
library installed, so a config error shows up before any import or weight read.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from ..meta_modules import meta_linear


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


LIBRARIES = ("diffusers", "transformers")


def library_module(library: str) -> Any:
    """The top-level module of diffusers or transformers, whose config classes `to_library` builds."""
    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {', '.join(LIBRARIES)}, not {library!r}")
    return importlib.import_module(library)


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

    #: `quant_method` in a saved component's config.json, as diffusers and transformers write it
    quant_method: ClassVar[str]

    #: keyword-only, so each backend's own options come first positionally, as in diffusers' classes
    modules_to_not_convert: list[str] | None = dataclasses.field(default=None, kw_only=True)

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
                    f"{context}: {cls.__name__} takes no option {key!r}.{hint} Valid options: {', '.join(valid)}."
                )
        return cls(**kwargs)

    #: class names of diffusers'/transformers' configs this class converts from (see `from_foreign`)
    foreign_class_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_foreign(cls, foreign: Any) -> BackendConfig:
        """Convert a diffusers or transformers config object, refusing any setting we would drop."""
        raise NotImplementedError(f"{cls.__name__} converts no foreign config")

    def to_library(self, library: str, dtype: torch.dtype | None) -> Any:
        """This config as `library`'s ("diffusers" or "transformers") own config object, the inverse of
        `from_foreign`: what that library would put on ``model.config.quantization_config`` (see `markers`).

        `dtype` is the dtype the component was loaded in, for settings that default to it.
        """
        raise NotImplementedError(f"{type(self).__name__} has no {library} equivalent")

    @property
    def backend_name(self) -> str:
        """The `Backend.name` that runs this config: its `quant_method`, unless one class serves several backends
        (diffusers and transformers write "bitsandbytes" for both bitsandbytes backends)."""
        return self.quant_method

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
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], *, context: str) -> BackendConfig:
        """The config back from `to_dict`'s output (the ``quantization_config`` of a saved component)."""
        return cls.from_kwargs({k: v for k, v in stored.items() if k != "quant_method"}, context=context)

    def differences(self, given: BackendConfig) -> list[str]:
        """How `given` (a user's config) disagrees with this one (a saved component's), one line each.

        Loading a saved component with a config that would quantize differently is refused. Which
        layers are quantized is not compared: a saved component's layers come back as stored.
        """
        if type(given) is not type(self) or given.backend_name != self.backend_name:
            return [f"backend: saved {self.backend_name!r}, given {given.backend_name!r}"]
        saved, wanted = self.to_dict(), given.to_dict()
        compared = [k for k in saved if k != "modules_to_not_convert"]
        return [f"{k}: saved {saved[k]!r}, given {wanted[k]!r}" for k in compared if saved[k] != wanted[k]]


@dataclasses.dataclass
class LayerState:
    """One quantized layer as stored: what `Backend.save_layer` gives and `Backend.restore` takes.

    `tensors` are plain tensors named relative to the layer ("weight", "weight.absmax", "bias");
    the saver prefixes them with the layer's name and writes them to safetensors. `metadata` is
    for what is not a tensor (e.g. a tensor subclass's attributes as JSON); it goes to the
    safetensors header under the same prefix. Only plain tensors and strings: no pickle.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


ConfigT = TypeVar("ConfigT", bound=BackendConfig)


class Backend(ABC, Generic[ConfigT]):
    """One quantization backend: which layers it takes, how it quantizes one, and how one is stored.

    Generic in its config class: ``class QuantoBackend(Backend[QuantoConfig])`` receives `QuantoConfig`s only
    (the loader finds a config's backend by `BackendConfig.backend_name`, see `backends.backend_for`).

    Saving and reloading go through three methods, so a saved component comes back without ever
    making full-precision weights and without running the quantizer again:

    * `save_layer(layer) -> LayerState`: the stored form of one quantized layer. The default,
      the layer's own ``state_dict()``, is right for layers that serialize themselves into plain
      tensors in their library's format (bitsandbytes; optimum-quanto's frozen ``QLinear``:
      ``weight._data``, ``weight._scale``, ``input_scale``, ``output_scale``).
    * `stored_as_quantized(names, layer)`: whether the tensors stored under a layer's name are
      this backend's state rather than plain weights. The default (some stored name is not one
      of the layer's own tensors) fits every backend whose state adds or renames tensors.
    * `restore(layer_on_meta, state, config, device) -> nn.Module`: rebuild the quantized layer
      from the stored tensors. Every backend that saves must implement it.

    How each backend provides them: bitsandbytes stores its layers' own state dicts (the names
    diffusers and transformers use) and rebuilds them with ``Params4bit.from_prequantized`` /
    ``Int8Params`` plus SCB. torchao keeps its weights as tensor subclasses: torchao's own
    safetensors flattening gives plain tensors plus per-tensor JSON (`LayerState.metadata`), and
    its unflattening rebuilds them. optimum-quanto stores ``QLinear``'s state dict and restores a
    ``QLinear`` made on meta with quanto's own deserializer. GGUF stores the raw GGML blocks with
    their type, and rebuilds its linear layer on them (its .gguf files have a writer of their own).
    A backend without `restore` cannot save: `save_pipeline` refuses rather than write a folder
    that would not load back.
    """

    # What a backend declares; the registry (`pipequant.backends`), the named modes (`pipequant.presets`), the
    # command line and `MissingBackendError` read these, so none of them names a backend.

    #: the ``quant_backend`` name (`BackendConfig.backend_name` of the configs it takes)
    name: ClassVar[str]
    config_class: type[ConfigT]
    #: import name of the library the backend runs on, and the pip extra that installs it (``pipequant[extra]``,
    #: one of pyproject.toml's optional-dependencies)
    module_name: ClassVar[str]
    pip_extra: ClassVar[str]
    #: one line for ``pipequant quantize --help``: what layers become, and the main options
    cli_help: ClassVar[str]
    #: what the backend's name implies in the simple form when quant_kwargs leave it out
    simple_form_defaults: ClassVar[Mapping[str, Any]] = {}
    #: named modes (``"bnb-nf4"``): mode name -> ``quant_kwargs`` of the simple form, in listing order
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: the modes among `presets` that `pipequant.plan` weighs by default
    plan_candidates: ClassVar[tuple[str, ...]] = ()

    def require(self) -> None:
        """Fail early, naming the package, when the backend's library is missing."""
        try:
            spec = importlib.util.find_spec(self.module_name)
        except ModuleNotFoundError:  # a dotted name ("optimum.quanto") whose parent package is missing
            spec = None
        if spec is None:
            raise MissingBackendError(
                f"The {self.name!r} backend needs the {self.module_name!r} package, which is not installed. "
                f"Install it with: pip install 'pipequant[{self.pip_extra}]'"
            )

    def check_device(self, config: ConfigT, device: torch.device) -> None:
        """Refuse, before any weight is read, a config that cannot run on `device`."""

    def library_quantizer(self, library_config: Any, *, pre_quantized: bool) -> Any:
        """The quantizer object diffusers or transformers keeps on a model it quantized with `library_config`
        (``model.hf_quantizer``): the library's own, chosen by the library from the config, as its
        ``from_pretrained`` makes it. A backend whose layers the library's quantizer cannot handle overrides this.
        """
        if type(library_config).__module__.split(".")[0] == "diffusers":
            from diffusers.quantizers.auto import DiffusersAutoQuantizer

            return DiffusersAutoQuantizer.from_config(library_config, pre_quantized=pre_quantized)
        from transformers.quantizers.auto import AutoHfQuantizer

        return AutoHfQuantizer.from_config(library_config, pre_quantized=pre_quantized)

    def takes(self, module_name: str, module: nn.Module, config: ConfigT) -> bool:
        """Whether this backend quantizes `module` (built on the meta device or real)."""
        return type(module) is nn.Linear and not config.excluded(module_name)

    @abstractmethod
    def quantize(self, module_name: str, module: nn.Linear, config: ConfigT, device: torch.device) -> nn.Module:
        """Quantize layer `module_name` (one `takes` accepted), whose weights are real (on `device`); returns the
        module to put in its place.

        The full-precision weights may be released by the caller as soon as this returns.
        """

    @abstractmethod
    def is_quantized(self, module: nn.Module) -> bool:
        """Whether `module` is a layer this backend produced."""

    @abstractmethod
    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        """A quantized layer's weight as full-precision values, ``(out_features, in_features)``, in the dtype it
        was quantized from (what fusing a LoRA adds its delta to before quantizing again, see `pipequant.lora`)."""

    def requantized(self, module: nn.Module, weight: torch.Tensor, config: ConfigT) -> nn.Module:
        """A new quantized layer like `module` (made with `config`) for the full-precision `weight`, with
        `module`'s bias: what fusing a LoRA into `module` makes."""
        return self.quantize("", linear_like(module, weight), config, weight.device)

    def layer_nbytes(self, module: nn.Module) -> int:
        """Bytes a quantized layer really holds (packed data plus scales), not its logical shape."""
        return sum(tensor_nbytes(t) for t in module.state_dict().values())

    @abstractmethod
    def estimate_layer_nbytes(self, module_name: str, module: nn.Linear, config: ConfigT, dtype: torch.dtype) -> int:
        """What `layer_nbytes` will report once `quantize` has made `module` (on meta, loaded in `dtype`).

        From shapes alone, so a pipeline's quantized size is known before any weight is read
        (`pipequant.estimate`, `pipequant.plan`). `module_name` is the layer's dotted name, for
        configs whose choice depends on it (GGUF `type_rules`).
        """

    def save_layer(self, module: nn.Module) -> LayerState:
        """The stored form of one quantized layer (see the class docstring)."""
        return LayerState(dict(module.state_dict()))

    def checkpoint_metadata(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
        """Header entries the backend's library expects once per safetensors file, beside the layers' own
        `metadata`; `tensors` are all the tensors stored. None by default."""
        return {}

    def stored_as_quantized(self, names: Collection[str], module: nn.Module) -> bool:
        """Whether tensors stored under `module`'s name (relative `names`) are this backend's layer state."""
        own = {name for name, _ in module.named_parameters(recurse=False)}
        own |= {name for name, _ in module.named_buffers(recurse=False)}
        return not set(names) <= own

    def restore(self, module: nn.Module, state: LayerState, config: ConfigT, device: torch.device) -> nn.Module:
        """Rebuild a quantized layer from its stored state; `module` is the model's layer of that name, on meta.

        Raises ValueError when `state` is not a layer this backend stored (or `module` not one it rebuilds,
        see `stored_linear`).
        """
        raise NotImplementedError(f"The {self.name!r} backend cannot restore saved layers yet.")


def stored_linear(module: nn.Module, backend_name: str) -> nn.Linear:
    """`module` as the linear layer a stored layer is rebuilt on; ValueError (which the loader reports with the
    file's name) when the model has another kind of layer under the stored layer's name."""
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"{backend_name} weights are loaded into linear layers only, and this layer is a {type(module).__name__}"
        )
    return module


def linear_like(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A full-precision `nn.Linear` of `weight` with a copy of `module`'s bias, for quantizing again."""
    linear = meta_linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
    return linear


def bias_nbytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a layer's bias kept as a plain tensor in `dtype` (0 without a bias)."""
    bias = getattr(module, "bias", None)
    return 0 if bias is None else bias.numel() * dtype.itemsize


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Real storage bytes of a tensor, looking inside tensor subclasses that wrap packed data."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        inner_names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in inner_names)
        return sum(tensor_nbytes(t) for t in inner if t is not None)
    return tensor.numel() * tensor.element_size()
