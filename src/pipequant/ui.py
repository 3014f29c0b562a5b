"""What the command line and the long-running calls show a person: byte counts and progress bars.

Kept apart from the code that computes sizes, so the plan solver and the memory report depend on
these two small helpers and not on each other (or on the loader).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

#: called after each step with the number of steps done and the total
ProgressCallback = Callable[[int, int], None]
#: add_task(description, total) -> the callback that advances that task's bar
AddTask = Callable[[str, int], ProgressCallback]


def format_bytes(nbytes: int) -> str:
    """`nbytes` in decimal units, two decimals: "1.23 GB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def ignore_progress(done: int, total: int) -> None:
    """The callback that shows nothing."""


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[AddTask]:
    """Yields add_task(description, total) -> ProgressCallback; rich bars when enabled, silent otherwise."""
    if not enabled:
        yield lambda description, total: ignore_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bars:

        def add_task(description: str, total: int) -> ProgressCallback:
            task = bars.add_task(description, total=total)
            return lambda done, _total: bars.update(task, completed=done)

        yield add_task
