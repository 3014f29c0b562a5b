"""The safetensors weights of one component folder: which files, which keys, one tensor at a time.

safetensors reads the headers (and checks them); tensors are read one at a time into memory of
their own (`page_cache.read_tensor`: no file page stays mapped, read-ahead keeps the disk busy while
the previous layer is quantized), so the loader never holds more than the layer it is working on
in full precision. Pickle checkpoints are refused: unpickling runs
arbitrary code, and we never need it because every format we load exists as safetensors.

Files are untrusted: a component reads only files inside its own folder. The shard names of an
index are plain file names (no separators, no "..", not absolute), and no weight file may be a
symlink leading out of the folder, except into the Hub cache's ``blobs`` folder of the same repo
(where `huggingface_hub` keeps the files a snapshot's symlinks point to).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
from safetensors import SafetensorError, safe_open

from .page_cache import FileRange, OpenFiles, ReadAhead, read_tensor

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# diffusers' and transformers' single-file names; other *.safetensors beside them are variants (fp16, ...)
_STANDARD_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")

#: safetensors header dtype names
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """Weights that cannot be read: the message names the file and what to do."""


class Checkpoint(Protocol):
    """What the streaming loader reads a model's tensors through, one at a time: a component's
    safetensors files (`ComponentCheckpoint`) or a .gguf file (`backends.gguf.reader.GGUFCheckpoint`).

    Keys are the stored tensor names; `dtype` is the stored type's name (safetensors' "BF16", or
    a GGML type such as "Q4_K"); `metadata` holds string entries savers keep beside the tensors.
    """

    folder: Path

    def keys(self) -> list[str]: ...

    def file_of(self, key: str) -> Path: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> str: ...

    def is_floating(self, key: str) -> bool:
        """Whether the tensor reads as floating point (what a float parameter needs)."""
        ...

    def metadata(self) -> dict[str, str]: ...

    def read(self, key: str, device: torch.device | str = "cpu", *, transient: bool = False) -> torch.Tensor:
        """The tensor in memory of its own; with `transient` (the caller drops it once used, and gives what it
        keeps to `ReadAhead.copy_mapped`), possibly a view of the file where the open read-ahead serves it."""
        ...

    def read_ahead(self, keys: Sequence[str]) -> ReadAhead:
        """Read `keys` ahead, in the order `read` will be asked for them, while the returned object is open."""
        ...


class ComponentCheckpoint:
    """The safetensors files of one component (single file, or sharded with an index)."""

    def __init__(self, folder: str | Path, variant: str | None = None) -> None:
        """`variant` picks diffusers' variant files (``diffusion_pytorch_model.fp16.safetensors``, its index
        ``...safetensors.index.fp16.json``) and is an error where the folder has none."""
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder; a component needs its own folder of weights.")
        self._index_path = _index_file(self.folder, variant)
        self._weight_map = None if self._index_path is None else read_index(self._index_path)
        self.files = _find_weight_files(self.folder, self._index_path, self._weight_map, variant)
        self._open_files = OpenFiles(self.files)  # before the headers are read
        self._handles = {path: _open(path) for path in self.files}
        self._ranges: dict[str, FileRange] = {}
        for path in self.files:
            self._ranges.update(_data_ranges(path))
        self._metadata: dict[str, str] = {}
        for handle in self._handles.values():
            self._metadata.update(handle.metadata() or {})
        self._file_of: dict[str, Path] = {}
        for path, handle in self._handles.items():
            for key in handle.keys():
                self._file_of[key] = path
        self._check_index_covers_keys()

    def keys(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, key: str) -> Path:
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[key]].get_slice(key).get_shape())

    def metadata(self) -> dict[str, str]:
        """The string metadata of every file's safetensors header, merged (where savers keep non-tensor state)."""
        return self._metadata

    def dtype(self, key: str) -> str:
        """The stored dtype as safetensors names it (e.g. "BF16")."""
        return self._handles[self._file_of[key]].get_slice(key).get_dtype()

    def is_floating(self, key: str) -> bool:
        dtype = SAFETENSORS_DTYPES.get(self.dtype(key))
        return dtype is not None and dtype.is_floating_point

    def stored_float_dtype(self) -> torch.dtype | None:
        """The floating dtype that most stored elements have; None when nothing stored is floating.

        What "the dtype this component was saved in" means for a load that keeps stored dtypes.
        """
        elements: Counter[torch.dtype] = Counter()
        for key in self.keys():
            dtype = SAFETENSORS_DTYPES.get(self.dtype(key))
            if dtype is not None and dtype.is_floating_point:
                elements[dtype] += math.prod(self.shape(key))
        return elements.most_common(1)[0][0] if elements else None

    def read_ahead(self, keys: Sequence[str]) -> ReadAhead:
        return ReadAhead(self._open_files, [self._ranges[key] for key in keys])

    def read(self, key: str, device: torch.device | str = "cpu", *, transient: bool = False) -> torch.Tensor:
        """The tensor in memory of its own, moved to `device`; with `transient`, see `Checkpoint.read`."""
        stored = self.dtype(key)
        if stored not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self._file_of[key]}: tensor {key!r} is stored as {stored}, a type pipequant does not load "
                f"(it reads {', '.join(SAFETENSORS_DTYPES)})."
            )
        try:
            tensor = read_tensor(
                self._open_files, self._ranges[key], SAFETENSORS_DTYPES[stored], self.shape(key), transient=transient
            )
        except (EOFError, OSError) as error:
            raise CheckpointError(
                f"{self._file_of[key]}: cannot read tensor {key!r} ({error}). The file is truncated or corrupt; "
                "replace it with a complete copy."
            ) from error
        return tensor if torch.device(device).type == "cpu" else tensor.to(device)

    def read_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Only `rows` (indices along the first dim) of a tensor, on the CPU: the rest is never read.

        For measurements on a sample of a layer, which must not cost reading the whole model.
        """
        tensor_slice = self._handles[self._file_of[key]].get_slice(key)
        try:
            return torch.cat([tensor_slice[row : row + 1] for row in rows])
        except SafetensorError as error:
            raise CheckpointError(
                f"{self._file_of[key]}: cannot read tensor {key!r} ({error}). The file is truncated or corrupt; "
                "replace it with a complete copy."
            ) from error

    def _check_index_covers_keys(self) -> None:
        if self._weight_map is None:
            return
        absent = sorted(set(self._weight_map) - set(self._file_of))
        if absent:
            raise CheckpointError(
                f"{self._index_path} lists {len(absent)} tensors that no shard holds (e.g. {absent[:3]}). "
                "A shard is missing or incomplete; replace the component's files with a complete copy."
            )
        misplaced = sorted(key for key, path in self._file_of.items() if self._weight_map.get(key) != path.name)
        if misplaced:
            raise CheckpointError(
                f"{self._index_path} does not list {len(misplaced)} tensors where the shards hold them "
                f"(e.g. {misplaced[:3]}). The index and the shards come from different saves; replace the "
                "component's files with a complete copy."
            )


def _index_file(folder: Path, variant: str | None = None) -> Path | None:
    indexes = sorted(folder.glob(f"*.safetensors.index.{variant}.json" if variant else "*.safetensors.index.json"))
    return indexes[0] if indexes else None


def read_index(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a safetensors index, checked to be one.

    Each shard name must be a plain file name: the index cannot point outside the folder.
    """

    def invalid(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{index_path} is not a valid safetensors index ({problem}). Replace it with the index the model was "
            "saved with."
        )

    try:
        raw = json.loads(index_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise invalid(f"not UTF-8: {error.reason} at byte {error.start}") from None
    except (ValueError, RecursionError) as error:
        raise invalid(f"not JSON: {type(error).__name__}: {error}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("weight_map"), dict):
        raise invalid('it must be a JSON object with a "weight_map" object')
    weight_map = raw["weight_map"]
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise invalid(f"tensor {key!r} maps to {name!r}, not a file name")
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).is_absolute():
            raise invalid(
                f"tensor {key!r} maps to {name!r}; shard names must be plain file names inside the component folder"
            )
    return weight_map


def _check_inside(folder: Path, path: Path) -> None:
    """`path` (a file named in `folder`) must not be a symlink leading out of it, but for the Hub cache's blobs."""
    target = path.resolve()
    roots = [folder.resolve()]
    parts = folder.absolute().parts
    if "snapshots" in parts:  # huggingface_hub: <repo>/snapshots/<revision>/... -> <repo>/blobs/<hash>
        repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        roots.append((repo / "blobs").resolve())
    if not any(target.is_relative_to(root) for root in roots):
        raise CheckpointError(
            f"{path} is a symlink to {target}, outside the component folder {folder}; pipequant reads only files "
            "inside it. Copy the file into the folder instead of linking it."
        )


def _variant_file(folder: Path, variant: str) -> list[Path]:
    """The single file of `variant` (``model.fp16.safetensors``), or an error listing the weight files there are."""
    for name in _STANDARD_NAMES:
        path = folder / name.replace(".safetensors", f".{variant}.safetensors")
        if path.is_file():
            return [path]
    present = sorted(path.name for path in folder.glob("*.safetensors")) or ["none"]
    raise CheckpointError(
        f"{folder} has no {variant!r} variant of its weights (no {_STANDARD_NAMES[0].replace('.safetensors', '')}"
        f".{variant}.safetensors, model.{variant}.safetensors or their sharded index). Weight files there: "
        f"{', '.join(present)}. Leave variant out to load the standard files."
    )


def _find_weight_files(
    folder: Path, index_path: Path | None, weight_map: dict[str, str] | None, variant: str | None
) -> list[Path]:
    files = _weight_files(folder, index_path, weight_map, variant)
    for path in files:
        _check_inside(folder, path)
    return files


def _weight_files(
    folder: Path, index_path: Path | None, weight_map: dict[str, str] | None, variant: str | None
) -> list[Path]:
    if index_path is not None and weight_map is not None:  # both or neither
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names shards that do not exist: {', '.join(missing)}.")
        return files
    if variant:
        return _variant_file(folder, variant)
    files = sorted(folder.glob("*.safetensors"))
    standard = [path for path in files if path.name in _STANDARD_NAMES]
    if standard:
        return standard[:1]
    if files:
        return files
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}). pipequant reads safetensors only, "
            "because loading a pickle can run arbitrary code. Convert the weights to safetensors with the "
            "library that made them (e.g. model.save_pretrained(path, safe_serialization=True))."
        )
    raise CheckpointError(f"{folder} holds no weights (*.safetensors).")


def header_bytes(file: BinaryIO) -> bytes:
    """The JSON header of the open safetensors `file`, read from its start (its data begins 8 + len bytes in).

    The format: an 8-byte little-endian header length, the JSON header, then the data, with each
    tensor's `data_offsets` counted from the data's start. safetensors' API exposes neither, hence this.
    """
    file.seek(0)
    length = int.from_bytes(file.read(8), "little")
    return file.read(length)


def _data_ranges(path: Path) -> dict[str, FileRange]:
    """Each tensor's bytes in a safetensors file, from its header (which safe_open has already checked)."""
    with open(path, "rb") as file:
        raw = header_bytes(file)
    header = json.loads(raw)
    start = 8 + len(raw)
    return {
        key: FileRange(path, start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
        for key, entry in header.items()
        if key != "__metadata__"
    }


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({error}). It is truncated or corrupt; "
            "replace it with a complete copy."
        ) from error
