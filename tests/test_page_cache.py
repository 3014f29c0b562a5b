"""Reads through page_cache: the same bytes as safetensors, no file page left mapped or cached, read-ahead issued."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import pipequant
from pipequant.checkpoint import ComponentCheckpoint
from pipequant.page_cache import FileRange, OpenFiles, ReadAhead, read_into
from pipequant.testing.memory import mapped_rss, resident_pages

_PAGE = mmap.PAGESIZE


def _written(path: Path) -> Path:
    """`path` flushed to the disk: the kernel drops only clean pages from its cache."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())
    return path


def _evict(path: Path) -> None:
    with open(_written(path), "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.fixture
def component(tmp_path: Path) -> Path:
    """A folder with one safetensors file of several dtypes and sizes, 4 MB of data in all."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(1024, 1024, generator=generator).to(torch.bfloat16),
        "float": torch.randn(512, 1024, generator=generator),
        "half": torch.randn(3, 5, generator=generator).half(),
        "ints": torch.arange(-7, 9, dtype=torch.int8),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    _written(tmp_path / "model.safetensors")
    return tmp_path


def test_reads_give_safetensors_own_tensors(component: Path) -> None:
    expected = load_file(component / "model.safetensors")
    checkpoint = ComponentCheckpoint(component)
    for key, tensor in expected.items():
        read = checkpoint.read(key)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape, key
        assert torch.equal(read.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_read_pages_are_released_from_the_page_cache(component: Path) -> None:
    path = component / "model.safetensors"
    checkpoint = ComponentCheckpoint(component)
    path.read_bytes()  # the whole file cached
    assert resident_pages(path) * _PAGE >= path.stat().st_size - _PAGE
    checkpoint.read("big")  # 2 MB of the file
    assert resident_pages(path) * _PAGE < path.stat().st_size - 2 * 2**20 + 16 * _PAGE


def test_no_file_page_stays_mapped_after_a_load(flux_path: Path) -> None:
    """A streamed model owns its memory: nothing of the weight files is left mapped in the process's RSS."""
    model = pipequant.load_model(FluxTransformer2DModel, flux_path / "transformer", torch_dtype=torch.float32)
    assert mapped_rss((flux_path / "transformer").resolve()) <= 64 * 1024  # the headers safetensors read
    assert model.proj_out.weight.is_contiguous()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_read_ahead_brings_in_the_window_ahead_and_no_more(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(8 * 2**20))
    ranges = [FileRange(path, offset, 2**20) for offset in range(0, 8 * 2**20, 2**20)]
    _evict(path)
    with ReadAhead(OpenFiles(), ranges, window=3 * 2**20) as ahead:
        ahead.reached(2)  # ranges 2, 3 and 4 are within the window from range 2
    deadline = time.monotonic() + 5
    while resident_pages(path) * _PAGE < 3 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 3 * 2**20 <= resident_pages(path) * _PAGE < 4 * 2**20
    assert torch.equal(  # and a read of one of them gives the file's bytes
        read_into(torch.empty(2**20, dtype=torch.uint8), OpenFiles(), ranges[3]),
        torch.frombuffer(bytearray(path.read_bytes()[3 * 2**20 : 4 * 2**20]), dtype=torch.uint8),
    )
