"""torch.compile of quantized transformers: one graph (fullgraph=True), no recompiles, outputs equal to eager."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from pipequant import load_model
from pipequant.backends.gguf.codecs import dequantize
from pipequant.backends.gguf.linear import GGUFLinear


def transformer_inputs(config, timestep: float, dtype: torch.dtype = torch.float32) -> dict:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return {
        "hidden_states": randn(1, 16, config.in_channels),
        "encoder_hidden_states": randn(1, 8, config.joint_attention_dim),
        "pooled_projections": randn(1, config.pooled_projection_dim),
        "timestep": torch.tensor([timestep]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference.float()).norm() / reference.float().norm()).item()


@pytest.mark.slow
def test_quantized_flux_transformer_compiles_to_one_graph_equal_to_eager(flux_path, each_backend):
    # float32, where eager and inductor agree to rounding; in bfloat16 they differ by 3 % on the tiny random-weight
    # transformer with no quantization at all (inductor rounds fused elementwise ops once, eager after each op)
    model = load_model(FluxTransformer2DModel, flux_path / "transformer", each_backend, torch_dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # any graph break is an error
    with torch.no_grad():
        for timestep in (0.5, 0.25):  # the second call must reuse the graph
            inputs = transformer_inputs(model.config, timestep)
            # eager first: a bitsandbytes 4-bit layer without a compute dtype takes the first input's at its first call
            eager = model(**inputs)[0]
            with torch._dynamo.config.patch(error_on_recompile=timestep != 0.5):
                output = compiled(**inputs)[0]
            assert relative_error(output, eager) < 1e-4


def test_gguf_dequantize_is_a_custom_op_with_a_fake_implementation():
    layer = GGUFLinear(64, 4, "Q8_0", torch.zeros(4, 68, dtype=torch.uint8), None, torch.bfloat16)
    layer.weight[:, :2] = torch.tensor([0, 60], dtype=torch.uint8)  # a float16 scale of 1.0 per block
    layer.weight[:, 2:34] = 3
    expected = dequantize(layer.weight, "Q8_0", (4, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.pipequant.gguf_dequantize, (layer.weight, "Q8_0", 4, 64, torch.bfloat16))
    assert torch.equal(layer.dequantized_weight(), expected) and expected[0, 0] == 3
