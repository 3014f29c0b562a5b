"""Parsing and validating a GGUF header before anything is allocated for what it claims.

Why our own parser and not gguf-py's `GGUFReader`: the reader loops over every count the file
states (a metadata array claiming 2**62 items spins forever, reading nothing past the end of the
file), builds one numpy view per array item (a valid 10**7-item array costs gigabytes of objects),
recurses once per nesting level, and takes tensor offsets and types as they come (a misaligned
offset, two tensors on the same bytes or a type whose blocks run past the tensor's range all load
as other weights). None of that can be checked from outside before it runs, so this module reads
the header itself. gguf-py still provides the format's constants (value types, GGML type sizes).

What a file must satisfy, checked before each loop or allocation:

- every count, string length and array length fits in the bytes left in the file (each item of
  an array needs at least its smallest encoded size), arrays nest at most `MAX_ARRAY_DEPTH` deep;
- strings (keys, values, tensor names) are UTF-8, keys and tensor names unique, value types known;
- ``general.alignment`` is a UINT32 power of two;
- tensors have 1 to 4 dims, none zero, a known GGML type whose block size divides the first
  (innermost) dim; their byte ranges start aligned in the data section, lie inside the file, and
  sorted by offset each starts exactly where the previous one ends (padded to the alignment),
  as ggml's own loader requires: so no two tensors share bytes and a type relabelled to one of
  another size no longer fits its range.

So parsing costs time and memory proportional to the header's size, never to its claims. Numeric
arrays are kept as one numpy array each (not an object per item).
"""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from ...checkpoint import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
#: GGML_MAX_DIMS
MAX_DIMS = 4
#: deepest nesting of arrays in arrays accepted (ggml reads none; gguf-py writes lists of lists)
MAX_ARRAY_DEPTH = 8
ALIGNMENT_KEY = "general.alignment"

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
#: the fewest bytes one value of each type takes: what a claimed count is checked against
_MIN_SIZES: dict[GGUFValueType, int] = {
    **{kind: np.dtype(code).itemsize for kind, code in _SCALARS.items()},
    GGUFValueType.STRING: 8,  # its length
    GGUFValueType.ARRAY: 12,  # item type and count
}
_KV_MIN_SIZE = 8 + 4 + 1  # key length, value type, smallest value
_TENSOR_INFO_MIN_SIZE = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it, after validation."""

    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]  # ggml order: innermost (row length) first
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """torch / numpy order: outermost first."""
        return tuple(reversed(self.dims))


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]  # str, int, float, bool, numpy array (numeric arrays) or list (others)
    field_types: dict[str, GGUFValueType]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


class _Malformed(Exception):
    def __init__(self, problem: str, offset: int) -> None:
        super().__init__(problem)
        self.problem, self.offset = problem, offset


def read_header(path: str | Path) -> GGUFHeader:
    """The validated header of the .gguf file `path`; CheckpointError names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file.")
    with open(path, "rb") as handle:
        size = path.stat().st_size
        if size == 0:
            return parse_header(b"", path)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return parse_header(mapped, path)


def parse_header(buffer: bytes | mmap.mmap, name: str | Path) -> GGUFHeader:
    """The validated header of the GGUF bytes `buffer` (the whole file); `name` is for messages."""
    try:
        return _Parser(buffer).header()
    except _Malformed as error:
        raise CheckpointError(
            f"{name}: not a readable GGUF file ({error.problem}, at byte {error.offset}). It is truncated or corrupt "
            "(or was edited); replace it with a complete copy from its source."
        ) from None


class _Parser:
    def __init__(self, buffer: bytes | mmap.mmap) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.at = 0

    def header(self) -> GGUFHeader:
        if self.take(4) != MAGIC:
            raise _Malformed("it does not start with the GGUF magic", 0)
        version = self.unsigned(4)
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and (version >> 16) in VERSIONS:
                raise _Malformed("it is a big-endian GGUF file, which pipequant does not read", 4)
            raise _Malformed(f"GGUF version {version} (pipequant reads versions {VERSIONS})", 4)
        tensor_count = self.count(_TENSOR_INFO_MIN_SIZE, "tensors")
        kv_count = self.count(_KV_MIN_SIZE, "metadata entries")
        fields: dict[str, Any] = {}
        types: dict[str, GGUFValueType] = {}
        for _ in range(kv_count):
            start = self.at
            key = self.string()
            if key in fields:
                raise _Malformed(f"metadata key {key!r} appears twice", start)
            kind = self.value_type()
            fields[key], types[key] = self.value(kind, 0), kind
        alignment = self.alignment(fields, types)
        infos = [self.tensor_info() for _ in range(tensor_count)]
        data_offset = -(-self.at // alignment) * alignment
        if data_offset > self.size and infos:
            raise _Malformed("the file ends before its data section", self.size)
        tensors = self.placed(infos, data_offset, alignment)
        return GGUFHeader(version, fields, types, tensors, alignment, data_offset)

    # -- primitives: each checks the bytes left before it reads

    def take(self, n: int) -> bytes:
        if n > self.size - self.at:
            raise _Malformed(f"{n} bytes are needed but only {self.size - self.at} are left", self.at)
        data = bytes(self.buffer[self.at : self.at + n])
        self.at += n
        return data

    def unsigned(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def count(self, min_item_size: int, what: str) -> int:
        """A uint64 count of items of at least `min_item_size` bytes each, checked against the bytes left."""
        start = self.at
        count = self.unsigned(8)
        if count * min_item_size > self.size - self.at:
            raise _Malformed(
                f"it claims {count} {what}, more than the {self.size - self.at} bytes left can hold", start
            )
        return count

    def string(self) -> str:
        start = self.at
        length = self.unsigned(8)
        if length > self.size - self.at:
            raise _Malformed(f"a string of {length} bytes, but only {self.size - self.at} bytes are left", start)
        data = self.take(length)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Malformed(f"a string that is not UTF-8 ({error.reason} at its byte {error.start})", start) from None

    def value_type(self) -> GGUFValueType:
        start = self.at
        raw = self.unsigned(4)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Malformed(f"unknown metadata value type {raw}", start) from None

    def value(self, kind: GGUFValueType, depth: int) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            return self.array(depth + 1)
        start = self.at
        value = np.frombuffer(self.take(_MIN_SIZES[kind]), dtype=_SCALARS[kind])[0].item()
        if kind == GGUFValueType.BOOL:
            if value not in (0, 1):
                raise _Malformed(f"a BOOL of value {value}", start)
            return bool(value)
        return value

    def array(self, depth: int) -> Any:
        start = self.at
        if depth > MAX_ARRAY_DEPTH:
            raise _Malformed(f"arrays nested more than {MAX_ARRAY_DEPTH} deep", start)
        kind = self.value_type()
        count = self.count(_MIN_SIZES[kind], f"{kind.name} array items")
        if kind in _SCALARS:
            values = np.frombuffer(self.take(count * _MIN_SIZES[kind]), dtype=_SCALARS[kind])
            if kind == GGUFValueType.BOOL:
                if (values > 1).any():
                    raise _Malformed("a BOOL array holds values other than 0 and 1", start)
                return values.astype(bool)
            return values
        return [self.value(kind, depth) for _ in range(count)]

    # -- what the values must be

    def alignment(self, fields: dict[str, Any], types: dict[str, GGUFValueType]) -> int:
        if ALIGNMENT_KEY not in fields:
            return GGUF_DEFAULT_ALIGNMENT
        value = fields[ALIGNMENT_KEY]
        if types[ALIGNMENT_KEY] != GGUFValueType.UINT32 or value == 0 or value & (value - 1):
            raise _Malformed(f"{ALIGNMENT_KEY} must be a UINT32 power of two, not {value!r}", self.at)
        return value

    def tensor_info(self) -> tuple[int, str, tuple[int, ...], GGMLQuantizationType, int]:
        start = self.at
        name = self.string()
        n_dims = self.unsigned(4)
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Malformed(f"tensor {name!r} has {n_dims} dims (1 to {MAX_DIMS} are valid)", start)
        dims = tuple(self.unsigned(8) for _ in range(n_dims))
        raw_type = self.unsigned(4)
        offset = self.unsigned(8)
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise _Malformed(f"tensor {name!r} has unknown GGML type id {raw_type}", start) from None
        if 0 in dims:
            raise _Malformed(f"tensor {name!r} has a zero dim ({list(dims)})", start)
        block = GGML_QUANT_SIZES[ggml_type][0]
        if dims[0] % block:
            raise _Malformed(
                f"tensor {name!r}: its row length {dims[0]} is not a multiple of the {ggml_type.name} block size "
                f"{block}",
                start,
            )
        return start, name, dims, ggml_type, offset

    def placed(self, infos: list, data_offset: int, alignment: int) -> list[TensorInfo]:
        """The tensors, each checked to be aligned and packed in the data section like ggml's loader wants."""
        names: set[str] = set()
        tensors = []
        for start, name, dims, ggml_type, offset in infos:
            if name in names:
                raise _Malformed(f"tensor name {name!r} appears twice", start)
            names.add(name)
            if offset % alignment:
                raise _Malformed(
                    f"tensor {name!r} starts at data offset {offset}, not a multiple of {alignment}", start
                )
            block, size = GGML_QUANT_SIZES[ggml_type]
            nbytes = dims[0] // block * size
            for dim in dims[1:]:
                nbytes *= dim
            tensors.append(TensorInfo(name, ggml_type, dims, data_offset + offset, nbytes))
        expected, end, before = data_offset, data_offset, "the data section's start"
        for tensor in sorted(tensors, key=lambda t: t.offset):
            described = f"tensor {tensor.name!r} ({tensor.ggml_type.name}, shape {list(tensor.shape)})"
            if tensor.offset != expected:
                problem = "overlaps" if tensor.offset < expected else "leaves a gap after"
                raise _Malformed(
                    f"{described} starts at byte {tensor.offset} and so {problem} {before}, which ends at byte "
                    f"{expected}: a tensor's offset, type or shape was changed",
                    tensor.offset,
                )
            end = tensor.offset + tensor.nbytes
            if end > self.size:
                raise _Malformed(
                    f"{described} needs {tensor.nbytes} bytes from byte {tensor.offset}, past the end of the file "
                    f"({self.size} bytes)",
                    tensor.offset,
                )
            expected, before = -(-end // alignment) * alignment, f"tensor {tensor.name!r}"
        if tensors and self.size - end >= alignment:
            raise _Malformed(
                f"{self.size - end} bytes follow the last tensor's data, which its type and shape do not account for",
                end,
            )
        return tensors
