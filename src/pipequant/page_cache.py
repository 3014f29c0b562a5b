"""Reading tensor bytes from files with the page cache under our control: read ahead, then release.

A checkpoint is read once, front to back, while layers are quantized. Through a memory map (what
safetensors' own reader does) every page read stays mapped into the process until it ends: the RSS
of a 24 GB load reaches 24 GB, and the reads happen in the page faults of the quantizer, one after
the other with it. Here instead:

- `read_into` copies a byte range into memory the caller owns, with `preadv` (no mapping, so no
  file page ever counts in the process's RSS), then tells the kernel the range is no longer needed
  (`POSIX_FADV_DONTNEED`), so a load does not push the user's other cached files out of memory.
- `ReadAhead` asks the kernel (`POSIX_FADV_WILLNEED`, from a thread of its own, since the call
  itself may wait for the disk queue) to start reading the ranges the loader will want next, up to a
  window of bytes ahead of the one being read: the disk works while the CPU quantizes, and a load
  costs about max(read, quantize) instead of their sum.

The ranges come from the file formats' headers (see `checkpoint.py`); nothing here parses files.
No library offers this: safetensors' and gguf-py's readers map files and expose no offsets or
advice, so this module is ours.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

#: how far ahead of the tensor being read the kernel is asked to read (the page cache holds this
#: much more, never the process): ~0.4 s of this machine's disk, several layers of a 12 B model
READ_AHEAD_BYTES = 512 * 2**20

_ADVICE = hasattr(os, "posix_fadvise")  # Linux and most Unixes; macOS and Windows have no fadvise


@dataclasses.dataclass(frozen=True)
class FileRange:
    """`nbytes` bytes of `path` from byte `offset` (absolute, from the start of the file)."""

    path: Path
    offset: int
    nbytes: int


class OpenFiles:
    """One read-only descriptor per file, opened on first use and kept until `close` (or collection)."""

    def __init__(self) -> None:
        self._descriptors: dict[Path, int] = {}
        self._lock = threading.Lock()

    def descriptor(self, path: Path) -> int:
        with self._lock:
            if path not in self._descriptors:
                self._descriptors[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._descriptors[path]

    def close(self) -> None:
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()

    def __del__(self) -> None:
        self.close()


def read_into(tensor: torch.Tensor, files: OpenFiles, source: FileRange) -> torch.Tensor:
    """Fill the contiguous CPU `tensor` with the bytes of `source`, then drop them from the page cache.

    Raises EOFError when the file ends before the range does (a file truncated after its header
    was read); the caller names the file.
    """
    if source.nbytes != tensor.numel() * tensor.element_size():
        wanted = f"{tuple(tensor.shape)} {tensor.dtype}"
        raise ValueError(f"{source} holds {source.nbytes} bytes, not the {wanted} asked for")
    if source.nbytes == 0:
        return tensor
    descriptor = files.descriptor(source.path)
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < source.nbytes:  # one call returns at most ~2 GiB on Linux
        count = os.preadv(descriptor, [buffer[done:]], source.offset + done)
        if count == 0:
            raise EOFError(f"{source.path} ends inside bytes {source.offset}..{source.offset + source.nbytes}")
        done += count
    if _ADVICE:
        os.posix_fadvise(descriptor, source.offset, source.nbytes, os.POSIX_FADV_DONTNEED)
    return tensor


class ReadAhead:
    """Keeps the kernel reading up to `window` bytes ahead of the range the loader reads now.

    `ranges` are in the order the loader will read them; call `reached(i)` just before reading
    range i. Advice is issued from a daemon thread in order; `close` stops it. Where the platform
    has no `posix_fadvise` this does nothing, and reads simply wait for the disk.
    """

    def __init__(self, files: OpenFiles, ranges: Sequence[FileRange], window: int = READ_AHEAD_BYTES) -> None:
        self._files = files
        self._ranges = ranges
        self._window = window
        self._issued = 0  # ranges[:_issued] are advised
        self._reached = 0  # the range the loader reads now: advice for earlier ones would cache them again
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if _ADVICE and ranges:
            self._thread = threading.Thread(target=self._advise, name="pipequant-read-ahead", daemon=True)
            self._thread.start()

    def reached(self, index: int) -> None:
        if self._thread is None:
            return
        ahead = 0
        self._reached = index
        self._issued = max(self._issued, index)
        for position in range(index, len(self._ranges)):
            ahead += self._ranges[position].nbytes
            if position >= self._issued:
                if ahead > self._window and position > index:
                    break
                if self._ranges[position].nbytes:  # (an empty range would advise the whole file)
                    self._queue.put(position)
                self._issued = position + 1

    def _advise(self) -> None:
        while (position := self._queue.get()) is not None:
            if position < self._reached:  # the loader has read it already (and dropped its pages)
                continue
            source = self._ranges[position]
            try:
                descriptor = self._files.descriptor(source.path)
                os.posix_fadvise(descriptor, source.offset, source.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:  # advice only: a read of the range later reports any real problem
                pass

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
