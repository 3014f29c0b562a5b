"""The compiled per-row int8 kernels give quanto's, torchao's and bitsandbytes' own bytes, and the
backends use them."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from optimum.quanto import qint8, quantize_module
from optimum.quanto.tensor.optimizers import AbsmaxOptimizer
from torch import nn
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, PerRow, quantize_

from pipequant import BitsAndBytesConfig, QuantoConfig, TorchAoConfig
from pipequant.backends import get_backend, int8_rows, row_blocks

CPU = torch.device("cpu")


def awkward_weight(dtype: torch.dtype, shape: tuple[int, int] = (40, 300)) -> torch.Tensor:
    """Random rows of several magnitudes, and rows that test the edges of the arithmetic."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator) * 0.1
    weight[1, 7] = 3.0  # one outlier
    weight[2] = 0.0  # scale 0 (quanto) or eps (torchao)
    weight[3] = 1e-30  # below torchao's eps
    weight[4] = -2.5  # the maximum is negative, and every value sits on it
    weight[5, 3] = float("inf")
    weight[6, 1] = float("nan")
    weight[7] = torch.arange(shape[1]) - shape[1] / 2  # values that fall halfway between steps
    return weight.to(dtype)


def quanto_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = AbsmaxOptimizer()(weight, qtype=qint8, axis=0)
    return torch.ops.quanto.quantize_symmetric(weight, dtype=torch.int8, axis=0, scale=scale), scale


def torchao_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tensor = Int8Tensor.from_hp(weight, PerRow())
    assert not tensor.zero_point.any()
    return tensor.qdata, tensor.scale


def assert_same(ours: tuple[torch.Tensor, torch.Tensor] | None, theirs: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert ours is not None
    assert torch.equal(ours[0], theirs[0])
    assert ours[1].dtype == theirs[1].dtype and ours[1].shape == theirs[1].shape
    assert torch.equal(ours[1].nan_to_num(), theirs[1].nan_to_num())  # NaN scales (a NaN row) in the same places
    assert torch.equal(ours[1].isnan(), theirs[1].isnan())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(40, 300), (9, 4096), (64, 8)])
def test_quanto_bytes(dtype, shape):
    weight = awkward_weight(dtype, shape)
    assert_same(int8_rows.quanto_int8_rows(weight), quanto_reference(weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(40, 300), (9, 4096), (64, 8)])
def test_torchao_bytes(dtype, shape):
    weight = awkward_weight(dtype, shape)
    assert_same(int8_rows.torchao_int8_rows(weight), torchao_reference(weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(40, 300), (9, 4096), (64, 8)])
def test_bitsandbytes_bytes(dtype, shape):
    weight = awkward_weight(dtype, shape)
    weight[7, 3] = 70000.0  # beyond float16: inf once rounded, as Linear8bitLt stores it
    data, scale, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
    assert_same(int8_rows.bitsandbytes_int8_rows(weight), (data, scale))


@pytest.mark.parametrize(
    "weight",
    [
        torch.randn(8, 16, dtype=torch.float16),  # its roundings are not written here
        torch.randn(16, 8, dtype=torch.bfloat16).t(),  # not contiguous
        torch.randn(16, dtype=torch.bfloat16),  # not a matrix
    ],
)
def test_other_weights_are_left_to_the_library(weight):
    assert int8_rows.quanto_int8_rows(weight) is None
    assert int8_rows.torchao_int8_rows(weight) is None
    assert int8_rows.bitsandbytes_int8_rows(weight) is None


def bf16_linear() -> nn.Linear:
    layer = nn.Linear(300, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(awkward_weight(torch.bfloat16).nan_to_num(posinf=1.0))
        layer.bias.copy_(torch.linspace(-1, 1, 40))
    return layer


@pytest.fixture
def no_row_blocks(monkeypatch):
    """The library's own (row-block) path made unusable: only the compiled kernel can quantize."""

    def refuse(*args, **kwargs):
        raise AssertionError("the library's own quantizer ran")

    monkeypatch.setattr(row_blocks, "quantize_by_rows", refuse)


def test_backends_take_the_kernel(no_row_blocks, assert_same_state):
    layer = get_backend("torchao").quantize("layer", bf16_linear(), TorchAoConfig("int8wo"), CPU)
    theirs = nn.Sequential(bf16_linear())
    quantize_(theirs, Int8WeightOnlyConfig())
    assert torch.equal(layer.weight.qdata, theirs[0].weight.qdata)
    assert torch.equal(layer.weight.scale, theirs[0].weight.scale)

    layer = get_backend("quanto").quantize("layer", bf16_linear(), QuantoConfig("int8"), CPU)
    theirs = quantize_module(bf16_linear(), weights="qint8")
    theirs.freeze()
    assert_same_state(layer, theirs)

    layer = get_backend("bitsandbytes_8bit").quantize(
        "layer", bf16_linear(), BitsAndBytesConfig(load_in_8bit=True), CPU
    )
    data, scale, _ = bnb.functional.int8_vectorwise_quant(bf16_linear().weight.data.to(torch.float16))
    assert torch.equal(layer.weight.data, data) and torch.equal(layer.weight.SCB.nan_to_num(), scale.nan_to_num())


def test_a_disagreeing_kernel_hands_back_to_the_library(monkeypatch, assert_same_state):
    def off_by_one(kernel):
        return lambda weight: (kernel(weight)[0] + 1, kernel(weight)[1])

    monkeypatch.setattr(int8_rows, "quanto_int8_rows", off_by_one(int8_rows.quanto_int8_rows))
    monkeypatch.setattr(int8_rows, "torchao_int8_rows", off_by_one(int8_rows.torchao_int8_rows))
    monkeypatch.setattr(int8_rows, "bitsandbytes_int8_rows", off_by_one(int8_rows.bitsandbytes_int8_rows))

    with pytest.warns(UserWarning, match="disagrees with this optimum-quanto version"):
        layer = get_backend("quanto").quantize("layer", bf16_linear(), QuantoConfig("int8"), CPU)
    theirs = quantize_module(bf16_linear(), weights="qint8")
    theirs.freeze()
    assert_same_state(layer, theirs)

    with pytest.warns(UserWarning, match="disagrees with this torchao version"):
        layer = get_backend("torchao").quantize("layer", bf16_linear(), TorchAoConfig("int8wo"), CPU)
    theirs = nn.Sequential(bf16_linear())
    quantize_(theirs, Int8WeightOnlyConfig())
    assert torch.equal(layer.weight.qdata, theirs[0].weight.qdata)

    with pytest.warns(UserWarning, match="disagrees with this bitsandbytes version"):
        layer = get_backend("bitsandbytes_8bit").quantize(
            "layer", bf16_linear(), BitsAndBytesConfig(load_in_8bit=True), CPU
        )
    data, _, _ = bnb.functional.int8_vectorwise_quant(bf16_linear().weight.data.to(torch.float16))
    assert torch.equal(layer.weight.data, data)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float16_rounding_of_every_value(dtype):
    """The bitsandbytes kernel rounds weights to float16 as torch does: each row holds one value (every
    bf16 bit pattern; random float32 patterns, subnormals to overflow), so its scale is that value's |fp16|."""
    if dtype == torch.bfloat16:
        values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    else:
        generator = torch.Generator().manual_seed(3)
        values = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=generator, dtype=torch.int32).view(
            torch.float32
        )
        values = torch.cat((values, torch.tensor([65504.0, 65519.99, 65520.0, 6e-8, 2.9802322e-08, 2.9802326e-08])))
    weight = torch.stack((values, torch.zeros_like(values)), 1)
    _, scale = int8_rows.bitsandbytes_int8_rows(weight)
    expected = values.to(torch.float16).float().abs()
    assert torch.equal(scale.isnan(), expected.isnan())
    assert torch.equal(scale.nan_to_num(), expected.nan_to_num())
