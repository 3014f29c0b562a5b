"""A component's safetensors files on hostile input: confined to the folder, bad indexes named, fuzzed.

Raise the fuzz examples with PIPEQUANT_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pipequant import CheckpointError, PipelineQuantizationConfig, estimate, load_model, load_pipeline
from pipequant.checkpoint import ComponentCheckpoint, read_index
from pipequant.testing.fixtures import make_tiny_pipeline

FUZZ_EXAMPLES = int(os.environ.get("PIPEQUANT_FUZZ_EXAMPLES", "300"))
INDEX = "diffusion_pytorch_model.safetensors.index.json"
INT8 = PipelineQuantizationConfig(
    quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True}, components_to_quantize=["transformer"]
)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("sharded") / "flux", "flux", shard_size="1MB")


def copy_with_index(sharded: Path, target: Path, edit) -> Path:
    """A copy of the sharded pipeline whose transformer index has gone through `edit(weight_map)`."""
    shutil.copytree(sharded, target)
    index_path = target / "transformer" / INDEX
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))
    return target


def every_reader_refuses(pipeline: Path, match: str) -> None:
    """load_model, a quantized load_pipeline and estimate all raise `match`, before reading a weight."""
    with pytest.raises(CheckpointError, match=match):
        load_model(FluxTransformer2DModel, pipeline / "transformer")
    with pytest.raises(CheckpointError, match=match):
        load_pipeline(pipeline, quantization_config=INT8)
    with pytest.raises(CheckpointError, match=match):
        load_pipeline(pipeline)
    with pytest.raises(CheckpointError, match=match):
        estimate(pipeline)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "a\\b"])
def test_shard_names_leading_out_of_the_folder_are_refused(sharded, tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(
        (
            sharded
            / "transformer"
            / next(iter(json.loads((sharded / "transformer" / INDEX).read_text())["weight_map"].values()))
        ).read_bytes()
    )

    def point_out(weight_map):
        weight_map[next(iter(weight_map))] = name

    pipeline = copy_with_index(sharded, tmp_path / "pipe", point_out)
    every_reader_refuses(pipeline, "shard names must be plain file names inside the component folder")


def test_a_shard_symlinked_out_of_the_folder_is_refused(sharded, tmp_path):
    pipeline = tmp_path / "pipe"
    shutil.copytree(sharded, pipeline)
    shard = sorted((pipeline / "transformer").glob("*-00001-*.safetensors"))[0]
    shard.rename(tmp_path / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "elsewhere.safetensors")
    every_reader_refuses(pipeline, "is a symlink to .*elsewhere.safetensors, outside the component folder")


def test_symlinks_into_the_hub_cache_blobs_load(sharded, tmp_path, assert_same_state):
    """huggingface_hub's snapshots link every file to the repo's blobs folder: that stays readable."""
    repo = tmp_path / "models--owner--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(sharded, snapshot)
    (repo / "blobs").mkdir()
    for path in (snapshot / "transformer").glob("*.safetensors"):
        blob = repo / "blobs" / path.name
        path.rename(blob)
        path.symlink_to(os.path.relpath(blob, path.parent))
    linked = load_model(FluxTransformer2DModel, snapshot / "transformer")
    assert_same_state(linked, load_model(FluxTransformer2DModel, sharded / "transformer"))


@pytest.mark.parametrize(
    "content,match",
    [
        (b"[1, 2]", 'must be a JSON object with a "weight_map" object'),
        (b'{"weight_map": ["a.safetensors"]}', 'must be a JSON object with a "weight_map" object'),
        (b'{"weight_map": {"w": 3}}', "tensor 'w' maps to 3, not a file name"),
        (b'{"weight_map": {"w": "\xff.safetensors"}}', "not UTF-8"),
        (b"{" * 100_000, "not JSON"),
    ],
)
def test_an_index_of_the_wrong_shape_is_named(sharded, tmp_path, content, match):
    pipeline = copy_with_index(sharded, tmp_path / "pipe", lambda weight_map: None)
    (pipeline / "transformer" / INDEX).write_bytes(content)
    every_reader_refuses(pipeline, f"{INDEX} is not a valid safetensors index .*{match}")


# --- fuzzing -------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.sampled_from(["..", "/etc/passwd", "a/b"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["weight_map", "metadata", "w"]) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@_FUZZ
@given(st.one_of(_JSON.map(lambda value: json.dumps(value).encode()), st.binary(max_size=64)))
def test_fuzz_index_files(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / INDEX
        path.write_bytes(content)
        try:
            weight_map = read_index(path)
        except CheckpointError as error:
            assert str(error).startswith(f"{path} is not a valid safetensors index")
        else:
            assert all("/" not in name and name not in ("", ".", "..") for name in weight_map.values())


def _safetensors_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)}, path)
        return path.read_bytes()


_VALID = _safetensors_bytes()


@_FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=6), st.integers(0, len(_VALID))
)
def test_fuzz_safetensors_files(changes, cut):
    data = bytearray(_VALID)
    for at, value in changes:
        data[at] = value
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "model.safetensors").write_bytes(bytes(data[:cut]))
        tracemalloc.start()
        try:
            checkpoint = ComponentCheckpoint(folder)
            for key in checkpoint.keys():
                checkpoint.shape(key), checkpoint.dtype(key), checkpoint.read(key)
        except CheckpointError as error:
            assert str(folder) in str(error)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 64 * len(_VALID) + (1 << 20)
