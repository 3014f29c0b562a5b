"""torchao through the public API on CPU: which layers it takes, equality with torchao itself, errors before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from diffusers import DiffusionPipeline, FluxTransformer2DModel
from safetensors import safe_open
from torch import nn
from torchao.quantization import (
    Float8WeightOnlyConfig,
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    quantize_,
)
from torchao.quantization.granularity import PerGroup
from torchao.quantization.quant_primitives import MappingType
from torchao.utils import TorchAOBaseTensor

from pipequant import (
    PipelineQuantizationConfig,
    QuantizationConfigError,
    TorchAoConfig,
    load_model,
    load_pipeline,
    quantize_pipeline,
)
from pipequant.backends import config_from_dict, get_backend

MODELS = {"flux": ("transformer", "text_encoder", "text_encoder_2"), "sd": ("unet", "text_encoder")}
#: the torchao tensor each CPU type leaves in a layer, and the dtype of its quantized data
CPU_TYPES = {
    "int8wo": ("Int8Tensor", torch.int8),
    "int8dq": ("Int8Tensor", torch.int8),
    "float8wo": ("Float8Tensor", torch.float8_e5m2),  # diffusers' float8wo means e5m2
}
LAYER = "transformer_blocks.0.attn.to_q"


def simple_config(quant_type: str, components, **options) -> PipelineQuantizationConfig:
    return PipelineQuantizationConfig(
        quant_backend="torchao", quant_kwargs={"quant_type": quant_type, **options}, components_to_quantize=components
    )


def torchao_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), TorchAOBaseTensor)}


def plain_linears(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if type(m) is nn.Linear and name not in torchao_layers(model)}


def inner_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    names, _ = weight.__tensor_flatten__()
    return {name: getattr(weight, name) for name in names}


def stored_linear(folder: Path, name: str, dtype: torch.dtype) -> nn.Linear:
    """The layer `name` exactly as stored, as a plain full-precision nn.Linear."""
    with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as handle:
        weight, bias = handle.get_tensor(f"{name}.weight"), handle.get_tensor(f"{name}.bias")
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    layer.load_state_dict({"weight": weight, "bias": bias})
    return layer


@pytest.fixture(scope="module")
def unreadable_flux(flux_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Flux folder with every weight file emptied: reading any weight fails."""
    folder = tmp_path_factory.mktemp("unreadable") / "flux"
    shutil.copytree(flux_path, folder)
    for path in folder.rglob("*.safetensors"):
        path.write_bytes(b"")
    return folder


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("quant_type", CPU_TYPES)
def test_pipeline_loads_quantized_and_generates(request, kind, quant_type, generate):
    components = MODELS[kind]
    config = simple_config(quant_type, list(components))
    pipe = load_pipeline(
        request.getfixturevalue(f"{kind}_path"), quantization_config=config, torch_dtype=torch.bfloat16
    )
    tensor_class, data_dtype = CPU_TYPES[quant_type]
    for name in components:
        model = getattr(pipe, name)
        layers = torchao_layers(model)
        assert layers, name
        assert all(
            type(m.weight).__name__ == tensor_class and m.weight.qdata.dtype == data_dtype for m in layers.values()
        )
        # every linear layer is quantized but those T5 keeps in float32
        assert all(layer.rsplit(".", 1)[-1] == "wo" for layer in plain_linears(model)), name
    if quant_type == "int8dq":  # activations are quantized too
        assert all(m.weight.act_quant_kwargs is not None for m in torchao_layers(getattr(pipe, components[0])).values())
    assert not torchao_layers(pipe.vae)
    image = generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_modules_to_not_convert_from_a_diffusers_config(flux_path):
    excluded = ["x_embedder", "single_transformer_blocks.0"]
    config = PipelineQuantizationConfig(
        quant_mapping={"transformer": diffusers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=excluded)}
    )
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    plain = plain_linears(pipe.transformer)
    block0 = {n for n, m in pipe.transformer.single_transformer_blocks[0].named_modules() if type(m) is nn.Linear}
    assert "x_embedder" in plain and {f"single_transformer_blocks.0.{n}" for n in block0} <= plain
    assert not any(name.startswith("single_transformer_blocks.1") for name in plain)
    assert "context_embedder" in torchao_layers(pipe.transformer)
    assert not torchao_layers(pipe.text_encoder)


@pytest.mark.parametrize(
    ("quant_type", "torchao_config"),
    [
        ("int8wo", Int8WeightOnlyConfig()),
        ("int8dq", Int8DynamicActivationInt8WeightConfig()),
        ("float8wo", Float8WeightOnlyConfig(weight_dtype=torch.float8_e5m2)),
        ("uint4wo", IntxWeightOnlyConfig(torch.int4, PerGroup(64), MappingType.ASYMMETRIC)),
        ("int4dq", Int8DynamicActivationIntxWeightConfig(torch.int4, PerGroup(32))),
    ],
)
def test_quantized_weight_equals_torchao_applied_to_the_same_layer(flux_path, quant_type, torchao_config):
    folder = flux_path / "transformer"
    model = load_model(FluxTransformer2DModel, folder, TorchAoConfig(quant_type), torch_dtype=torch.bfloat16)
    ours = model.get_submodule(LAYER)
    theirs = stored_linear(folder, LAYER, torch.bfloat16)
    quantize_(theirs, torchao_config)
    assert type(ours.weight) is type(theirs.weight)
    expected = inner_tensors(theirs.weight)
    assert inner_tensors(ours.weight).keys() == expected.keys()
    for name, tensor in inner_tensors(ours.weight).items():
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(ours.bias, theirs.bias)
    # real storage: one byte per weight (torchao 0.18 keeps int4 unpacked in int8) plus small scales
    weights = ours.weight.numel()
    assert weights < get_backend("torchao").layer_nbytes(ours) < 1.1 * weights + ours.bias.numel() * 2


def test_quantize_pipeline_in_memory_gives_the_same_layers(flux_path):
    config = simple_config("int8dq", ["transformer", "text_encoder"])
    streamed = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    in_memory = quantize_pipeline(DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16), config)
    for component in ("transformer", "text_encoder"):
        ours = torchao_layers(getattr(streamed, component))
        theirs = torchao_layers(getattr(in_memory, component))
        assert ours.keys() == theirs.keys()
        for name, layer in ours.items():
            expected = inner_tensors(theirs[name].weight)
            assert all(torch.equal(t, expected[k]) for k, t in inner_tensors(layer.weight).items()), name


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (simple_config("int4wo", ["transformer"]), r"'int4wo' cannot run on cpu.*Nearest that runs on cpu: 'uint4wo'"),
        (simple_config("float8dq", ["transformer"]), r"'float8dq' cannot run on cpu.*Nearest.*'float8wo'"),
        (
            PipelineQuantizationConfig(
                quant_mapping={"transformer": TorchAoConfig(Int4WeightOnlyConfig(group_size=64))}
            ),
            r"'Int4WeightOnlyConfig' cannot run on cpu.*Types that run on cpu: int8wo",
        ),
    ],
)
def test_type_that_cannot_run_on_the_device_fails_before_any_weight_is_read(unreadable_flux, config, message):
    with pytest.raises(QuantizationConfigError, match=message):
        load_pipeline(unreadable_flux, quantization_config=config)


@pytest.mark.parametrize(
    ("make_config", "message"),
    [
        (
            lambda: simple_config("int8w", ["transformer"]),
            r"Unknown torchao quant_type 'int8w'\. Did you mean 'int8wo'\?",
        ),
        (
            lambda: simple_config("int4wo", ["transformer"], grup_size=64),
            r"no option 'grup_size'\. Did you mean 'group_size'\?",
        ),
        (lambda: simple_config("uint4wo", ["transformer"], granularity="row"), r"torchao rejects quant_type 'uint4wo'"),
        (lambda: TorchAoConfig(Int8WeightOnlyConfig(), group_size=64), r"go into the torchao object itself"),
        (lambda: TorchAoConfig(FqnToConfig()), r"one config per component"),
        (
            lambda: PipelineQuantizationConfig(
                quant_mapping={
                    "text_encoder": transformers.TorchAoConfig(
                        Int8WeightOnlyConfig(), include_input_output_embeddings=True
                    )
                }
            ),
            r"linear layers only",
        ),
    ],
)
def test_bad_config_is_refused_when_constructed(make_config, message):
    with pytest.raises(QuantizationConfigError, match=message):
        make_config()


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        (  # the name form pipequant wrote before it wrote diffusers' form
            {
                "quant_method": "torchao",
                "quant_type": "uint4wo",
                "quant_type_kwargs": {"group_size": 32},
                "modules_to_not_convert": None,
            },
            TorchAoConfig("uint4wo", group_size=32),
        ),
        (TorchAoConfig(Int8WeightOnlyConfig()).to_dict(), TorchAoConfig(Int8WeightOnlyConfig())),
        (
            diffusers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["proj_out"]).to_dict(),
            TorchAoConfig(Int8WeightOnlyConfig(), ["proj_out"]),
        ),
        (transformers.TorchAoConfig(Float8WeightOnlyConfig()).to_dict(), TorchAoConfig(Float8WeightOnlyConfig())),
    ],
)
def test_saved_quantization_config_reads_back(saved, expected):
    """A component's config.json `quantization_config`, as pipequant, diffusers or transformers write it."""
    assert config_from_dict(json.loads(json.dumps(saved)), context="config.json") == expected


def test_a_named_type_is_saved_as_the_torchao_object_it_applies():
    """to_dict writes diffusers' form; reading it back applies the same torchao config as the name did."""
    config = TorchAoConfig("uint4wo", group_size=32, modules_to_not_convert=["proj_out"])
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved == diffusers.TorchAoConfig(config.torchao_config(), modules_to_not_convert=["proj_out"]).to_dict()
    restored = config_from_dict(saved, context="config.json")
    assert restored.torchao_config() == config.torchao_config() and restored.differences(config) == []
