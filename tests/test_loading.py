"""load_pipeline end to end, with bitsandbytes nf4 on CPU as the backend: layers, errors, in-memory equivalence."""

from __future__ import annotations

import shutil

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from torch import nn

from pipequant import (
    CheckpointError,
    PipelineFolderError,
    PipelineQuantizationConfig,
    load_pipeline,
    quantize_pipeline,
)
from pipequant.report import memory_report
from pipequant.testing.fixtures import make_tiny_pipeline

NF4 = PipelineQuantizationConfig(
    quant_backend="bitsandbytes_4bit",
    quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
    components_to_quantize=["transformer", "text_encoder_2"],
)


def linears(module: nn.Module, kind: type) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, kind)}


def test_seed_simple_form_loads_flux_and_generates(flux_path, generate):
    pipe = load_pipeline(flux_path, quantization_config=NF4, torch_dtype=torch.bfloat16)
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.quantization_config is NF4
    quantized = linears(pipe.transformer, bnb.nn.Linear4bit)
    plain = [n for n, m in pipe.transformer.named_modules() if type(m) is nn.Linear]
    assert len(quantized) > 40 and plain == []
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quantized.values())
    assert all(m.compute_dtype is torch.bfloat16 for m in quantized.values())
    assert linears(pipe.text_encoder_2, bnb.nn.Linear4bit)
    assert not linears(pipe.text_encoder, bnb.nn.Linear4bit)  # not named in the config
    image = generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_unet_pipeline_loads_quantized_and_generates(sd_path, generate):
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
        components_to_quantize=["unet", "text_encoder"],
    )
    pipe = load_pipeline(sd_path, quantization_config=config, torch_dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    layers = linears(pipe.unet, bnb.nn.Linear4bit)
    assert layers and all(m.weight.quant_state.nested for m in layers.values())
    assert linears(pipe.text_encoder, bnb.nn.Linear4bit)
    assert generate(pipe).shape[2] == 3


def test_modules_to_not_convert_layers_stay_full_precision(flux_path):
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"modules_to_not_convert": ["proj_out", "single_transformer_blocks.*.proj_mlp", "ff"]},
        components_to_quantize="transformer",
    )
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    plain = {n for n, m in pipe.transformer.named_modules() if type(m) is nn.Linear}
    assert "proj_out" in plain
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_mlp"} <= plain
    assert "transformer_blocks.0.ff.net.2" in plain
    assert "transformer_blocks.0.ff_context.net.2" not in plain
    assert pipe.transformer.get_submodule("proj_out").weight.dtype is torch.bfloat16


@pytest.mark.parametrize(("dtype", "wo_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_t5_keeps_its_float32_modules_unquantized_with_transformers_dtype_rule(flux_path, dtype, wo_dtype):
    pipe = load_pipeline(flux_path, quantization_config=NF4, torch_dtype=dtype)
    wo = pipe.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is nn.Linear and wo.weight.dtype is wo_dtype


def test_quantize_pipeline_in_memory_gives_the_same_layers(flux_path, generate):
    streamed = load_pipeline(flux_path, quantization_config=NF4, torch_dtype=torch.bfloat16)
    in_memory = DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16)
    quantize_pipeline(in_memory, NF4)
    for component in ("transformer", "text_encoder_2"):
        ours = getattr(streamed, component).state_dict()
        theirs = getattr(in_memory, component).state_dict()
        assert sorted(ours) == sorted(theirs)
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    np.testing.assert_array_equal(generate(streamed), generate(in_memory))


def test_components_passed_in_are_used_and_quantized(flux_path):
    reference = DiffusionPipeline.from_pretrained(flux_path, dtype=torch.bfloat16)
    given_t5 = reference.text_encoder_2
    given_clip = reference.text_encoder
    pipe = load_pipeline(
        flux_path, quantization_config=NF4, torch_dtype=torch.bfloat16, text_encoder_2=given_t5, text_encoder=given_clip
    )
    assert pipe.text_encoder_2 is given_t5 and linears(given_t5, bnb.nn.Linear4bit)
    assert pipe.text_encoder is given_clip and not linears(given_clip, bnb.nn.Linear4bit)
    with pytest.raises(TypeError, match="'unet'.*components of FluxPipeline"):
        load_pipeline(flux_path, unet=given_clip)


def test_sharded_checkpoint_streams(tmp_path, generate):
    path = make_tiny_pipeline(tmp_path / "sharded", "flux", shard_size="1MB")
    assert list((path / "transformer").glob("*.index.json"))
    sharded = load_pipeline(path, quantization_config=NF4, torch_dtype=torch.bfloat16)
    assert linears(sharded.transformer, bnb.nn.Linear4bit)
    assert generate(sharded).shape == (64, 64, 3)


def test_memory_report_counts_real_bytes(flux_path):
    pipe = load_pipeline(flux_path, quantization_config=NF4, torch_dtype=torch.bfloat16)
    rows = {row.name: row for row in memory_report(pipe)}
    transformer = rows["transformer"]
    assert transformer.backend == "bitsandbytes_4bit"
    assert transformer.parameters == sum(
        p.numel() for p in DiffusionPipeline.from_pretrained(flux_path).transformer.parameters()
    )
    assert transformer.bytes_before == 2 * transformer.parameters  # bfloat16, no buffers stored
    assert transformer.bytes_after < 0.45 * transformer.bytes_before
    state_bytes = sum(t.numel() * t.element_size() for t in pipe.transformer.state_dict().values())
    assert transformer.bytes_after == state_bytes
    assert rows["vae"].backend == "-" and rows["vae"].bytes_before == rows["vae"].bytes_after


def _copy(path, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(path, target)
    return target


def test_truncated_safetensors_names_the_file(flux_path, tmp_path):
    broken = _copy(flux_path, tmp_path)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*truncated or corrupt"):
        load_pipeline(broken, quantization_config=NF4)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*truncated or corrupt"):
        load_pipeline(broken)  # the unquantized path gives the same error


def test_missing_and_unexpected_keys_are_named(flux_path, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = _copy(flux_path, tmp_path)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["proj_out.weight"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(
        CheckpointError, match=r"missing 1 keys.*proj_out\.weight.*1 keys the model does not have.*extra\.weight"
    ):
        load_pipeline(broken, quantization_config=NF4)


def test_pickle_only_component_is_refused(flux_path, tmp_path):
    broken = _copy(flux_path, tmp_path)
    folder = broken / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights.*arbitrary code"):
        load_pipeline(broken, quantization_config=NF4)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(PipelineFolderError, match="no model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(PipelineFolderError, match="neither a pipeline folder nor a Hub repo id"):
        load_pipeline(tmp_path / "does" / "not" / "exist")
