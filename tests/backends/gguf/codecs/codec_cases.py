"""What the GGML codec tests share: the type families, gguf-py as the reference (bytes and values),
random blocks, and the inputs llama.cpp's stored reference was made from (data/README.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402

from pipequant.backends.gguf import type_size  # noqa: E402

FLOAT_TYPES = ["F32", "F16", "BF16"]
LEGACY_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES + K_TYPES

DATA = Path(__file__).parent / "data" / "llamacpp_reference.npz"


def shapes(name: str) -> list[tuple[int, ...]]:
    bs = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    if bs == 1:
        return [(7,), (3, 5), (2, 3, 4)]
    return [(bs,), (5, 2 * bs), (2, 3, 3 * bs), (48, 4 * bs)]


def gguf_bytes(x: np.ndarray, name: str) -> np.ndarray:
    """gguf-py's quantization as uint8 rows (it returns float arrays for F32/F16)."""
    out = gguf.quants.quantize(x.astype(np.float32), GGMLQuantizationType[name])
    return out.view(np.uint8).reshape(int(np.prod(x.shape[:-1])), -1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.view(np.uint32))


# Byte offsets of the f16 scales in each block: random bytes there could be NaN or inf.
HALF_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in every field (all bit patterns of quants and sub-scales), finite floats."""
    if name in FLOAT_TYPES:
        return gguf_bytes(rng.standard_normal((n_blocks, 1)) * 3, name)
    raw = rng.integers(0, 256, (n_blocks, type_size(name)), dtype=np.uint8)
    magnitude = rng.choice([1e-4, 1.0, 100.0], (n_blocks, 1))
    for offset in HALF_FIELDS[name]:
        raw[:, offset : offset + 2] = (rng.standard_normal((n_blocks, 1)) * magnitude).astype(np.float16).view(np.uint8)
    return raw


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


def sha256(a: np.ndarray | torch.Tensor) -> str:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
