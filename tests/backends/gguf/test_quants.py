"""GGML codecs vs gguf-py (dequantize everywhere, quantize where it has a quantizer) and
vs llama.cpp's reference K-quant quantizers (stored digests, see data/README.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from pipequant.backends.gguf import GGML_TYPES, block_size, dequantize, quantize, type_size  # noqa: E402
from pipequant.backends.gguf.codecs import resolve  # noqa: E402

FLOAT_TYPES = ["F32", "F16", "BF16"]
LEGACY_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

DATA = Path(__file__).parent / "data" / "llamacpp_reference.npz"

# Relative RMS reconstruction error on N(0, 1) data; observed values are ~10% lower.
K_ERROR_BOUNDS = {"Q2_K": 0.33, "Q3_K": 0.167, "Q4_K": 0.079, "Q5_K": 0.040, "Q6_K": 0.0196}


def _shapes(name: str) -> list[tuple[int, ...]]:
    bs = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    if bs == 1:
        return [(7,), (3, 5), (2, 3, 4)]
    return [(bs,), (5, 2 * bs), (2, 3, 3 * bs), (48, 4 * bs)]


def _gguf_bytes(x: np.ndarray, name: str) -> np.ndarray:
    """gguf-py's quantization as uint8 rows (it returns float arrays for F32/F16)."""
    out = gguf.quants.quantize(x.astype(np.float32), GGMLQuantizationType[name])
    return out.view(np.uint8).reshape(int(np.prod(x.shape[:-1])), -1)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.view(np.uint32))


# Byte offsets of the f16 scales in each block: random bytes there could be NaN or inf.
HALF_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def _random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in every field (all bit patterns of quants and sub-scales), finite floats."""
    if name in FLOAT_TYPES:
        return _gguf_bytes(rng.standard_normal((n_blocks, 1)) * 3, name)
    raw = rng.integers(0, 256, (n_blocks, type_size(name)), dtype=np.uint8)
    magnitude = rng.choice([1e-4, 1.0, 100.0], (n_blocks, 1))
    for offset in HALF_FIELDS[name]:
        raw[:, offset : offset + 2] = (rng.standard_normal((n_blocks, 1)) * magnitude).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_bit_exact_with_gguf(name: str) -> None:
    rng = np.random.default_rng(1)
    for shape in _shapes(name):
        n_blocks = int(np.prod(shape)) // block_size(name)
        raw = _random_blocks(name, n_blocks, rng)
        expected = gguf.quants.dequantize(raw, GGMLQuantizationType[name]).reshape(shape)
        for layout in (torch.from_numpy(raw), torch.from_numpy(raw).reshape(-1)):
            ours = dequantize(layout, name, shape)
            assert ours.dtype == torch.float32 and ours.shape == shape
            assert _same_bits(expected, ours.numpy()), (name, shape)
        for dtype in (torch.bfloat16, torch.float16):
            ours = dequantize(torch.from_numpy(raw), name, shape, dtype=dtype)
            assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32)).to(dtype)), (name, dtype)


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q5_1", "Q4_K", "Q6_K"])
def test_dequantize_large_outputs_bit_exact(name: str) -> None:
    """Outputs of several MB are split between threads at their 2 MiB huge pages (blocks cross
    page boundaries there), for float32 and bfloat16 results."""
    rng = np.random.default_rng(2)
    shape = (1100, 2304)  # 9.7 MB of float32
    raw = _random_blocks(name, int(np.prod(shape)) // block_size(name), rng)
    expected = gguf.quants.dequantize(raw, GGMLQuantizationType[name]).reshape(shape)
    assert _same_bits(expected, dequantize(torch.from_numpy(raw), name, shape).numpy())
    ours = dequantize(torch.from_numpy(raw), name, shape, dtype=torch.bfloat16)
    assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32)).to(torch.bfloat16))


@pytest.mark.parametrize("name", FLOAT_TYPES + LEGACY_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_byte_identical_with_gguf(name: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    for shape in _shapes(name):
        x = (torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 3).to(dtype)
        ours = quantize(x, name)
        expected = _gguf_bytes(x.float().numpy(), name)
        assert ours.dtype == torch.uint8
        assert np.array_equal(ours.numpy(), expected), (name, shape, dtype)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0"])
def test_quantize_rounding_ties_like_gguf(name: str) -> None:
    """Values landing exactly on .5 after scaling (round half away from zero)."""
    rng = np.random.default_rng(3)
    x = rng.integers(-255, 256, (64, 32)).astype(np.float32) / 2
    x[:, 0] = np.where(rng.random(64) < 0.5, 127.0, -127.0)  # scale 1 (Q8_0): x * id = x
    x[1] = -x[1]
    x[2, :] = 0.49999997
    x[2, 0] = 127.0
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), _gguf_bytes(x, name))


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_nan_payloads_like_gguf(name: str) -> None:
    bits = np.array([0x7F800001, 0x7FC00000, 0xFFC12345, 0x7F812345, 0x7FA00000, 0x3F800000], dtype=np.uint32)
    x = bits.view(np.float32).reshape(1, -1)
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), _gguf_bytes(x, name))


def _nan_blocks() -> np.ndarray:
    """Rows: NaN first, in the middle, everywhere, with an inf, the default NaN arithmetic makes on x86
    (sign set), a NaN with a payload."""
    x = np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)
    x[0, 0] = x[1, 17] = x[2] = x[3, 31] = np.nan
    x[3, 5] = np.inf
    x[4, 4] = np.array([0xFFC00000], np.uint32).view(np.float32)[0]
    x[5, 9], x[5, 1] = np.nan, -np.inf
    x[6, 7] = np.array([0xFFC12345], np.uint32).view(np.float32)[0]
    return x


@pytest.mark.parametrize("name", LEGACY_TYPES)
@pytest.mark.parametrize("compiled", [True, False])
def test_nan_blocks_give_gguf_py_bytes(name: str, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN anywhere in a block makes gguf-py's scale NaN and every level 0; the kernel and the torch
    codec must agree (the kernel used to see a NaN only in a block's first weight). The kernel stores
    a NaN scale without its payload bits (the README's one exception): not compared for its last row."""
    codec = resolve(name)
    assert codec.compiled_quantizer is not None, f"the compiled quantizer for {name} was not built"
    if not compiled:
        monkeypatch.setattr(codec, "compiled_quantizer", None)
    x = _nan_blocks()[: 6 if compiled else 7]
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), _gguf_bytes(x, name))


def reference_inputs(seed: int, rows: int = 256, cols: int = 1024) -> np.ndarray:
    """Weights that reach every branch of the C quantizers: one distribution per 256 weights.

    ``np.random.RandomState`` is used because its streams are frozen across numpy
    versions; the reference file also stores the input digest to catch any drift.
    """
    rs = np.random.RandomState(seed)
    n = rows * cols // 256
    kinds = rs.randint(0, 14, n)
    out = np.empty((n, 256))
    for b, kind in enumerate(kinds):
        g = rs.standard_normal(256)
        out[b] = [
            g,
            g * 0.02,
            np.zeros(256),  # all zero: early exits, zero scales
            np.full(256, g[0]),  # constant: max == min
            np.abs(g),  # positive only: min clipped to 0
            -np.abs(g) - 1,  # negative only
            rs.standard_t(2, 256),  # heavy tails
            g * (rs.uniform(size=256) < 0.05),  # sparse, mostly zeros
            g * 1e-17,  # below GROUP_MAX_EPS
            rs.randint(-8, 8, 256) * 0.25,  # on a grid: rounding ties
            g * np.repeat(rs.uniform(0, 2, 16) * (rs.uniform(size=16) < 0.7), 16),  # zero sub-blocks
            rs.uniform(-1, 1, 256) + 5,  # offset
            np.repeat(g[:16], 16),  # few distinct values: exact fits, error ties
            g * np.repeat(10.0 ** rs.uniform(-9, 1, 8), 32),  # sub-block scales spanning 10 decades
        ][kind]
    x = out.reshape(rows, cols).astype(np.float32)
    # Half of the rows rounded to bf16 like real checkpoints (more exact ties).
    bits = x.view(np.uint32)
    bf16 = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).view(np.float32)
    return np.where(rs.uniform(size=(rows, 1)) < 0.5, bf16, x)


def extreme_inputs() -> np.ndarray:
    """Rows of three superblocks (an odd count: the kernels pair superblocks) with NaN, +-inf,
    values near float32's limits, subnormals and huge constants: where the searches' float
    rounding shortcut does not hold and the compiled kernels take llama.cpp's integer rounding."""
    rs = np.random.RandomState(5)
    x = rs.standard_normal((8, 768)).astype(np.float32) * np.float32(0.05)
    x[0, 5] = np.nan
    x[1, 300] = np.inf
    x[2, 40] = -np.inf
    x[3, :32] = np.nan
    x[4, 7], x[4, 8] = 3e38, -3e38
    x[5, :256] = np.linspace(0, 1, 256, dtype=np.float32) * np.float32(1e-30)
    x[6, :256] = np.linspace(0, 1, 256, dtype=np.float32) * np.float32(1e-40)  # subnormal
    x[7] = 1e30
    return x


def _sha256(a: np.ndarray | torch.Tensor) -> str:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(DATA) as data:
        return dict(data)


@pytest.mark.parametrize("name", K_TYPES + ["Q8_0", "Q4_1", "Q5_1"])
def test_quantize_byte_identical_with_llamacpp(name: str, reference: dict[str, np.ndarray]) -> None:
    """quantize_row_*_ref output (and dequantize_row_* of it) from llama.cpp, see data/README.md."""
    x = reference_inputs(int(reference["seed"]))
    assert _sha256(x) == str(reference["input_sha256"]), "input generator drifted; regenerate the reference"
    ours = quantize(torch.from_numpy(x), name)
    head = reference[f"{name}_head"]
    flat = ours.view(-1, type_size(name))
    assert np.array_equal(flat[: len(head)].numpy(), head), f"{name}: first blocks differ from llama.cpp"
    if _sha256(ours) != str(reference[f"{name}_sha256"]):
        pytest.fail(f"{name}: bytes differ from llama.cpp (blocks beyond the first {len(head)})")
    assert _sha256(dequantize(ours, name, x.shape)) == str(reference[f"{name}_dequant_sha256"])


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


@pytest.mark.parametrize("name", K_TYPES)
def test_non_finite_and_extreme_weights_like_llamacpp(name: str, reference: dict[str, np.ndarray]) -> None:
    """On CPU (the compiled kernels) the bytes are llama.cpp's for weights outside any model's
    range too: NaN and inf poison a block the way they poison llama.cpp's."""
    x = extreme_inputs()
    assert _sha256(x) == str(reference["extreme_input_sha256"]), "input generator drifted; regenerate the reference"
    assert _sha256(quantize(torch.from_numpy(x), name)) == str(reference[f"{name}_extreme_sha256"])


def _awkward_rows() -> torch.Tensor:
    """Gaussian rows of several magnitudes, and blocks at the edges of the K-quant searches."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(24, 1024, generator=generator) * torch.rand(24, 1, generator=generator) * 0.05
    x[0] = 0.0  # every scale zero
    x[1] = 1.0  # max == min in every sub-block
    x[2, :256] = 1e-20  # below GROUP_MAX_EPS
    x[3, :256] = torch.arange(256) - 128.0  # evenly spaced levels, ties
    x[4] *= 1e4
    x[5, 17] = 50.0  # one outlier
    x[6, ::2] = 0.0
    x[7] = -x[7].abs()  # one sign only
    x[8] = x[8].abs()
    x[9, :16] = 0.3
    return x


@pytest.mark.parametrize("name", LEGACY_TYPES + K_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_quantizers_match_the_torch_code(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the block types are quantized by compiled kernels; the torch code (the path on other
    devices) must give the same bytes, for every source dtype the kernels read."""
    codec = resolve(name)
    assert codec.compiled_quantizer is not None, f"the compiled quantizer for {name} was not built"
    x = _awkward_rows().to(dtype)
    compiled = codec.quantize_rows(x)
    monkeypatch.setattr(codec, "compiled_quantizer", None)
    assert torch.equal(compiled, codec.quantize_rows(x))
