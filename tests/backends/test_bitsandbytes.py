"""The bitsandbytes backends: their config, the bytes they make (bitsandbytes' own), and interop with
transformers' and diffusers' bitsandbytes folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import diffusers
import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers import T5EncoderModel

from pipequant import (
    BitsAndBytesConfig,
    PipelineQuantizationConfig,
    QuantizationConfigError,
    load_model,
    load_pipeline,
    save_model,
)

MODELS = ["transformer", "text_encoder", "text_encoder_2", "vae"]
OTHERS = ["tokenizer", "tokenizer_2", "scheduler"]
MODES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
    "int8": {"load_in_8bit": True},
}


def linears(module: nn.Module, kind: type) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, kind)}


def stored_tensor(folder, key: str) -> torch.Tensor:
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            if key in handle.keys():
                return handle.get_tensor(key)
    raise KeyError(key)


# --- the config ---


def test_bitsandbytes_config_validates_its_values():
    with pytest.raises(QuantizationConfigError, match="exactly one"):
        BitsAndBytesConfig()
    with pytest.raises(QuantizationConfigError, match="nf4, fp4"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")
    with pytest.raises(QuantizationConfigError, match="not a torch dtype"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat17")


def test_compute_dtype_is_honoured_as_the_4bit_compute_dtype():
    assert BitsAndBytesConfig(load_in_4bit=True, compute_dtype=torch.bfloat16).bnb_4bit_compute_dtype is torch.bfloat16
    assert BitsAndBytesConfig(load_in_4bit=True, compute_dtype="float16").bnb_4bit_compute_dtype is torch.float16
    with pytest.raises(QuantizationConfigError, match="disagree"):
        BitsAndBytesConfig(load_in_4bit=True, compute_dtype=torch.float16, bnb_4bit_compute_dtype=torch.bfloat16)


def test_kwargs_that_contradict_the_backend_name_are_an_error():
    with pytest.raises(QuantizationConfigError, match="exactly one of load_in_4bit"):
        PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_8bit": True})
    with pytest.raises(QuantizationConfigError, match="describe 'bitsandbytes_8bit'"):
        PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", quant_kwargs={"load_in_4bit": False, "load_in_8bit": True}
        )


def test_transformers_config_converts_with_every_setting():
    theirs = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["proj_out"],
    )
    config = PipelineQuantizationConfig(quant_mapping={"text_encoder_2": theirs})
    ours = config.resolve(MODELS, OTHERS)["text_encoder_2"]
    assert isinstance(ours, BitsAndBytesConfig)
    assert ours == BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=["proj_out"],
    )
    assert ours.excluded("x.proj_out")


def test_diffusers_config_converts_and_refuses_what_it_cannot_honour():
    ours = PipelineQuantizationConfig(
        quant_mapping={"transformer": diffusers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0)}
    ).quant_mapping["transformer"]
    assert ours.load_in_8bit and ours.llm_int8_threshold == 4.0
    offload = diffusers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    with pytest.raises(QuantizationConfigError, match="llm_int8_enable_fp32_cpu_offload"):
        PipelineQuantizationConfig(quant_mapping={"transformer": offload})


# --- loading: bitsandbytes' own bytes ---


def test_seed_mapping_form_with_our_bitsandbytes_config(flux_path, generate):
    config = PipelineQuantizationConfig(
        quant_mapping={
            "transformer": BitsAndBytesConfig(load_in_8bit=True),
            "text_encoder_2": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
        }
    )
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    assert linears(pipe.transformer, bnb.nn.Linear8bitLt)
    t5_layers = linears(pipe.text_encoder_2, bnb.nn.Linear4bit)
    assert t5_layers and all(m.weight.quant_state.quant_type == "fp4" for m in t5_layers.values())
    assert generate(pipe).shape == (64, 64, 3)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_4bit_bytes_equal_bitsandbytes_own_quantization(flux_path, quant_type, double_quant):
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant},
        components_to_quantize="transformer",
    )
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    key = "transformer_blocks.0.attn.to_q"
    weight = stored_tensor(flux_path / "transformer", f"{key}.weight").to(torch.bfloat16)
    expected, state = bnb.functional.quantize_4bit(weight, quant_type=quant_type, compress_statistics=double_quant)
    layer = pipe.transformer.get_submodule(key)
    ours = layer.state_dict()
    theirs = {"weight": expected, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert sorted(ours) == sorted([*theirs, "bias"])
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_8bit_bytes_equal_bitsandbytes_own_quantization(flux_path):
    config = PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", components_to_quantize="transformer")
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.float16)
    key = "single_transformer_blocks.1.proj_out"
    weight = stored_tensor(flux_path / "transformer", f"{key}.weight").to(torch.float16)
    reference = bnb.nn.Linear8bitLt(*weight.shape[::-1], bias=True, has_fp16_weights=False)
    reference.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    reference = reference.to("cpu")  # bitsandbytes quantizes on this move
    layer = pipe.transformer.get_submodule(key)
    assert torch.equal(layer.weight.data, reference.weight.data)
    assert torch.equal(layer.weight.SCB, reference.weight.SCB)


# --- saved folders: transformers' and diffusers' format ---


def quantized_t5(flux_path: Path, mode: str) -> T5EncoderModel:
    return load_model(T5EncoderModel, flux_path / "text_encoder_2", BitsAndBytesConfig(**MODES[mode]))


def stored_keys(folder: Path) -> set[str]:
    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            keys.update(handle.keys())
    return keys


IDS = torch.tensor([[5, 17, 42, 99, 1]])
TRANSFORMERS_CONFIGS = {
    "nf4": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    ),
    "int8": transformers.BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_transformers_loads_our_saved_text_encoder(
    flux_path: Path, tmp_path: Path, mode: str, assert_same_state
) -> None:
    ours = quantized_t5(flux_path, mode)
    folder = save_model(ours, tmp_path / "t5")
    theirs = T5EncoderModel.from_pretrained(folder)  # transformers 5 runs bitsandbytes on CPU
    layer = theirs.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(layer, bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit)
    assert_same_state(ours, theirs)
    # the same bytes; bitsandbytes' own repacked CPU kernel (which transformers' layers use) rounds differently
    torch.testing.assert_close(theirs(IDS).last_hidden_state, ours(IDS).last_hidden_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_we_load_what_transformers_saves(flux_path: Path, tmp_path: Path, mode: str, assert_same_state) -> None:
    theirs = T5EncoderModel.from_pretrained(
        flux_path / "text_encoder_2", quantization_config=TRANSFORMERS_CONFIGS[mode]
    )
    theirs.save_pretrained(tmp_path / "theirs")
    save_model(quantized_t5(flux_path, mode), tmp_path / "ours")

    # the same tensor names and the same quantization_config, key for key; a compute dtype left
    # unset stays null in ours (bitsandbytes then follows the input), transformers writes float32
    assert stored_keys(tmp_path / "ours") == stored_keys(tmp_path / "theirs")
    config_of = lambda name: json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]  # noqa: E731
    unset = {"bnb_4bit_compute_dtype": None} if MODES[mode].get("bnb_4bit_compute_dtype") is None else {}
    assert config_of("ours") == {**config_of("theirs"), **unset}

    reloaded = load_model(T5EncoderModel, tmp_path / "theirs")
    assert_same_state(theirs, reloaded)
    assert reloaded.pipequant_record.config.backend_name == f"bitsandbytes_{'8' if mode == 'int8' else '4'}bit"


def test_pipeline_with_a_transformers_saved_component_loads(
    flux_path: Path, tmp_path: Path, assert_same_state, generate
) -> None:
    folder = tmp_path / "pipe"
    shutil.copytree(flux_path, folder)
    shutil.rmtree(folder / "text_encoder_2")
    theirs = T5EncoderModel.from_pretrained(
        flux_path / "text_encoder_2", quantization_config=TRANSFORMERS_CONFIGS["nf4"]
    )
    theirs.save_pretrained(folder / "text_encoder_2")
    pipe = load_pipeline(folder)
    assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)
    assert_same_state(theirs, pipe.text_encoder_2)
    assert generate(pipe).shape == (64, 64, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="diffusers runs bitsandbytes on a GPU")
def test_diffusers_refuses_bitsandbytes_without_a_gpu(flux_path: Path, tmp_path: Path) -> None:
    """Our folders use diffusers' names and config; diffusers 0.42 itself loads bitsandbytes only on a GPU."""
    from diffusers import FluxTransformer2DModel

    ours = load_model(FluxTransformer2DModel, flux_path / "transformer", BitsAndBytesConfig(**MODES["nf4"]))
    folder = save_model(ours, tmp_path / "transformer")
    with pytest.raises(RuntimeError, match="No GPU found"):
        FluxTransformer2DModel.from_pretrained(folder)
