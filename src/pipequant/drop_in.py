"""diffusers' pipeline classes, loading through pipequant: ``from pipequant import DiffusionPipeline, FluxPipeline``.

One mechanism covers every pipeline class diffusers has, without copying any: ``pipequant.<Name>``
(made on first use by the package's module ``__getattr__``) stands in for ``diffusers.<Name>``.
Its ``from_pretrained`` loads through `load_pipeline` (streaming, quantizing while loading, with
pipequant's or diffusers' `PipelineQuantizationConfig`) and returns diffusers' own pipeline object,
of the class diffusers' ``<Name>.from_pretrained`` would return: the one model_index.json names for
`DiffusionPipeline`, ``<Name>`` itself otherwise. Everything else (constructing one, ``isinstance``,
``from_pipe``, class attributes) is diffusers' class, so code written for diffusers runs unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


class PipelineStandIn(type):
    """The type of the stand-ins: attributes, calls and ``isinstance`` go to the diffusers class."""

    diffusers_class: type

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls.diffusers_class, name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.diffusers_class(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, cls.diffusers_class)

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, cls.diffusers_class)

    def __repr__(cls) -> str:
        return f"<pipequant stand-in for diffusers.{cls.diffusers_class.__name__}>"


def _from_pretrained(cls: PipelineStandIn, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
    """Load the pipeline at a local folder or Hub repo id through pipequant's streaming loader.

    Takes diffusers' keywords (``quantization_config`` — pipequant's or diffusers'
    `PipelineQuantizationConfig` —, ``torch_dtype`` / ``dtype``, ``device_map``, ``variant``,
    ``revision``, ``subfolder``, ``cache_dir``, ``token``, ``local_files_only``,
    ``use_safetensors``, ``low_cpu_mem_usage``), components to use as given, and pipequant's
    ``device`` and ``progress``; see `pipequant.load_pipeline`.
    """
    from .loading import load_pipeline

    return load_pipeline(pretrained_model_name_or_path, pipeline_class=cls.diffusers_class, **kwargs)


@functools.cache
def stand_in(name: str) -> PipelineStandIn:
    """The stand-in for diffusers' pipeline class `name`; `AttributeError` where diffusers has none."""
    from .component_classes import PipelineFolderError, pipeline_class

    try:
        diffusers_class = pipeline_class(name)
    except PipelineFolderError as error:
        raise AttributeError(str(error)) from None
    namespace = {
        "diffusers_class": diffusers_class,
        "from_pretrained": classmethod(_from_pretrained),
        "__module__": "pipequant",
        "__doc__": f"diffusers' {name}, loaded by pipequant: `{name}.from_pretrained` streams and quantizes.",
    }
    return PipelineStandIn(name, (), namespace)
