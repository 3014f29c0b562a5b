"""Quantized models carry what diffusers / transformers set on models they quantized, so their guards apply."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin, QuantizationMethod
from transformers.quantizers.base import HfQuantizer

import pipequant as pq
from pipequant.backends.gguf.linear import GGUFLinear

CONFIGS = {
    "bitsandbytes_4bit": lambda: pq.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "bitsandbytes_8bit": lambda: pq.BitsAndBytesConfig(load_in_8bit=True),
    "torchao": lambda: pq.TorchAoConfig("int8wo"),
    "quanto": lambda: pq.QuantoConfig(weights_dtype="int8"),
    "gguf": lambda: pq.GGUFQuantizationConfig(quant_type="Q8_0"),
}
METHODS = {
    "bitsandbytes_4bit": QuantizationMethod.BITS_AND_BYTES,
    "bitsandbytes_8bit": QuantizationMethod.BITS_AND_BYTES,
    "torchao": QuantizationMethod.TORCHAO,
    "quanto": QuantizationMethod.QUANTO,
    "gguf": QuantizationMethod.GGUF,
}
#: what diffusers' own from_pretrained makes for each backend (GGUF: ours, a subclass of diffusers' GGUFQuantizer)
DIFFUSERS_QUANTIZERS = {
    "bitsandbytes_4bit": "BnB4BitDiffusersQuantizer",
    "bitsandbytes_8bit": "BnB8BitDiffusersQuantizer",
    "torchao": "TorchAoHfQuantizer",
    "quanto": "QuantoQuantizer",
    "gguf": "GGUFLayersQuantizer",
}


def _load(path, backend: str, components=("transformer", "text_encoder_2")):
    config = pq.PipelineQuantizationConfig(quant_mapping={name: CONFIGS[backend]() for name in components})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pq.load_pipeline(path, quantization_config=config, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", list(CONFIGS))
def test_streamed_models_carry_the_libraries_markers(flux_path, backend):
    pipe = _load(flux_path, backend)
    transformer, text_encoder = pipe.transformer, pipe.text_encoder_2
    for model in (transformer, text_encoder):
        assert model.is_quantized is True
        assert model.quantization_method == METHODS[backend]
        assert getattr(model, "is_loaded_in_4bit", False) == (backend == "bitsandbytes_4bit")
        assert getattr(model, "is_loaded_in_8bit", False) == (backend == "bitsandbytes_8bit")
    assert isinstance(transformer.hf_quantizer, DiffusersQuantizer)
    assert type(transformer.hf_quantizer).__name__ == DIFFUSERS_QUANTIZERS[backend]
    assert transformer.hf_quantizer.pre_quantized is (backend == "gguf")  # diffusers' GGUF config is always so
    assert isinstance(transformer.config.quantization_config, QuantizationConfigMixin)
    assert transformer.config["_pre_quantization_dtype"] == torch.bfloat16
    assert transformer.config.quantization_config.quant_method == METHODS[backend]
    if backend != "gguf":  # transformers has no GGUF quantizer; that model carries diffusers' (see markers.py)
        assert isinstance(text_encoder.hf_quantizer, HfQuantizer)
        assert type(text_encoder.config.quantization_config).__module__.startswith("transformers.")
        assert text_encoder.config._is_quantized is True
    else:
        assert type(text_encoder.hf_quantizer).__name__ == "GGUFLayersQuantizer"
        assert text_encoder.config.quantization_config.to_dict()["compute_dtype"] == "bfloat16"  # JSON-safe


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_markers_equal_what_diffusers_sets_when_it_quantizes(flux_path, backend):
    """torchao and quanto quantize on CPU in diffusers too: compare with a model diffusers quantized itself."""
    import diffusers
    from torchao.quantization import Int8WeightOnlyConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_config = (
            diffusers.TorchAoConfig(Int8WeightOnlyConfig()) if backend == "torchao" else diffusers.QuantoConfig("int8")
        )
        theirs = diffusers.FluxTransformer2DModel.from_pretrained(
            flux_path / "transformer", quantization_config=theirs_config, torch_dtype=torch.bfloat16
        )
    ours = _load(flux_path, backend, ["transformer"]).transformer
    assert type(ours.hf_quantizer) is type(theirs.hf_quantizer)
    assert ours.hf_quantizer.pre_quantized == theirs.hf_quantizer.pre_quantized
    # diffusers' quanto quantizer leaves the None of an unset list in it ([None]); the names are what count
    assert ours.hf_quantizer.modules_to_not_convert == [m for m in theirs.hf_quantizer.modules_to_not_convert if m]
    assert ours.quantization_method == theirs.quantization_method
    assert ours.config.quantization_config.to_dict() == theirs.config.quantization_config.to_dict()
    assert ours.config["_pre_quantization_dtype"] == theirs.config["_pre_quantization_dtype"]


def test_quantize_pipeline_and_restored_models_are_marked_too(flux_path, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = pq.load_pipeline(flux_path, torch_dtype=torch.bfloat16)
        config = pq.PipelineQuantizationConfig(quant_mapping={"transformer": pq.TorchAoConfig("int8wo")})
        pq.quantize_pipeline(pipe, config)
    assert pipe.transformer.is_quantized and pipe.transformer.hf_quantizer.pre_quantized is False
    assert pipe.transformer.config["_pre_quantization_dtype"] == torch.bfloat16
    pq.save_pipeline(pipe, tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = pq.load_pipeline(tmp_path / "saved", torch_dtype=torch.bfloat16)
    assert restored.transformer.quantization_method == QuantizationMethod.TORCHAO
    assert restored.transformer.hf_quantizer.pre_quantized is True
    with pytest.raises(ValueError, match="already quantized"):
        pq.quantize_model(restored.transformer, pq.QuantoConfig())


@pytest.mark.parametrize("backend", list(CONFIGS))
def test_pipe_to_dtype_behaves_as_in_diffusers(flux_path, backend):
    """bitsandbytes models are left as they are (diffusers warns); other quantized diffusers models refuse."""
    pipe = _load(flux_path, backend, ["transformer"])
    if backend.startswith("bitsandbytes"):
        pipe.to(torch.float32)
        assert pipe.transformer.is_quantized and pipe.vae.dtype == torch.float32
        return
    with pytest.raises(ValueError, match="Casting a quantized model to a new `dtype` is unsupported"):
        pipe.to(torch.float32)
    with pytest.raises(ValueError, match="Casting a quantized model"):
        pipe.transformer.to(torch.float16)
    with pytest.raises(ValueError, match="not supported for quantized model"):
        pipe.transformer.half()


def test_lora_merges_into_torchao_layers_and_hf_quantizer_gives_peft_the_requantizer(flux_path):
    """peft reads ``hf_quantizer.quantization_config.get_apply_tensor_subclass`` for its torchao LoRA layer;
    pipequant's own LoRA layer (`pipequant.lora`, which restores the exact bytes on unmerge) takes our layers, and
    merging re-quantizes into a torchao tensor."""
    from peft import LoraConfig
    from torchao.utils import TorchAOBaseTensor

    from pipequant.lora import QuantizedLoraLinear

    transformer = _load(flux_path, "torchao", ["transformer"]).transformer
    assert type(transformer.hf_quantizer.quantization_config.get_apply_tensor_subclass()).__name__.endswith("Config")
    transformer.add_adapter(LoraConfig(r=4, target_modules=["to_q"], init_lora_weights=False))
    layers = [m for m in transformer.modules() if isinstance(m, QuantizedLoraLinear)]
    assert layers
    layer = layers[0]
    x = torch.randn(2, layer.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert isinstance(layer.base_layer.weight, TorchAOBaseTensor)
    assert torch.allclose(unmerged.float(), merged.float(), atol=0.1)


def test_dequantize_turns_our_gguf_layers_back_into_linear_layers(flux_path, generate):
    pipe = _load(flux_path, "gguf", ["transformer"])
    before = generate(pipe)
    pipe.transformer.dequantize()
    assert not any(isinstance(m, GGUFLinear) for m in pipe.transformer.modules())
    assert pipe.transformer.is_quantized is False and not hasattr(pipe.transformer, "hf_quantizer")
    assert abs(generate(pipe) - before).max() < 1e-2


def test_a_dequantized_model_saves_and_reports_as_full_precision(flux_path, tmp_path):
    from pipequant.report import memory_report

    pipe = _load(flux_path, "torchao", ["transformer"])
    pipe.transformer.dequantize()
    rows = {row.name: row for row in memory_report(pipe)}
    assert rows["transformer"].backend == "-"
    saved = pq.save_pipeline(pipe, tmp_path / "saved")
    assert "quantization_config" not in (saved / "transformer" / "config.json").read_text()
    restored = pq.load_pipeline(saved)
    assert not getattr(restored.transformer, "is_quantized", False)
    assert type(restored.transformer.transformer_blocks[0].attn.to_q.weight) is torch.nn.Parameter
