"""PipelineQuantizationConfig: both forms and every validation error (each backend config's own: tests/backends)."""

from __future__ import annotations

import shutil

import pytest
import torch

from pipequant import BitsAndBytesConfig, PipelineQuantizationConfig, QuantizationConfigError, load_pipeline
from pipequant.backends.base import matches_module_pattern

MODELS = ["transformer", "text_encoder", "text_encoder_2", "vae"]
OTHERS = ["tokenizer", "tokenizer_2", "scheduler"]


def test_simple_form_resolves_each_component_to_one_config():
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=["transformer", "text_encoder_2"],
    )
    resolved = config.resolve(MODELS, OTHERS)
    assert list(resolved) == ["transformer", "text_encoder_2"]
    bnb = resolved["transformer"]
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_compute_dtype is torch.bfloat16
    assert bnb.backend_name == "bitsandbytes_4bit"


def test_simple_form_takes_a_single_component_name_and_defaults_to_every_model():
    single = PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", components_to_quantize="transformer")
    assert list(single.resolve(MODELS, OTHERS)) == ["transformer"]
    assert single.resolve(MODELS, OTHERS)["transformer"].load_in_8bit
    every = PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit")
    assert list(every.resolve(MODELS, OTHERS)) == MODELS


def test_both_forms_or_neither_is_an_error():
    with pytest.raises(QuantizationConfigError, match="not both"):
        PipelineQuantizationConfig(
            quant_backend="bitsandbytes_4bit", quant_mapping={"transformer": BitsAndBytesConfig(load_in_4bit=True)}
        )
    with pytest.raises(QuantizationConfigError, match="Nothing to quantize"):
        PipelineQuantizationConfig()
    with pytest.raises(QuantizationConfigError, match="Nothing to quantize"):
        PipelineQuantizationConfig(components_to_quantize=["transformer"])


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(QuantizationConfigError, match=r"Unknown quantization backend 'bnb4'.*bitsandbytes_4bit"):
        PipelineQuantizationConfig(quant_backend="bnb4")


def test_misspelled_kwarg_names_it_and_suggests_the_closest():
    with pytest.raises(QuantizationConfigError, match=r"'bnb_4bit_quant_typ'.*Did you mean 'bnb_4bit_quant_type'"):
        PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"bnb_4bit_quant_typ": "nf4"})


def test_component_not_in_pipeline_lists_the_components():
    config = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", components_to_quantize=["transfomer"])
    with pytest.raises(QuantizationConfigError, match=r"no component 'transfomer'.*Did you mean 'transformer'.*vae"):
        config.resolve(MODELS, OTHERS)


def test_component_that_is_not_a_model_is_an_error():
    config = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", components_to_quantize=["tokenizer_2"])
    with pytest.raises(QuantizationConfigError, match="'tokenizer_2' is not a torch model"):
        config.resolve(MODELS, OTHERS)


def test_mapping_value_that_is_not_a_config_is_an_error():
    with pytest.raises(
        QuantizationConfigError, match=r"quant_mapping\['transformer'\] is a dict, not a quantization config"
    ):
        PipelineQuantizationConfig(quant_mapping={"transformer": {"load_in_4bit": True}})


def test_bad_config_errors_come_before_any_weight_is_read(flux_path, tmp_path):
    # Every weight file is garbage: only an error raised before reading weights can name the config problem.
    broken = tmp_path / "broken"
    shutil.copytree(flux_path, broken)
    for weights in broken.glob("*/*.safetensors"):
        weights.write_bytes(b"garbage")
    config = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", components_to_quantize=["unet"])
    with pytest.raises(QuantizationConfigError, match="no component 'unet'"):
        load_pipeline(broken, quantization_config=config)


def test_configs_print_readably():
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    assert repr(config) == (
        "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=torch.bfloat16)"
    )
    pipeline_config = PipelineQuantizationConfig(quant_mapping={"transformer": config})
    assert repr(pipeline_config) == f"PipelineQuantizationConfig(quant_mapping={{'transformer': {config!r}}})"


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("proj_out", ["proj_out"], True),
        ("transformer_blocks.0.ff.net.2", ["ff"], True),  # a module and everything under it
        ("transformer_blocks.0.ff_context.net.2", ["ff"], False),  # names match whole components, not substrings
        ("transformer_blocks.0.attn.to_q", ["transformer_blocks.0"], True),
        ("transformer_blocks.10.attn.to_q", ["transformer_blocks.1"], False),
        ("single_transformer_blocks.3.proj_mlp", ["single_transformer_blocks.*.proj_mlp"], True),
        ("transformer_blocks.3.attn.to_k", ["*.attn.to_[qk]"], True),
        ("transformer_blocks.3.attn.to_v", ["*.attn.to_[qk]"], False),
        ("context_embedder", ["*embedder"], True),
    ],
)
def test_modules_to_not_convert_rule(name, patterns, expected):
    assert matches_module_pattern(name, patterns) is expected
