"""The stored llama.cpp reference of the GGML codec tests (see data/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
from codec_cases import DATA


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(DATA) as data:
        return dict(data)
