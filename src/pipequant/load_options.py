"""The keywords of diffusers' `from_pretrained` that pipequant's loaders take, checked in one place.

`load_pipeline` and the drop-in `DiffusionPipeline.from_pretrained` accept the same keywords
diffusers users pass, so code ports by changing an import. Each is honoured or refused: a
keyword that would change nothing here (``low_cpu_mem_usage``: pipequant always streams) is
accepted, one that asks for what pipequant does not do (pickle weights) is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .backends.base import dtype_from_any
from .devices import device_from_map


@dataclasses.dataclass(frozen=True)
class HubOptions:
    """Where a pipeline comes from: passed to huggingface_hub for a repo id (`subfolder`: local folders too)."""

    revision: str | None = None
    subfolder: str | None = None
    cache_dir: str | Path | None = None
    token: str | bool | None = None
    local_files_only: bool = False


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What `take_load_options` made of a call's keywords."""

    #: one dtype for every model component, or diffusers' per-component dict ({"transformer": ..., "default": ...})
    torch_dtype: torch.dtype | Mapping[str, torch.dtype] | None
    #: where models go: one device, or "balanced" (see `devices.device_from_map`)
    device: torch.device | str
    variant: str | None
    hub: HubOptions

    def dtype_for(self, component: str) -> torch.dtype | None:
        if isinstance(self.torch_dtype, Mapping):
            return self.torch_dtype.get(component, self.torch_dtype.get("default"))
        return self.torch_dtype


#: every keyword `take_load_options` understands, as the TypeError for an unknown one lists them
LOAD_KEYWORDS = (
    "quantization_config",
    "torch_dtype",
    "dtype",
    "device",
    "device_map",
    "variant",
    "revision",
    "subfolder",
    "cache_dir",
    "token",
    "local_files_only",
    "use_safetensors",
    "low_cpu_mem_usage",
    "progress",
)


def take_load_options(kwargs: dict[str, Any]) -> LoadOptions:
    """Remove the loading keywords from `kwargs` and return them checked; what is left names components."""
    torch_dtype = _one_dtype(kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None))
    device = device_from_map(kwargs.pop("device_map", None), kwargs.pop("device", None))
    if kwargs.pop("use_safetensors", None) is False:
        raise TypeError(
            "use_safetensors=False asks for pickle weights (.bin), which pipequant never loads: unpickling can run "
            "arbitrary code. Leave use_safetensors out or True, and convert .bin weights to safetensors."
        )
    kwargs.pop("low_cpu_mem_usage", None)  # pipequant always streams: peak memory is one layer over the result
    hub_names = [field.name for field in dataclasses.fields(HubOptions)]
    hub = HubOptions(**{name: kwargs.pop(name) for name in hub_names if name in kwargs})
    return LoadOptions(torch_dtype, device, kwargs.pop("variant", None), hub)


def unknown_keywords_error(unknown: list[str], components: list[str], pipeline_class: str) -> TypeError:
    """The TypeError for keywords that are neither loading options nor components, naming both lists."""
    valid = [*LOAD_KEYWORDS, *components]
    hints = [close[0] for key in unknown if (close := difflib.get_close_matches(key, valid, n=1))]
    hint = f" Did you mean {', '.join(map(repr, hints))}?" if hints else ""
    return TypeError(
        f"Unexpected keyword(s) {', '.join(map(repr, unknown))}.{hint} Valid keywords: "
        f"{', '.join(LOAD_KEYWORDS)}; and the components of {pipeline_class}, to pass your own: "
        f"{', '.join(components)}."
    )


def _one_dtype(torch_dtype: Any, dtype: Any) -> torch.dtype | dict[str, torch.dtype] | None:
    """`torch_dtype` and `dtype` (its newer name in diffusers and transformers) are one setting."""
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise TypeError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree; give one of them.")
    value = torch_dtype if torch_dtype is not None else dtype
    if isinstance(value, Mapping):
        return {str(name): _dtype(each, f"torch_dtype[{name!r}]") for name, each in value.items()}
    return _dtype(value, "torch_dtype")


def _dtype(value: Any, name: str) -> torch.dtype | None:
    if value == "auto":
        return None  # transformers' "the checkpoint's dtype": what None does here
    try:
        return dtype_from_any(value, name)
    except ValueError as error:
        raise TypeError(str(error)) from None
