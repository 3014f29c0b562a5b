"""The 32-weight block types (`codecs.legacy`): gguf-py's rounding ties and NaN blocks, by the torch
codecs and the compiled quantizer alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_cases import LEGACY_TYPES, gguf_bytes

from pipequant.backends.gguf import quantize
from pipequant.backends.gguf.codecs import resolve


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q5_0"])
def test_quantize_rounding_ties_like_gguf(name: str) -> None:
    """Values landing exactly on .5 after scaling (round half away from zero)."""
    rng = np.random.default_rng(3)
    x = rng.integers(-255, 256, (64, 32)).astype(np.float32) / 2
    x[:, 0] = np.where(rng.random(64) < 0.5, 127.0, -127.0)  # scale 1 (Q8_0): x * id = x
    x[1] = -x[1]
    x[2, :] = 0.49999997
    x[2, 0] = 127.0
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), gguf_bytes(x, name))


def nan_blocks() -> np.ndarray:
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
    assert codec.compiled_quantizer, f"{name} has no compiled quantizer"
    if not compiled:
        monkeypatch.setattr(codec, "compiled_quantizer", False)
    x = nan_blocks()[: 6 if compiled else 7]
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), gguf_bytes(x, name))
