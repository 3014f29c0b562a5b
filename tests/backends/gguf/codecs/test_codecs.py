"""The GGML codecs' public functions (`pipequant.backends.gguf.codecs`, assembled from their modules) vs
gguf-py (dequantize everywhere, quantize where it has a quantizer) and vs llama.cpp's reference
quantizers (stored digests, see data/README.md), and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_cases import (
    ALL_TYPES,
    FLOAT_TYPES,
    K_TYPES,
    LEGACY_TYPES,
    GGMLQuantizationType,
    gguf,
    gguf_bytes,
    random_blocks,
    reference_inputs,
    same_bits,
    sha256,
    shapes,
)

from pipequant.backends.gguf import GGML_TYPES, block_size, dequantize, quantize, type_size
from pipequant.backends.gguf.codecs import resolve


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_bit_exact_with_gguf(name: str) -> None:
    rng = np.random.default_rng(1)
    for shape in shapes(name):
        n_blocks = int(np.prod(shape)) // block_size(name)
        raw = random_blocks(name, n_blocks, rng)
        expected = gguf.quants.dequantize(raw, GGMLQuantizationType[name]).reshape(shape)
        for layout in (torch.from_numpy(raw), torch.from_numpy(raw).reshape(-1)):
            ours = dequantize(layout, name, shape)
            assert ours.dtype == torch.float32 and ours.shape == shape
            assert same_bits(expected, ours.numpy()), (name, shape)
        for dtype in (torch.bfloat16, torch.float16):
            ours = dequantize(torch.from_numpy(raw), name, shape, dtype=dtype)
            assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32)).to(dtype)), (name, dtype)


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q5_1", "Q4_K", "Q6_K"])
def test_dequantize_large_outputs_bit_exact(name: str) -> None:
    """Outputs of several MB are split between threads at their 2 MiB huge pages (blocks cross
    page boundaries there), for float32 and bfloat16 results."""
    rng = np.random.default_rng(2)
    shape = (1100, 2304)  # 9.7 MB of float32
    raw = random_blocks(name, int(np.prod(shape)) // block_size(name), rng)
    expected = gguf.quants.dequantize(raw, GGMLQuantizationType[name]).reshape(shape)
    assert same_bits(expected, dequantize(torch.from_numpy(raw), name, shape).numpy())
    ours = dequantize(torch.from_numpy(raw), name, shape, dtype=torch.bfloat16)
    assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32)).to(torch.bfloat16))


@pytest.mark.parametrize("name", FLOAT_TYPES + LEGACY_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_byte_identical_with_gguf(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    for shape in shapes(name):
        x = (torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 3).to(dtype)
        ours = quantize(x, name)
        expected = gguf_bytes(x.float().numpy(), name)
        assert ours.dtype == torch.uint8
        assert np.array_equal(ours.numpy(), expected), (name, shape, dtype)


@pytest.mark.parametrize("name", K_TYPES + ["Q8_0", "Q4_1", "Q5_1"])
def test_quantize_byte_identical_with_llamacpp(name: str, reference: dict[str, np.ndarray]) -> None:
    """quantize_row_*_ref output (and dequantize_row_* of it) from llama.cpp, see data/README.md."""
    x = reference_inputs(int(reference["seed"]))
    assert sha256(x) == str(reference["input_sha256"]), "input generator drifted; regenerate the reference"
    ours = quantize(torch.from_numpy(x), name)
    head = reference[f"{name}_head"]
    flat = ours.view(-1, type_size(name))
    assert np.array_equal(flat[: len(head)].numpy(), head), f"{name}: first blocks differ from llama.cpp"
    if sha256(ours) != str(reference[f"{name}_sha256"]):
        pytest.fail(f"{name}: bytes differ from llama.cpp (blocks beyond the first {len(head)})")
    assert sha256(dequantize(ours, name, x.shape)) == str(reference[f"{name}_dequant_sha256"])


@pytest.mark.parametrize("name", ["BF16", "Q5_1", "Q3_K", "Q4_K", "Q6_K"])
def test_chunking_does_not_change_results(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3, 7 * block_size(name), generator=torch.Generator().manual_seed(6))
    packed, back = quantize(x, name), dequantize(quantize(x, name), name, x.shape)
    codec = resolve(name)
    monkeypatch.setattr(codec, "quantize_chunk", 4)
    monkeypatch.setattr(codec, "dequantize_chunk", 3)
    assert torch.equal(quantize(x, name), packed)
    assert torch.equal(dequantize(packed, name, x.shape), back)


def test_type_names_and_enums() -> None:
    assert set(ALL_TYPES) == set(GGML_TYPES)
    x = torch.randn(2, 256)
    by_name = quantize(x, "q4_k")
    assert torch.equal(by_name, quantize(x, GGMLQuantizationType.Q4_K))
    assert by_name.shape == (2, type_size("Q4_K"))
    assert block_size(GGMLQuantizationType.Q8_0) == 32 and type_size("q8_0") == 34
    raw = by_name.numpy().reshape(-1)
    assert torch.equal(dequantize(by_name, "Q4_K", (2, 256)), dequantize(torch.from_numpy(raw), "Q4_K", (2, 256)))


def test_bad_type_name() -> None:
    with pytest.raises(ValueError, match="Q4_K") as info:
        quantize(torch.randn(32), "Q4_X")
    assert "valid types" in str(info.value)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), GGMLQuantizationType.IQ2_XXS, (256,))


def test_bad_row_length() -> None:
    with pytest.raises(ValueError, match="block size 256"):
        quantize(torch.randn(4, 300), "Q4_K")
    with pytest.raises(ValueError, match="block size 32"):
        dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (1, 48))
    with pytest.raises(ValueError, match="144 uint8 bytes"):
        dequantize(torch.zeros(100, dtype=torch.uint8), "Q4_K", (1, 256))


@pytest.mark.parametrize("name", ALL_TYPES)
def test_zero_size_tensors_are_a_clear_error(name: str) -> None:
    for shape in [(0, block_size(name)), (2, 0)]:
        with pytest.raises(ValueError, match=r"has no elements; a GGML tensor holds at least one block"):
            quantize(torch.empty(shape), name)
        with pytest.raises(ValueError, match=r"has no elements"):
            dequantize(torch.empty(0, dtype=torch.uint8), name, shape)


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: the torch codecs, not the kernel
def test_byte_slices_at_odd_offsets_dequantize_like_aligned_ones(name: str, dtype: torch.dtype) -> None:
    raw = quantize(torch.randn(2, 256, generator=torch.Generator().manual_seed(0)), name).view(-1)
    odd = torch.cat([torch.zeros(1, dtype=torch.uint8), raw])[1:]
    assert odd.storage_offset() == 1
    assert torch.equal(dequantize(odd, name, (2, 256), dtype), dequantize(raw, name, (2, 256), dtype))
