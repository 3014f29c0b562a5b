"""Writing tensors of raw GGML bytes to a .gguf file with gguf-py's `GGUFWriter`, atomically.

Tensors are declared first and their bytes produced one at a time while the data section is
written, so a file is written with three tensors (three stacked BFL tensors at most: two being written,
one made) in memory beyond the model, or beyond nothing when the parts are made on demand
(`LazyPart`). The file goes to a temporary name beside the target and is renamed over it only once
complete and synced: a failed or killed write leaves no partial file under the target's name, and the
next write to the same path removes the temporary a killed one left (`atomic.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...atomic import recover, temporary_prefix
from .flux_names import flux_tensors_from_diffusers
from .metadata import FILE_TYPES

if TYPE_CHECKING:
    from gguf import GGUFWriter

#: longest tensor name ComfyUI-GGUF's converter and stable-diffusion.cpp's ggml build accept
MAX_NAME_LENGTH = 127


@dataclasses.dataclass(frozen=True)
class LazyPart:
    """Bytes made only when the writer reaches them (`make()` returns uint8 of `shape`): a file is then written
    with one tensor in memory, not the whole model (see `saving.export_gguf`)."""

    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]
    #: the model tensors `make` reads, in order (for reading the checkpoint ahead in the order the file is made);
    #: a quantized layer's weight and bias parts both name the weight and the bias, which the first made reads
    sources: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def load(self) -> np.ndarray:
        data = self.make()
        if data.shape != self.shape or data.dtype != np.uint8:
            raise AssertionError(f"a lazy part made {data.dtype} {data.shape}, not the uint8 {self.shape} declared")
        return data


@dataclasses.dataclass
class StoredTensor:
    """One tensor to write: its GGML type and its bytes, as row-stacked parts.

    Each part is uint8 with the bytes of one row of blocks along its last axis (a plain tensor's
    bytes viewed as uint8), in memory or made on demand (`LazyPart`). `swap_halves` swaps the two
    row halves of the stacked parts.
    """

    ggml_type: str
    parts: list[np.ndarray | LazyPart]
    swap_halves: bool = False

    @property
    def byte_shape(self) -> tuple[int, ...]:
        first = self.parts[0]
        return (sum(part.shape[0] for part in self.parts), *first.shape[1:])

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def materialize(self) -> np.ndarray:
        parts = [part.load() if isinstance(part, LazyPart) else part for part in self.parts]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.swap_halves:
            half = data.shape[0] // 2
            data = np.concatenate((data[half:], data[:half]))
        return np.ascontiguousarray(data)


def to_bfl_layout(tensors: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """A Flux transformer's tensors under BFL names, stacking the parts of fused tensors by rows.

    ValueError when a tensor has no BFL name, or the parts of a fused tensor differ in type.
    """
    left = dict(tensors)
    out: dict[str, StoredTensor] = {}
    for fused in flux_tensors_from_diffusers(tensors):
        present = [part for part in fused.parts if part in left]
        if not present:
            continue
        if len(present) != len(fused.parts):
            missing = sorted(set(fused.parts) - set(present))
            raise ValueError(
                f"the BFL tensor {fused.bfl!r} stacks {', '.join(fused.parts)}; the model lacks {', '.join(missing)}"
            )
        parts = [left.pop(part) for part in fused.parts]
        types = {part.ggml_type for part in parts}
        widths = {part.byte_shape[1:] for part in parts}
        if len(types) > 1 or len(widths) > 1:
            found = ", ".join(f"{name}: {part.ggml_type} {part.byte_shape}" for name, part in zip(fused.parts, parts))
            raise ValueError(
                f"the BFL layout stacks {', '.join(fused.parts)} into one tensor {fused.bfl!r}, so they need one GGML "
                f"type and row width; found {found}. Give them the same type (type_rules, modules_to_not_convert) "
                "or write layout='diffusers'"
            )
        out[fused.bfl] = StoredTensor(
            parts[0].ggml_type, [p for part in parts for p in part.parts], swap_halves=fused.swap_halves
        )
    if left:
        raise ValueError(f"these tensors have no name in the BFL Flux layout: {', '.join(sorted(left)[:5])}")
    return out


def main_type(tensors: dict[str, StoredTensor]) -> str:
    """The type most weights (tensors of two or more dims, counted by bytes) are stored in."""
    weights: Counter[str] = Counter()
    for tensor in tensors.values():
        if len(tensor.byte_shape) >= 2:
            weights[tensor.ggml_type] += tensor.nbytes
    return weights.most_common(1)[0][0] if weights else "F32"


#: writes made and not yet done, at most
_WRITES_WAITING = 2


def _write_tensor_data(writer: GGUFWriter, tensors: Iterable[StoredTensor]) -> None:
    """Each tensor's bytes, made here and written by a thread of its own while the next tensors are made.

    Writing a file through the page cache waits on the disk once its dirty pages pile up: the 12 B Q4_K export
    spent 12 s of its 66-70 s in those writes, one after the other with the quantizing. A quantized layer's weight
    is followed by its bias (made with it), so two writes may wait while the next weight is made: at most three
    tensors' bytes are held.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="pipequant-write") as pool:
        writes: collections.deque[Future[None]] = collections.deque()
        for tensor in tensors:
            data = tensor.materialize()
            while len(writes) >= _WRITES_WAITING:
                writes.popleft().result()
            writes.append(pool.submit(writer.write_tensor_data, data))
        for write in writes:
            write.result()


def write_gguf(
    path: Path, tensors: dict[str, StoredTensor], *, architecture: str, fields: dict[str, str], overwrite: bool
) -> Path:
    """Write `tensors` and string `fields` to `path` (refused when it exists, unless `overwrite`)."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType

    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    too_long = [name for name in tensors if len(name) > MAX_NAME_LENGTH]
    if too_long:
        raise ValueError(
            f"GGUF tensor names are limited to {MAX_NAME_LENGTH} characters by the tools that read them; "
            f"too long: {', '.join(too_long[:3])}"
        )
    writer = GGUFWriter(path=None, arch=architecture)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_file_type(int(LlamaFileType[FILE_TYPES[main_type(tensors)]]))
    for key, value in fields.items():
        writer.add_string(key, value)
    for name, tensor in tensors.items():
        writer.add_tensor_info(
            name, tensor.byte_shape, np.dtype(np.uint8), tensor.nbytes, raw_dtype=GGMLQuantizationType[tensor.ggml_type]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)  # temporaries of killed writes to this path
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, tensors.values())
        assert writer.fout is not None
        for out in writer.fout:
            out.flush()
            os.fsync(out.fileno())
        writer.close()
        tmp.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return path
