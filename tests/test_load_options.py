"""diffusers' from_pretrained keywords on load_pipeline, and devices checked before any weight is read."""

from __future__ import annotations

import json
import shutil

import diffusers
import pytest
import torch

import pipequant
from pipequant import (
    CheckpointError,
    DeviceError,
    PipelineFolderError,
    PipelineQuantizationConfig,
    load_pipeline,
    loading,
)

INT8 = PipelineQuantizationConfig(
    quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True}, components_to_quantize=["transformer"]
)


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if any component starts loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("a component was loaded before the error")

    monkeypatch.setattr(loading, "_load_component", refuse)


def test_dtype_is_torch_dtype_and_may_differ_per_component(flux_path):
    pipe = load_pipeline(flux_path, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    pipe = load_pipeline(flux_path, torch_dtype={"transformer": torch.bfloat16, "default": torch.float32})
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    with pytest.raises(TypeError, match="disagree"):
        load_pipeline(flux_path, torch_dtype=torch.float16, dtype=torch.bfloat16)


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, torch.device("cpu")])
def test_device_map_naming_one_device(flux_path, device_map):
    pipe = load_pipeline(flux_path, quantization_config=INT8, device_map=device_map, torch_dtype=torch.bfloat16)
    assert pipe.transformer.device.type == "cpu"


def test_device_maps_that_cannot_be_honoured(flux_path, no_weights_read):
    with pytest.raises(DeviceError, match="places whole components"):
        load_pipeline(flux_path, device_map={"transformer_blocks.0": "cpu", "": "cpu"})
    if torch.cuda.device_count() < 2:
        for spreading in ("balanced", "auto"):
            with pytest.raises(DeviceError, match=f"device_map='{spreading}' spreads components over several GPUs"):
                load_pipeline(flux_path, device_map=spreading)
    with pytest.raises(TypeError, match="device or device_map, not both"):
        load_pipeline(flux_path, device="cpu", device_map="cpu")


def test_variant_files_load_and_a_missing_variant_is_an_error(flux_path, tmp_path, assert_same_state):
    folder = tmp_path / "variant"
    shutil.copytree(flux_path, folder)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        for path in (folder / name).glob("*.safetensors"):
            path.rename(path.with_name(path.name.replace(".safetensors", ".fp16.safetensors")))
        for path in (folder / name).glob("*.safetensors.index.json"):  # a sharded component: its index and shard names
            index = json.loads(path.read_text())
            shards = index["weight_map"]
            index["weight_map"] = {k: v.replace(".safetensors", ".fp16.safetensors") for k, v in shards.items()}
            path.with_name(path.name.replace(".json", ".fp16.json")).write_text(json.dumps(index))
            path.unlink()
    pipe = load_pipeline(folder, quantization_config=INT8, variant="fp16", torch_dtype=torch.bfloat16)
    plain = load_pipeline(flux_path, quantization_config=INT8, torch_dtype=torch.bfloat16)
    for name in ("transformer", "text_encoder", "vae"):
        assert_same_state(getattr(pipe, name), getattr(plain, name))
    with pytest.raises(CheckpointError, match="no 'fp8' variant"):
        load_pipeline(folder, quantization_config=INT8, variant="fp8")


def test_subfolder_and_hub_keywords_reach_the_hub_cache(flux_path, tmp_path, monkeypatch):
    """A repo id resolved from a local Hugging Face cache (offline): revision, cache_dir, local_files_only, token."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tiny--flux"
    shutil.copytree(flux_path, repo / "snapshots" / commit / "pipe")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(
        "tiny/flux",
        subfolder="pipe",
        revision="main",
        cache_dir=tmp_path / "cache",
        local_files_only=True,
        token=False,
        torch_dtype=torch.bfloat16,
    )
    assert type(pipe).__name__ == "FluxPipeline"
    with pytest.raises(PipelineFolderError, match="fetching it from the Hub failed"):
        load_pipeline("tiny/flux", subfolder="pipe", revision="v2", cache_dir=tmp_path / "cache", local_files_only=True)
    with pytest.raises(PipelineFolderError, match="subfolder='elsewhere' is not a folder"):
        load_pipeline(flux_path.parent, subfolder="elsewhere")
    with pytest.raises(PipelineFolderError, match="subfolder='../x' is not a folder"):
        load_pipeline(flux_path, subfolder="../x")


def test_accepted_keywords_and_unknown_ones(flux_path, no_weights_read):
    with pytest.raises(TypeError, match="pickle weights"):
        load_pipeline(flux_path, use_safetensors=False)
    with pytest.raises(TypeError, match=r"Unexpected keyword\(s\) 'torch_dtpe'. Did you mean 'torch_dtype'\?.*variant"):
        load_pipeline(flux_path, torch_dtpe=torch.bfloat16)
    with pytest.raises(TypeError, match="components of FluxPipeline.*text_encoder_2"):
        pipequant.DiffusionPipeline.from_pretrained(flux_path, custom_pipeline="x")


def test_use_safetensors_and_low_cpu_mem_usage_are_accepted(flux_path):
    pipe = load_pipeline(flux_path, use_safetensors=True, low_cpu_mem_usage=False, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("meta", "device 'meta' holds no data"),
        ("gpu", "'gpu' is not a device"),
        ("cuda:99", "there are .* cuda device|has no cuda device"),
    ],
)
def test_devices_that_cannot_hold_weights_fail_before_any_weight_is_read(flux_path, no_weights_read, device, message):
    with pytest.raises(DeviceError, match=message) as error:
        load_pipeline(flux_path, quantization_config=INT8, device=device)
    assert "Devices here: cpu" in str(error.value)
    with pytest.raises(DeviceError, match=message):
        pipequant.DiffusionPipeline.from_pretrained(flux_path, device_map=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_without_cuda_names_the_devices_there_are(flux_path, no_weights_read):
    with pytest.raises(DeviceError, match="this machine has no cuda device. Devices here: cpu"):
        load_pipeline(flux_path, quantization_config=INT8, device="cuda")
    with pytest.raises(DeviceError, match="no cuda device"):
        pipequant.load_model(diffusers.AutoencoderKL, flux_path / "vae", device="cuda")
    with pytest.raises(DeviceError, match="no cuda device"):
        pipequant.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), pipequant.QuantoConfig(), device="cuda")
    with pytest.raises(DeviceError, match="no cuda device"):
        pipequant.estimate(flux_path, INT8, device="cuda")


@pytest.mark.cuda
def test_device_map_cuda_loads_onto_the_gpu(flux_path, generate):
    pipe = pipequant.DiffusionPipeline.from_pretrained(
        flux_path, quantization_config=INT8, device_map="cuda", torch_dtype=torch.bfloat16
    )
    assert pipe.transformer.device.type == "cuda" and pipe.vae.device.type == "cuda"
    with pytest.raises(DeviceError, match=f"there are {torch.cuda.device_count()} cuda device"):
        load_pipeline(flux_path, device=f"cuda:{torch.cuda.device_count()}")
