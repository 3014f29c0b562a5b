"""bitsandbytes 4-bit quantization, by the compiled kernel or by chunks, gives bitsandbytes' own
bytes, for every layout and option."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from pipequant.backends import bnb_chunked

SHAPES = [(300, 128), (96, 7680), (64, 100), (7, 9)]  # multi-chunk, wide rows, partial blocks, odd sizes


@pytest.fixture(params=["compiled", "chunks"])
def path(request, monkeypatch):
    """Each test runs on both paths: the compiled kernel (CPU's) and bitsandbytes on chunks (the rest)."""
    if request.param == "chunks":
        monkeypatch.setattr(bnb_chunked, "_compiled_4bit", lambda *args: None)
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_4bit_matches_bitsandbytes(shape, quant_type, double_quant, storage, path):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected, expected_state = bnb.functional.quantize_4bit(
        weight, quant_type=quant_type, compress_statistics=double_quant, quant_storage=storage
    )
    packed, state = bnb_chunked.quantize_4bit(
        weight, quant_type=quant_type, compress_statistics=double_quant, quant_storage=storage, chunk_elements=4096
    )
    assert packed.shape == expected.shape and packed.dtype == expected.dtype
    assert torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))
    ours, theirs = state.as_dict(packed=True), expected_state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def awkward_values(count: int, dtype: torch.dtype) -> torch.Tensor:
    """Blocks of several magnitudes, and blocks at the edges of the arithmetic."""
    values = torch.randn(count, generator=torch.Generator().manual_seed(1)) * 0.05
    values[5] = 3.0  # one outlier
    values[64:128] = 0.0  # absmax 0 (bitsandbytes divides by 1e-38 instead)
    values[130] = 1e-39  # below the absmax floor
    values[200:] *= 1e-30
    return values.to(dtype)


@pytest.mark.parametrize("count", [1000, 3 * 64 + 1, 65536 + 33])  # partial last blocks, odd counts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_compiled_kernel_bytes(count, dtype, quant_type, blocksize):
    values = awkward_values(count, dtype)
    ours = bnb_chunked._run_4bit(values, blocksize, quant_type, torch.uint8)
    theirs = bnb.functional.quantize_4bit(values, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1].absmax)


def test_a_disagreeing_kernel_hands_back_to_bitsandbytes(monkeypatch):
    real = bnb_chunked._run_4bit
    monkeypatch.setattr(bnb_chunked, "_run_4bit", lambda *args: (real(*args)[0] ^ 1, real(*args)[1]))
    weight = torch.randn(96, 640, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="disagrees with this bitsandbytes version"):
        packed, state = bnb_chunked.quantize_4bit(
            weight, quant_type="nf4", compress_statistics=False, quant_storage=torch.uint8
        )
    expected, expected_state = bnb.functional.quantize_4bit(weight, quant_type="nf4")
    assert torch.equal(packed, expected) and torch.equal(state.absmax, expected_state.absmax)
