"""`PipelineQuantizationConfig`: one config for a whole pipeline, resolved per component.

Resolution happens against the pipeline's index before any weight is read, so every mistake
(unknown backend, misspelled option, component that does not exist or is not a model) surfaces
as one clear error while nothing has been loaded yet.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from .backends import backend_for, backend_names, config_classes, get_backend
from .backends.base import BackendConfig, QuantizationConfigError


class PipelineQuantizationConfig:
    """Which components of a pipeline to quantize, and how.

    Simple form: one backend for several components::

        PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit",
                                   quant_kwargs={"bnb_4bit_quant_type": "nf4"},
                                   components_to_quantize=["transformer", "text_encoder_2"])

    Per component, mixing backends: ``PipelineQuantizationConfig(quant_mapping={"transformer": cfg, ...})``
    where each value is a pipequant backend config, or diffusers' / transformers' own config object.
    ``components_to_quantize=None`` in the simple form means every model component of the pipeline.
    """

    def __init__(
        self,
        quant_backend: str | None = None,
        quant_kwargs: Mapping[str, Any] | None = None,
        components_to_quantize: Iterable[str] | str | None = None,
        quant_mapping: Mapping[str, Any] | None = None,
    ) -> None:
        simple_given = quant_backend is not None or quant_kwargs is not None or components_to_quantize is not None
        if simple_given and quant_mapping is not None:
            raise QuantizationConfigError(
                "Give either the simple form (quant_backend, quant_kwargs, components_to_quantize) "
                "or quant_mapping, not both."
            )
        if quant_backend is None and quant_mapping is None:
            raise QuantizationConfigError(
                "Nothing to quantize: pass quant_backend=... (with quant_kwargs and components_to_quantize) "
                f"or quant_mapping={{component: config}}. Backends: {', '.join(backend_names())}."
            )
        self.quant_backend = quant_backend
        self.quant_kwargs = dict(quant_kwargs or {})
        if isinstance(components_to_quantize, str):
            components_to_quantize = [components_to_quantize]
        self.components_to_quantize = list(components_to_quantize) if components_to_quantize is not None else None
        self.quant_mapping: dict[str, BackendConfig] | None = None

        if quant_mapping is not None:
            if not isinstance(quant_mapping, Mapping) or not quant_mapping:
                raise QuantizationConfigError("quant_mapping must be a non-empty dict {component name: config}.")
            self.quant_mapping = {name: _as_backend_config(name, cfg) for name, cfg in quant_mapping.items()}
            self.shared_config = None
        else:
            assert quant_backend is not None
            self.shared_config = _simple_form_config(quant_backend, self.quant_kwargs)

    def resolve(
        self, model_components: Iterable[str], other_components: Iterable[str] = ()
    ) -> dict[str, BackendConfig]:
        """The backend config of each component to quantize, checked against the pipeline's components.

        `model_components` are the torch-model components; `other_components` the rest
        (tokenizers, schedulers), named separately so the error can say why they cannot be quantized.
        """
        models = list(model_components)
        others = set(other_components)
        if self.quant_mapping is not None:
            wanted = list(self.quant_mapping)
        elif self.components_to_quantize is not None:
            wanted = self.components_to_quantize
        else:
            wanted = models
        for name in wanted:
            if name in others:
                raise QuantizationConfigError(
                    f"Component {name!r} is not a torch model (a tokenizer, scheduler or similar) and cannot be "
                    f"quantized. Model components: {', '.join(models)}."
                )
            if name not in models:
                close = difflib.get_close_matches(name, models, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise QuantizationConfigError(
                    f"The pipeline has no component {name!r}.{hint} Its model components: {', '.join(models)}."
                )
        if self.quant_mapping is not None:
            return dict(self.quant_mapping)
        assert self.shared_config is not None
        return {name: self.shared_config for name in wanted}

    def __repr__(self) -> str:
        if self.quant_mapping is not None:
            inner = ", ".join(f"{name!r}: {cfg!r}" for name, cfg in self.quant_mapping.items())
            return f"PipelineQuantizationConfig(quant_mapping={{{inner}}})"
        return (
            f"PipelineQuantizationConfig(quant_backend={self.quant_backend!r}, quant_kwargs={self.quant_kwargs!r}, "
            f"components_to_quantize={self.components_to_quantize!r})"
        )


def _simple_form_config(quant_backend: str, quant_kwargs: dict[str, Any]) -> BackendConfig:
    backend = get_backend(quant_backend)
    kwargs = {**backend.simple_form_defaults, **quant_kwargs}
    config = backend.config_class.from_kwargs(kwargs, context=f"quant_kwargs for {quant_backend!r}")
    if config.backend_name != quant_backend:
        raise QuantizationConfigError(
            f"quant_backend={quant_backend!r} but quant_kwargs describe {config.backend_name!r}; "
            f"use quant_backend={config.backend_name!r} or drop the conflicting keys."
        )
    return config


def _as_backend_config(component: str, config: Any) -> BackendConfig:
    """Our config as is; diffusers' or transformers' config converted by the matching class."""
    if isinstance(config, BackendConfig):
        backend_for(config)  # a config class whose backend is not registered fails here
        return config
    root = type(config).__module__.split(".")[0]
    if root in ("diffusers", "transformers"):
        for config_class in config_classes():
            if type(config).__name__ in config_class.foreign_class_names:
                return config_class.from_foreign(config)
        raise QuantizationConfigError(
            f"quant_mapping[{component!r}]: {root}'s {type(config).__name__} has no pipequant equivalent. "
            f"Use one of: {', '.join(c.__name__ for c in config_classes())}."
        )
    raise QuantizationConfigError(
        f"quant_mapping[{component!r}] is a {type(config).__name__}, not a quantization config. Use one of: "
        f"{', '.join(c.__name__ for c in config_classes())} (or diffusers'/transformers' own config objects)."
    )


def as_pipeline_config(config: Any) -> PipelineQuantizationConfig | None:
    """pipequant's config as is; diffusers' `PipelineQuantizationConfig` converted field by field (both forms).

    The conversion goes through the same constructor as ours, so it resolves to the same backend
    configs, layers and bytes; a backend or option pipequant cannot honour is the same error.
    """
    if config is None or isinstance(config, PipelineQuantizationConfig):
        return config
    if type(config).__name__ == "PipelineQuantizationConfig" and type(config).__module__.startswith("diffusers."):
        return PipelineQuantizationConfig(
            quant_backend=config.quant_backend,
            quant_kwargs=config.quant_kwargs or None,
            # diffusers quantizes every component when the list is empty, as for None
            components_to_quantize=config.components_to_quantize or None,
            quant_mapping=config.quant_mapping,
        )
    raise QuantizationConfigError(
        f"quantization_config must be a PipelineQuantizationConfig (pipequant's or diffusers'), not a "
        f"{type(config).__name__}. For one component use quant_mapping={{'transformer': config}}."
    )
