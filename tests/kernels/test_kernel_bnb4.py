"""`kernels.bnb4`: what the 4-bit kernel accepts, and a clear error, not a C call, otherwise.
(Its bytes against bitsandbytes: tests/backends/test_bnb_chunked.py.)"""

from __future__ import annotations

import pytest
import torch

from pipequant.kernels import KernelInputError, bnb4

#: nf4's sorted code values: midpoints between them, order None
NF4_BOUNDS = torch.linspace(-0.95, 0.95, 15)


def test_the_wrapper_quantizes_whole_and_partial_blocks():
    values = torch.randn(64 * 3 + 5)
    packed, absmax = bnb4.quantize(values, 64, NF4_BOUNDS, None)
    assert packed.shape == ((values.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    assert absmax.shape == (4,) and absmax.dtype == torch.float32
    assert absmax[0] == values[:64].abs().max()


@pytest.mark.parametrize(
    ("values", "blocksize", "message"),
    [
        (torch.randn(128, device="meta"), 64, "on meta"),
        (torch.randn(2, 64), 64, "2 dimensions"),
        (torch.randn(256)[::2], 64, "not contiguous"),
        (torch.randint(0, 9, (128,)), 64, "torch.int64"),
        (torch.randn(128), 63, "blocksize 63"),
        (torch.randn(128), 8192, "blocksize 8192"),
    ],
)
def test_the_wrapper_refuses_what_the_kernel_cannot_read(values, blocksize, message):
    assert message in bnb4.problem(values, blocksize)
    with pytest.raises(KernelInputError, match=message):
        bnb4.quantize(values, blocksize, NF4_BOUNDS, None)


def test_the_code_tables_are_checked():
    values = torch.randn(128)
    with pytest.raises(KernelInputError, match="bounds has 16 elements where the kernel needs 15"):
        bnb4.quantize(values, 64, torch.linspace(-1, 1, 16), None)
    with pytest.raises(KernelInputError, match="bounds is torch.float64"):
        bnb4.quantize(values, 64, NF4_BOUNDS.double(), None)
    with pytest.raises(KernelInputError, match="order is torch.int64"):
        bnb4.quantize(values, 64, NF4_BOUNDS, torch.arange(16))
