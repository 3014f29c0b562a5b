"""The K-quants (`codecs.kquants`): reconstruction error, stability under re-quantization, and
llama.cpp's bytes for weights outside any model's range (stored digests, see data/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_cases import K_TYPES, extreme_inputs, reference_inputs, sha256

from pipequant.backends.gguf import dequantize, quantize
from pipequant.backends.gguf.codecs import GGML_TYPE_TABLE
from pipequant.kernels import ggml

# Relative RMS reconstruction error on N(0, 1) data; observed values are ~10% lower.
K_ERROR_BOUNDS = {"Q2_K": 0.33, "Q3_K": 0.167, "Q4_K": 0.079, "Q5_K": 0.040, "Q6_K": 0.0196}


@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kquant_error_on_gaussian(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(16, 2048, generator=torch.Generator().manual_seed(4)).to(dtype)
    back = dequantize(quantize(x, name), name, x.shape)
    rel = ((x.float() - back).norm() / x.float().norm()).item()
    assert rel < K_ERROR_BOUNDS[name], rel


@pytest.mark.parametrize("name", K_TYPES)
def test_kquant_roundtrip_is_stable(name: str) -> None:
    """Re-quantizing dequantized weights barely moves them (the codec is near a fixed point)."""
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(5))
    once = dequantize(quantize(x, name), name, x.shape)
    twice = dequantize(quantize(once, name), name, x.shape)
    assert ((twice - once).norm() / once.norm()).item() < K_ERROR_BOUNDS[name] / 4


@pytest.mark.parametrize("name", K_TYPES)
def test_non_finite_and_extreme_weights_like_llamacpp(name: str, reference: dict[str, np.ndarray]) -> None:
    """On CPU (the compiled kernels) the bytes are llama.cpp's for weights outside any model's
    range too: NaN and inf poison a block the way they poison llama.cpp's."""
    x = extreme_inputs()
    assert sha256(x) == str(reference["extreme_input_sha256"]), "input generator drifted; regenerate the reference"
    assert sha256(quantize(torch.from_numpy(x), name)) == str(reference[f"{name}_extreme_sha256"])


@pytest.mark.parametrize("name", K_TYPES)
def test_portable_build_gives_llamacpp_bytes(name: str, reference: dict[str, np.ndarray]) -> None:
    """The K-quants' build for any CPU (the one a CPU without AVX2 runs; the tests above check the
    build this CPU picks) writes llama.cpp's bytes too, on the reference and the extreme weights."""
    ggml_type = GGML_TYPE_TABLE[name]
    for x, digest in (
        (reference_inputs(int(reference["seed"])), f"{name}_sha256"),
        (extreme_inputs(), f"{name}_extreme_sha256"),
    ):
        out = torch.empty(x.size // ggml_type.block_size * ggml_type.type_size, dtype=torch.uint8)
        ggml.quantize(ggml_type, torch.from_numpy(x), out, portable=True)
        assert sha256(out) == str(reference[digest]), digest
