"""safetensors files whose one-byte tensors (int8 weights, packed 4-bit, GGML blocks) start 64-byte aligned.

Readers map a safetensors file and use its tensors in place, at whatever address the file layout
gives them. torch's CPU int8 matmul, which optimum-quanto's int8 layers run on, crashes on int8
weights that are not 64-byte aligned: diffusers loading a quanto folder on CPU (its own folders
too) segfaults on the first forward. safetensors orders tensors by dtype size, then name, so the
one-byte tensors come last, together; padding the header (a metadata entry) moves them onto a
64-byte boundary, and they stay aligned where their sizes are multiples of 64, as weights' are.

The layout is predicted from safetensors' documented order and checked by reading the header back;
should a safetensors version order differently, the file is written once more with the measured
padding. safetensors has no alignment option, hence this module.

safetensors writes the metadata in hash order, which differs between runs; with more than one entry
the same tensors would give different bytes. The header is rewritten in place with the metadata
sorted (same length, same content), so a file's bytes depend only on what it holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import SAFETENSORS_DTYPES, header_bytes

ALIGNMENT = 64
PADDING_KEY = "pipequant.alignment_padding"
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
#: what a metadata entry adds to the header besides its value: , " key " : " "
_ENTRY_OVERHEAD = len(PADDING_KEY) + 6


def save_aligned(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """`safetensors.torch.save_file`, with the one-byte tensors' data aligned to `ALIGNMENT` bytes in the file."""
    metadata = dict(metadata)
    written = _padding(*_predicted_layout(tensors, metadata))
    save_file(dict(tensors), path, metadata={**metadata, PADDING_KEY: written})
    measured = _padding(*_written_layout(path))
    if measured != written:  # the prediction missed: write again with the layout as written
        save_file(dict(tensors), path, metadata={**metadata, PADDING_KEY: measured})
    _sort_metadata(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header with its metadata in sorted order, in place: the same bytes for the same content."""
    with open(path, "r+b") as file:
        raw = header_bytes(file)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
        sorted_raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(sorted_raw) != len(raw.rstrip(b" ")):
            return  # serialized differently from safetensors (escaping): leave its header as it wrote it
        file.seek(8)
        file.write(sorted_raw.ljust(len(raw), b" "))


def _padding(length: int, first_byte_tensor: int | None) -> str:
    """The padding value that puts the data at `first_byte_tensor` (offset in the data section) on the alignment,
    given the header's `length` without the padding entry; empty where nothing can or needs to be aligned."""
    if first_byte_tensor is None or first_byte_tensor % 8:  # the header grows in steps of 8 bytes
        return ""
    for size in range(8 * ALIGNMENT):
        header_size = -(-(length + _ENTRY_OVERHEAD + size) // 8) * 8  # safetensors pads the header to 8 bytes
        if (8 + header_size + first_byte_tensor) % ALIGNMENT == 0:
            return " " * size
    raise AssertionError("a header size in steps of 8 reaches every multiple of 8 modulo the alignment")


def _predicted_layout(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[int, int | None]:
    """(header length without the padding entry, offset of the first one-byte tensor), as safetensors will write."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    first_byte_tensor = None
    for name, tensor in sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0])):
        if tensor.dtype not in _NAMES:
            return 0, None  # a dtype this module does not name: no prediction, the written header decides
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.element_size() == 1 and first_byte_tensor is None:
            first_byte_tensor = offset
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    return len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()), first_byte_tensor


def _written_layout(path: Path) -> tuple[int, int | None]:
    """(header length without the padding entry and spaces, offset of the first one-byte tensor) as written."""
    with open(path, "rb") as file:
        raw = header_bytes(file)
    header = json.loads(raw)
    padding = header.get("__metadata__", {}).get(PADDING_KEY, "")
    length = len(raw.rstrip(b" ")) - _ENTRY_OVERHEAD - len(padding.encode())
    one_byte = {name for name, dtype in SAFETENSORS_DTYPES.items() if dtype.itemsize == 1}
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    offsets = [entry["data_offsets"][0] for entry in tensors.values() if entry["dtype"] in one_byte]
    return length, min(offsets) if offsets else None
