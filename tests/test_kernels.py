"""The compiled kernels load, and a missing one is said, not hidden."""

from __future__ import annotations

import pytest

from pipequant.kernels import compiled


@pytest.mark.parametrize("name", ["int8_rows", "bnb4", "ggml_quantize", "ggml_dequantize"])
def test_every_kernel_is_built(name):
    """setup.py builds them optionally; on a machine with a compiler (CI's) each must be there."""
    assert compiled(name) is not None


def test_a_missing_kernel_is_announced():
    with pytest.warns(UserWarning, match="'no_such_kernel' is not built"):
        assert compiled("no_such_kernel") is None
