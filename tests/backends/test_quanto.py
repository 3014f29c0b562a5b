"""optimum-quanto through the public API on CPU, and a pipeline mixing quanto, bitsandbytes and torchao."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import bitsandbytes as bnb
import diffusers
import numpy as np
import pytest
import torch
import transformers
from diffusers import DiffusionPipeline, FluxTransformer2DModel
from optimum.quanto import QLinear, QTensor, qtypes, quantize_module
from safetensors import safe_open
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig
from torchao.utils import TorchAOBaseTensor

from pipequant import (
    BitsAndBytesConfig,
    PipelineQuantizationConfig,
    QuantizationConfigError,
    QuantoConfig,
    load_model,
    load_pipeline,
    quantize_pipeline,
)
from pipequant.backends import config_from_dict, get_backend
from pipequant.streaming import return_freed_memory
from pipequant.testing.memory import PeakSampler, anonymous_bytes

MODELS = {"flux": ("transformer", "text_encoder", "text_encoder_2"), "sd": ("unet", "text_encoder")}
#: flux loads in bfloat16 (quanto's tinygemm int4 path), sd in float32 (its generic packed path)
DTYPES = {"flux": torch.bfloat16, "sd": torch.float32}
BITS = {"int8": 8, "float8": 8, "int4": 4, "int2": 2}
LAYER = "transformer_blocks.0.attn.to_q"


def qlinears(model: nn.Module) -> dict[str, QLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def plain_linears(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if type(m) is nn.Linear}


def stored_linear(folder: Path, name: str, dtype: torch.dtype) -> nn.Linear:
    """The layer `name` exactly as stored, as a plain full-precision nn.Linear."""
    with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as handle:
        weight, bias = handle.get_tensor(f"{name}.weight"), handle.get_tensor(f"{name}.bias")
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    layer.load_state_dict({"weight": weight, "bias": bias})
    return layer


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("weights_dtype", BITS)
def test_pipeline_loads_quantized_and_generates(request, kind, weights_dtype, generate):
    components = MODELS[kind]
    config = PipelineQuantizationConfig(
        quant_backend="quanto", quant_kwargs={"weights_dtype": weights_dtype}, components_to_quantize=list(components)
    )
    pipe = load_pipeline(request.getfixturevalue(f"{kind}_path"), quantization_config=config, torch_dtype=DTYPES[kind])
    for name in components:
        model = getattr(pipe, name)
        layers = qlinears(model)
        assert layers, name
        assert all(
            m.weight_qtype == qtypes[f"q{weights_dtype}"] and isinstance(m.weight, QTensor) for m in layers.values()
        )
        assert all(m.activation_qtype is None for m in layers.values())
        # every linear layer is quantized but those T5 keeps in float32
        assert all(layer.rsplit(".", 1)[-1] == "wo" for layer in plain_linears(model)), name
    assert not qlinears(pipe.vae)
    image = generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_float8_activations_from_a_transformers_config(flux_path, generate):
    config = PipelineQuantizationConfig(
        quant_mapping={"transformer": transformers.QuantoConfig(weights="int8", activations="float8")}
    )
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    layers = qlinears(pipe.transformer)
    assert layers and all(m.activation_qtype == qtypes["qfloat8"] for m in layers.values())
    assert np.isfinite(generate(pipe)).all()


def test_modules_to_not_convert_from_a_diffusers_config(flux_path):
    excluded = ["proj_out", "transformer_blocks.*.ff"]
    config = PipelineQuantizationConfig(
        quant_mapping={"transformer": diffusers.QuantoConfig(weights_dtype="int4", modules_to_not_convert=excluded)}
    )
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    plain = plain_linears(pipe.transformer)
    assert "proj_out" in plain and {"transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.0.proj"} <= plain
    assert "transformer_blocks.0.ff_context.net.2" in qlinears(pipe.transformer)
    assert all(m.weight_qtype == qtypes["qint4"] for m in qlinears(pipe.transformer).values())


def test_mixed_backends_in_one_load(flux_path, generate):
    config = PipelineQuantizationConfig(
        quant_mapping={
            "transformer": QuantoConfig(weights_dtype="int8"),
            "text_encoder_2": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
            "text_encoder": transformers.TorchAoConfig(Int8WeightOnlyConfig()),
        }
    )
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    assert qlinears(pipe.transformer) and not plain_linears(pipe.transformer)
    t5 = [m for m in pipe.text_encoder_2.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert t5 and not qlinears(pipe.text_encoder_2)
    clip = [m for m in pipe.text_encoder.modules() if type(m) is nn.Linear]
    assert clip and all(isinstance(m.weight, TorchAOBaseTensor) for m in clip)
    image = generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("weights_dtype", BITS)
def test_quantized_layer_equals_quanto_applied_to_the_same_layer(flux_path, weights_dtype, assert_same_state):
    folder = flux_path / "transformer"
    model = load_model(FluxTransformer2DModel, folder, QuantoConfig(weights_dtype), torch_dtype=torch.bfloat16)
    ours = model.get_submodule(LAYER)
    theirs = quantize_module(stored_linear(folder, LAYER, torch.bfloat16), weights=f"q{weights_dtype}")
    theirs.freeze()
    assert type(ours) is type(theirs) and type(ours.weight) is type(theirs.weight)
    assert_same_state(ours, theirs)
    # real storage: the packed bits plus scales (and shifts), not two bytes per bfloat16 weight
    packed = ours.weight.numel() * BITS[weights_dtype] / 8
    assert packed < get_backend("quanto").layer_nbytes(ours) < 1.2 * packed + ours.bias.numel() * 2 + 4


def test_quantize_pipeline_in_memory_gives_the_same_layers(flux_path, assert_same_state):
    config = PipelineQuantizationConfig(
        quant_backend="quanto", quant_kwargs={"weights_dtype": "int4"}, components_to_quantize=["transformer"]
    )
    streamed = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    in_memory = quantize_pipeline(DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16), config)
    assert qlinears(streamed.transformer).keys() == qlinears(in_memory.transformer).keys()
    assert_same_state(streamed.transformer, in_memory.transformer)


@pytest.mark.parametrize(
    ("make_config", "message"),
    [
        (lambda: QuantoConfig(weights_dtype="int3"), r"weights_dtype='int3'.*use one of int2, int4, int8, float8"),
        (
            lambda: QuantoConfig(activations_dtype="int8"),
            r"activations_dtype='int8' needs activation scales calibrated",
        ),
        (
            lambda: PipelineQuantizationConfig(
                quant_mapping={"transformer": transformers.QuantoConfig(activations="int8")}
            ),
            r"needs activation scales calibrated",
        ),
        (lambda: QuantoConfig(weights_dtype="int4", weights="int2"), r"disagree; give only weights_dtype"),
        (
            lambda: PipelineQuantizationConfig(quant_backend="quanto", quant_kwargs={"weight_dtype": "int4"}),
            r"no option 'weight_dtype'\. Did you mean 'weights_dtype'\?",
        ),
    ],
)
def test_bad_config_is_refused_when_constructed(make_config, message):
    with pytest.raises(QuantizationConfigError, match=message):
        make_config()


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        (
            QuantoConfig("int2", modules_to_not_convert=["proj_out"]).to_dict(),
            QuantoConfig("int2", modules_to_not_convert=["proj_out"]),
        ),
        (diffusers.QuantoConfig(weights_dtype="int4").to_dict(), QuantoConfig("int4")),
        (transformers.QuantoConfig(weights="float8", activations="float8").to_dict(), QuantoConfig("float8", "float8")),
    ],
)
def test_saved_quantization_config_reads_back(saved, expected):
    """A component's config.json `quantization_config`, as pipequant, diffusers or transformers write it."""
    assert config_from_dict(json.loads(json.dumps(saved)), context="config.json") == expected


def test_int4_quantizes_a_big_layer_without_whole_weight_temporaries():
    """quanto's own int4 in bfloat16 makes one byte per code and an int32 copy of the whole weight (2.5 times the
    layer's bytes) before packing; the backend packs a block of rows at a time, so its peak stays below the layer's
    size (the packed weight is a quarter of it, one block's temporaries a few MB)."""
    rows, columns = 4096, 8192
    layer = nn.Linear(columns, rows, dtype=torch.bfloat16, device="meta")
    layer.weight = nn.Parameter(torch.randn(rows, columns, dtype=torch.bfloat16), requires_grad=False)
    layer.bias = nn.Parameter(torch.zeros(rows, dtype=torch.bfloat16), requires_grad=False)
    layer_nbytes = layer.weight.nbytes
    gc.collect()
    return_freed_memory()
    before = anonymous_bytes()
    with PeakSampler(interval=0.001) as sampler:
        quantized = get_backend("quanto").quantize("layer", layer, QuantoConfig("int4"), torch.device("cpu"))
    assert type(quantized.weight).__name__ == "TinyGemmWeightQBitsTensor"
    assert sampler.peak - before < 0.9 * layer_nbytes
