"""`torch.ops.pipequant.gguf_dequantize`: GGML dequantization as a torch custom operator.

`GGUFLinear.forward` dequantizes its blocks on every call, with the compiled C kernel on CPU. A plain
Python call into that kernel (raw pointers, `torch.get_num_threads`) breaks a `torch.compile` graph at
every layer, and dynamo then compiles each `GGUFLinear.forward` apart until it hits its recompile limit.
As a custom operator with a fake implementation (the output's shape and dtype from the arguments alone)
the call is one opaque node that dynamo and inductor trace through, so a model of `GGUFLinear` layers
compiles to one graph, with `fullgraph=True` too, like diffusers' own GGUF layers.
"""

from __future__ import annotations

import torch

from .codecs import dequantize


@torch.library.custom_op("pipequant::gguf_dequantize", mutates_args=())
def gguf_dequantize(raw: torch.Tensor, ggml_type: str, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """``(rows, columns)`` weights in `dtype` from the GGML blocks `raw` of type `ggml_type` (`codecs.dequantize`)."""
    return dequantize(raw, ggml_type, (rows, columns), dtype)


@gguf_dequantize.register_fake
def _(raw: torch.Tensor, ggml_type: str, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    return raw.new_empty((rows, columns), dtype=dtype)
