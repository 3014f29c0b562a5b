"""LoRA on every backend through diffusers' API: unfused beside the quantized layer, fused by requantizing, unfused
back to the quantized bytes, unloaded back to the original image."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from pipequant import GGUFQuantizationConfig, PipelineQuantizationConfig, QuantoConfig, load_pipeline
from pipequant.backends import backend_for
from pipequant.lora import QuantizedLoraLinear
from pipequant.quantizing import LAYER_CONFIG_ATTRIBUTE

DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"]
#: diffusers' layer name pattern -> kohya's (sd-scripts) name for the layers a kohya file of the tiny Flux holds
KOHYA_NAMES = {
    r"transformer_blocks\.(\d+)\.attn\.to_out\.0": r"lora_unet_double_blocks_\1_img_attn_proj",
    r"transformer_blocks\.(\d+)\.ff\.net\.2": r"lora_unet_double_blocks_\1_img_mlp_2",
    r"single_transformer_blocks\.(\d+)\.proj_out": r"lora_unet_single_blocks_\1_linear2",
}


def kohya_state(made: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's state dict in kohya's names (lora_down / lora_up / alpha), which diffusers' converter reads back."""
    state = {}
    for key, tensor in made.items():
        layer, _, kind = key.removesuffix(".weight").rpartition(".")
        for pattern, kohya in KOHYA_NAMES.items():
            if re.fullmatch(pattern, layer):
                name = re.sub(pattern, kohya, layer)
                state[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = tensor
                state[f"{name}.alpha"] = torch.tensor(4.0)
    return state


@pytest.fixture(scope="module")
def lora_files(flux_path, tmp_path_factory) -> dict:
    """Two rank-4 LoRAs with random weights for the tiny Flux transformer, made by peft: "a" saved by diffusers,
    "b" in kohya's names."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = FluxPipeline.from_pretrained(flux_path, torch_dtype=torch.bfloat16)
    targets = {"a": DIFFUSERS_TARGETS, "b": "|".join(KOHYA_NAMES)}
    files = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets[name])
        pipe.transformer.add_adapter(config, adapter_name=name)
        made = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
        state = {key: value * 2 for key, value in made.items()}  # a LoRA that changes the image clearly
        if name == "a":
            FluxPipeline.save_lora_weights(folder / name, transformer_lora_layers=state)
            files[name] = folder / name
        else:
            files[name] = folder / "kohya.safetensors"
            save_file(kohya_state(state), files[name])
            assert len(load_file(files[name])) == 3 * 3 * 2  # 3 tensors for each of 2 + 2 + 2 layers
    return files


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's stored tensors by the layer's name without peft's wrapper (`.base_layer`)."""
    state = {}
    for name, module in model.named_modules():
        config = getattr(module, LAYER_CONFIG_ATTRIBUTE, None)
        if config is not None:
            for key, tensor in backend_for(config).save_layer(module).tensors.items():
                state[f"{name.replace('.base_layer', '')}.{key}"] = tensor.clone()
    return state


def load_lora(pipe, path, adapter_name: str) -> None:
    """`pipe.load_lora_weights`, but for GGUF and quanto: diffusers' Flux loader compares each LoRA with the layer's
    stored weight shape, which a GGUF layer holds as bytes and quanto as `weight._data`, and fails (diffusers' own
    GGUF weights pass by their class name, its quanto ones fail the same way). The component's own loader takes the
    state dict the pipeline's converters made, without that comparison."""
    if isinstance(pipe.transformer.pipequant_record.config, (GGUFQuantizationConfig, QuantoConfig)):
        state = pipe.lora_state_dict(path)
        pipe.transformer.load_lora_adapter(state, prefix="transformer", adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(path, adapter_name=adapter_name)


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


@pytest.mark.slow
def test_lora_loads_fuses_unfuses_and_unloads(flux_path, lora_files, generate, each_backend):
    config = PipelineQuantizationConfig(quant_mapping={"transformer": each_backend})
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    before = quantized_state(pipe.transformer)
    original = generate(pipe)

    load_lora(pipe, lora_files["a"], "a")
    load_lora(pipe, lora_files["b"], "b")
    assert isinstance(pipe.transformer.proj_out, QuantizedLoraLinear)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    unfused = generate(pipe)
    lora_effect = mean_difference(unfused, original)
    assert lora_effect > 0.05

    pipe.fuse_lora(components=["transformer"], adapter_names=["a", "b"])
    assert pipe.transformer.proj_out.merged
    fused = generate(pipe)
    # fusing quantizes weight + delta again: the backend's rounding, far below what the LoRA changes
    assert mean_difference(fused, unfused) < 0.25 * lora_effect
    assert quantized_state(pipe.transformer).keys() == before.keys()

    pipe.unfuse_lora(components=["transformer"])
    after = quantized_state(pipe.transformer)
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    assert np.array_equal(generate(pipe), unfused)

    pipe.delete_adapters("b")
    pipe.unload_lora_weights()
    assert not isinstance(pipe.transformer.proj_out, QuantizedLoraLinear)
    assert np.array_equal(generate(pipe), original)


def test_fuse_lora_scale_scales_the_fused_delta(flux_path, lora_files, generate):
    config = PipelineQuantizationConfig(quant_mapping={"transformer": GGUFQuantizationConfig(quant_type="Q8_0")})
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.float32)
    before = quantized_state(pipe.transformer)
    original = generate(pipe)
    load_lora(pipe, lora_files["a"], "a")
    pipe.fuse_lora(components=["transformer"], lora_scale=0.0)  # Q8_0 of dequantized Q8_0 weights: the same bytes
    after = quantized_state(pipe.transformer)
    assert all(torch.equal(after[key], before[key]) for key in before)
    pipe.unfuse_lora(components=["transformer"])

    pipe.set_adapters("a", adapter_weights=0.5)
    half = generate(pipe)
    pipe.set_adapters("a", adapter_weights=1.0)
    pipe.fuse_lora(components=["transformer"], lora_scale=0.5)
    assert mean_difference(generate(pipe), half) < 0.25 * mean_difference(half, original)


def test_quanto_lora_fuses_right_on_an_sd_unet(sd_path, generate, tmp_path):
    """quanto's own fuse through peft adds the delta to the packed data (a 0.55 relative error here)."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd_path)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    reference.unet.add_adapter(config)
    state = {key: value * 2 for key, value in get_peft_model_state_dict(reference.unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state)

    pipe = load_pipeline(sd_path, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": QuantoConfig()}))
    before = quantized_state(pipe.unet)
    original = generate(pipe)
    pipe.load_lora_weights(tmp_path, adapter_name="sd")
    unfused = generate(pipe)
    pipe.fuse_lora()
    assert mean_difference(generate(pipe), unfused) < 0.25 * mean_difference(unfused, original)
    pipe.unfuse_lora()
    after = quantized_state(pipe.unet)
    assert all(torch.equal(after[key], before[key]) for key in before)
