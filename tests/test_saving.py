"""save_pipeline / save_model and reloading saved folders: bytes, images, interop, atomicity, errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipequant import (
    BitsAndBytesConfig,
    CheckpointError,
    GGUFQuantizationConfig,
    PipelineQuantizationConfig,
    QuantizationConfigError,
    QuantoConfig,
    TorchAoConfig,
    atomic,
    load_pipeline,
    save_model,
    save_pipeline,
    saving,
)

TESTS = Path(__file__).parent

MODES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
    "fp4-double-quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
#: every backend and mode that runs on CPU: (config, load dtype, layer class the reload must hold)
ROUND_TRIPS = {
    **{
        f"bnb-{mode}": (BitsAndBytesConfig(**kwargs), None, "Linear8bitLt" if mode == "int8" else "Linear4bit")
        for mode, kwargs in MODES.items()
    },
    "torchao-int8wo": (TorchAoConfig("int8wo"), torch.bfloat16, "Int8Tensor"),
    "torchao-uint4wo": (TorchAoConfig("uint4wo"), torch.bfloat16, "IntxUnpackedToInt8Tensor"),
    "quanto-int8": (QuantoConfig(weights_dtype="int8"), torch.bfloat16, "QLinear"),
    "quanto-int4": (QuantoConfig(weights_dtype="int4"), torch.bfloat16, "QLinear"),
    "gguf-q4_k": (GGUFQuantizationConfig(quant_type="Q4_K"), torch.bfloat16, "GGUFLinear"),
}
QUANTIZED = ["transformer", "text_encoder_2"]


def pipeline_config(mode: str) -> PipelineQuantizationConfig:
    return PipelineQuantizationConfig(quant_mapping={name: BitsAndBytesConfig(**MODES[mode]) for name in QUANTIZED})


def tensor_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's bytes (a torchao subclass holds several)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [part for name in names for part in tensor_parts(getattr(tensor, name))]


def fingerprints(pipe) -> dict[str, list[str]]:
    """dtype, shape and sha256 of every tensor of the quantized components, by state-dict name."""
    out = {}
    for component in QUANTIZED:
        for key, tensor in getattr(pipe, component).state_dict().items():
            out[f"{component}.{key}"] = [
                f"{part.dtype} {tuple(part.shape)} "
                + hashlib.sha256(part.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                for part in tensor_parts(tensor)
            ]
    return out


def layer_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the modules and of their weights (torchao keeps nn.Linear with a subclass weight)."""
    return {type(m).__name__ for m in model.modules()} | {
        type(getattr(m, "weight", None)).__name__ for m in model.modules()
    }


def image(pipe) -> np.ndarray:
    return pipe(
        "photo of a cute dog",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=3.5,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


# Runs in a fresh interpreter: loads the saved folder with every backend's weight quantizer disabled
# (a saved pipeline must come back from its stored bytes), then reports what it loaded and an image.
RELOAD = """
import json, sys
import bitsandbytes.functional as F
import numpy as np
import optimum.quanto
import torch
import torchao.quantization

def quantizing(*args, **kwargs):
    raise AssertionError("a saved pipeline must load without quantizing")

quantizers = F.quantize_4bit, F.int8_vectorwise_quant
F.quantize_4bit = F.int8_vectorwise_quant = torchao.quantization.quantize_ = optimum.quanto.quantize_module = quantizing
from pipequant import load_pipeline
from test_saving import QUANTIZED, fingerprints, image, layer_classes

folder, dtype, out = sys.argv[1:]
pipe = load_pipeline(folder, torch_dtype=getattr(torch, dtype) if dtype != "None" else None)
F.quantize_4bit, F.int8_vectorwise_quant = quantizers  # bitsandbytes' int8 layers quantize their inputs as they run
json.dump({
    "fingerprints": fingerprints(pipe),
    "layers": sorted(layer_classes(pipe.transformer)),
    "configs": {name: getattr(pipe, name).pipequant_record.config.to_dict() for name in QUANTIZED},
}, open(out + "/result.json", "w"))
np.save(out + "/image.npy", image(pipe))
"""


def reload_in_fresh_process(folder: Path, dtype: torch.dtype | None, out: Path) -> tuple[dict, np.ndarray]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    dtype_name = str(dtype).removeprefix("torch.")
    subprocess.run([sys.executable, "-c", RELOAD, str(folder), dtype_name, str(out)], check=True, env=env, timeout=300)
    return json.loads((out / "result.json").read_text()), np.load(out / "image.npy")


@pytest.mark.parametrize("mode", list(ROUND_TRIPS))
def test_reload_in_fresh_process_gives_identical_bytes_and_image(flux_path: Path, tmp_path: Path, mode: str) -> None:
    config, dtype, layer_class = ROUND_TRIPS[mode]
    quantization = PipelineQuantizationConfig(quant_mapping={name: config for name in QUANTIZED})
    pipe = load_pipeline(flux_path, quantization_config=quantization, torch_dtype=dtype)
    as_quantized = fingerprints(pipe)
    expected = image(pipe)  # saving after inference must still store the weights as quantized
    before = fingerprints(pipe)
    unbiased = lambda prints: {k: v for k, v in prints.items() if not k.endswith(".bias")}  # noqa: E731
    # bitsandbytes' 4-bit forward casts a layer's bias to the compute dtype in place; nothing else changes
    assert unbiased(before) == unbiased(as_quantized)
    shard_size = "1MB" if mode == "bnb-nf4" else saving.DEFAULT_MAX_SHARD_SIZE
    saved = save_pipeline(pipe, tmp_path / "saved", max_shard_size=shard_size)

    stored = json.loads((saved / "transformer" / "config.json").read_text())["quantization_config"]
    assert stored == config.to_dict()
    if mode == "bnb-nf4":
        assert (saved / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert (saved / "text_encoder_2" / "model.safetensors.index.json").is_file()
    assert "quantization_config" not in json.loads((saved / "text_encoder" / "config.json").read_text())
    assert not [p for p in saved.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]  # no pickle anywhere

    result, reloaded = reload_in_fresh_process(saved, dtype, tmp_path)
    assert result["fingerprints"] == before
    assert layer_class in result["layers"]
    assert result["configs"] == {name: config.to_dict() for name in QUANTIZED}
    np.testing.assert_array_equal(reloaded, expected)


@pytest.fixture(scope="module")
def saved_nf4(flux_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pipe = load_pipeline(flux_path, quantization_config=pipeline_config("nf4"))
    return save_pipeline(pipe, tmp_path_factory.mktemp("saved") / "nf4")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_interrupted_save_leaves_previous_folder_intact(
    flux_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_pipeline(flux_path, quantization_config=pipeline_config("int8"))
    target = save_pipeline(pipe, tmp_path / "out")
    previous = folder_bytes(target)
    write_component = saving.save_component
    calls = []

    def fail_after_first(*args, **kwargs):
        calls.append(args[1])
        if len(calls) % 2 == 0:  # the second component of each save
            raise RuntimeError("killed halfway")
        write_component(*args, **kwargs)

    monkeypatch.setattr(saving, "save_component", fail_after_first)
    with pytest.raises(RuntimeError, match="killed halfway"):
        save_pipeline(pipe, target, overwrite=True)
    with pytest.raises(RuntimeError, match="killed halfway"):
        save_pipeline(pipe, tmp_path / "new")
    assert len(calls) == 4
    assert folder_bytes(target) == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or partial folders left


# Runs in a fresh interpreter: overwrites a saved folder and is killed (SIGKILL) after its first component.
KILLED_SAVE = """
import os, signal, sys
from pipequant import load_pipeline, saving

source, target = sys.argv[1:]
pipe = load_pipeline(source)
write_component = saving.save_component
written = []

def killed_after_first(*args, **kwargs):
    if written:
        os.kill(os.getpid(), signal.SIGKILL)
    write_component(*args, **kwargs)
    written.append(args[1])

saving.save_component = killed_after_first
saving.save_pipeline(pipe, target, overwrite=True)
"""


def test_killed_save_leaves_previous_folder_intact(saved_nf4: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    shutil.copytree(saved_nf4, target)
    previous = folder_bytes(target)
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(saved_nf4), str(target)], timeout=300)
    assert run.returncode == -9
    assert folder_bytes(target) == previous
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".out.saving-") for p in leftovers)  # hidden, beside the target
    assert not [p for p in leftovers if (p / "model_index.json").exists()]  # and never looks complete
    save_model(load_pipeline(saved_nf4).vae, tmp_path / "vae")  # a save elsewhere leaves them alone
    assert all(p.exists() for p in leftovers)
    save_pipeline(load_pipeline(saved_nf4), target, overwrite=True)  # the next save to the target removes them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vae"]


# Runs in a fresh interpreter: overwrites a saved folder and is killed (SIGKILL) in the middle of replacing it,
# right after the atomic exchange ("exchange"), or where the exchange is not available, between moving the
# old folder aside and renaming the new one in ("fallback").
KILLED_REPLACE = """
import os, signal, sys
from pathlib import Path
from pipequant import atomic, load_pipeline, save_pipeline

source, target, mode = sys.argv[1:]
pipe = load_pipeline(source)
exchange, rename = atomic.exchange, Path.rename

def exchanged_then_killed(a, b):
    assert exchange(a, b)
    os.kill(os.getpid(), signal.SIGKILL)

def moved_aside_then_killed(self, to):
    result = rename(self, to)
    if self == Path(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return result

if mode == "exchange":
    atomic.exchange = exchanged_then_killed
else:
    atomic.exchange = lambda a, b: False
    Path.rename = moved_aside_then_killed
save_pipeline(pipe, target, overwrite=True)
"""


@pytest.mark.skipif(atomic._RENAMEAT2 is None, reason="renameat2 is Linux-only")
def test_a_save_killed_during_the_exchange_leaves_the_new_target(saved_nf4: Path, flux_path: Path, tmp_path: Path):
    target = tmp_path / "out"
    shutil.copytree(flux_path, target)
    run = subprocess.run([sys.executable, "-c", KILLED_REPLACE, str(saved_nf4), str(target), "exchange"], timeout=300)
    assert run.returncode == -9
    new, saved = folder_bytes(target), folder_bytes(saved_nf4)
    assert new.keys() == saved.keys()  # the new folder, complete, in one step
    assert all(new[name] == saved[name] for name in new if name != "model_index.json")  # (its _name_or_path differs)
    assert [p.name.startswith(".out.saving-") for p in tmp_path.iterdir() if p != target] == [True]  # the old one
    load_pipeline(target)  # a load removes what the killed save left
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_save_killed_between_the_fallback_renames_is_restored(saved_nf4: Path, flux_path: Path, tmp_path: Path):
    target = tmp_path / "out"
    shutil.copytree(flux_path, target)
    previous = folder_bytes(target)
    run = subprocess.run([sys.executable, "-c", KILLED_REPLACE, str(saved_nf4), str(target), "fallback"], timeout=300)
    assert run.returncode == -9
    assert not target.exists()
    with pytest.warns(atomic.InterruptedSaveWarning, match="the previous out was restored"):
        load_pipeline(target)
    assert folder_bytes(target) == previous
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_reloaded_pipeline_saves_the_same_bytes(saved_nf4: Path, tmp_path: Path) -> None:
    again = save_pipeline(load_pipeline(saved_nf4), tmp_path / "again")
    first, second = folder_bytes(saved_nf4), folder_bytes(again)
    for component in QUANTIZED:
        files = sorted(name for name in first if name.startswith(f"{component}/"))
        assert files == sorted(name for name in second if name.startswith(f"{component}/"))
        assert all(first[name] == second[name] for name in files), component


def test_refuses_a_non_empty_folder_unless_overwrite(saved_nf4: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(saved_nf4)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pipeline(pipe, target)
    assert (target / "notes.txt").read_text() == "mine"

    save_pipeline(pipe, target, overwrite=True)
    assert not (target / "notes.txt").exists()
    assert folder_bytes(target)["transformer/config.json"] == folder_bytes(saved_nf4)["transformer/config.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_model(pipe.transformer, empty) / "config.json").is_file()


def test_a_matching_config_is_accepted_and_a_conflicting_one_refused(saved_nf4: Path) -> None:
    pipe = load_pipeline(saved_nf4, quantization_config=pipeline_config("nf4"))
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, bnb.nn.Linear4bit)

    fp4 = PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", components_to_quantize=["transformer"])
    with pytest.raises(QuantizationConfigError, match="bnb_4bit_quant_type: saved 'nf4', given 'fp4'"):
        load_pipeline(saved_nf4, quantization_config=fp4)
    int8 = PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", components_to_quantize=["transformer"])
    with pytest.raises(QuantizationConfigError, match="saved 'bitsandbytes_4bit', given 'bitsandbytes_8bit'"):
        load_pipeline(saved_nf4, quantization_config=int8)


def broken_copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    return folder


def test_truncated_safetensors_is_a_clear_error(saved_nf4: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved_nf4, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors.*truncated or corrupt"):
        load_pipeline(folder)


def test_unknown_backend_in_config_is_a_clear_error(saved_nf4: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved_nf4, tmp_path)
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["quant_method"] = "mystery"
    path.write_text(json.dumps(config))
    with pytest.raises(QuantizationConfigError, match=r"transformer/config.json: quant_method 'mystery' is not"):
        load_pipeline(folder)


def test_pickle_only_weights_are_a_clear_error(saved_nf4: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved_nf4, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # what a pickle checkpoint is named; never opened
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_pipeline(folder)


def test_stored_layer_that_does_not_fit_is_a_clear_error(saved_nf4: Path, tmp_path: Path) -> None:
    folder = broken_copy(saved_nf4, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    del tensors["proj_out.weight.absmax"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layer 'proj_out' cannot be rebuilt.*weight.absmax"):
        load_pipeline(folder)


def test_a_bfloat16_pipeline_reloads_in_bfloat16_without_a_torch_dtype(
    flux_path: Path, tmp_path: Path, generate
) -> None:
    config = PipelineQuantizationConfig(quant_mapping={"transformer": QuantoConfig(weights_dtype="int8")})
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    saved = save_pipeline(pipe, tmp_path / "saved")
    reloaded = load_pipeline(saved)  # the vae and text encoders are not quantized: their libraries load them
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(reloaded, name)
        keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []  # T5's `wo` stays float32
        dtypes = {p.dtype for n, p in model.named_parameters() if not any(f".{m}." in f".{n}" for m in keep_fp32)}
        assert dtypes == {torch.bfloat16}, name
    np.testing.assert_array_equal(generate(reloaded), generate(pipe))
