"""A torchao layer stored and rebuilt: torchao's own safetensors flattening of its tensor subclasses, no pickle.

A layer's weight is stored as its inner tensors (``_weight_qdata``, ``_weight_scale``, ...) with its attributes as
JSON (`LayerState.metadata`), named as torchao's `flatten_tensor_state_dict` names a whole model's, so diffusers
reads our folders with torchao's loader.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import nn

from ...meta_modules import meta_linear
from ..base import LayerState


def save_layer(module: nn.Linear) -> LayerState:
    """The weight's inner tensors (``_weight_qdata``, ``_weight_scale``, ...) and its attributes as JSON."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    try:
        flat, metadata = flatten_tensor_state_dict({f"{_LAYER}.weight": module.weight})
    except ValueError as error:  # a tensor subclass torchao's safetensors support does not cover
        raise NotImplementedError(f"torchao cannot save a {type(module.weight).__name__} weight: {error}") from error
    tensors = {key.removeprefix(f"{_LAYER}."): value for key, value in flat.items()}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach()
    return LayerState(tensors, {"weight": metadata[f"{_LAYER}.weight"]})


def checkpoint_metadata(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """The rest of what torchao's `flatten_tensor_state_dict` writes for a whole model: ``tensor_names``, every
    tensor of the state dict by its unflattened name, and ``{"_type": "Tensor"}`` for each plain one.

    diffusers takes ``tensor_names`` as the list of the checkpoint's keys; without it, it loads the
    flattened parts as unknown keys and leaves the quantized layers with random weights.
    """
    # "<layer>.weight" is stored as parts "<layer>._weight_<part>" (torchao's naming)
    flattened = {_part_prefix(*name.rpartition(".")[::2]) for name in metadata}
    plain = [key for key in tensors if _part_prefix(*key.rpartition(".")[::2], part=True) not in flattened]
    plain_type = json.dumps({"_type": torch.Tensor.__name__})
    return {"tensor_names": json.dumps([*metadata, *plain]), **dict.fromkeys(plain, plain_type)}


def restore_linear(module: nn.Linear, state: LayerState, device: torch.device) -> nn.Linear:
    """The stored weight rebuilt by torchao's `unflatten_tensor_state_dict`, on an `nn.Linear` made on meta."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    tensors = dict(state.tensors)
    bias = tensors.pop("bias", None)
    if "weight" not in state.metadata:
        raise ValueError(f"no torchao weight metadata stored for the layer (tensors {sorted(state.tensors)})")
    metadata = {f"{_LAYER}.weight": state.metadata["weight"], "tensor_names": f'["{_LAYER}.weight"]'}
    weights, leftover = unflatten_tensor_state_dict({f"{_LAYER}.{k}": v for k, v in tensors.items()}, metadata)
    if leftover or f"{_LAYER}.weight" not in weights:
        raise ValueError(f"the stored tensors {sorted(state.tensors)} are not one torchao weight")
    weight = weights[f"{_LAYER}.weight"]
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(
            f"the stored weight has shape {tuple(weight.shape)}, the layer {(module.out_features, module.in_features)}"
        )
    layer = meta_linear(module.in_features, module.out_features, bias=bias is not None)
    layer.weight = nn.Parameter(weight.to(device), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return layer


#: the layer name torchao's (whole-model) flattening is given for one layer, stripped again after
_LAYER = "layer"


def _part_prefix(layer: str, leaf: str, part: bool = False) -> str | None:
    """torchao's "<layer>._<attribute>_" for tensor `leaf` of `layer`; with `part`, `leaf` is a stored part
    ("_weight_qdata") and the prefix is read from it (None when it is not one)."""
    if part:
        if not leaf.startswith("_") or "_" not in leaf[1:]:
            return None
        leaf = leaf[1:].split("_", 1)[0]
    return f"{layer}._{leaf}_" if layer else f"_{leaf}_"
