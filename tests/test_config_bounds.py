"""Absurd configs are refused from the checkpoint's headers, before the model is built."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from diffusers import FluxTransformer2DModel
from gguf import GGUFWriter

from pipequant import CheckpointError, estimate, load_model, load_pipeline
from pipequant.config_bounds import check_config_fits


def edited(source, target, component: str, **fields):
    shutil.copytree(source, target)
    path = target / component / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "component,field,value,match",
    [
        ("transformer", "num_layers", 10**6, "num_layers = 1000000, but the checkpoint holds only"),
        ("transformer", "attention_head_dim", 10**9, "attention_head_dim = 1000000000, but the largest tensor"),
        ("text_encoder_2", "d_model", 10**9, "d_model = 1000000000, but the largest tensor"),
        ("text_encoder", "num_hidden_layers", 10**6, "num_hidden_layers = 1000000"),
    ],
)
def test_a_config_the_weights_cannot_fill_is_refused_before_building(
    flux_path, tmp_path, component, field, value, match
):
    folder = edited(flux_path, tmp_path / "pipe", component, **{field: value})
    with pytest.raises(CheckpointError, match=f"{component}/config.json: {match}"):
        load_pipeline(folder)
    with pytest.raises(CheckpointError, match=match):
        estimate(folder)


def test_load_model_and_gguf_configs_are_bounded_too(flux_path, tmp_path):
    folder = edited(flux_path, tmp_path / "pipe", "transformer", num_single_layers=10**6)
    with pytest.raises(CheckpointError, match="num_single_layers = 1000000"):
        load_model(FluxTransformer2DModel, folder / "transformer")
    path = tmp_path / "absurd.gguf"
    writer = GGUFWriter(path, arch="pipequant")
    writer.add_string("pipequant.model_class", "diffusers.FluxTransformer2DModel")
    writer.add_string("pipequant.model_config", json.dumps({"num_layers": 10**6, "in_channels": 4}))
    writer.add_tensor("x_embedder.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"absurd.gguf \(pipequant.model_config\): num_layers = 1000000"):
        load_model(FluxTransformer2DModel, path)


def test_the_bounds_name_nested_fields_and_pass_real_sizes():
    shapes = [(3072, 64), (3072,)]
    check_config_fits({"num_layers": 2, "hidden_size": 3072, "sample_size": 1024, "flag": True}, shapes, "c")
    with pytest.raises(CheckpointError, match=r"c: text_config.hidden_size = 10000000, but the largest tensor"):
        check_config_fits({"text_config": {"hidden_size": 10**7}}, shapes, "c")
    with pytest.raises(CheckpointError, match=r"block_out_channels = 999999"):
        check_config_fits({"block_out_channels": [64, 999_999]}, shapes, "c")
