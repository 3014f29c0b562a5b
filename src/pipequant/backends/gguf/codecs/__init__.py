"""GGML block quantization codecs written with plain torch ops, assembled from their modules:
`floats` (F32, F16, BF16), `legacy` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and `kquants` (Q2_K..Q6_K), each
type a subclass of `base.GGMLQuant` with its sizes from `table`.

The layout and the arithmetic follow gguf-py's ``gguf/quants.py`` (one class per type,
``quantize_blocks``/``dequantize_blocks`` on a batch of blocks), so that:

* ``dequantize`` is bit-exact with ``gguf.quants.dequantize`` for every type, and
* ``quantize`` is byte-identical with ``gguf.quants.quantize`` where gguf-py has a quantizer
  (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1). The K-quants, which gguf-py cannot
  produce, follow llama.cpp's ``quantize_row_q*_K_ref``.

On CPU, dequantization and the block-type quantizers run compiled kernels instead
(`pipequant.kernels.ggml`) that give the same bytes; the torch codecs run on other devices (and
without the kernels) and remain the readable statement of each layout. Neither needs the ``gguf``
package, which the tests use as the reference.
"""

from __future__ import annotations

import enum

import torch

from . import floats, kquants, legacy
from .base import GGMLQuant
from .table import GGML_TYPE_TABLE, GGML_TYPES, GGMLType

#: a type name (any case) or an enum member of that name, such as gguf's ``GGMLQuantizationType``
QuantType = str | enum.Enum

#: the codec of each type, by name, in type-id order (`table.GGML_TYPES`; a test checks that every type has one)
CODECS: dict[str, type[GGMLQuant]] = {
    codec.ggml_type.name: codec
    for codec in sorted((*floats.CODECS, *legacy.CODECS, *kquants.CODECS), key=lambda codec: codec.ggml_type.type_id)
}

__all__ = [
    "CODECS",
    "GGML_TYPES",
    "GGML_TYPE_TABLE",
    "GGMLQuant",
    "GGMLType",
    "QuantType",
    "block_size",
    "dequantize",
    "quantize",
    "resolve",
    "type_size",
]


def resolve(qtype: QuantType) -> type[GGMLQuant]:
    """The codec class for a type name (any case) or an enum member of that name (gguf's
    ``GGMLQuantizationType``)."""
    name = qtype.upper() if isinstance(qtype, str) else qtype.name if isinstance(qtype, enum.Enum) else None
    if name not in CODECS:
        raise ValueError(f"unsupported GGML type {qtype!r}; valid types: {', '.join(GGML_TYPES)}")
    return CODECS[name]


def block_size(qtype: QuantType) -> int:
    """Weights per block (a row length must be a multiple of it)."""
    return resolve(qtype).block_size


def type_size(qtype: QuantType) -> int:
    """Bytes per block."""
    return resolve(qtype).type_size


def _check_row(codec: type[GGMLQuant], row: int, shape: tuple[int, ...]) -> None:
    if 0 in shape:
        raise ValueError(f"shape {shape} has no elements; a GGML tensor holds at least one block")
    if row % codec.block_size:
        raise ValueError(
            f"row length {row} is not a multiple of the {codec.ggml_type.name} block size {codec.block_size}"
        )


def quantize(tensor: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    """Quantize along the last dim; returns uint8 ``(rows, bytes_per_row)`` like gguf-py.

    Any float dtype is accepted; the math runs in float32 on the tensor's device.
    """
    codec = resolve(qtype)
    row = tensor.shape[-1] if tensor.dim() else 1
    _check_row(codec, row, tuple(tensor.shape))
    return codec.quantize_rows(tensor.reshape(-1, row))


def dequantize(
    raw: torch.Tensor, qtype: QuantType, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Decode GGML bytes (uint8, ``(rows, bytes_per_row)`` or flat) into a ``shape`` tensor."""
    codec = resolve(qtype)
    shape = tuple(shape)
    row = shape[-1] if shape else 1
    _check_row(codec, row, shape)
    numel = 1
    for dim in shape:
        numel *= dim
    expected = numel // codec.block_size * codec.type_size
    if raw.dtype != torch.uint8 or raw.numel() != expected:
        name = codec.ggml_type.name
        raise ValueError(f"{name} data for shape {shape} must be {expected} uint8 bytes, got {raw.numel()} {raw.dtype}")
    raw = raw.contiguous()
    if raw.storage_offset() % 8:  # a slice at an odd byte: the torch codecs view it as wider words
        raw = raw.clone()
    return codec.dequantize_rows(raw.view(-1), dtype).view(shape)
