"""What the 4-bit and 8-bit backends share: a layer's bias, and taking apart the tensors a layer was stored as."""

from __future__ import annotations

import torch
from torch import nn


def pop_required(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"the stored layer has no {name!r} tensor (it holds {sorted(tensors)})")
    return tensors.pop(name)


def copy_bias(source: nn.Linear, target: nn.Module, device: torch.device) -> None:
    if source.bias is not None:
        target.bias = nn.Parameter(source.bias.data.to(device), requires_grad=False)


def set_bias(layer: nn.Module, bias: torch.Tensor | None, device: torch.device) -> None:
    """The stored bias on the rebuilt layer; a layer built with a bias needs one stored."""
    if (bias is None) != (layer.bias is None):
        raise ValueError("the stored layer and the model disagree on whether the layer has a bias")
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
