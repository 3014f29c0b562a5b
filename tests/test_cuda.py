"""CUDA paths (skipped without a GPU): quantize straight onto the GPU and generate."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from pipequant import PipelineQuantizationConfig, load_pipeline

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("backend", ["bitsandbytes_4bit", "bitsandbytes_8bit"])
def test_flux_quantizes_onto_the_gpu_and_generates(flux_path, backend):
    config = PipelineQuantizationConfig(quant_backend=backend, components_to_quantize=["transformer", "text_encoder_2"])
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16, device="cuda")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert layer.weight.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in pipe.vae.parameters())
    image = pipe(
        "photo of a cute dog",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator("cuda").manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)
