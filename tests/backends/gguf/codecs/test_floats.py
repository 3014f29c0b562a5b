"""The float types (`codecs.floats`): NaN payloads kept as gguf-py keeps them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_cases import gguf_bytes

from pipequant.backends.gguf import quantize


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_nan_payloads_like_gguf(name: str) -> None:
    bits = np.array([0x7F800001, 0x7FC00000, 0xFFC12345, 0x7F812345, 0x7FA00000, 0x3F800000], dtype=np.uint32)
    x = bits.view(np.float32).reshape(1, -1)
    assert np.array_equal(quantize(torch.from_numpy(x), name).numpy(), gguf_bytes(x, name))
