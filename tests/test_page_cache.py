"""Reads through page_cache: the same bytes as safetensors, no file page left mapped, the page cache left as it was
found, ranges read ahead within the window."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import pipequant
from pipequant.checkpoint import ComponentCheckpoint
from pipequant.page_cache import (
    PIECE_BYTES,
    READ_AHEAD_BYTES,
    FileRange,
    OpenFiles,
    ReadAhead,
    ReadBuffers,
    page_residency,
    read_ahead_window,
    read_tensor,
)
from pipequant.testing.memory import anonymous_bytes, mapped_rss, resident_pages

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
@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "through the cache"])
def test_a_read_leaves_the_page_cache_as_it_found_it(
    component: Path, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range not cached is not cached by the read (read around the cache, or dropped after); a cached one stays."""
    if not direct:  # as on a file system that refuses O_DIRECT (tmpfs)
        monkeypatch.setattr(OpenFiles, "direct_descriptor", lambda self, path: None)
    path = component / "model.safetensors"
    expected = load_file(path)["big"].clone()  # (safetensors' tensors map the file: comparing would fault it in)
    _evict(path)
    checkpoint = ComponentCheckpoint(component)  # notes the file as not cached
    _evict(path)  # what the kernel read ahead around the headers, gone (as under memory pressure)
    before = page_residency(path)  # (the kernel may keep a few pages another CPU still holds in a batch)
    assert torch.equal(checkpoint.read("big"), expected)  # 2 MB of the file
    brought_in = [page for page, (was, now) in enumerate(zip(before, page_residency(path))) if now and not was]
    assert len(brought_in) <= 2  # the pages the range shares with its neighbours at most
    path.read_bytes()  # the whole file cached
    assert torch.equal(ComponentCheckpoint(component).read("big"), expected)
    assert resident_pages(path) * _PAGE >= path.stat().st_size - _PAGE


def test_no_file_page_stays_mapped_after_a_load(flux_path: Path) -> None:
    """A streamed model owns its memory: nothing of the weight files is left mapped in the process's RSS."""
    model = pipequant.load_model(FluxTransformer2DModel, flux_path / "transformer", torch_dtype=torch.float32)
    assert mapped_rss((flux_path / "transformer").resolve()) <= 64 * 1024  # the headers safetensors read
    assert model.proj_out.weight.is_contiguous()


def test_read_ahead_reads_within_its_window_and_gives_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "data"
    data = os.urandom(8 * 2**20)
    path.write_bytes(data)
    _evict(path)
    ranges = [FileRange(path, offset, 2**20) for offset in range(0, 8 * 2**20, 2**20)]
    files = OpenFiles()
    with ReadAhead(files, ranges, window=3 * 2**20) as ahead:
        assert ahead.pending_bytes == 3 * 2**20  # ranges 0, 1 and 2 are being read
        first = read_tensor(files, ranges[0], torch.uint8, (2**20,))
        assert ahead.pending_bytes == 3 * 2**20  # 1, 2 and 3: the window moved on with the range taken
        read_tensor(files, ranges[4], torch.uint8, (2**20,))  # 1 to 3 passed: dropped, not read again
        assert ahead.pending_bytes == 3 * 2**20  # 5, 6 and 7
        last = read_tensor(files, ranges[7], torch.uint8, (2**20,))
        assert ahead.pending_bytes == 0
        again = read_tensor(files, ranges[3], torch.uint8, (2**20,))  # out of order: read when asked
    assert files.ahead is None
    for tensor, start in ((first, 0), (last, 7), (again, 3)):
        assert tensor.numpy().tobytes() == data[start * 2**20 : (start + 1) * 2**20]


def test_a_small_load_reads_ahead_a_window_of_a_fraction_of_its_bytes(tmp_path: Path) -> None:
    """A 256 MB window would be a third of a 0.4 B model's memory: a small load holds one range ahead."""
    path = tmp_path / "data"
    path.write_bytes(os.urandom(8 * 2**20))
    _evict(path)
    ranges = [FileRange(path, offset, 2**20) for offset in range(0, 8 * 2**20, 2**20)]
    with ReadAhead(OpenFiles(), ranges) as ahead:
        assert ahead.pending_bytes == 2**20
    assert read_ahead_window(2**40) == READ_AHEAD_BYTES


def test_a_cold_range_of_several_pieces_reads_as_the_file(tmp_path: Path) -> None:
    """The readers share a large range in pieces; it may start and end inside blocks, the end with the file's."""
    path = tmp_path / "data"
    data = os.urandom(2 * PIECE_BYTES + 12345)
    path.write_bytes(data)
    _evict(path)
    source = FileRange(path, 3, len(data) - 3)
    past_the_end = FileRange(path, 2**20, len(data))
    files = OpenFiles()
    with ReadAhead(files, [source, past_the_end], window=2**40):
        assert read_tensor(files, source, torch.uint8, (source.nbytes,)).numpy().tobytes() == data[3:]
        with pytest.raises(EOFError, match="ends inside"):
            read_tensor(files, past_the_end, torch.uint8, (past_the_end.nbytes,))


def test_closing_a_read_ahead_unmaps_its_idle_buffers(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(32 * 2**20))
    _evict(path)
    ranges = [FileRange(path, offset, 4 * 2**20) for offset in range(0, 32 * 2**20, 4 * 2**20)]
    files = OpenFiles()
    before = anonymous_bytes()
    with ReadAhead(files, ranges, window=16 * 2**20) as ahead:
        for source in ranges:
            assert read_tensor(files, source, torch.uint8, (source.nbytes,)).numel() == source.nbytes
    assert ahead.pending_bytes == 0
    assert anonymous_bytes() - before < 2 * 2**20


def test_cached_ranges_are_left_to_the_loader(tmp_path: Path) -> None:
    """A range already in the page cache is copied from there by the loader itself: no thread, no window."""
    path = tmp_path / "data"
    path.write_bytes(os.urandom(4 * 2**20))
    path.read_bytes()
    ranges = [FileRange(path, offset, 2**20) for offset in range(0, 4 * 2**20, 2**20)]
    with ReadAhead(OpenFiles(), ranges) as ahead:
        assert ahead.pending_bytes == 0


def test_a_range_at_an_odd_offset_reads_as_its_dtype(tmp_path: Path) -> None:
    """O_DIRECT reads whole blocks; a tensor starting at an odd byte inside one still comes out right."""
    path = tmp_path / "data"
    values = torch.randn(2**20, dtype=torch.float32)
    path.write_bytes(b"x" + values.numpy().tobytes() + b"tail")
    _evict(path)
    read = read_tensor(OpenFiles(), FileRange(path, 1, values.nbytes), torch.float32, (2**10, 2**10))
    assert torch.equal(read, values.view(2**10, 2**10))


def test_a_file_shorter_than_its_range_is_an_eof_error(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(3 * 2**20))
    _evict(path)
    with pytest.raises(EOFError, match="ends inside"):
        read_tensor(OpenFiles(), FileRange(path, 2**20, 4 * 2**20), torch.uint8, (4 * 2**20,))


def test_the_page_cache_is_noted_before_the_headers_are_read(tmp_path: Path) -> None:
    """What a load brings in itself (the kernel reads ahead around a header) does not count as the user's."""
    path = tmp_path / "data"
    path.write_bytes(os.urandom(2**20))
    _evict(path)
    files = OpenFiles([path])
    path.read_bytes()  # as the header reads of a small file may
    assert not files.is_cached(FileRange(path, 4096, 2**19))
    assert OpenFiles().is_cached(FileRange(path, 4096, 2**19))  # a file not noted is probed when read


def test_read_buffers_are_reused_only_once_no_tensor_views_them() -> None:
    buffers = ReadBuffers(idle_limit=8 * 2**20)

    def read() -> tuple[torch.Tensor, int]:  # (the buffer is referenced only by the pool and the tensor)
        buffer = buffers.get(2**20)
        return torch.frombuffer(buffer, dtype=torch.uint8), id(buffer)

    kept, kept_id = read()  # a tensor the model keeps
    dropped, dropped_id = read()
    assert dropped_id != kept_id
    del dropped  # quantized, then dropped
    again, again_id = read()
    assert again_id == dropped_id
    assert read()[1] not in (kept_id, dropped_id) and kept.numel() == 2**20


def test_tensors_kept_from_reused_buffers_keep_their_bytes(tmp_path: Path) -> None:
    """A load keeps some tensors and drops others; reading the next ones into reused memory changes no kept one."""
    path = tmp_path / "data"
    data = os.urandom(16 * 2**20)
    path.write_bytes(data)
    ranges = [FileRange(path, offset, 2**20 + 8) for offset in range(0, 15 * 2**20, 2**20 + 8)]
    for cold in (True, False):
        if cold:
            _evict(path)
        else:
            path.read_bytes()
        files = OpenFiles()
        kept = {}
        with ReadAhead(files, ranges, window=3 * 2**20):
            for index, source in enumerate(ranges):
                tensor = read_tensor(files, source, torch.uint8, (source.nbytes,))
                if index % 3 == 0:
                    kept[index] = tensor
        for index, tensor in kept.items():
            source = ranges[index]
            assert tensor.numpy().tobytes() == data[source.offset : source.offset + source.nbytes], (cold, index)


def test_read_memory_counts_as_the_process_own(tmp_path: Path) -> None:
    """Large reads land in private anonymous memory, which the memory probes (and the kernel) count as the
    process's, not in shared memory."""
    path = tmp_path / "data"
    path.write_bytes(os.urandom(64 * 2**20))
    before = anonymous_bytes()
    tensor = read_tensor(OpenFiles(), FileRange(path, 0, 64 * 2**20), torch.uint8, (64 * 2**20,))
    assert anonymous_bytes() - before >= 60 * 2**20
    assert tensor.numel() == 64 * 2**20


def test_a_transient_read_of_a_cached_range_views_the_file_while_the_tensor_lives(tmp_path: Path) -> None:
    """No copy and no memory of the process's own for a weight the loader drops once quantized; the file's pages
    leave the RSS with the tensor."""
    path = tmp_path / "data"
    data = os.urandom(16 * 2**20)
    path.write_bytes(data)
    path.read_bytes()
    ranges = [FileRange(path, 4096 + 8, 8 * 2**20), FileRange(path, 9 * 2**20, 4 * 2**20)]
    files = OpenFiles()
    with ReadAhead(files, ranges):
        before = anonymous_bytes()
        view = read_tensor(files, ranges[0], torch.float32, (2**21,), transient=True)
        assert view.numpy().tobytes() == data[ranges[0].offset : ranges[0].offset + ranges[0].nbytes]
        assert anonymous_bytes() - before < 2**20
        assert mapped_rss(path) >= 8 * 2**20
        del view
        assert mapped_rss(path) == 0
        copied = read_tensor(files, ranges[1], torch.uint8, (4 * 2**20,))  # not transient: a copy of its own
        assert mapped_rss(path) == 0 and copied.numpy().tobytes() == data[9 * 2**20 : 13 * 2**20]


def test_copy_mapped_gives_a_kept_file_view_memory_of_its_own(tmp_path: Path) -> None:
    """What a backend keeps of a transient read (the very bytes it was given) leaves the file unmapped."""
    path = tmp_path / "data"
    data = os.urandom(4 * 2**20)
    path.write_bytes(data)
    path.read_bytes()
    source = FileRange(path, 0, 4 * 2**20)
    files = OpenFiles()
    with ReadAhead(files, [source]) as ahead:
        kept = torch.nn.Parameter(read_tensor(files, source, torch.uint8, (4 * 2**20,), transient=True), False)
        assert kept.numpy().tobytes() == data and mapped_rss(path) == len(data)  # (the comparison faulted it in)
        ahead.copy_mapped([kept, torch.zeros(3)])
        assert mapped_rss(path) == 0
    assert kept.numpy().tobytes() == data and isinstance(kept, torch.nn.Parameter)


@pytest.mark.parametrize("cached", [True, False], ids=["page-cached: file views", "evicted: reads"])
def test_quantized_layers_are_the_same_from_file_views_and_no_file_page_stays_mapped(
    tmp_path: Path, cached: bool
) -> None:
    """Layers of 1 MiB and more that are quantized come as views of a page-cached file (`transient`): the same
    bytes as the loader's own reads, and nothing of the file mapped once the load is done."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(16, 56, 56),
    ).to(torch.bfloat16)  # fmt: skip
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    for path in folder.glob("*.safetensors"):
        path.read_bytes() if cached else _evict(path)
    config = pipequant.GGUFQuantizationConfig(quant_type="Q8_0")
    loaded = pipequant.load_model(FluxTransformer2DModel, folder, config, torch_dtype=torch.bfloat16)
    assert mapped_rss(folder.resolve()) <= 64 * 1024  # the headers safetensors read
    weight = model.transformer_blocks[0].ff.net[2].weight.detach()
    assert weight.nbytes >= 2**20
    raw = loaded.transformer_blocks[0].ff.net[2].weight
    expected = pipequant.backends.gguf.codecs.quantize(weight, "Q8_0")
    assert torch.equal(raw.view(torch.uint8).reshape(expected.shape), expected)
