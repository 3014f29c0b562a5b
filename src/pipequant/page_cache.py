"""Reading tensor bytes from files ahead of the loader, without disturbing the page cache.

A checkpoint is read once, front to back, while layers are quantized. Through a memory map (what
safetensors' own reader does) every page read stays mapped into the process until it ends: the RSS
of a 24 GB load reaches 24 GB, and the reads happen in the page faults of the quantizer, one after
the other with it. Here instead:

- Each range is read into memory the process owns (no mapping, so no file page counts in its RSS).
  A range whose pages are all in the page cache already (a model loaded a moment ago) is copied from
  there and left cached. A range that is not is read with ``O_DIRECT`` straight into the process's
  memory, bypassing the cache: a 24 GB load neither pushes the user's other cached files out nor
  leaves 24 GB of its own pages behind. Where a file system refuses ``O_DIRECT`` (tmpfs), the range
  is read through the cache and then dropped from it (``POSIX_FADV_DONTNEED``).
- The one exception: a cached range the caller drops once used (`transient`: a weight the loader quantizes)
  comes as a view of the file, mapped for as long as the tensor lives; nothing is copied.
- `ReadAhead` reads the ranges the loader will want next from `READERS` threads, up to a window of bytes
  ahead of the one it takes now: the disk works while the CPU quantizes, and a load costs about
  max(read, quantize) instead of their sum. Measured on this project's 2-core VM (a 2.2 GB shard, cache
  dropped): one buffered reader 0.5 GB/s using a whole core, two readers 1.8 GB/s; ``O_DIRECT`` 1.4 GB/s
  at a tenth of the CPU. A cached range is read by the loader itself: a copy beats a thread hand-off.

The ranges come from the file formats' headers (see `checkpoint.py`); nothing here parses files.
No library offers this: safetensors' and gguf-py's readers map files and expose no offsets or
advice, so this module is ours.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import math
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

#: the most bytes `ReadAhead` holds read (or being read) that the loader has not taken yet: several
#: layers of a 12 B model (113 MB in bf16), ~0.2 s of this machine's disk
READ_AHEAD_BYTES = 256 * 2**20
#: a smaller load's window is this fraction of the bytes it reads from disk (`read_ahead_window`)
READ_AHEAD_FRACTION = 64
#: threads reading ahead, each one range at a time: the 12 B nf4 load here took 21-25 s with four,
#: 27-29 s with two (the loader waited on the disk twice as long), no better with eight
READERS = 4
#: ranges below this are read through the page cache: an ``O_DIRECT`` read costs a mapping of its own,
#: and a model's many small tensors (norms, biases) would each hold one
DIRECT_MIN_BYTES = 2**20
#: a cold range is read in pieces of this many bytes, by all the readers at once, so that a small window (one
#: range ahead) keeps the disk busy too: the 0.4 B Flux pipeline in bnb int8, cache dropped, loaded in 1.11 s
#: with each range read whole by one reader, 0.89 s in pieces (0.74 s with a 256 MB window, which cost 0.35 GB)
PIECE_BYTES = 8 * 2**20
#: ``O_DIRECT`` wants the file offset, the length and the memory aligned to the device's logical block
#: size (512 or 4096 bytes); 4096 serves both
_DIRECT_ALIGNMENT = 4096

_ADVICE = hasattr(os, "posix_fadvise")  # Linux and most Unixes; macOS and Windows have no fadvise
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux and the BSDs; macOS has none (F_NOCACHE instead, not used)


@dataclasses.dataclass(frozen=True)
class FileRange:
    """`nbytes` bytes of `path` from byte `offset` (absolute, from the start of the file)."""

    path: Path
    offset: int
    nbytes: int


class OpenFiles:
    """Read-only descriptors per file (one through the page cache, one ``O_DIRECT`` where the file system
    allows it), opened on first use and kept until `close` (or collection); which pages of them were cached
    before the load; and the `ReadAhead` now reading ahead from them, if any, which serves `read_tensor`."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        """Notes which pages of `paths` are in the page cache now: create this before reading the files'
        headers, around which the kernel reads ahead (8 MB on some machines), so that what the user had
        cached is told apart from what the load brought in. Other files are probed when read."""
        self._descriptors: dict[tuple[Path, bool], int | None] = {}
        self._lock = threading.Lock()
        self._cached_pages: dict[Path, bytes] = {}
        for path in paths:
            try:
                self._cached_pages[path] = page_residency(path)
            except OSError:  # no mincore here, or the file is gone (its reads will say so)
                pass
        self.ahead: ReadAhead | None = None

    def is_cached(self, source: FileRange) -> bool:
        """Whether every page of `source` was in the page cache (when noted, else now); False where the
        platform cannot tell."""
        if source.nbytes == 0:
            return True
        first = source.offset // mmap.PAGESIZE
        end = _round_up(source.offset + source.nbytes, mmap.PAGESIZE) // mmap.PAGESIZE
        noted = self._cached_pages.get(source.path)
        if noted is None:  # probe the range's pages now
            start = first * mmap.PAGESIZE
            try:
                noted = page_residency(source.path, start, source.offset + source.nbytes - start)
            except OSError:
                return False
            first, end = 0, end - first
        return len(noted) >= end and noted.count(0, first, end) == 0

    def descriptor(self, path: Path) -> int:
        descriptor = self._open(path, direct=False)
        assert descriptor is not None
        return descriptor

    def direct_descriptor(self, path: Path) -> int | None:
        """An ``O_DIRECT`` descriptor of `path`; None where the platform or the file system has none."""
        return self._open(path, direct=True) if _O_DIRECT else None

    def refuse_direct(self, path: Path) -> None:
        """The file system took ``O_DIRECT`` at open but refuses its reads: read `path` through the cache."""
        with self._lock:
            descriptor = self._descriptors.get((path, True))
            self._descriptors[(path, True)] = None
        if descriptor is not None:
            os.close(descriptor)

    def _open(self, path: Path, direct: bool) -> int | None:
        with self._lock:
            if (path, direct) not in self._descriptors:
                flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (_O_DIRECT if direct else 0)
                try:
                    self._descriptors[(path, direct)] = os.open(path, flags)
                except OSError as error:
                    if not direct or error.errno != errno.EINVAL:
                        raise
                    self._descriptors[(path, direct)] = None  # tmpfs and others: no O_DIRECT
            return self._descriptors[(path, direct)]

    def close(self) -> None:
        with self._lock:
            for descriptor in self._descriptors.values():
                if descriptor is not None:
                    os.close(descriptor)
            self._descriptors.clear()

    def __del__(self) -> None:
        self.close()


def read_tensor(
    files: OpenFiles, source: FileRange, dtype: torch.dtype, shape: Sequence[int], *, transient: bool = False
) -> torch.Tensor:
    """The bytes of `source` as a `dtype` tensor of `shape`, in memory of its own.

    Taken from `files`' `ReadAhead` where it has read the range already. With `transient` (the caller drops the
    tensor once used, as a loader drops a weight once quantized), a large range in the page cache that the open
    `ReadAhead` serves comes as a view of the file instead (see `ReadAhead.take`). Raises EOFError when the file
    ends before the range does (a file truncated after its header was read); the caller names the file.
    """
    if source.nbytes != dtype.itemsize * math.prod(shape):
        raise ValueError(f"{source} holds {source.nbytes} bytes, not the {tuple(shape)} {dtype} asked for")
    ahead = files.ahead
    data = ahead.take(source, transient=transient) if ahead is not None else None
    if data is None:
        data = _read(files, source, cached=files.is_cached(source))
    if data.storage_offset() % dtype.itemsize:  # a range at an odd offset inside an O_DIRECT block
        data = data.clone()
    return data.view(dtype).view(tuple(shape))


def _read(files: OpenFiles, source: FileRange, *, cached: bool, buffers: ReadBuffers | None = None) -> torch.Tensor:
    """`source`'s bytes (uint8) in memory of the process's own: through the page cache where `cached`, else
    around it (``O_DIRECT``; or through it, then dropped). A large range goes into page-aligned memory, from
    `buffers` where given, that the returned tensor views."""
    if source.nbytes < DIRECT_MIN_BYTES:
        data = torch.empty(source.nbytes, dtype=torch.uint8)
        _read_through_cache(files, source, source.offset, memoryview(data.numpy()), drop=not cached)
        return data
    start, buffer = _block_buffer(source, buffers)
    _read_piece(files, source, buffer, start, start, start + len(buffer), cached=cached)
    return _range_view(source, buffer, start)


def _block_buffer(source: FileRange, buffers: ReadBuffers | None) -> tuple[int, mmap.mmap]:
    """(the file offset of the ``O_DIRECT`` block `source` starts in, page-aligned memory for `source`'s whole
    blocks, from `buffers` where given)."""
    start = source.offset - source.offset % _DIRECT_ALIGNMENT
    nbytes = _round_up(source.offset + source.nbytes, _DIRECT_ALIGNMENT) - start
    return start, buffers.get(nbytes) if buffers is not None else private_memory(nbytes)


def _range_view(source: FileRange, buffer: mmap.mmap, start: int) -> torch.Tensor:
    """`source`'s bytes in `buffer`, which holds the file from offset `start`."""
    lead = source.offset - start
    return torch.frombuffer(buffer, dtype=torch.uint8)[lead : lead + source.nbytes]


def _pieces(start: int, nbytes: int) -> list[tuple[int, int]]:
    """`nbytes` of a file from offset `start` as (first, end) offsets of `PIECE_BYTES` each, the last one
    shorter: what the readers read in parallel."""
    return [(first, min(first + PIECE_BYTES, start + nbytes)) for first in range(start, start + nbytes, PIECE_BYTES)]


def _read_piece(
    files: OpenFiles, source: FileRange, buffer: mmap.mmap, start: int, first: int, end: int, *, cached: bool
) -> None:
    """Fill the part of `buffer` (which holds the file from offset `start`) from file offset `first` to `end`
    (block-aligned) with `source`'s bytes there: ``O_DIRECT`` unless `cached`, else through the page cache."""
    descriptor = None if cached else files.direct_descriptor(source.path)
    data_first, data_end = max(first, source.offset), min(end, source.offset + source.nbytes)
    data = memoryview(buffer)[data_first - start : data_end - start]
    try:
        if descriptor is None:
            _read_through_cache(files, source, data_first, data, drop=not cached)
        else:  # whole blocks; the file may end inside the last one
            blocks = memoryview(buffer)[first - start : end - start]
            _read_fully(descriptor, blocks, first, source, least=data_end - first)
    except OSError as error:
        if descriptor is None or error.errno != errno.EINVAL:
            raise
        files.refuse_direct(source.path)  # took O_DIRECT at open, refuses its reads
        _read_through_cache(files, source, data_first, data, drop=True)


def private_memory(nbytes: int) -> mmap.mmap:
    """`nbytes` of page-aligned memory of the process's own (anonymous and private: Python's default for an
    anonymous map is shared memory, which the kernel counts apart from the process's anonymous memory)."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)


def _file_view(files: OpenFiles, source: FileRange) -> tuple[torch.Tensor, _Mapping]:
    """`source`'s bytes as a view of a private mapping of the file (unmapped with the last tensor that views it),
    and that mapping."""
    descriptor = files.descriptor(source.path)
    if os.fstat(descriptor).st_size < source.offset + source.nbytes:  # a page past the end would fault (SIGBUS)
        raise _ends_inside(source)
    start = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY
    # writable (copy-on-write, so the file never changes) because torch wants a writable buffer
    mapping = mmap.mmap(
        descriptor,
        source.offset + source.nbytes - start,
        flags=mmap.MAP_PRIVATE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=start,
    )
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    lead = source.offset - start
    return whole[lead : lead + source.nbytes], _Mapping(weakref.ref(mapping), whole.data_ptr(), len(mapping))


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """A file mapping that tensors view, known without keeping it mapped."""

    mapping: weakref.ref[mmap.mmap]
    address: int
    nbytes: int

    def holds(self, address: int) -> bool:
        """Whether the mapping is still there and `address` lies in it."""
        return self.mapping() is not None and self.address <= address < self.address + self.nbytes


def _read_through_cache(files: OpenFiles, source: FileRange, offset: int, into: memoryview, *, drop: bool) -> None:
    """Fill `into` with the file's bytes from `offset` (inside `source`, which errors name)."""
    descriptor = files.descriptor(source.path)
    _read_fully(descriptor, into, offset, source)
    if drop and _ADVICE:  # the pages this read brought in, and only those
        os.posix_fadvise(descriptor, offset, len(into), os.POSIX_FADV_DONTNEED)


class ReadBuffers:
    """Page-aligned memory for large reads, handed out again once no tensor views it any more.

    Fresh memory is costly: the kernel zeroes every page on first touch, and on this project's VM that costs
    about 1 s of system time per GB (a 12 B load would spend 24 s on it). A load reads each quantized layer's
    full-precision weight once and drops it after quantizing; the next block's weights have the same sizes,
    so they go into the same memory. A buffer is idle when only this pool holds it: every tensor made by
    `torch.frombuffer` keeps a reference to its buffer until the tensor's memory is freed. Idle buffers
    beyond `idle_limit` bytes are unmapped (oldest first), so memory no layer shape reuses is given back.
    """

    def __init__(self, idle_limit: int) -> None:
        self._idle_limit = idle_limit
        self._buffers: list[mmap.mmap] = []  # oldest first
        self._lock = threading.Lock()  # the readers ask from their threads

    def get(self, nbytes: int) -> mmap.mmap:
        """An idle buffer of at least `nbytes`, else a new one."""
        size = _round_up(nbytes, mmap.PAGESIZE)
        with self._lock:
            return self._get(size)

    def _get(self, size: int) -> mmap.mmap:
        idle = [index for index in range(len(self._buffers)) if self._is_idle(index)]
        # the smallest idle buffer that fits, wasting at most a quarter of it (a tensor the model keeps holds
        # its whole buffer): the layers of one block have a few sizes, which the next block's reuse
        fitting = [index for index in idle if size <= len(self._buffers[index]) <= size * 5 // 4]
        if fitting:
            best = min(fitting, key=lambda index: len(self._buffers[index]))
            self._buffers.append(self._buffers.pop(best))  # (newest last)
            return self._buffers[-1]
        idle_bytes = sum(len(self._buffers[index]) for index in idle)
        dropped = []
        for index in idle:  # oldest first
            if idle_bytes + size <= self._idle_limit:
                break
            idle_bytes -= len(self._buffers[index])
            dropped.append(index)
        for index in reversed(dropped):
            del self._buffers[index]  # unmapped with its last reference
        self._buffers.append(private_memory(size))
        return self._buffers[-1]

    def _is_idle(self, index: int) -> bool:
        return sys.getrefcount(self._buffers[index]) == 2  # this list's reference and the call's own

    def clear(self) -> None:
        """Forget every buffer: idle ones are unmapped now, the others with the last tensor that views them.
        For the end of a load, whose idle buffers would otherwise stay mapped as long as this pool lives."""
        with self._lock:
            self._buffers.clear()


def _ends_inside(source: FileRange) -> EOFError:
    """The error for a file that ends before `source` does (truncated after its header was read)."""
    return EOFError(f"{source.path} ends inside bytes {source.offset}..{source.offset + source.nbytes}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _read_fully(descriptor: int, buffer: memoryview, offset: int, source: FileRange, least: int | None = None) -> None:
    """Fill `buffer` from `offset`, or at least its first `least` bytes (then the file may end)."""
    least = len(buffer) if least is None else least
    done = 0
    while done < len(buffer):  # one call returns at most ~2 GiB on Linux
        count = os.preadv(descriptor, [buffer[done:]], offset + done)
        if count == 0:
            break
        done += count
    if done < least:
        raise _ends_inside(source)


def page_residency(path: Path, offset: int = 0, nbytes: int | None = None) -> bytes:
    """One byte per page of `nbytes` bytes of `path` from `offset` (page-aligned; default: to the end of the
    file), 1 where the page is in the page cache: ``mincore`` on a fresh mapping, which touches no page."""
    if _LIBC is None:
        raise OSError(errno.ENOSYS, "no mincore on this platform")
    if nbytes is None:
        nbytes = path.stat().st_size - offset
    pages = _round_up(nbytes, mmap.PAGESIZE) // mmap.PAGESIZE
    if pages == 0:
        return b""
    residency = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as file:
        address = _LIBC.mmap(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), offset)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path}")
        try:
            if _LIBC.mincore(address, nbytes, residency) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path}")
        finally:
            _LIBC.munmap(address, nbytes)
    return bytes(residency).translate(_LOW_BIT)  # the other bits are reserved


_LOW_BIT = bytes(byte & 1 for byte in range(256))


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # Windows: no mmap/mincore in the C library
        return None


_LIBC = _load_libc()


class _PendingRead:
    """A cold range being read by the reader threads: a small one whole, a large one in `PIECE_BYTES` pieces
    into one buffer."""

    def __init__(self, executor: ThreadPoolExecutor, files: OpenFiles, source: FileRange, buffers: ReadBuffers):
        self._source = source
        if source.nbytes < DIRECT_MIN_BYTES:
            self._buffer = None
            self._pieces = [executor.submit(_read, files, source, cached=False)]
            return
        self._start, self._buffer = _block_buffer(source, buffers)
        self._pieces = [
            executor.submit(_read_piece, files, source, self._buffer, self._start, first, end, cached=False)
            for first, end in _pieces(self._start, len(self._buffer))
        ]

    def result(self) -> torch.Tensor:
        """The range's bytes, once every piece is read (a piece's error is raised here)."""
        results = [piece.result() for piece in self._pieces]
        if self._buffer is None:
            return results[0]
        return _range_view(self._source, self._buffer, self._start)

    def cancel(self) -> None:
        """Drop the pieces not started; those being read finish, and their buffer is idle after."""
        for piece in self._pieces:
            piece.cancel()


def read_ahead_window(cold_bytes: int) -> int:
    """How many bytes to read ahead in a load that reads `cold_bytes` from disk: `READ_AHEAD_BYTES`, or for a
    smaller load 1/`READ_AHEAD_FRACTION` of them (at least one range is always read ahead).

    The window is memory held above the model being built. A 256 MB window is 1 % of a 12 B model but a third
    of a 0.4 B one, whose anonymous peak would then pass 1.1x (quantized model + largest layer). 1/64 of the
    full-precision bytes is at most 1/16 of a 4-bit model.
    """
    return min(READ_AHEAD_BYTES, cold_bytes // READ_AHEAD_FRACTION)


class ReadAhead:
    """Reads `ranges` (in the order the loader will take them) from `READERS` threads, up to `window`
    bytes ahead of the loader; `read_tensor` on the same `files` takes them while this is open.

    Only ranges not already in the page cache are read ahead (whether they are is checked once, here);
    the loader reads cached ones itself when it takes them, or maps them (`transient`). Other large ranges go
    into `ReadBuffers` shared by the whole load. A range the loader passes without taking is dropped, and one it
    asks for out of order is read then (never twice into the window). `close` stops the threads.
    """

    def __init__(self, files: OpenFiles, ranges: Sequence[FileRange], window: int | None = None) -> None:
        """`window` defaults to `read_ahead_window` of the ranges not in the page cache."""
        self._files = files
        self._ranges = list(ranges)
        self._cold = [not files.is_cached(source) for source in self._ranges]
        if window is None:
            window = read_ahead_window(sum(source.nbytes for source, cold in zip(self._ranges, self._cold) if cold))
        self._window = window
        self._positions: dict[FileRange, list[int]] = {}
        for position, source in enumerate(self._ranges):
            self._positions.setdefault(source, []).append(position)
        self._mappings: list[_Mapping] = []  # of the file views taken since `copy_mapped`
        self._next = 0  # the loader takes ranges[_next:] from here on
        self._scheduled = 0  # ranges[:_scheduled] are read ahead (if cold) or left to the loader
        self._reads: dict[int, _PendingRead] = {}
        largest = max((source.nbytes for source in self._ranges), default=0)
        # idle buffers for the next layers' reads: those in flight ahead; with none (all cached), what the
        # loader reads now and the idle ones together stay within one range's size, the full-precision layer
        # a streamed load holds anyway
        self._buffers = ReadBuffers(idle_limit=window + largest if any(self._cold) else largest)
        self._executor = ThreadPoolExecutor(READERS, thread_name_prefix="pipequant-read") if any(self._cold) else None
        files.ahead = self
        self._schedule()

    @property
    def pending_bytes(self) -> int:
        """Bytes read ahead, or being read, that the loader has not taken: what the window bounds."""
        return sum(self._ranges[position].nbytes for position in self._reads)

    def take(self, source: FileRange, *, transient: bool = False) -> torch.Tensor | None:
        """`source`'s bytes, read ahead (waiting for the read to finish) or read now; None for a range not
        among this read-ahead's (the caller reads it).

        With `transient`, a range of at least `DIRECT_MIN_BYTES` in the page cache comes as a view of a private
        mapping of the file: nothing is copied and no memory is touched (measured on the 0.4 B Flux pipeline, page
        cached: quanto int8 0.67 s -> 0.51 s). Its pages count in the RSS while the tensor lives, so nothing may keep
        it: `copy_mapped` gives a kept one memory of its own.
        """
        positions = [position for position in self._positions.get(source, ()) if position >= self._next]
        if not positions:
            return None
        position = positions[0]
        for passed in range(self._next, position):
            read = self._reads.pop(passed, None)
            if read is not None:
                read.cancel()
        self._next = position + 1
        read = self._reads.pop(position, None)
        self._schedule()  # before waiting: the readers go on while this one finishes
        if read is not None:
            return read.result()
        cached = not self._cold[position]
        if cached and transient and source.nbytes >= DIRECT_MIN_BYTES:
            view, mapping = _file_view(self._files, source)
            self._mappings.append(mapping)
            return view
        return _read(self._files, source, cached=cached, buffers=self._buffers)

    def copy_mapped(self, tensors: Iterable[torch.Tensor]) -> None:
        """Give each of `tensors` that views a file mapping `take` made memory of its own (its ``.data`` swapped
        for a copy), then forget those mappings.

        For what a quantized layer keeps: no backend here keeps a weight as it was read, but one that did (a
        layer it leaves as it is) must not leave a file page mapped after the load.
        """
        if not self._mappings:
            return
        for tensor in tensors:
            try:
                address = tensor.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):  # a tensor subclass without storage of its own: new data
                continue
            if any(mapping.holds(address) for mapping in self._mappings):
                tensor.data = tensor.data.clone()
        self._mappings.clear()

    def _schedule(self) -> None:
        if self._executor is None:
            return
        self._scheduled = max(self._scheduled, self._next)
        while self._scheduled < len(self._ranges):
            source = self._ranges[self._scheduled]
            if self._cold[self._scheduled]:
                if self._reads and self.pending_bytes + source.nbytes > self._window:
                    break
                self._reads[self._scheduled] = _PendingRead(self._executor, self._files, source, self._buffers)
            self._scheduled += 1

    def close(self) -> None:
        if self._files.ahead is self:
            self._files.ahead = None
        for read in self._reads.values():
            read.cancel()
        self._reads.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._buffers.clear()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
