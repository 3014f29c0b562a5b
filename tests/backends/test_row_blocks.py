"""Quantizing by blocks of rows gives each library's own whole-weight result, byte for byte."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from optimum.quanto import quantize_module
from torch import nn
from torchao.quantization import (
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerGroup,
    PerTensor,
    quantize_,
)

from pipequant import BitsAndBytesConfig, QuantoConfig, TorchAoConfig
from pipequant.backends import get_backend, row_blocks

# several blocks with a one-row remainder, an uneven last block, a single block
SHAPES = [(302, 128), (97, 192), (5, 64)]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(row_blocks, "BLOCK_ELEMENTS", 1000)  # about 10 rows per block


def make_linear(shape: tuple[int, int], seed: int) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(shape[1], shape[0], dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator))
        layer.bias.copy_(torch.randn(shape[0], generator=generator))
    return layer


def inner_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    names, _ = weight.__tensor_flatten__()
    return {name: getattr(weight, name) for name in names}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("quant_type", "torchao_config"),
    [
        ("int8wo", Int8WeightOnlyConfig()),
        ("int8dq", Int8DynamicActivationInt8WeightConfig()),
        ("float8wo_e4m3", Float8WeightOnlyConfig(weight_dtype=torch.float8_e4m3fn)),
        ("uint4wo", IntxWeightOnlyConfig(torch.int4, PerGroup(64), MappingType.ASYMMETRIC)),
        ("int4dq", Int8DynamicActivationIntxWeightConfig(torch.int4, PerGroup(32))),
        # a per-tensor scale: not row-separable, quantized whole
        (Int8WeightOnlyConfig(granularity=PerTensor()), Int8WeightOnlyConfig(granularity=PerTensor())),
    ],
)
def test_torchao(shape, quant_type, torchao_config):
    layer = make_linear(shape, 0)
    ours = get_backend("torchao").quantize("layer", layer, TorchAoConfig(quant_type), CPU)
    theirs = nn.Sequential(make_linear(shape, 0))
    quantize_(theirs, torchao_config)
    theirs = theirs[0]
    assert type(ours) is type(theirs) and type(ours.weight) is type(theirs.weight)
    assert ours.weight.shape == theirs.weight.shape and ours.out_features == theirs.out_features
    assert ours.weight.__tensor_flatten__()[1] == theirs.weight.__tensor_flatten__()[1]
    expected = inner_tensors(theirs.weight)
    for name, tensor in inner_tensors(ours.weight).items():
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(ours.bias, theirs.bias)
    inputs = torch.randn(3, shape[1], dtype=torch.bfloat16)
    assert torch.equal(ours(inputs), theirs(inputs))


# (160, 256), (208, 384): groups of 128 in bfloat16, which quanto packs for its tinygemm kernel, in blocks of whole
# tiles of rows (64 with AVX512): two full blocks and a shorter one, three full and one of 16 rows
@pytest.mark.parametrize("shape", [*SHAPES, (160, 256), (208, 384)])
@pytest.mark.parametrize("weights_dtype", ["int8", "float8", "int4", "int2"])
def test_quanto(shape, weights_dtype, assert_same_state):
    ours = get_backend("quanto").quantize("layer", make_linear(shape, 1), QuantoConfig(weights_dtype), CPU)
    theirs = quantize_module(make_linear(shape, 1), weights=f"q{weights_dtype}")
    theirs.freeze()
    assert type(ours.weight) is type(theirs.weight)
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_bitsandbytes_int8(shape):
    layer = make_linear(shape, 2)
    ours = get_backend("bitsandbytes_8bit").quantize("layer", layer, BitsAndBytesConfig(load_in_8bit=True), CPU)
    expected, expected_scales, _ = bnb.functional.int8_vectorwise_quant(layer.weight.data.to(torch.float16))
    assert torch.equal(ours.weight.data, expected)
    assert torch.equal(ours.weight.SCB, expected_scales)


def test_quanto_with_float8_activations(assert_same_state):
    config = QuantoConfig(weights_dtype="int8", activations_dtype="float8")
    ours = get_backend("quanto").quantize("layer", make_linear(SHAPES[0], 3), config, CPU)
    theirs = quantize_module(make_linear(SHAPES[0], 3), weights="qint8", activations="qfloat8")
    theirs.freeze()
    assert ours.weight.activation_qtype is theirs.weight.activation_qtype
    assert_same_state(ours, theirs)
    inputs = torch.randn(3, SHAPES[0][1], dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(inputs), theirs(inputs))
