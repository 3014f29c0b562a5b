"""Choose how to quantize a pipeline so it fits a memory budget with the least loss of quality.

Per component, every linear layer the loader would quantize gets a few ways to be stored: each
candidate mode (sized exactly by the backend's `estimate_layer_nbytes`, its error measured on a
sample of its rows, see `sensitivity.py`), or full precision. One backend config serves a whole
component, so a component picks one *family*: a single mode with some layers kept in full precision
(`modules_to_not_convert`), or GGUF, whose layers may also mix types (`type_rules`); or it stays
unquantized. The plan minimizes the sum over layers of parameters x relative weight error under the
budget (`solver.py`, which knows only sizes and errors), and is explained per component (`explanation.py`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..backends import backend_for
from ..backends.base import BackendConfig
from ..backends.gguf.config import GGUFQuantizationConfig
from ..config import PipelineQuantizationConfig
from ..loading import read_pipeline_index, resolve_pipeline_folder
from ..presets import PLAN_CANDIDATES, preset, usable
from ..quantizing import quantization_targets
from ..ui import progress_bars
from .explanation import ComponentPlan, Explanation
from .sensitivity import SAMPLE_COLUMNS, SAMPLE_ROWS, measure_layers
from .sizing import ModelLayout, estimate_component
from .solver import FULL, BudgetError, Component, Family, Layer, Option, check_feasible, solve

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_GGUF_FAMILY = "gguf"


@dataclasses.dataclass
class _Sized:
    """A component as the solver sees it (sizes and errors), with what measuring its errors needs."""

    component: Component
    #: the model on the meta device, with the dtype each tensor loads in
    layout: ModelLayout
    #: the config of each candidate mode
    configs: dict[str, BackendConfig]
    #: the layers in `component.layers`' order, on the meta device
    modules: list[nn.Linear]


def parse_budget(budget: int | str) -> int:
    """Bytes from an int or a string such as "8GB", "7.5 GiB", "500MB" (kB/MB/GB are powers of 1000)."""
    if isinstance(budget, int):
        return budget
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"budget {budget!r} is not a size such as '8GB', '7.5GiB' or '500MB'.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def plan(
    path: str | Path,
    budget: int | str,
    torch_dtype: torch.dtype | None = None,
    *,
    candidates: Sequence[str] = PLAN_CANDIDATES,
    components: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    rows: int = SAMPLE_ROWS,
    columns: int = SAMPLE_COLUMNS,
    seed: int = 0,
    progress: bool = False,
) -> tuple[PipelineQuantizationConfig | None, Explanation]:
    """The config that fits the pipeline at `path` into `budget` bytes with the least expected quality loss.

    `budget` covers the model components as `memory_report` counts them after
    ``load_pipeline(path, config, torch_dtype)``. `candidates` are mode names (`presets.PRESETS`);
    those whose library is missing or that cannot run on `device` are left out. `components`
    limits which components may be quantized (default: every model component). The config is None
    when the pipeline fits unquantized. Raises `BudgetError`, naming the smallest size any plan
    reaches, when none fits.
    """
    limit = parse_budget(budget)
    device = torch.device(device)
    modes = [mode for mode in candidates if usable(mode, device)]
    folder = resolve_pipeline_folder(path)
    index = read_pipeline_index(folder)
    models, _ = index.split_components()
    quantizable = set(models if components is None else components)
    unknown = sorted(quantizable - set(models))
    if unknown:
        raise ValueError(
            f"{index.pipeline_class_name} has no model component {', '.join(unknown)}; its models: {', '.join(models)}."
        )
    measurable = [
        _size(name, index.component_class(name), folder / name, torch_dtype, modes if name in quantizable else [])
        for name in models
    ]
    sized = [entry.component for entry in measurable]
    if sum(c.full_nbytes for c in sized) <= limit:  # nothing to quantize, nothing to measure
        choice = [(c.families[0], [layer.options[0] for layer in c.layers]) for c in sized]
    else:
        check_feasible(sized, limit)  # before the measurement: it needs sizes only
        with progress_bars(progress) as add_task:
            for entry in measurable:
                _measure(entry, rows=rows, columns=columns, seed=seed, device=device, add_task=add_task)
        choice = solve(sized, limit)
    mapping: dict[str, BackendConfig] = {}
    explained = []
    for component, (family, picks) in zip(sized, choice):
        config = _config(family, component.layers, picks)
        if config is not None:
            mapping[component.name] = config
        nbytes = estimate_component(
            component.name, index.component_class(component.name), folder / component.name, config, torch_dtype
        ).bytes_after
        explained.append(_explain(component, family, picks, nbytes))
    explanation = Explanation(explained, limit, rows, columns)
    if explanation.total > limit:  # the estimates the plan was made with and the loader's must agree
        raise AssertionError(f"plan of {explanation.total} bytes exceeds the budget of {limit}")
    return (PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None), explanation


def _size(
    name: str, model_class: type[nn.Module], folder: Path, torch_dtype: torch.dtype | None, modes: list[str]
) -> _Sized:
    """Every layer one of `modes` would quantize, with the bytes of each option, and the families the component
    may take.

    Errors are measured later (`_measure`); until then they are NaN.
    """
    full = estimate_component(name, model_class, folder, None, torch_dtype).bytes_after
    layout = ModelLayout(model_class, folder, torch_dtype)
    configs = {mode: preset(mode) for mode in modes}
    taken = {mode: quantization_targets(layout.model, backend_for(cfg), cfg) for mode, cfg in configs.items()}
    names = set().union(*taken.values()) if taken else set()
    layers = []
    modules = []
    for layer_name, module in layout.model.named_modules():
        if layer_name not in names:
            continue
        full_layer = sum(
            t.numel() * layout.dtype_of(layer_name, n).itemsize for n, t in module._parameters.items() if t is not None
        )
        options = [Option(None, full_layer, 0.0)]
        dtype = layout.dtype_of(layer_name, "weight")
        for mode, config in configs.items():
            if layer_name in taken[mode]:
                nbytes = backend_for(config).estimate_layer_nbytes(layer_name, module, config, dtype)
                options.append(Option(mode, nbytes, math.nan))
        layers.append(Layer(layer_name, module.weight.numel(), options))
        modules.append(module)
    fixed = full - sum(layer.options[0].nbytes for layer in layers)
    gguf = tuple(mode for mode in modes if isinstance(configs[mode], GGUFQuantizationConfig))
    families = [Family(FULL, ())]
    families += [Family(mode, (mode,)) for mode in modes if mode not in gguf]
    if gguf:
        families.append(Family(_GGUF_FAMILY, gguf))
    component = Component(name, model_class.__name__, full, fixed, layers, families)
    return _Sized(component, layout, configs, modules)


def _measure(sized: _Sized, *, rows: int, columns: int, seed: int, device: torch.device, add_task) -> None:
    """Fill in each option's error; an option whose mode cannot quantize its layer is dropped (the layer stays full)."""
    component = sized.component
    modules = [(layer.name, module) for layer, module in zip(component.layers, sized.modules)]
    on_layer = add_task(f"{component.name}: measuring {len(sized.configs)} modes", len(modules))
    measured = measure_layers(
        sized.layout, modules, sized.configs, rows=rows, columns=columns, seed=seed, device=device, on_layer=on_layer
    )
    for layer, errors in zip(component.layers, measured):
        layer.options = [o for o in layer.options if o.mode is None or o.mode in errors]
        for option in layer.options[1:]:
            option.error = errors[option.mode]


def _config(family: Family, layers: list[Layer], picks: list[Option]) -> BackendConfig | None:
    """The backend config that stores each layer as picked; None when every layer stays in full precision."""
    names = [layer.name for layer in layers]
    kept = [_exact(layer.name, names) for layer, option in zip(layers, picks) if option.mode is None]
    modes = Counter(option.mode for option in picks if option.mode is not None)
    if not modes:
        return None
    default = modes.most_common(1)[0][0]
    if family.label != _GGUF_FAMILY:
        config = preset(default)
        config.modules_to_not_convert = kept or None
        return config
    rules = {
        _exact(layer.name, names): preset(option.mode).quant_type
        for layer, option in zip(layers, picks)
        if option.mode not in (None, default)
    }
    return GGUFQuantizationConfig(
        quant_type=preset(default).quant_type, type_rules=rules or None, modules_to_not_convert=kept or None
    )


def _exact(name: str, names: list[str]) -> str:
    """A pattern (see `matches_module_pattern`) that matches layer `name` and no other of `names`.

    The plain name, unless another layer's name ends with it; then the same name as a glob (its
    first character in brackets), which is matched against full names only.
    """
    if any(other != name and other.endswith("." + name) for other in names):
        return f"[{name[0]}]{name[1:]}"
    return name


def _explain(component: Component, family: Family, picks: list[Option], nbytes: int) -> ComponentPlan:
    parameters = sum(layer.parameters for layer in component.layers)
    error = (
        sum(layer.parameters * o.error for layer, o in zip(component.layers, picks)) / parameters if parameters else 0.0
    )
    modes = Counter(option.mode for option in picks if option.mode is not None)
    kept = len(picks) - sum(modes.values())
    if not modes:
        choice = FULL
    elif len(modes) == 1:
        choice = next(iter(modes))
    else:
        choice = ", ".join(f"{mode} x{count}" for mode, count in modes.most_common())
    alternatives = {}
    measured = not any(math.isnan(o.error) for layer in component.layers for o in layer.options)
    for other in component.families if measured else ():
        for mode in other.modes:
            options = [
                next((o for o in layer.options if o.mode == mode), layer.options[0]) for layer in component.layers
            ]
            size = component.fixed_nbytes + sum(o.nbytes for o in options)
            weighted = sum(layer.parameters * o.error for layer, o in zip(component.layers, options))
            alternatives[mode] = (size, weighted / parameters if parameters else 0.0)
    return ComponentPlan(
        component.name,
        component.class_name,
        choice,
        sum(modes.values()),
        kept,
        nbytes,
        component.full_nbytes,
        parameters,
        error,
        alternatives,
    )


__all__ = ["BudgetError", "parse_budget", "plan"]
