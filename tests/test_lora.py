"""LoRA on every backend through diffusers' API: unfused beside the quantized layer, fused by requantizing, unfused
back to the quantized bytes, unloaded back to the original image."""

from __future__ import annotations

import re
from collections import defaultdict

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
#: diffusers' layer name pattern -> the layer's name in the original (BFL) Flux, for the layers LoRA "b" holds. Kohya's
#: sd-scripts files spell it `lora_unet_` + the name with underscores, ComfyUI's `diffusion_model.` + the name; to_q,
#: to_k and to_v are one fused qkv layer there
BFL_NAMES = {
    r"transformer_blocks\.(\d+)\.attn\.to_[qkv]": r"double_blocks.\1.img_attn.qkv",
    r"transformer_blocks\.(\d+)\.attn\.to_out\.0": r"double_blocks.\1.img_attn.proj",
    r"transformer_blocks\.(\d+)\.ff\.net\.2": r"double_blocks.\1.img_mlp.2",
    r"single_transformer_blocks\.(\d+)\.proj_out": r"single_blocks.\1.linear2",
}
SPELLINGS = {
    "kohya": lambda bfl: "lora_unet_" + bfl.replace(".", "_"),
    "bfl": lambda bfl: "diffusion_model." + bfl,
}


def bfl_state(made: dict[str, torch.Tensor], spell) -> dict[str, torch.Tensor]:
    """peft's state dict (q, k and v sharing their lora_A) in BFL layer names spelled by `spell`, with kohya's
    lora_down / lora_up / alpha, q, k and v fused into one qkv layer (their lora_up stacked): what diffusers'
    converters read back into the same LoRA."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, list[torch.Tensor]] = defaultdict(list)
    for key, tensor in made.items():
        layer, _, kind = key.removesuffix(".weight").rpartition(".")
        pattern, bfl = next((p, b) for p, b in BFL_NAMES.items() if re.fullmatch(p, layer))
        name = spell(re.sub(pattern, bfl, layer))
        if kind == "lora_A":
            assert torch.equal(downs.setdefault(name, tensor), tensor)  # q, k and v share it
        else:
            ups[name].append(tensor)
    state = {}
    for name, down in downs.items():
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.cat(ups[name])}
        state[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return state


@pytest.fixture(scope="module")
def loras(flux_path, tmp_path_factory) -> dict:
    """Rank-4 LoRAs with random weights for the tiny Flux transformer, made by peft: "a" saved by diffusers (a folder);
    "b" as a diffusers-named state dict and the same LoRA as a kohya file and a BFL-named (ComfyUI) file."""
    folder = tmp_path_factory.mktemp("loras")
    pipe = FluxPipeline.from_pretrained(flux_path, torch_dtype=torch.bfloat16)
    targets = {"a": DIFFUSERS_TARGETS, "b": "|".join(BFL_NAMES)}
    made = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=targets[name])
        pipe.transformer.add_adapter(config, adapter_name=name)
        state = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
        made[name] = {key: value * 2 for key, value in state.items()}  # a LoRA that changes the image clearly
    for key in [key for key in made["b"] if re.search(r"to_[kv]\.lora_A", key)]:
        made["b"][key] = made["b"][re.sub(r"to_[kv]\.", "to_q.", key)]  # one lora_A for q, k and v, as a fused qkv
    FluxPipeline.save_lora_weights(folder / "a", transformer_lora_layers=made["a"])
    files = {"a": folder / "a", "b": {f"transformer.{key}": value for key, value in made["b"].items()}}
    for spelling, spell in SPELLINGS.items():
        files[f"b-{spelling}"] = folder / f"{spelling}.safetensors"
        save_file(bfl_state(made["b"], spell), files[f"b-{spelling}"])
        # 3 tensors for each of 3 layers in each of 2 double blocks and 1 in each of 2 single blocks
        assert len(load_file(files[f"b-{spelling}"])) == (3 + 1) * 2 * 3
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


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def quantized_pipeline(path, config, dtype: torch.dtype = torch.bfloat16, component: str = "transformer"):
    return load_pipeline(
        path, quantization_config=PipelineQuantizationConfig(quant_mapping={component: config}), torch_dtype=dtype
    )


@pytest.mark.slow
def test_lora_loads_fuses_unfuses_and_unloads(flux_path, loras, generate, each_backend):
    pipe = quantized_pipeline(flux_path, each_backend)
    before = quantized_state(pipe.transformer)
    original = generate(pipe)

    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.load_lora_weights(loras["b-kohya"], adapter_name="b")
    assert isinstance(pipe.transformer.proj_out, QuantizedLoraLinear)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.25])
    half = generate(pipe)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    unfused = generate(pipe)
    lora_effect = mean_difference(unfused, original)
    assert lora_effect > 0.05 and mean_difference(half, unfused) > 0.25 * lora_effect

    pipe.fuse_lora(components=["transformer"], adapter_names=["a", "b"], lora_scale=0.5)
    assert pipe.transformer.proj_out.merged
    fused = generate(pipe)
    # fusing quantizes weight + delta again: the backend's rounding, far below what the LoRA changes
    assert mean_difference(fused, half) < 0.25 * mean_difference(half, original)
    assert quantized_state(pipe.transformer).keys() == before.keys()

    pipe.unfuse_lora(components=["transformer"])
    after = quantized_state(pipe.transformer)
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])  # fuse_lora's lora_scale stays on the layers
    assert np.array_equal(generate(pipe), unfused)

    pipe.delete_adapters("b")
    pipe.unload_lora_weights()
    assert not isinstance(pipe.transformer.proj_out, QuantizedLoraLinear)
    assert np.array_equal(generate(pipe), original)


@pytest.mark.slow
def test_kohya_and_bfl_named_loras_give_the_diffusers_named_lora_image(flux_path, loras, generate, each_backend):
    """diffusers' converters turn kohya's and BFL's names (a fused qkv layer included) into the diffusers-named
    LoRA: the same adapter, so the same image, on every backend."""
    pipe = quantized_pipeline(flux_path, each_backend)
    images = {"none": generate(pipe)}
    for name in ("b", "b-kohya", "b-bfl"):
        pipe.load_lora_weights(loras[name], adapter_name=name)
        pipe.set_adapters(name)
        images[name] = generate(pipe)
    assert mean_difference(images["b"], images["none"]) > 0.01  # a LoRA that shows
    assert np.array_equal(images["b-kohya"], images["b"]) and np.array_equal(images["b-bfl"], images["b"])


def test_fuse_lora_scale_scales_the_fused_delta(flux_path, loras, generate):
    pipe = quantized_pipeline(flux_path, GGUFQuantizationConfig(quant_type="Q8_0"), torch.float32)
    before = quantized_state(pipe.transformer)
    original = generate(pipe)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.fuse_lora(components=["transformer"], lora_scale=0.0)  # Q8_0 of dequantized Q8_0 weights: the same bytes
    after = quantized_state(pipe.transformer)
    assert all(torch.equal(after[key], before[key]) for key in before)
    pipe.unfuse_lora(components=["transformer"])

    pipe.set_adapters("a", adapter_weights=0.5)
    half = generate(pipe)
    pipe.set_adapters("a", adapter_weights=1.0)
    pipe.fuse_lora(components=["transformer"], lora_scale=0.5)
    assert mean_difference(generate(pipe), half) < 0.25 * mean_difference(half, original)


def test_quanto_flux_lora_narrower_than_its_layer_is_zero_padded(flux_path, generate):
    """As diffusers pads a LoRA narrower than its layer (a Flux LoRA on Flux Control's wider x_embedder), with the
    width read from the quanto layer: a quanto model's state dict has no `x_embedder.weight`."""
    pipe = quantized_pipeline(flux_path, QuantoConfig())
    layer = pipe.transformer.x_embedder
    torch.manual_seed(0)
    lora_a, lora_b = torch.randn(4, layer.in_features - 8), torch.randn(layer.out_features, 4)
    padded = torch.cat([lora_a, torch.zeros(4, 8)], 1)
    images = {}
    for name, down in (("narrow", lora_a), ("padded", padded)):
        state = {"transformer.x_embedder.lora_A.weight": down, "transformer.x_embedder.lora_B.weight": lora_b}
        pipe.load_lora_weights(state, adapter_name=name)
        pipe.set_adapters(name)
        images[name] = generate(pipe)
    assert np.array_equal(images["narrow"], images["padded"])


@pytest.fixture(scope="module")
def sd_lora(sd_path, tmp_path_factory):
    """A rank-4 LoRA with random weights for the tiny SD UNet's attention, made by peft and saved by diffusers."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd_path)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    reference.unet.add_adapter(config)
    state = {key: value * 2 for key, value in get_peft_model_state_dict(reference.unet).items()}
    folder = tmp_path_factory.mktemp("sd_lora")
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
    return folder


@pytest.mark.slow
def test_lora_fuses_right_on_an_sd_unet(sd_path, sd_lora, generate, each_backend):
    """The UNet loader (no Flux width check) on every backend; quanto's own fuse through peft would add the delta to
    the packed data (a 0.55 relative error here)."""
    pipe = quantized_pipeline(sd_path, each_backend, torch.float32, component="unet")
    before = quantized_state(pipe.unet)
    original = generate(pipe)
    pipe.load_lora_weights(sd_lora, adapter_name="sd")
    unfused = generate(pipe)
    pipe.fuse_lora()
    # on the tiny UNet, bitsandbytes' 4-bit codes round weight + delta to 0.4 of the random LoRA's effect
    assert mean_difference(generate(pipe), unfused) < 0.5 * mean_difference(unfused, original)
    pipe.unfuse_lora()
    after = quantized_state(pipe.unet)
    assert before and all(torch.equal(after[key], before[key]) for key in before)
    pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe), original)
