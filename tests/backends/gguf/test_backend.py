"""The GGUF backend through the public API: its config, quantizing while loading, type fallbacks.

.gguf files (export, loading, their errors) are tested in tests/formats/gguf/."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers import GGUFQuantizationConfig as DiffusersGGUFConfig
from torch import nn

from pipequant import (
    GGUFQuantizationConfig,
    PipelineQuantizationConfig,
    QuantizationConfigError,
    load_model,
    load_pipeline,
    quantize_model,
)
from pipequant.backends import get_backend
from pipequant.backends.gguf import GGUFLinear, GGUFTypeFallbackWarning, type_fallbacks

BF16 = torch.bfloat16
#: the tiny transformer's linear layers by input size: 256-weight K-quant blocks fit only 256 and 512
K_BLOCKS_FIT = {256, 512}


def transformer_config(config: GGUFQuantizationConfig) -> PipelineQuantizationConfig:
    return PipelineQuantizationConfig(quant_mapping={"transformer": config})


def gguf_layers(model: nn.Module) -> dict[str, GGUFLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, GGUFLinear)}


@pytest.fixture(scope="module")
def reference_image(flux_path, generate):
    return generate(load_pipeline(flux_path, torch_dtype=BF16))


# --- config ---------------------------------------------------------------------------------------


def test_config_validates_types_and_rules():
    assert GGUFQuantizationConfig(quant_type="q4_k", compute_dtype="bfloat16").quant_type == "Q4_K"
    with pytest.raises(QuantizationConfigError, match="quant_type='Q7_K' is not a GGML type.*Valid types: F32"):
        GGUFQuantizationConfig(quant_type="Q7_K")
    with pytest.raises(QuantizationConfigError, match=r"type_rules\['to_q'\]='Q9'"):
        GGUFQuantizationConfig(quant_type="Q4_K", type_rules={"to_q": "Q9"})
    with pytest.raises(QuantizationConfigError, match="give quant_type too"):
        GGUFQuantizationConfig(type_rules={"to_q": "Q8_0"})
    with pytest.raises(QuantizationConfigError, match="compute_dtype=torch.int8"):
        GGUFQuantizationConfig(compute_dtype=torch.int8)


def test_simple_form_and_diffusers_config_resolve_to_ours():
    simple = PipelineQuantizationConfig(
        quant_backend="gguf", quant_kwargs={"quant_type": "Q4_K"}, components_to_quantize=["transformer"]
    )
    assert simple.resolve(["transformer", "vae"]) == {"transformer": GGUFQuantizationConfig(quant_type="Q4_K")}
    foreign = transformer_config(DiffusersGGUFConfig(compute_dtype=BF16))
    assert foreign.quant_mapping == {"transformer": GGUFQuantizationConfig(compute_dtype=BF16)}


def test_a_config_without_quant_type_refuses_full_precision_weights(flux_path):
    with pytest.raises(
        QuantizationConfigError, match="no quant_type, so, like diffusers' GGUFQuantizationConfig, it only"
    ):
        load_pipeline(flux_path, quantization_config=transformer_config(DiffusersGGUFConfig(compute_dtype=BF16)))


# --- quantizing on the fly ------------------------------------------------------------------------


@pytest.mark.parametrize(("qtype", "fallback"), [("Q8_0", None), ("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")])
def test_pipeline_quantized_while_loading_generates(flux_path, generate, reference_image, qtype, fallback):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(
            flux_path,
            quantization_config=transformer_config(GGUFQuantizationConfig(quant_type=qtype, compute_dtype=BF16)),
            torch_dtype=BF16,
        )
    layers = gguf_layers(pipe.transformer)
    plain = [name for name, module in pipe.transformer.named_modules() if type(module) is nn.Linear]
    assert layers and not plain
    for name, layer in layers.items():
        fits = fallback is None or layer.in_features in K_BLOCKS_FIT
        assert (layer.ggml_type, layer.requested_type) == ((qtype, None) if fits else (fallback, qtype)), name
        assert layer.compute_dtype == BF16 and layer.bias.dtype == BF16
    fallback_warnings = [str(w.message) for w in caught if issubclass(w.category, GGUFTypeFallbackWarning)]
    assert len(fallback_warnings) == len(type_fallbacks(pipe.transformer))
    if fallback is not None:
        assert "layer 'x_embedder' has rows of 64 weights" in "\n".join(fallback_warnings)
        assert f"stored as {fallback} instead" in fallback_warnings[0]
    layer = layers["transformer_blocks.0.attn.to_q"]
    assert get_backend("gguf").layer_nbytes(layer) == layer.weight.nbytes + layer.bias.nbytes

    image = generate(pipe)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert np.abs(image - reference_image).mean() < 0.02


def test_type_rules_first_match_wins_and_modules_to_not_convert_stay_plain(flux_path):
    config = GGUFQuantizationConfig(
        quant_type="Q4_0",
        type_rules={"transformer_blocks.0.*": "Q8_0", "to_q": "Q5_1", "*.ff.net.2": "Q4_K"},
        modules_to_not_convert=["x_embedder", "*.to_k"],
    )
    model = load_model(FluxTransformer2DModel, flux_path / "transformer", config, torch_dtype=BF16)
    types = {name: layer.ggml_type for name, layer in gguf_layers(model).items()}
    assert types["transformer_blocks.0.attn.to_q"] == "Q8_0"  # the first rule, though "to_q" matches too
    assert types["transformer_blocks.0.ff.net.2"] == "Q8_0"
    assert types["transformer_blocks.1.attn.to_q"] == types["single_transformer_blocks.1.attn.to_q"] == "Q5_1"
    assert types["transformer_blocks.1.ff.net.2"] == "Q4_K"
    assert types["proj_out"] == types["transformer_blocks.1.attn.to_v"] == "Q4_0"
    for name in ("x_embedder", "transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.attn.to_k"):
        assert type(model.get_submodule(name)) is nn.Linear, name

    backend = get_backend("gguf")
    with torch.device("meta"):
        empty = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(flux_path / "transformer"))
    for name, layer in gguf_layers(model).items():  # sizes known before any weight is read, to the byte
        assert backend.estimate_layer_nbytes(name, empty.get_submodule(name), config, BF16) == backend.layer_nbytes(
            layer
        )


def test_rows_that_do_not_fit_the_blocks_fall_back_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 8), nn.Linear(96, 8), nn.Linear(256, 8))
    references = [layer.weight.detach().clone() for layer in model]
    with pytest.warns(GGUFTypeFallbackWarning) as caught:
        quantize_model(model, GGUFQuantizationConfig(quant_type="Q4_K"))
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert (
        "layer '0' has rows of 100 weights, not a multiple of the Q4_K block size 256; it is stored as F16"
        in messages[0]
    )
    assert "layer '1' has rows of 96 weights" in messages[1] and "stored as Q5_0" in messages[1]
    assert type_fallbacks(model) == {"0": ("Q4_K", "F16"), "1": ("Q4_K", "Q5_0")}
    assert [layer.ggml_type for layer in model] == ["F16", "Q5_0", "Q4_K"]
    for layer, reference in zip(model, references):
        error = (layer.dequantized_weight() - reference).abs().mean() / reference.abs().mean()
        assert error < 0.1, layer
        assert get_backend("gguf").layer_nbytes(layer) == layer.weight.nbytes + layer.bias.nbytes
    assert model[0].weight.nbytes == 8 * 100 * 2

    bfloat = nn.Sequential(nn.Linear(100, 8, dtype=BF16))
    with pytest.warns(GGUFTypeFallbackWarning, match="stored as BF16"):
        quantize_model(bfloat, GGUFQuantizationConfig(quant_type="Q8_0"))
    assert bfloat[0].ggml_type == "BF16" and bfloat[0].compute_dtype == BF16
