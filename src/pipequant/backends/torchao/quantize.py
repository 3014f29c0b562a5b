"""How a layer becomes torchao's: `quantize_` itself, on blocks of rows where the format is per row, or per-row
int8 by our compiled kernel (`int8_rows`), checked against torchao on two rows.

Blocks of rows give the same tensors as one call on the whole weight, several times faster (see `row_blocks`);
formats with a per-tensor scale or a packing across rows take the whole.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ...meta_modules import meta_linear
from .. import int8_rows, row_blocks
from ..base import QuantizationConfigError
from .config import TorchAoConfig


def quantize_linear(module: nn.Linear, config: TorchAoConfig, device: torch.device) -> nn.Module:
    """The torchao layer for `module` (weights real, on `device`), by the fastest path that gives torchao's bytes."""
    layer = _quantize_int8_rows(module, config, device)
    if layer is not None:
        return layer
    if row_blocks.rows_per_block(module.weight, device) < module.out_features:
        try:
            return _quantize_by_rows(module, config, device)
        except row_blocks.NotRowSeparable:
            pass
    return quantize_layer(module.weight, module.bias, config, device)


def quantize_layer(
    weight: torch.Tensor, bias: torch.Tensor | None, config: TorchAoConfig, device: torch.device
) -> nn.Module:
    """`quantize_` on a new layer holding `weight` and `bias`, inside a one-layer wrapper.

    A new layer, because `quantize_` swaps weights in place and the caller may clear the old
    layer's parameters once this returns; a wrapper, so a config that swaps the module itself
    (not just its weight) works too.
    """
    from torchao.quantization import quantize_

    out_features, in_features = weight.shape
    layer = meta_linear(in_features, out_features, bias=bias is not None)
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    layer.bias = bias
    wrapper = nn.Sequential(layer)
    try:
        quantize_(wrapper, config.torchao_config(), device=device)
    except (AssertionError, ImportError, NotImplementedError) as error:
        raise QuantizationConfigError(
            f"torchao cannot apply quant_type {config.label!r} to a {weight.dtype} layer "
            f"({in_features} -> {out_features}) on {device}: {error}"
        ) from error
    return wrapper[0]


def _quantize_by_rows(module: nn.Linear, config: TorchAoConfig, device: torch.device) -> nn.Module:
    """`quantize_layer` on blocks of rows, their inner tensors stacked into one torchao tensor.

    Raises `row_blocks.NotRowSeparable` (after one block) unless the first block comes back as a
    plain `nn.Linear` holding a torchao tensor whose quantization blocks are single rows
    (``block_size[0] == 1``) with every inner tensor one row per weight row.
    """
    first: list[tuple[nn.Module, list[str], dict]] = []  # the first block's layer, inner tensor names, attributes

    def quantize_rows(rows: torch.Tensor) -> list[torch.Tensor]:
        layer, names, attributes = _row_template(rows, config, device)
        if not first:
            first.append((layer, names, attributes))
        elif attributes != first[0][2]:
            raise row_blocks.NotRowSeparable("blocks of rows quantized with different attributes")
        return [getattr(layer.weight, name) for name in names]

    inner = row_blocks.quantize_by_rows(module.weight.detach(), quantize_rows, device)
    return _assemble(*first[0], inner, module, device)


def _quantize_int8_rows(module: nn.Linear, config: TorchAoConfig, device: torch.device) -> nn.Module | None:
    """torchao's per-row int8 tensor (int8wo, int8dq) computed by `int8_rows` in one compiled pass.

    torchao quantizes the first two rows itself: that gives the layer and the tensor's attributes,
    and checks that our kernel gives the same bytes with this torchao version and config. None
    (use torchao) where the format is not plain per-row symmetric int8, or the check fails.
    """
    from torchao.quantization import Int8Tensor

    weight = module.weight.detach()
    if device.type != "cpu" or weight.shape[0] < 2:
        return None
    try:
        with kernels.torch_on_one_thread():
            layer, names, attributes = _row_template(weight[:2], config, device)
    except row_blocks.NotRowSeparable:
        return None
    template = layer.weight
    plain_int8 = (
        type(template) is Int8Tensor
        and names == ["qdata", "scale", "zero_point"]
        and list(attributes.get("block_size", ())) == [1, weight.shape[1]]
        and not attributes.get("reduce_range")
        and not template.zero_point.any()
    )
    if not plain_int8:
        return None
    fused = kernels.checked(
        kernel=int8_rows.torchao_int8_rows,
        library=lambda head: (template.qdata, template.scale),  # torchao's own bytes for the head, computed above
        weight=weight,
        head=weight[:2],
        library_name="torchao",
    )
    if fused is None:
        return None
    data, scale = fused
    zero_point = torch.zeros(scale.shape, dtype=template.zero_point.dtype)
    return _assemble(layer, names, attributes, [data, scale, zero_point], module, device)


def _row_template(rows: torch.Tensor, config: TorchAoConfig, device: torch.device) -> tuple[nn.Module, list[str], dict]:
    """torchao's layer for `rows`, with its weight's inner tensor names and attributes; raises
    `row_blocks.NotRowSeparable` unless that weight is quantized in blocks of single rows."""
    from torchao.utils import TorchAOBaseTensor

    layer = quantize_layer(rows, None, config, device)
    weight = layer.weight
    if type(layer) is not nn.Linear or not isinstance(weight, TorchAOBaseTensor):
        raise row_blocks.NotRowSeparable(f"torchao made a {type(layer).__name__} holding a {type(weight).__name__}")
    names, attributes = weight.__tensor_flatten__()
    block_size = attributes.get("block_size") if isinstance(attributes, dict) else None
    if block_size is None or block_size[0] != 1:
        raise row_blocks.NotRowSeparable(f"{type(weight).__name__} has blocks of {block_size}")
    return layer, names, attributes


def _assemble(
    layer: nn.Module,
    names: list[str],
    attributes: dict,
    inner: list[torch.Tensor],
    module: nn.Linear,
    device: torch.device,
) -> nn.Module:
    """`layer` (torchao's, for some of the rows; it keeps whatever torchao set on it) holding the
    torchao tensor made of `inner`, for the whole of `module`'s weight, and `module`'s bias."""
    weight = type(layer.weight).__tensor_unflatten__(
        dict(zip(names, inner)), attributes, module.weight.shape, module.weight.stride()
    )
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to(device), requires_grad=module.bias.requires_grad)
    layer.out_features = module.out_features
    return layer
