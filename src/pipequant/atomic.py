"""Replacing a saved folder or file so that no kill, at any point, loses the target.

A save writes into a temporary beside its target, named ``.<target>.saving-<pid>-<random>``, and
puts it in place in one step. A new file is renamed over the old one (atomic on every platform
we run on). A folder cannot be renamed over a non-empty one, so on Linux the two are swapped with
``renameat2(RENAME_EXCHANGE)`` (one atomic step; the old content then sits in the temporary and is
deleted). Where that call does not exist (macOS, Windows, old kernels, some file systems) the old
folder is first moved aside to ``.<target>.replaced-<pid>-<random>/<target>``, and a kill between
the two renames leaves no target: the next save or load of that target puts the old folder back
(or deletes it when the new one is in place) and says so with a warning.

Temporaries of killed saves are recognised by their process id (no longer running) and removed
by the next save (or load) of the same target; those of running processes are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

SAVING = "saving"
REPLACED = "replaced"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class InterruptedSaveWarning(UserWarning):
    """A killed save's leftovers were found beside its target and restored or removed."""


def temporary_prefix(target: Path, kind: str = SAVING) -> str:
    """The name prefix of `target`'s temporaries made by this process (for tempfile's mkdtemp / mkstemp)."""
    return f".{target.name}.{kind}-{os.getpid()}-"


def recover(target: Path) -> None:
    """Restore or remove what killed saves of `target` left beside it (see the module docstring)."""
    if not target.parent.is_dir():
        return
    for leftover, kind in _dead_leftovers(target):
        if kind == REPLACED:
            old = leftover / target.name
            if not target.exists() and old.exists():
                old.rename(target)
                warnings.warn(
                    f"A save of {target} was killed while replacing it; the previous {target.name} was restored "
                    f"from {leftover.name}.",
                    InterruptedSaveWarning,
                    stacklevel=3,
                )
        _remove(leftover)


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step; False where the system cannot (nothing changed then)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # no such call, or a file system without it
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


def replace_folder(target: Path, new: Path) -> None:
    """Put the complete folder `new` at `target`; the old `target` (if any) ends up inside `new`'s path, to delete."""
    if not target.exists():
        new.rename(target)
        return
    if exchange(new, target):
        return
    aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(target, REPLACED), dir=target.parent))
    target.rename(aside / target.name)
    try:
        new.rename(target)
    except BaseException:
        (aside / target.name).rename(target)
        raise
    finally:
        _remove(aside)


def _dead_leftovers(target: Path) -> list[tuple[Path, str]]:
    found = []
    for path in target.parent.iterdir():
        for kind in (REPLACED, SAVING):
            prefix = f".{target.name}.{kind}-"
            if path.name.startswith(prefix):
                pid = path.name[len(prefix) :].partition("-")[0]
                if pid.isdigit() and not _running(int(pid)):
                    found.append((path, kind))
    return sorted(found, key=lambda item: item[1] != REPLACED)  # restore before anything is removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or a platform without the check): leave its files alone
    return True


def _remove(path: Path) -> None:
    """Best effort: a leftover that cannot be removed (a read-only folder) must not stop a load."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
