"""What a load costs in memory, for the benchmarks and the tests (Linux: read from /proc).

Peak memory is anonymous memory (RSS less file-backed pages, as psutil's `rss - shared`), sampled
on a thread: memory-mapped file pages count in RSS, but the kernel drops them under pressure, so
they are not memory a load needs. The RSS high-water mark is reported beside it. `mapped_rss` and
`resident_pages` say what of a weight file is still mapped in the process or cached by the kernel.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from ..page_cache import page_residency

_PAGE = os.sysconf("SC_PAGE_SIZE")


def anonymous_bytes() -> int:
    """RSS less shared (file-backed) pages, read from /proc like psutil does, but cheaper."""
    with open("/proc/self/statm") as statm:
        fields = statm.read().split()
    return (int(fields[1]) - int(fields[2])) * _PAGE


def rss_high_water_mark() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakSampler:
    """Samples anonymous memory every `interval` seconds while active; `peak` is the largest sample."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = anonymous_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_bytes())


def mapped_rss(prefix: str | Path) -> int:
    """Bytes of the process's RSS that are pages of files whose path starts with `prefix` (/proc/self/smaps)."""
    prefix = str(prefix)
    total = 0
    current = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                current = fields[5] if len(fields) >= 6 else None
            elif fields[0] == "Rss:" and current and current.startswith(prefix):
                total += int(fields[1]) * 1024
    return total


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache."""
    return sum(page_residency(path))
