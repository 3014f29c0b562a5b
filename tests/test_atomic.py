"""Replacing folders and cleaning up after killed saves (the kill -9 cases are in test_saving.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipequant import atomic


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "content.txt").write_text(text)
    return path


def test_leftovers_of_dead_processes_go_and_those_of_running_ones_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free again
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = folder(tmp_path / f".out.saving-{dead.pid}-abc", "old")
        stale_file = tmp_path / f".out.saving-{dead.pid}-def.tmp"
        stale_file.write_bytes(b"partial")
        busy = folder(tmp_path / f".out.saving-{running.pid}-ghi", "in progress")
        other_target = folder(tmp_path / f".other.saving-{dead.pid}-jkl", "not ours")
        atomic.recover(tmp_path / "out")
        assert not stale.exists() and not stale_file.exists()
        assert busy.exists() and other_target.exists()
    finally:
        running.kill()
        running.wait()


def test_a_target_moved_aside_by_a_killed_save_is_restored_with_a_warning(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".out.replaced-{dead.pid}-abc"
    aside.mkdir()
    folder(aside / "out", "previous")
    with pytest.warns(atomic.InterruptedSaveWarning, match="the previous out was restored"):
        atomic.recover(tmp_path / "out")
    assert (tmp_path / "out" / "content.txt").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exchange_available", [True, False])
def test_replace_folder_puts_the_new_folder_in_place(tmp_path, monkeypatch, exchange_available):
    if exchange_available and atomic._RENAMEAT2 is None:
        pytest.skip("renameat2 is Linux-only")
    if not exchange_available:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    target, new = folder(tmp_path / "out", "old"), folder(tmp_path / ".out.saving-1-x", "new")
    atomic.replace_folder(target, new)
    assert (target / "content.txt").read_text() == "new"
    if exchange_available:  # the old folder is where the new one was, for the caller to delete
        assert (new / "content.txt").read_text() == "old"
    else:
        assert not new.exists() and [p.name for p in tmp_path.iterdir()] == ["out"]
