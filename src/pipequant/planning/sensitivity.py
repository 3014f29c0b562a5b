"""How much each quantization mode disturbs each layer's weights, measured on a sample of rows.

For a layer, a few of its rows are read from the checkpoint (only those rows, through the memory
map), put in a small `nn.Linear` in the dtype the layer is loaded in, quantized by the backend's own
`quantize`, and read back through the quantized layer's own forward on one-hot inputs
(``layer(e_j)`` is column j of the weight it really computes with). Every format here scales whole
rows or blocks inside rows, so a sampled row is quantized as it is inside the full layer
(bitsandbytes' double-quantized scales, shared by 256 blocks, aside), and the relative error
``||W - Q(W)|| / ||W||`` of the sample estimates the layer's. Reading back a sample of columns, not
all of them, keeps a 12 B-parameter transformer to minutes.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..backends import backend_for
from ..backends.base import BackendConfig, QuantizationConfigError
from ..meta_modules import meta_linear
from .sizing import ModelLayout

#: rows read per layer; a multiple of 16, which quanto's int4 CPU kernel needs
SAMPLE_ROWS = 32
#: columns read back per layer
SAMPLE_COLUMNS = 512


def measure_layers(
    layout: ModelLayout,
    layers: list[tuple[str, nn.Linear]],
    modes: Mapping[str, BackendConfig],
    *,
    rows: int = SAMPLE_ROWS,
    columns: int = SAMPLE_COLUMNS,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_layer: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """Per layer of `layers` (dotted name, module on meta) of `layout`'s model, the error of each mode.

    A mode that cannot quantize a layer (loading would fail the same way) is absent from its dict.
    Samples depend only on `seed` and the layer's name, so a measurement repeats exactly.
    """
    device = torch.device(device)
    results = []
    for done, (name, module) in enumerate(layers, start=1):
        rng = random.Random(f"{seed}:{name}")
        out_features, in_features = module.weight.shape
        row_ids = sorted(rng.sample(range(out_features), min(rows, out_features)))
        column_ids = sorted(rng.sample(range(in_features), min(columns, in_features)))
        key = layout.stored_key(module.weight)
        sample = layout.checkpoint.read_rows(key, row_ids).to(device=device, dtype=layout.dtype_of(name, "weight"))
        errors = {}
        for mode, config in modes.items():
            try:
                errors[mode] = sample_error(sample, name, column_ids, config, device)
            except (RuntimeError, ValueError):  # the mode cannot make this layer
                continue
        results.append(errors)
        if on_layer is not None:
            on_layer(done, len(layers))
    return results


def sample_error(
    weight: torch.Tensor, name: str, columns: list[int], config: BackendConfig, device: torch.device
) -> float:
    """``||W - Q(W)|| / ||W||`` over `columns` of `weight` (rows of layer `name`), quantized with `config`."""
    backend = backend_for(config)
    layer = meta_linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if not backend.takes(name, layer, config):
        raise QuantizationConfigError(f"{config!r} does not quantize {name}")
    with warnings.catch_warnings():  # e.g. GGUF type fallbacks, which the size estimate accounts for
        warnings.simplefilter("ignore")
        quantized = backend.quantize(name, layer, config, device)
        return reconstruction_error(quantized, weight, columns)


def reconstruction_error(layer: nn.Module, weight: torch.Tensor, columns: list[int] | None = None) -> float:
    """``||W - W'|| / ||W||`` over `columns` (default: all), W' read through `layer`'s own forward.

    Column j of the weight a layer computes with is ``layer(e_j) - layer(0)``: exact for any
    backend, with or without a bias, whatever its storage.
    """
    in_features = weight.shape[1]
    columns = list(range(in_features)) if columns is None else columns
    probes = torch.zeros(len(columns) + 1, in_features, dtype=weight.dtype, device=weight.device)
    probes[torch.arange(len(columns)), torch.tensor(columns)] = 1  # the last row stays 0
    with torch.no_grad():
        outputs = layer(probes).double()
    reconstructed = (outputs[:-1] - outputs[-1]).T
    reference = weight[:, columns].double()
    norm = reference.norm().item()
    difference = (reconstructed - reference).norm().item()
    return difference / norm if norm else 0.0
