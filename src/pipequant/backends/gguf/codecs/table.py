"""The GGML types pipequant reads and writes, and their block sizes: the one table the codecs, the
GGUF config and the compiled kernels' wrapper use.

The same list is in C as `GGML_TYPE_LIST` (`_native/common.h`); a test reads it there and checks it
against this one, and another checks this one against gguf-py's `GGML_QUANT_SIZES`. Plain data, so
configs are validated and layer sizes computed without the codecs or the ``gguf`` package.
"""

from __future__ import annotations

from typing import NamedTuple


class GGMLType(NamedTuple):
    """One GGML storage type: `block_size` weights are stored in `type_size` bytes."""

    name: str
    #: the number gguf files use (gguf's `GGMLQuantizationType`)
    type_id: int
    block_size: int
    type_size: int


#: weights per K-quant superblock (gguf's QK_K)
QK_K = 256

#: every type, by name, in type-id order (as gguf-py's GGML_QUANT_SIZES: weights and bytes per block)
GGML_TYPE_TABLE: dict[str, GGMLType] = {
    t.name: t
    for t in (
        GGMLType("F32", 0, 1, 4),
        GGMLType("F16", 1, 1, 2),
        GGMLType("Q4_0", 2, 32, 18),
        GGMLType("Q4_1", 3, 32, 20),
        GGMLType("Q5_0", 6, 32, 22),
        GGMLType("Q5_1", 7, 32, 24),
        GGMLType("Q8_0", 8, 32, 34),
        GGMLType("Q2_K", 10, QK_K, 84),
        GGMLType("Q3_K", 11, QK_K, 110),
        GGMLType("Q4_K", 12, QK_K, 144),
        GGMLType("Q5_K", 13, QK_K, 176),
        GGMLType("Q6_K", 14, QK_K, 210),
        GGMLType("BF16", 30, 1, 2),
    )
}

GGML_TYPES: tuple[str, ...] = tuple(GGML_TYPE_TABLE)
"""Names of the supported types, in GGML type-id order."""
