"""Folders pipequant saves load in diffusers' own from_pretrained, and folders diffusers saves load in pipequant."""

from __future__ import annotations

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao.quantization import Int8WeightOnlyConfig

import pipequant as pq

#: backends diffusers can load on CPU: pipequant's config, and diffusers' config for the same quantization
BACKENDS = {
    "torchao-int8wo": (lambda: pq.TorchAoConfig("int8wo"), lambda: diffusers.TorchAoConfig(Int8WeightOnlyConfig())),
    "quanto-int8": (
        lambda: pq.QuantoConfig(weights_dtype="int8"),
        lambda: diffusers.QuantoConfig(weights_dtype="int8"),
    ),
}


def _diffusers_load(folder, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates its quanto support
        return diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, **kwargs)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_pipequant_saved_pipeline_loads_in_diffusers_with_equal_outputs(flux_path, tmp_path, generate, backend):
    ours, _ = BACKENDS[backend]
    components = ["transformer"] if backend.startswith("quanto") else ["transformer", "text_encoder_2"]
    config = pq.PipelineQuantizationConfig(quant_mapping={name: ours() for name in components})
    pipe = pq.load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    expected = generate(pipe)
    saved = pq.save_pipeline(pipe, tmp_path / "saved")
    theirs = _diffusers_load(saved)
    for name in components:
        assert getattr(theirs, name).is_quantized
        assert getattr(theirs, name).quantization_method == getattr(pipe, name).quantization_method
    np.testing.assert_array_equal(generate(theirs), expected)


def test_one_byte_tensors_are_64_byte_aligned_in_the_files_we_write(flux_path, tmp_path):
    """torch's CPU int8 matmul (quanto's) crashes on int8 weights mapped at unaligned addresses."""
    config = pq.PipelineQuantizationConfig(quant_mapping={"transformer": pq.QuantoConfig(weights_dtype="int8")})
    pipe = pq.load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    folder = pq.save_pipeline(pipe, tmp_path / "saved") / "transformer"
    with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as handle:
        addresses = {key: handle.get_tensor(key).data_ptr() for key in handle.keys() if key.endswith("._data")}
    assert addresses and all(address % 64 == 0 for address in addresses.values())


def test_torchao_files_are_in_the_form_diffusers_writes(flux_path, tmp_path):
    config = pq.PipelineQuantizationConfig(quant_mapping={"transformer": pq.TorchAoConfig("int8wo")})
    pipe = pq.load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    folder = pq.save_pipeline(pipe, tmp_path / "saved") / "transformer"
    stored = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert stored == diffusers.TorchAoConfig(Int8WeightOnlyConfig()).to_dict()
    with safe_open(folder / "diffusion_pytorch_model.safetensors", "pt") as handle:
        metadata, keys = handle.metadata(), set(handle.keys())
    from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    assert is_metadata_torchao(metadata)
    names = json.loads(metadata["tensor_names"])
    assert set(names) == set(pipe.transformer.state_dict())  # every tensor, by its name in the model
    assert all(json.loads(metadata[name])["_type"] == "Tensor" for name in names if name in keys)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_diffusers_saved_pipeline_loads_in_pipequant_with_equal_outputs(flux_path, tmp_path, generate, backend):
    _, theirs = BACKENDS[backend]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = diffusers.PipelineQuantizationConfig(quant_mapping={"transformer": theirs()})
    pipe = _diffusers_load(flux_path, quantization_config=config)
    expected = generate(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    ours = pq.load_pipeline(tmp_path / "saved", torch_dtype=torch.bfloat16)
    assert ours.transformer.pipequant_record.quantized_layers > 0
    np.testing.assert_array_equal(generate(ours), expected)


def test_torchao_folders_in_the_old_form_still_load(flux_path, tmp_path, generate):
    """pipequant wrote ``"quant_type": "int8wo"`` and no ``tensor_names`` before; such folders load as they did."""
    config = pq.PipelineQuantizationConfig(quant_mapping={"transformer": pq.TorchAoConfig("int8wo")})
    pipe = pq.load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    expected = generate(pipe)
    folder = pq.save_pipeline(pipe, tmp_path / "saved")
    config_path = folder / "transformer" / "config.json"
    model_config = json.loads(config_path.read_text())
    model_config["quantization_config"] = {
        "quant_method": "torchao",
        "quant_type": "int8wo",
        "quant_type_kwargs": {},
        "modules_to_not_convert": None,
    }
    config_path.write_text(json.dumps(model_config))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
    plain = json.dumps({"_type": "Tensor"})
    old_metadata = {key: value for key, value in metadata.items() if key != "tensor_names" and value != plain}
    save_file(load_file(weights), weights, metadata=old_metadata)
    restored = pq.load_pipeline(folder, torch_dtype=torch.bfloat16)
    assert restored.transformer.pipequant_record.config.label == "int8wo"
    np.testing.assert_array_equal(generate(restored), expected)
