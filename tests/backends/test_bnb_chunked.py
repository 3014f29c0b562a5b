"""Chunked bitsandbytes 4-bit quantization gives bitsandbytes' own bytes, for every layout and option."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from pipequant.backends import bnb_chunked

SHAPES = [(300, 128), (96, 7680), (64, 100), (7, 9)]  # multi-chunk, wide rows, partial blocks, odd sizes


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_4bit_chunks_match_bitsandbytes(shape, quant_type, double_quant, storage):
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

