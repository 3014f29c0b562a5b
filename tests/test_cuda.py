"""CUDA paths (skipped without a GPU): quantize straight onto the GPU and generate."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from pipequant import PipelineQuantizationConfig, load_pipeline

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("backend", ["bitsandbytes_4bit", "bitsandbytes_8bit"])
def test_flux_quantizes_onto_the_gpu_and_generates(flux_path, generate, backend):
    config = PipelineQuantizationConfig(quant_backend=backend, components_to_quantize=["transformer", "text_encoder_2"])
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16, device="cuda")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert layer.weight.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in pipe.vae.parameters())
    image = generate(pipe, device="cuda")
    assert image.shape == (64, 64, 3)
