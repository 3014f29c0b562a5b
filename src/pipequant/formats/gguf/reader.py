"""Reading a .gguf file memory-mapped, as a checkpoint the streaming loader can fill a model from.

The header is parsed and validated first by our own parser (`header.py`, which says why not
gguf-py's reader): every tensor's range is known to lie in the file, aligned and apart from the
others, before the file is mapped and each tensor taken as a numpy view into the map, so opening a
file reads only its header. `GGUFFile` puts every tensor under its diffusers name (a
Flux file in the BFL layout is split and reordered by rows, see `flux_names.py`, still as views);
`GGUFCheckpoint` is the view the streaming loader reads one layer at a time through, the same
interface as a folder of safetensors (`ComponentCheckpoint`). Reading a tensor copies only that
tensor's bytes out of the map; the file is never read whole into memory (diffusers' loader copies
every tensor of the file first).

A linear layer's weight in a quantized type (or one pipequant's metadata lists as a GGUF layer)
is presented as a stored `GGUFLinear` (``weight`` raw blocks plus ``weight_type``, see
`backend.py`), so the backend's `restore` rebuilds the layer from the bytes as they are. Every
other tensor is a plain tensor: F32/F16/BF16 as stored, and a quantized weight of a layer that is
not linear (a convolution) dequantized.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from gguf.constants import GGUFValueType

from ...backends.gguf.codecs.table import GGML_TYPES
from ...checkpoint import CheckpointError
from ...page_cache import FileRange, OpenFiles, ReadAhead, read_tensor
from .flux_names import flux_tensors_from_bfl, is_bfl_flux, strip_bfl_prefix
from .header import GGUFHeader, TensorInfo, read_header
from .metadata import PipequantMetadata

_PLAIN_TYPES = ("F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class TensorPiece:
    """A diffusers tensor inside one file tensor: its rows ``start:stop``, halves swapped if `swap_halves`."""

    name: str
    ggml_type: str
    file_shape: tuple[int, ...]
    #: the whole file tensor's bytes (range checked by `read_header`)
    source: FileRange
    start: int
    stop: int
    swap_halves: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.stop - self.start, *self.file_shape[1:])

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in _PLAIN_TYPES

    @property
    def _one_row(self) -> bool:
        """A 1-D tensor of GGML blocks: one row of bytes, never split (see `_bfl_pieces`)."""
        return self.quantized and len(self.file_shape) == 1

    @property
    def range(self) -> FileRange:
        """The bytes of the piece's rows in the file (before any halves are swapped)."""
        if self._one_row:
            return self.source
        row_nbytes = self.source.nbytes // self.file_shape[0]
        return FileRange(self.source.path, self.source.offset + self.start * row_nbytes, self.shape[0] * row_nbytes)

    def raw(self, files: OpenFiles, transient: bool = False) -> torch.Tensor:
        """The piece's bytes in memory of its own (read with `files`, then dropped from the page cache): uint8,
        one row of GGML blocks per row; with `transient`, see `Checkpoint.read`."""
        source = self.range
        rows = 1 if self._one_row else self.shape[0]
        try:
            shape = (rows, source.nbytes // rows if rows else 0)
            raw = read_tensor(files, source, torch.uint8, shape, transient=transient)
        except (EOFError, OSError) as error:
            raise CheckpointError(
                f"{source.path}: cannot read tensor {self.name!r} ({error}). The file is truncated or corrupt; "
                "replace it with a complete copy."
            ) from error
        if self.swap_halves:
            half = rows // 2
            raw = torch.cat((raw[half:], raw[:half]))
        return raw

    def tensor(self, files: OpenFiles, transient: bool = False) -> torch.Tensor:
        """The piece as a plain tensor: stored floats as they are, quantized weights dequantized to float32; with
        `transient`, see `Checkpoint.read`."""
        raw = self.raw(files, transient)
        if self.ggml_type == "F32":
            return raw.view(torch.float32).reshape(self.shape)
        if self.ggml_type == "F16":
            return raw.view(torch.float16).reshape(self.shape)
        if self.ggml_type == "BF16":
            return raw.view(torch.bfloat16).reshape(self.shape)
        from ...backends.gguf.codecs import dequantize

        return dequantize(raw, self.ggml_type, self.shape)


class GGUFFile:
    """A .gguf file's header: its tensors under diffusers names (as `TensorPiece`s, read on demand with
    `page_cache`, like safetensors shards), and pipequant's metadata."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        #: the descriptors the pieces are read with (made before the header is read: see `OpenFiles`)
        self.open_files = OpenFiles([self.path])
        header = read_header(self.path)
        self.architecture = _string_field(self.path, header, "general.architecture")
        fields = {key: _string_field(self.path, header, key) for key in header.fields if key.startswith("pipequant.")}
        try:
            self.metadata = PipequantMetadata.from_strings(fields)
        except ValueError as error:
            raise CheckpointError(f"{self.path}: {error}; the file is corrupt or was edited.") from error
        self.type_counts: Counter[str] = Counter(tensor.ggml_type.name for tensor in header.tensors)
        _check_types(self.path, header)
        stored = {
            strip_bfl_prefix(tensor.name): (tensor, FileRange(self.path, tensor.offset, tensor.nbytes))
            for tensor in header.tensors
        }
        if len(stored) != len(header.tensors):
            raise CheckpointError(f"{self.path}: some tensors are stored twice, with and without the BFL name prefix.")
        self.layout = "bfl" if is_bfl_flux(stored) else "diffusers"
        self.pieces = (
            _bfl_pieces(self.path, stored)
            if self.layout == "bfl"
            else {name: _whole(name, *stored_tensor) for name, stored_tensor in stored.items()}
        )

    def describe_types(self) -> str:
        """e.g. "Q4_K: 304 tensors, F32: 476 tensors", for messages."""
        return ", ".join(f"{name}: {count} tensors" for name, count in self.type_counts.most_common())


def _string_field(path: Path, header: GGUFHeader, key: str) -> str | None:
    if key not in header.fields:
        return None
    if header.field_types[key] != GGUFValueType.STRING:
        raise CheckpointError(
            f"{path}: metadata {key!r} is a {header.field_types[key].name}, not a STRING; the file is corrupt or "
            "was edited."
        )
    return header.fields[key]


def _check_types(path: Path, header: GGUFHeader) -> None:
    unsupported = [(t.name, t.ggml_type.name) for t in header.tensors if t.ggml_type.name not in GGML_TYPES]
    if unsupported:
        shown = ", ".join(f"{name!r} ({qtype})" for name, qtype in unsupported[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise CheckpointError(
            f"{path}: {len(unsupported)} tensors are in GGML types pipequant cannot read: {shown}{more}. "
            f"Supported types: {', '.join(GGML_TYPES)}. Use a file quantized to one of those."
        )


def _whole(name: str, tensor: TensorInfo, source: FileRange) -> TensorPiece:
    return TensorPiece(name, tensor.ggml_type.name, tensor.shape, source, 0, tensor.shape[0])


def _bfl_pieces(path: Path, stored: dict) -> dict[str, TensorPiece]:
    """Diffusers name -> piece, for a Flux file in the BFL layout; names outside the table pass through."""
    if "img_in.weight" not in stored:
        raise CheckpointError(
            f"{path}: the tensor names look like Flux (double_blocks.*) but img_in.weight is missing."
        )
    hidden = stored["img_in.weight"][0].shape[0]
    pieces: dict[str, TensorPiece] = {}
    for fused in flux_tensors_from_bfl(stored):
        tensor = stored.pop(fused.bfl, None)
        if tensor is None:
            continue  # left for the loader to report as missing
        whole = _whole(fused.bfl, *tensor)
        rows = whole.shape[0]
        sizes = [hidden] * (len(fused.parts) - 1)
        sizes.append(rows - sum(sizes))
        if sizes[-1] <= 0 or (fused.swap_halves and rows % 2) or (whole.quantized and len(whole.shape) == 1):
            raise CheckpointError(
                f"{path}: tensor {fused.bfl!r} ({whole.ggml_type}, shape {list(whole.shape)}) does not split into "
                f"{', '.join(fused.parts)} for hidden size {hidden}. The file is not a Flux transformer pipequant can "
                "read."
            )
        start = 0
        for part, size in zip(fused.parts, sizes):
            pieces[part] = dataclasses.replace(
                whole, name=part, start=start, stop=start + size, swap_halves=fused.swap_halves
            )
            start += size
    pieces.update({name: _whole(name, *tensor) for name, tensor in stored.items()})
    return pieces


class GGUFCheckpoint:
    """The tensors of a `GGUFFile` as the streaming loader reads a checkpoint (a `checkpoint.Checkpoint`).

    `linear_layers` are the names of the model's linear layers: those whose weight the file holds
    quantized (or which pipequant's metadata lists as GGUF layers) are presented as stored GGUF layers.
    """

    def __init__(self, file: GGUFFile, linear_layers: set[str]) -> None:
        from ...backends.gguf.backend import TYPE_TENSOR

        self.file = file
        self.folder = file.path  # the Checkpoint's name for where the tensors are, in the loader's messages
        listed = file.metadata.gguf_layers
        self.gguf_layers: dict[str, TensorPiece] = {}
        self._tensors: dict[str, TensorPiece] = {}
        for name, piece in file.pieces.items():
            layer, _, leaf = name.rpartition(".")
            is_gguf = piece.quantized or (listed is not None and layer in listed)
            if leaf == "weight" and layer in linear_layers and is_gguf:
                self.gguf_layers[layer] = piece
            else:
                self._tensors[name] = piece
        self._type_keys = {f"{layer}.{TYPE_TENSOR}": layer for layer in self.gguf_layers}

    def keys(self) -> list[str]:
        return [*self._tensors, *(f"{layer}.weight" for layer in self.gguf_layers), *self._type_keys]

    def file_of(self, key: str) -> Path:
        return self.file.path

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._type_keys:
            return ()
        return self._piece(key).shape

    def dtype(self, key: str) -> str:
        return "I32" if key in self._type_keys else self._piece(key).ggml_type

    def is_floating(self, key: str) -> bool:
        return key not in self._type_keys  # every type pipequant reads decodes to floats

    def metadata(self) -> dict[str, str]:
        from ...backends.gguf.backend import REQUESTED_TYPE_KEY

        fallbacks = self.file.metadata.type_fallbacks
        return {f"{layer}.{REQUESTED_TYPE_KEY}": fallbacks[layer] for layer in self.gguf_layers if layer in fallbacks}

    def read(self, key: str, device: torch.device | str = "cpu", *, transient: bool = False) -> torch.Tensor:
        from ...backends.gguf.backend import type_id

        if key in self._type_keys:
            piece = self.gguf_layers[self._type_keys[key]]
            return torch.tensor(type_id(piece.ggml_type), dtype=torch.int32, device=device)
        layer = key.removesuffix(".weight")
        if layer in self.gguf_layers and key.endswith(".weight"):
            return self.gguf_layers[layer].raw(self.file.open_files, transient).to(device)
        return self._tensors[key].tensor(self.file.open_files, transient).to(device)

    def read_ahead(self, keys: Sequence[str]) -> ReadAhead:
        """Read the file ranges of `keys` ahead, in the order the loader reads them (see `page_cache`)."""
        # a layer's type key is made from the header: nothing to read
        ranges = [self._piece(key).range for key in keys if key not in self._type_keys]
        return ReadAhead(self.file.open_files, ranges)

    def _piece(self, key: str) -> TensorPiece:
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in self.gguf_layers:
            return self.gguf_layers[layer]
        return self._tensors[key]
