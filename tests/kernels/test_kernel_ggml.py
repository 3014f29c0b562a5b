"""`kernels.ggml`: the compiled GGML quantizers give the torch codecs' bytes, and the wrapper refuses
what the kernels cannot read or write with a clear error, not a C call."""

from __future__ import annotations

import pytest
import torch

from pipequant.backends.gguf.codecs import GGML_TYPE_TABLE, resolve
from pipequant.kernels import KernelInputError, ggml

LEGACY_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
Q8_0 = GGML_TYPE_TABLE["Q8_0"]


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
def test_compiled_quantizers_match_the_torch_code(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the block types are quantized by compiled kernels; the torch code (the path on other
    devices) must give the same bytes, for every source dtype the kernels read."""
    codec = resolve(name)
    assert codec.compiled_quantizer, f"{name} has no compiled quantizer"
    x = _awkward_rows().to(dtype)
    compiled = codec.quantize_rows(x)
    monkeypatch.setattr(codec, "compiled_quantizer", False)
    assert torch.equal(compiled, codec.quantize_rows(x))


def test_quantize_refuses_what_the_kernel_cannot_read_or_write():
    out = torch.empty(2, 34, dtype=torch.uint8)
    for source, message in [
        (torch.randn(64, device="meta"), "on meta"),
        (torch.randn(64).double(), "torch.float64"),
        (torch.randn(64, 2).t(), "not contiguous"),
        (torch.randn(48), "48 Q8_0 weights are not whole blocks of 32"),
        (torch.randn(96), "the Q8_0 output has 68 elements where the kernel needs 102"),
    ]:
        with pytest.raises(KernelInputError, match=message):
            ggml.quantize(Q8_0, source, out)
    with pytest.raises(KernelInputError, match="the Q8_0 output is torch.int8"):
        ggml.quantize(Q8_0, torch.randn(64), out.view(torch.int8))


def test_dequantize_refuses_what_the_kernel_cannot_read_or_write():
    raw = torch.zeros(68, dtype=torch.uint8)
    for raw_bytes, out, message in [
        (raw, torch.empty(64, dtype=torch.float16), "writes float32 or bfloat16, not torch.float16"),
        (raw.view(torch.int8), torch.empty(64), "the GGML bytes is torch.int8"),
        (raw[:50], torch.empty(64), "50 Q8_0 bytes are not whole blocks of 34"),
        (raw, torch.empty(32), "the output has 32 elements where the kernel needs 64"),
        (raw, torch.empty(128)[::2], "the output is not contiguous"),
    ]:
        with pytest.raises(KernelInputError, match=message):
            ggml.dequantize(Q8_0, raw_bytes, out)


def test_the_wrapper_writes_what_the_codec_reads():
    x = torch.randn(4, 64)
    out = torch.empty(4, 68, dtype=torch.uint8)
    ggml.quantize(Q8_0, x, out)
    back = torch.empty(4, 64, dtype=torch.bfloat16)
    ggml.dequantize(Q8_0, out.view(-1), back)
    assert (back.float() - x).abs().max() < 0.05
