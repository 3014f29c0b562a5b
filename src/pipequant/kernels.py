"""The compiled kernels (C sources in `src/pipequant/_native`, built by setup.py at install).

setup.py marks them optional, so an install without a C compiler still works: each caller then
runs its slower code (the libraries' own int8 quantizers, the torch GGUF codecs), and the first
use says so once.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

import torch

#: the dtypes of the weights the kernels read, numbered as `enum source_dtype` in _native/common.h
SOURCE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def compiled(name: str) -> ModuleType | None:
    """`pipequant._<name>`, or None (with a warning, once per kernel) where it was not built."""
    try:
        return importlib.import_module(f"pipequant._{name}")
    except ImportError:
        warnings.warn(
            f"pipequant's compiled kernel {name!r} is not built (no C compiler at install?); the slower code "
            "path runs instead. Reinstall pipequant with a C compiler at hand to build it.",
            stacklevel=2,
        )
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
    kernel: Callable[[torch.Tensor], Sequence[torch.Tensor] | None],
    library: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    weight: torch.Tensor,
    head: torch.Tensor,
    library_name: str,
) -> Sequence[torch.Tensor] | None:
    """`kernel(weight)`, if the kernel applies and gives the library's own bytes on `head` (the
    first rows or blocks of `weight`, see `agrees`); None otherwise, and the caller uses the library."""
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
def torch_on_one_thread() -> Iterator[None]:
    """For the library's call on the few rows or blocks that `agrees` checks: far too small to gain
    from threads, and a parallel region would leave torch's OpenMP workers spinning for a while on
    the cores the kernel needs next (measured: int8 kernels over a whole model 0.21 s -> 0.37 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
