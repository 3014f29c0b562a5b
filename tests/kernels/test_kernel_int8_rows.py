"""`kernels.int8_rows`: what the per-row int8 kernel accepts, and a clear error, not a C call, otherwise.
(Its bytes against the libraries: tests/backends/test_int8_rows.py.)"""

from __future__ import annotations

import pytest
import torch

from pipequant.kernels import KernelInputError, int8_rows

REFUSED = {
    "on the meta device": torch.empty(4, 8, dtype=torch.bfloat16, device="meta"),
    "float16": torch.randn(4, 8, dtype=torch.float16),
    "not contiguous": torch.randn(8, 4).t(),
    "not a matrix": torch.randn(8),
}


@pytest.mark.parametrize("case", REFUSED)
def test_the_wrapper_refuses_what_the_kernel_cannot_read(case):
    weight = REFUSED[case]
    reason = int8_rows.problem(weight)
    assert reason is not None
    with pytest.raises(KernelInputError, match=reason.split(";")[0][:20]):
        int8_rows.quantize("quanto", weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_are_laid_out_per_library(dtype):
    weight = torch.randn(5, 24, dtype=dtype)
    assert int8_rows.problem(weight) is None
    for library, scale_dtype in [("quanto", dtype), ("torchao", torch.float32), ("bitsandbytes", torch.float32)]:
        data, scale = int8_rows.quantize(library, weight)
        assert data.dtype == torch.int8 and data.shape == (5, 24)
        assert scale.dtype == scale_dtype and scale.shape == (5, 1)


def test_an_unknown_library_is_refused():
    with pytest.raises(KernelInputError, match="no int8 kernel for 'hqq'"):
        int8_rows.quantize("hqq", torch.randn(2, 8))  # type: ignore[arg-type]
