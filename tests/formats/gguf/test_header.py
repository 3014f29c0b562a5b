"""The GGUF header parser on hostile files: each named bad case, and hypothesis-made bytes.

Every input must end in a parsed header or one `CheckpointError`, with memory bounded by the
input's size (never by what it claims). Raise the fuzz examples with PIPEQUANT_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipequant import CheckpointError
from pipequant.backends.gguf import quantize
from pipequant.formats.gguf.header import parse_header, read_header
from pipequant.formats.gguf.reader import GGUFFile

FUZZ_EXAMPLES = int(os.environ.get("PIPEQUANT_FUZZ_EXAMPLES", "300"))
#: a hang detector (the array bomb used to run forever), not a performance threshold
FUZZ_DEADLINE_MS = 5000
Q8, Q4K = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K


# --- writing GGUF bytes by hand, so headers can say anything ---------------------------------------


def gguf_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key: str | bytes, kind: GGUFValueType, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", kind) + payload


def kv_string(key: str, value: str | bytes) -> bytes:
    return kv(key, GGUFValueType.STRING, gguf_string(value))


def tensor_info(name: str, dims: tuple[int, ...], qtype: GGMLQuantizationType, offset: int) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def gguf_file(kvs: list[bytes], infos: list[bytes], data: bytes = b"", alignment: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


def q8_tensor(rows: int, seed: int = 0) -> tuple[torch.Tensor, bytes]:
    weights = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed))
    return weights, quantize(weights, "Q8_0").numpy().tobytes()


def two_q8_tensors(second_offset: int) -> bytes:
    _, first = q8_tensor(2)  # 2 rows of 2 blocks: 136 bytes, padded to 160
    _, second = q8_tensor(2, seed=1)
    infos = [tensor_info("a.weight", (64, 2), Q8, 0), tensor_info("b.weight", (64, 2), Q8, second_offset)]
    return gguf_file([], infos, first + bytes(24) + second + bytes(24))


def refused(data: bytes, match: str, tmp_path: Path) -> CheckpointError:
    """The error reading `data` as a file raises, checked to name the file and `match`, with bounded memory."""
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match) as caught:
            GGUFFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data) + (1 << 20), peak  # proportional to the file, not to its claims
    assert str(caught.value).startswith(f"{path}: ")
    return caught.value


# --- the named bad cases -------------------------------------------------------------------------


@pytest.mark.parametrize("claimed", [2**62, 2**31, 10**7])
def test_an_array_bomb_is_refused_at_once(claimed, tmp_path):
    bomb = kv("tokenizer.scores", GGUFValueType.ARRAY, struct.pack("<IQ", GGUFValueType.UINT32, claimed))
    data = gguf_file([bomb], []) + bytes(1_300_000)  # 1.3 MB: far fewer bytes than the items claimed
    refused(data, f"claims {claimed} UINT32 array items, more than the", tmp_path)


def test_claimed_counts_of_tensors_and_entries_are_checked_against_the_file(tmp_path):
    refused(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), "claims 1099511627776 tensors", tmp_path)
    refused(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60), "claims 1152921504606846976 metadata entries", tmp_path)
    refused(gguf_file([kv_string("general.name", "x")], [])[:-10], "bytes are needed but only", tmp_path)


def test_a_misaligned_offset_is_refused(tmp_path):
    refused(two_q8_tensors(161), "'b.weight' starts at data offset 161, not a multiple of 32", tmp_path)


def test_overlapping_tensors_and_gaps_are_refused(tmp_path):
    refused(two_q8_tensors(0), "'b.weight'.* overlaps tensor 'a.weight'", tmp_path)
    refused(two_q8_tensors(192), "'b.weight'.* leaves a gap after tensor 'a.weight'", tmp_path)


def test_a_relabelled_type_no_longer_fits_its_range(tmp_path):
    weights = torch.randn(2, 256)
    blocks = quantize(weights, "Q4_K").numpy().tobytes()  # 288 bytes
    _, after = q8_tensor(2)
    infos = [tensor_info("a.weight", (256, 2), Q8, 0), tensor_info("b.weight", (64, 2), Q8, 288)]
    refused(gguf_file([], infos, blocks + after + bytes(600)), "'b.weight'.* overlaps tensor 'a.weight'", tmp_path)
    alone = gguf_file([], [tensor_info("a.weight", (256, 2), Q8, 0)], blocks)
    refused(alone, r"'a.weight' \(Q8_0, shape \[2, 256\]\) needs 544 bytes .* past the end of the file", tmp_path)
    smaller = gguf_file([], [tensor_info("a.weight", (64, 2), Q8, 0)], blocks)  # 136 of 288 bytes used
    refused(smaller, "bytes follow the last tensor's data", tmp_path)


def test_deep_nesting_is_refused(tmp_path):
    nested = struct.pack("<IQ", GGUFValueType.ARRAY, 1) * 5000 + struct.pack("<IQ", GGUFValueType.UINT8, 0)
    refused(gguf_file([kv("deep", GGUFValueType.ARRAY, nested)], []), "arrays nested more than 8 deep", tmp_path)


def test_zero_or_too_many_dims_and_zero_size_tensors_are_refused(tmp_path):
    for dims, match in [((), "has 0 dims"), ((32, 1, 1, 1, 1), "has 5 dims"), ((32, 0), "has a zero dim")]:
        refused(gguf_file([], [tensor_info("t", dims, Q8, 0)], bytes(64)), match, tmp_path)


def test_strings_that_are_not_utf8_are_refused(tmp_path):
    refused(gguf_file([kv_string("general.name", b"\xff\xfe")], []), "a string that is not UTF-8", tmp_path)
    refused(gguf_file([kv(b"bad\xc3", GGUFValueType.UINT8, b"\x01")], []), "not UTF-8", tmp_path)


def test_unknown_types_duplicates_and_bad_alignment_are_refused(tmp_path):
    refused(gguf_file([kv("x", 99, b"")], []), "unknown metadata value type 99", tmp_path)
    refused(gguf_file([kv_string("x", "a"), kv_string("x", "b")], []), "'x' appears twice", tmp_path)
    refused(
        gguf_file([kv("general.alignment", GGUFValueType.UINT32, struct.pack("<I", 24))], []), "power of two", tmp_path
    )
    refused(gguf_file([], [tensor_info("t", (32,), 200, 0)], bytes(32)), "unknown GGML type id 200", tmp_path)
    refused(
        gguf_file([], [tensor_info("t", (48,), Q8, 0)], bytes(64)), "48 is not a multiple of the Q8_0 block", tmp_path
    )
    refused(gguf_file([kv("general.architecture", GGUFValueType.UINT8, b"\x01")], []), "not a STRING", tmp_path)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("pipequant.model_config", '"black-forest-labs/FLUX.1-dev"', "model_config is a JSON str, not a dict"),
        ("pipequant.quantization_config", "[1]", "quantization_config is a JSON list, not a dict"),
        ("pipequant.gguf_layers", "[1, 2]", "gguf_layers is a JSON list, not a list of str"),
        ("pipequant.dtype", "save", "dtype is 'save'"),
        ("pipequant.model_config", "[" * 100_000, "model_config is not JSON"),
    ],
)
def test_pipequant_metadata_of_the_wrong_type_is_refused(key, value, match, tmp_path):
    refused(gguf_file([kv_string(key, value)], []), match, tmp_path)


def test_a_one_dimensional_tensor_in_a_block_type_reads_like_gguf_py(tmp_path):
    weights, blocks = q8_tensor(1)
    path = tmp_path / "flat.gguf"
    path.write_bytes(gguf_file([], [tensor_info("norm.weight", (64,), Q8, 0)], blocks))
    file = GGUFFile(path)
    piece = file.pieces["norm.weight"]
    expected = gguf_dequantize(np.frombuffer(blocks, np.uint8), Q8)
    assert piece.shape == (64,) and torch.equal(piece.tensor(file.open_files), torch.from_numpy(expected))


def test_files_gguf_py_writes_parse_to_the_same_header(tmp_path):
    path = tmp_path / "written.gguf"
    writer = GGUFWriter(path, arch="pipequant")
    writer.add_string("pipequant.dtype", "bfloat16")
    writer.add_array("tokens", ["a", "bc", ""])
    writer.add_array("scores", [1.5, 2.5])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b", np.ones((2, 64 // 32 * 34), np.uint8), raw_dtype=Q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header, reference = read_header(path), GGUFReader(path)
    assert header.fields["tokens"] == ["a", "bc", ""] and header.fields["scores"].tolist() == [1.5, 2.5]
    assert [v.tolist() for v in header.fields["nested"]] == [[1, 2], [3]]
    assert header.data_offset == reference.data_offset
    for ours, theirs in zip(header.tensors, reference.tensors):
        assert (ours.name, ours.ggml_type, ours.offset, ours.nbytes) == (
            theirs.name,
            theirs.tensor_type,
            theirs.data_offset,
            theirs.n_bytes,
        )


# --- fuzzing -------------------------------------------------------------------------------------

_SEED = gguf_file(
    [kv_string("general.architecture", "pipequant"), kv("n", GGUFValueType.ARRAY, struct.pack("<IQ", 4, 2) + bytes(8))],
    [tensor_info("a.weight", (64, 2), Q8, 0)],
    q8_tensor(2)[1] + bytes(24),
)


def _parses_or_is_refused(data: bytes) -> None:
    tracemalloc.start()
    try:
        try:
            header = parse_header(data, "fuzz.gguf")
        except CheckpointError as error:
            assert str(error).startswith("fuzz.gguf: not a readable GGUF file")
        else:
            assert all(t.offset + t.nbytes <= len(data) for t in header.tensors)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * len(data) + (1 << 20)


_FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=FUZZ_DEADLINE_MS, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=512))
def test_fuzz_any_bytes(data):
    _parses_or_is_refused(b"GGUF" + data)


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_SEED) - 1), st.integers(0, 255)), max_size=8), st.integers(0, len(_SEED)))
def test_fuzz_a_valid_file_with_bytes_changed_or_cut(changes, cut):
    data = bytearray(_SEED)
    for at, value in changes:
        data[at] = value
    _parses_or_is_refused(bytes(data[:cut]))


_FILE_SEED = gguf_file(
    [
        kv_string("pipequant.model_config", '{"num_layers": 1}'),
        kv_string("pipequant.gguf_layers", '["a"]'),
        kv_string("pipequant.dtype", "bfloat16"),
    ],
    [tensor_info("a.weight", (64, 2), Q8, 0), tensor_info("norm.weight", (64,), Q8, 160)],
    q8_tensor(2)[1] + bytes(24) + q8_tensor(1)[1] + bytes(28),
)


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_FILE_SEED) - 1), st.integers(0, 255)), max_size=8))
def test_fuzz_files_read_tensor_by_tensor(changes):
    """Past the header: the metadata, the pieces and every tensor read back, or one CheckpointError."""
    data = bytearray(_FILE_SEED)
    for at, value in changes:
        data[at] = value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.gguf"
        path.write_bytes(bytes(data))
        try:
            file = GGUFFile(path)
            for piece in file.pieces.values():
                assert piece.tensor(file.open_files).shape == piece.shape
        except CheckpointError as error:
            assert str(error).startswith(str(path))


_COUNTS = st.sampled_from([0, 1, 2, 255, 2**31, 2**32 - 1, 2**62, 2**64 - 1])


@_FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(list(GGUFValueType)), _COUNTS, st.binary(max_size=24)), max_size=4),
    st.lists(st.tuples(st.integers(0, 4), _COUNTS, st.sampled_from([0, 1, 8, 12, 99]), _COUNTS), max_size=3),
)
def test_fuzz_headers_that_claim_anything(values, tensors):
    kvs = [kv(f"k{i}", kind, struct.pack("<Q", count) + payload) for i, (kind, count, payload) in enumerate(values)]
    infos = [
        gguf_string(f"t{i}")
        + struct.pack("<I", n_dims)
        + struct.pack("<Q", dim % 2**64) * n_dims
        + struct.pack("<IQ", qtype, offset)
        for i, (n_dims, dim, qtype, offset) in enumerate(tensors)
    ]
    _parses_or_is_refused(gguf_file(kvs, infos, bytes(256)))
