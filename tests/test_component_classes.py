"""What a model_index.json may name: only model-library classes of the kinds a pipeline holds."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from pipequant import CheckpointError, PipelineFolderError, allow_library, component_classes, estimate, load_pipeline
from pipequant.loading import read_pipeline_index

FUZZ_EXAMPLES = int(os.environ.get("PIPEQUANT_FUZZ_EXAMPLES", "300"))


def copy_with_index(source: Path, target: Path, **entries) -> Path:
    shutil.copytree(source, target)
    index = json.loads((target / "model_index.json").read_text())
    index.update(entries)
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def test_a_module_outside_the_model_libraries_is_never_imported(flux_path, tmp_path):
    assert "this" not in sys.modules
    folder = copy_with_index(flux_path, tmp_path / "pipe", scheduler=["this", "s"])
    with pytest.raises(PipelineFolderError, match=r"component 'scheduler' \(\['this', 's'\]\).*does not import"):
        load_pipeline(folder)
    with pytest.raises(PipelineFolderError, match="pipequant.allow_library\\('this'\\)"):
        estimate(folder)
    assert "this" not in sys.modules
    os_system = copy_with_index(flux_path, tmp_path / "os", tokenizer=["os", "system"])
    with pytest.raises(PipelineFolderError, match=r"'tokenizer' \(\['os', 'system'\]\)"):
        load_pipeline(os_system)


def test_a_loader_class_cannot_reach_a_pickle(flux_path, tmp_path):
    folder = copy_with_index(flux_path, tmp_path / "pipe", text_encoder=["transformers", "AutoModel"])
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(PipelineFolderError, match=r"'text_encoder' .*AutoModel.*not a model, scheduler, tokenizer"):
        load_pipeline(folder)
    not_a_class = copy_with_index(flux_path, tmp_path / "fn", scheduler=["transformers", "pipeline"])
    with pytest.raises(PipelineFolderError, match="not a model, scheduler, tokenizer or processor class"):
        load_pipeline(not_a_class)
    a_pipeline = copy_with_index(flux_path, tmp_path / "pipe2", transformer=["diffusers", "DiffusionPipeline"])
    with pytest.raises(PipelineFolderError, match="not a model, scheduler, tokenizer or processor class"):
        load_pipeline(a_pipeline)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"[1, 2]", 'must be a JSON object with the pipeline\'s "_class_name"'),
        (b'{"transformer": ["diffusers", "FluxTransformer2DModel"]}', '"_class_name"'),
        (b'{"_class_name": 3}', '"_class_name"'),
        (b'{"_class_name": "\xff"}', "not valid JSON .*UnicodeDecodeError"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"_class_name": "ModelMixin"}', "names pipeline class 'ModelMixin', which is not a pipeline class"),
        (b'{"_class_name": "__class__"}', "not a pipeline"),
    ],
)
def test_an_index_of_the_wrong_shape_is_a_pipeline_folder_error(tmp_path, content, match):
    (tmp_path / "model_index.json").write_bytes(content)
    with pytest.raises(PipelineFolderError, match=match):
        load_pipeline(tmp_path)


_NAMES = st.sampled_from(
    [
        "diffusers",
        "transformers",
        "os",
        "this",
        "FluxPipeline",
        "CLIPTokenizer",
        "AutoModel",
        "FluxTransformer2DModel",
        "ModelMixin",
        "__class__",
        "pipeline",
        "x",
    ]
)
_VALUES = st.none() | st.booleans() | st.integers() | _NAMES | st.lists(st.none() | _NAMES, max_size=3)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.dictionaries(st.sampled_from(["_class_name", "transformer", "tokenizer", "scheduler", "flag"]), _VALUES),
        _VALUES,
    ).map(json.dumps)
)
def test_fuzz_model_index_files(content):
    """Any index resolves to allowed classes or is one PipelineFolderError, and imports nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "model_index.json").write_text(content)
        try:
            index = read_pipeline_index(folder)
            models, others = index.split_components()
            assert all(
                index.component_class(name).__module__.split(".")[0] in ("diffusers", "transformers")
                for name in models + others
            )
        except PipelineFolderError as error:
            assert str(error).startswith(str(Path(folder) / "model_index.json"))
    assert "this" not in sys.modules


def test_allow_library_lets_a_trusted_library_in(flux_path, tmp_path, monkeypatch):
    monkeypatch.setattr(component_classes, "_ALLOWED_LIBRARIES", {"diffusers", "transformers"})
    (tmp_path / "my_schedulers.py").write_text(
        "from diffusers import FlowMatchEulerDiscreteScheduler\n\n"
        "class MyScheduler(FlowMatchEulerDiscreteScheduler):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = copy_with_index(flux_path, tmp_path / "pipe", scheduler=["my_schedulers", "MyScheduler"])
    with pytest.raises(PipelineFolderError, match="does not import"):
        load_pipeline(folder)
    allow_library("my_schedulers")
    assert type(load_pipeline(folder).scheduler).__name__ == "MyScheduler"
    with pytest.raises(ValueError, match="not a top-level module name"):
        allow_library("my.sub")


# --- every model component is read by our reader, unquantized too -----------------------------------


def _weights(folder: Path) -> Path:
    return folder / "transformer" / "diffusion_pytorch_model.safetensors"


def test_an_unquantized_component_missing_a_tensor_is_one_error(flux_path, tmp_path):
    from safetensors.torch import load_file

    folder = copy_with_index(flux_path, tmp_path / "pipe")
    state = load_file(_weights(folder))
    del state["proj_out.weight"]
    save_file(state, _weights(folder))
    with pytest.raises(CheckpointError, match=r"pipe/transformer: .*missing 1 keys.*proj_out\.weight"):
        load_pipeline(folder)


def test_a_float_weight_relabelled_as_integers_is_named(flux_path, tmp_path):
    folder = copy_with_index(flux_path, tmp_path / "pipe")
    data = bytearray(_weights(folder).read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    stored = header["proj_out.weight"]["dtype"]
    header["proj_out.weight"]["dtype"] = {"F32": "I32", "BF16": "I16", "F16": "I16"}[stored]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    data[8 : 8 + size] = text.ljust(size)  # safetensors allows trailing spaces in the header
    _weights(folder).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"'proj_out.weight' is stored as I(32|16), but the model's .* floating"):
        load_pipeline(folder)


def test_an_index_and_shards_that_disagree_are_named(tmp_path):
    folder = tmp_path / "component"
    folder.mkdir()
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    from pipequant.checkpoint import ComponentCheckpoint

    with pytest.raises(CheckpointError, match=r"does not list 1 tensors where the shards hold them \(e.g. \['b'\]\)"):
        ComponentCheckpoint(folder)


@pytest.mark.parametrize("kind", ["flux", "sd"])
def test_unquantized_components_load_the_state_diffusers_loads(kind, flux_path, sd_path, assert_same_state):
    from diffusers import DiffusionPipeline
    from torch import nn

    path = flux_path if kind == "flux" else sd_path
    ours = load_pipeline(path, torch_dtype=torch.bfloat16)
    theirs = DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16)
    models = [name for name, value in theirs.components.items() if isinstance(value, nn.Module)]
    assert models
    for name in models:
        assert_same_state(getattr(ours, name), getattr(theirs, name))
        assert getattr(ours, name).training is False
