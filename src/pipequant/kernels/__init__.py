"""The compiled kernels: one extension module, `pipequant._kernels` (C sources in `src/pipequant/_native`,
built by setup.py at install), and here one Python wrapper per C source (`int8_rows`, `bnb4`, `ggml`).

The wrappers are the only Python code that hands a tensor's address to C. C trusts what it is given,
so each wrapper checks every buffer's device, dtype, contiguity and size before the call and raises
`KernelInputError` naming the problem otherwise; each also says beforehand whether a tensor suits
its kernel (its `problem` functions), for callers that fall back to a library where it does not.

setup.py marks the extension optional, so an install without a C compiler still works: each caller then
runs its slower code (the libraries' own int8 quantizers, the torch GGUF codecs). The extension is
imported at first use (`compiled`), so that first use is where a missing one is said, once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType

import torch

#: the dtypes of the weights the kernels read, numbered as `enum source_dtype` in _native/common.h
SOURCE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class KernelInputError(ValueError):
    """A tensor handed to a compiled kernel is not what the kernel reads or writes (device, dtype,
    layout or size); the kernel was not called."""


@functools.cache
def compiled() -> ModuleType | None:
    """`pipequant._kernels`, imported on the first call; None, with a warning on that call, where it
    was not built."""
    try:
        return importlib.import_module("pipequant._kernels")
    except ImportError:
        warnings.warn(
            "pipequant's compiled kernels are not built (no C compiler at install?); the slower code paths run "
            "instead. Reinstall pipequant with a C compiler at hand to build them.",
            stacklevel=2,
        )
        return None


def native() -> ModuleType:
    """`compiled()` for the wrappers, which callers only reach after checking that it is there."""
    module = compiled()
    if module is None:
        raise RuntimeError("pipequant's compiled kernels are not built; check kernels.compiled() before calling one")
    return module


def check_buffer(
    tensor: torch.Tensor, name: str, dtypes: Iterable[torch.dtype], numel: int | None = None
) -> torch.Tensor:
    """`tensor` if a kernel can read or write it as `name`: in CPU memory, of one of `dtypes`,
    contiguous and (if given) of `numel` elements; else `KernelInputError`."""
    problem = buffer_problem(tensor, name, dtypes)
    if problem is None and numel is not None and tensor.numel() != numel:
        problem = f"{name} has {tensor.numel()} elements where the kernel needs {numel}"
    if problem is not None:
        raise KernelInputError(problem)
    return tensor


def buffer_problem(tensor: torch.Tensor, name: str, dtypes: Iterable[torch.dtype]) -> str | None:
    """Why a kernel cannot take `tensor` as `name` (device, dtype, contiguity), or None if it can."""
    dtypes = tuple(dtypes)
    if tensor.device.type != "cpu":
        return f"{name} is on {tensor.device}; the compiled kernels read and write CPU memory"
    if tensor.dtype not in dtypes:
        return f"{name} is {tensor.dtype}; this kernel takes {', '.join(map(str, dtypes))}"
    if not tensor.is_contiguous():
        return f"{name} is not contiguous; the kernel reads it as one row-major buffer (call .contiguous())"
    return None


def agrees(ours: Sequence[torch.Tensor] | None, theirs: Sequence[torch.Tensor], library: str) -> bool:
    """Whether a kernel's tensors equal the library's own for the same input (dtype, shape, bytes).

    The kernels repeat a library's arithmetic, and each caller checks a small part of every weight
    against the library before trusting the kernel with the rest; if a library version changed its
    arithmetic this says so (once) and the caller uses the library.
    """
    if ours is None:
        return False
    same = len(ours) == len(theirs) and all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b)) for a, b in zip(ours, theirs)
    )
    if not same:
        warnings.warn(f"pipequant's compiled kernel disagrees with this {library} version; {library} quantizes instead")
    return same


def checked(
    *,
    kernel: Callable[[torch.Tensor], Sequence[torch.Tensor] | None],
    library: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    weight: torch.Tensor,
    head: torch.Tensor,
    library_name: str,
) -> Sequence[torch.Tensor] | None:
    """`kernel(weight)`, if the kernel applies and gives the library's own bytes on `head` (the
    first rows or blocks of `weight`, see `agrees`); None otherwise, and the caller uses the library.

    `kernel` returns None where it does not apply (and is then not compared); `library` runs on one
    thread (`torch_on_one_thread`).
    """
    ours = kernel(head)
    if ours is None:
        return None
    with torch_on_one_thread():
        theirs = library(head)
    if not agrees(ours, theirs, library_name):
        return None
    return kernel(weight)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: NaN patterns (packed codes viewed as floats, NaN scales) compare equal."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@contextlib.contextmanager
def torch_on_one_thread(device: torch.device | None = None) -> Iterator[None]:
    """Run the enclosed torch CPU ops on the calling thread only; the thread count is restored after.
    With a `device` other than the CPU nothing changes.

    For work made of many small ops: every op that torch spreads over its OpenMP threads ends at a
    barrier, and a parallel region leaves the workers spinning for a while after. For the few rows or
    blocks a library quantizes for `agrees`, the spinning takes the cores the kernel needs next
    (measured: int8 kernels over a whole model 0.21 s -> 0.37 s). For the torch GGUF codecs (sequences
    of cache-sized ops), each barrier waits for a descheduled thread on a busy machine: on 2 cores at
    load ~3 that made dequantization 40x and K-quant quantization 20-50x slower than one thread, while
    an idle machine gains at most 2x from the second core. Callers that want more cores can run several
    tensors in parallel threads (torch ops release the GIL).
    """
    threads = torch.get_num_threads()
    if threads == 1 or (device is not None and device.type != "cpu"):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
