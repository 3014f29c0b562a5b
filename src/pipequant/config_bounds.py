"""A model's config checked against its checkpoint's tensor shapes before the model is built.

Building a model costs time and memory in what the config says: ``num_layers`` 10**6 builds for
minutes even on the meta device, and a hidden size of 10**9 allocates the (real) buffers such as
rotary tables before any weight is compared. The checkpoint's headers already bound every sane
value cheaply: each layer holds at least one tensor, so a layer count is at most the number of
stored tensors; and a width (a size, dim or channel count) is a dimension of some tensor, so it is
at most the largest tensor's element count. These bounds are loose on purpose (they refuse only
configs that cannot fit the weights, never a real model); the exact shapes are compared tensor by
tensor once the model is built (`streaming.match_keys`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError

#: config fields that count layers or blocks: num_layers, num_hidden_layers, layers_per_block, depth, ...
_COUNT = re.compile(r"(^|_)(layers|blocks|depth)$|layers_per_block$")
#: config fields that are widths: hidden_size, attention_head_dim, block_out_channels, d_model, ...
_WIDTH = re.compile(r"(size|dim|dims|channels|features|heads|d_model|d_ff|d_kv)$")


def check_config_fits(config: Mapping[str, Any], shapes: list[tuple[int, ...]], source: str | Path) -> None:
    """CheckpointError naming the field of `config` that the tensors of `shapes` cannot hold."""
    tensors = len(shapes)
    largest = max((math.prod(shape) for shape in shapes), default=0)
    for name, value in _int_fields(config, ""):
        leaf = name.rpartition(".")[2]
        if _COUNT.search(leaf) and value > tensors:
            raise CheckpointError(
                f"{source}: {name} = {value}, but the checkpoint holds only {tensors} tensors, fewer than one per "
                "layer. The config does not belong to these weights (or was edited); fix the field or the file."
            )
        if _WIDTH.search(leaf) and value > largest:
            raise CheckpointError(
                f"{source}: {name} = {value}, but the largest tensor of the checkpoint has only {largest} elements. "
                "The config does not belong to these weights (or was edited); fix the field or the file."
            )


def _int_fields(config: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, int]]:
    """(dotted name, value) of every integer in `config`: nested configs and lists of integers included."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _int_fields(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            yield from ((name, item) for item in value if isinstance(item, int) and not isinstance(item, bool))
        elif isinstance(value, int) and not isinstance(value, bool):
            yield name, value
