"""torchao weight quantization, applied by torchao's own `quantize_` to each layer as it streams in.

Layers stay `nn.Linear` whose weight is a torchao tensor subclass (`Int8Tensor`, `Float8Tensor`,
...), exactly what `quantize_` makes of a full-precision model, so torchao's kernels run them.

Users write what diffusers' `TorchAoConfig` took: a short name (``"int8wo"``) or torchao's old
function name (``"int8_weight_only"``) with its keyword options, or a torchao config object.

`names` holds the name table (`QUANT_TYPES`) and what each torchao class takes and where it runs;
`config` the `TorchAoConfig`; `quantize` the three ways a layer is quantized; `saving` how a layer
is stored and rebuilt; `backend` the `Backend` that ties them together.
"""

from __future__ import annotations

from ..base import Backend
from .backend import TorchAoBackend
from .config import TorchAoConfig
from .names import QUANT_TYPES

BACKENDS: tuple[Backend, ...] = (TorchAoBackend(),)

__all__ = ["BACKENDS", "QUANT_TYPES", "TorchAoBackend", "TorchAoConfig"]
