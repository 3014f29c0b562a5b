"""Modules built on the meta device without running their initialisers.

Models are built on the meta device (accelerate's `init_empty_weights`) and quantized layers as empty shells
(``device="meta"``) that the loaded weights fill; their constructors still run every initialiser:
`nn.Linear.reset_parameters`' kaiming_uniform_, transformers' `_init_weights`. On the meta device such a call
computes nothing, but each is dispatched through torch's Python decompositions (0.1 to 1 ms): several hundred per
pipeline, all thrown away. Within `no_init_on_meta()` torch's initialisers return at once for meta tensors.

Real tensors are initialised as before: the buffers `init_empty_weights` leaves on the CPU (position ids, rotary
tables), which transformers' `_init_weights` may compute, stay exactly what the model's own build makes.
diffusers' and transformers' ``no_init_weights`` skip every tensor instead; they build with different buffers.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: torch's initialisers (each takes the tensor it fills first)
INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)

#: modules that bind torch's initialisers by name at import (``from torch.nn.init import xavier_uniform_``)
_BINDING_MODULES = ("torch.nn.init", "torch.nn.modules.activation", "torch.nn.modules.transformer")


def _skipping_meta(initialiser: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(initialiser)
    def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if tensor.is_meta:
            return tensor
        return initialiser(tensor, *args, **kwargs)

    return initialise


def _namespaces() -> list[dict[str, Any]]:
    """Where torch's initialisers are looked up at call time: the modules binding them, and transformers' table
    of the originals, which its own initialisers (``transformers.initialization.normal_``) call."""
    namespaces = [vars(sys.modules[name]) for name in _BINDING_MODULES if name in sys.modules]
    transformers_init = sys.modules.get("transformers.initialization")
    table = getattr(transformers_init, "TORCH_INIT_FUNCTIONS", None)
    if isinstance(table, dict):
        namespaces.append(table)
    return namespaces


@contextlib.contextmanager
def no_init_on_meta() -> Iterator[None]:
    """Within it, torch's initialisers leave meta tensors alone (see the module docstring)."""
    replacements = {}
    for name in INITIALISERS:
        original = getattr(torch.nn.init, name)
        replacements[original] = _skipping_meta(original)
    replaced: list[tuple[dict[str, Any], str, Any]] = []
    for namespace in _namespaces():
        for key, value in list(namespace.items()):
            if isinstance(value, types.FunctionType) and value in replacements:
                replaced.append((namespace, key, value))
                namespace[key] = replacements[value]
    try:
        yield
    finally:
        for namespace, key, value in reversed(replaced):
            namespace[key] = value


def meta_linear(
    in_features: int, out_features: int, *, bias: bool = True, dtype: torch.dtype | None = None
) -> nn.Linear:
    """An `nn.Linear` on the meta device, for weights to be set on, built without running its initialisers."""
    with no_init_on_meta():
        return nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
