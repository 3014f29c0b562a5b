"""The drop-in: diffusers' own calls, with only the imports changed, load through pipequant."""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import diffusers
import numpy as np
import pytest
import torch
import transformers
from optimum.quanto import QLinear

import pipequant
from pipequant import DiffusionPipeline, PipelineFolderError, PipelineQuantizationConfig, QuantoConfig


def test_seed_simple_form_with_only_the_imports_changed(flux_path, generate):
    pipeline_quant_config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=["transformer", "text_encoder_2"],
    )
    pipe = DiffusionPipeline.from_pretrained(
        str(flux_path), quantization_config=pipeline_quant_config, torch_dtype=torch.bfloat16
    )
    assert type(pipe) is diffusers.FluxPipeline
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)
    assert pipe.transformer.is_loaded_in_4bit and pipe.text_encoder_2.is_loaded_in_4bit
    image = generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_seed_mapping_form_with_transformers_config_on_text_encoder_2(flux_path, generate):
    from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig

    pipeline_quant_config = PipelineQuantizationConfig(
        quant_mapping={
            "transformer": QuantoConfig(weights_dtype="int8"),
            "text_encoder_2": TransformersBitsAndBytesConfig(load_in_4bit=True, compute_dtype=torch.bfloat16),
        }
    )
    pipe = DiffusionPipeline.from_pretrained(
        str(flux_path), quantization_config=pipeline_quant_config, torch_dtype=torch.bfloat16
    )
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, QLinear)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in pipe.text_encoder_2.modules())
    image = generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_named_pipeline_classes_stand_in_for_diffusers_own(flux_path):
    from pipequant import FluxImg2ImgPipeline, FluxPipeline

    assert FluxPipeline.diffusers_class is diffusers.FluxPipeline
    assert issubclass(diffusers.FluxPipeline, FluxPipeline)
    assert FluxPipeline.model_cpu_offload_seq == diffusers.FluxPipeline.model_cpu_offload_seq
    pipe = FluxPipeline.from_pretrained(flux_path, dtype=torch.bfloat16)
    assert type(pipe) is diffusers.FluxPipeline and isinstance(pipe, FluxPipeline)
    # a related class on the same folder, as diffusers' FluxImg2ImgPipeline.from_pretrained(flux) does
    img2img = FluxImg2ImgPipeline.from_pretrained(flux_path, dtype=torch.bfloat16)
    assert type(img2img) is diffusers.FluxImg2ImgPipeline
    assert FluxImg2ImgPipeline.from_pipe(pipe).transformer is pipe.transformer  # diffusers' own classmethod


def test_a_class_whose_components_the_folder_lacks_is_refused_before_loading(flux_path):
    with pytest.raises(PipelineFolderError, match="StableDiffusion3Pipeline needs component.*text_encoder_3"):
        pipequant.StableDiffusion3Pipeline.from_pretrained(flux_path)


def test_a_name_diffusers_has_no_pipeline_for_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchPipeline"):
        pipequant.NoSuchPipeline  # noqa: B018
    with pytest.raises(AttributeError):
        pipequant.not_a_thing  # noqa: B018


def test_diffusers_pipeline_config_gives_the_same_layers_and_bytes_as_ours(flux_path, assert_same_state):
    """Both forms of diffusers' own PipelineQuantizationConfig, converted exactly like ours."""
    kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
    components = ["transformer", "text_encoder_2"]
    theirs = diffusers.PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit", quant_kwargs=kwargs, components_to_quantize=components
    )
    ours = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit", quant_kwargs=kwargs, components_to_quantize=components
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates its QuantoConfig
        theirs_mapping = diffusers.PipelineQuantizationConfig(
            quant_mapping={
                "transformer": diffusers.QuantoConfig(weights_dtype="int8"),
                "text_encoder_2": transformers.BitsAndBytesConfig(load_in_8bit=True),
            }
        )
    ours_mapping = PipelineQuantizationConfig(
        quant_mapping={
            "transformer": QuantoConfig(weights_dtype="int8"),
            "text_encoder_2": pipequant.BitsAndBytesConfig(load_in_8bit=True),
        }
    )
    for diffusers_config, our_config in ((theirs, ours), (theirs_mapping, ours_mapping)):
        a = pipequant.load_pipeline(flux_path, quantization_config=diffusers_config, torch_dtype=torch.bfloat16)
        b = pipequant.load_pipeline(flux_path, quantization_config=our_config, torch_dtype=torch.bfloat16)
        for name in components:
            assert_same_state(getattr(a, name), getattr(b, name))
            assert [type(m) for m in getattr(a, name).modules()] == [type(m) for m in getattr(b, name).modules()]


def test_diffusers_config_settings_we_cannot_honour_are_errors(flux_path):
    from diffusers.quantizers.quantization_config import AutoRoundConfig

    auto_round = diffusers.PipelineQuantizationConfig(quant_backend="auto-round", quant_kwargs={"bits": 4})
    with pytest.raises(pipequant.QuantizationConfigError, match="Unknown quantization backend 'auto-round'"):
        pipequant.load_pipeline(flux_path, quantization_config=auto_round)
    auto_round = diffusers.PipelineQuantizationConfig(quant_mapping={"transformer": AutoRoundConfig(bits=4)})
    with pytest.raises(pipequant.QuantizationConfigError, match="AutoRoundConfig has no pipequant equivalent"):
        pipequant.load_pipeline(flux_path, quantization_config=auto_round)
    offloading = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    with pytest.raises(pipequant.QuantizationConfigError, match="llm_int8_enable_fp32_cpu_offload"):
        mapping = diffusers.PipelineQuantizationConfig(quant_mapping={"text_encoder_2": offloading})
        DiffusionPipeline.from_pretrained(flux_path, quantization_config=mapping)
    with pytest.raises(pipequant.QuantizationConfigError, match="must be a PipelineQuantizationConfig"):
        pipequant.load_pipeline(flux_path, quantization_config=pipequant.BitsAndBytesConfig(load_in_8bit=True))


def test_diffusers_config_in_quantize_pipeline_and_estimate(flux_path):
    config = diffusers.PipelineQuantizationConfig(
        quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True}, components_to_quantize=["transformer"]
    )
    rows = {row.name: row for row in pipequant.estimate(flux_path, config, torch_dtype=torch.bfloat16)}
    assert rows["transformer"].backend == "bitsandbytes_8bit" and rows["vae"].backend == "-"
    pipe = pipequant.load_pipeline(flux_path, torch_dtype=torch.bfloat16)
    pipequant.quantize_pipeline(pipe, config)
    assert pipe.transformer.is_loaded_in_8bit
