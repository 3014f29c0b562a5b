"""The offline pipeline fixtures load through diffusers, generate, and are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from PIL import Image

from pipequant.testing import fixtures
from pipequant.testing.fixtures import make_tiny_pipeline, tiny_pipeline_cache_dir

PROMPT = "A photo of a red cat sitting on a wooden chair, 4k, highly detailed!"


def _safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize(
    ("kind", "pipeline_class", "extra"),
    [
        ("flux", "FluxPipeline", {"guidance_scale": 3.5, "max_sequence_length": 32}),
        ("sd", "StableDiffusionPipeline", {"guidance_scale": 5.0}),
    ],
)
def test_builds_loads_and_generates(tmp_path: Path, kind: str, pipeline_class: str, extra: dict) -> None:
    path = make_tiny_pipeline(tmp_path / kind, kind)
    assert path == tmp_path / kind
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == pipeline_class

    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == pipeline_class
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None:
            continue
        encoder = getattr(pipe, name.replace("tokenizer", "text_encoder"))
        ids = tokenizer(PROMPT).input_ids
        assert len(ids) > 10 and max(ids) < encoder.config.vocab_size

    image = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=48 if kind == "sd" else 64,
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images[0]
    assert isinstance(image, Image.Image)
    assert image.size == ((48, 64) if kind == "sd" else (64, 64))


@pytest.mark.parametrize("kind", ["flux", "sd"])
def test_same_seed_gives_identical_weights(tmp_path: Path, kind: str) -> None:
    a = _safetensors_bytes(make_tiny_pipeline(tmp_path / "a", kind, seed=3))
    b = _safetensors_bytes(make_tiny_pipeline(tmp_path / "b", kind, seed=3))
    c = _safetensors_bytes(make_tiny_pipeline(tmp_path / "c", kind, seed=4))
    assert a and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_building_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_tiny_pipeline(tmp_path / "p", "sd")
    assert torch.equal(torch.rand(4), expected)


def test_complete_folder_is_reused_unless_overwrite(tmp_path: Path) -> None:
    path = make_tiny_pipeline(tmp_path / "p", "sd")
    marker = path / "marker.txt"
    marker.write_text("kept")

    assert make_tiny_pipeline(path, "sd") == path
    assert marker.exists()

    assert make_tiny_pipeline(path, "sd", overwrite=True) == path
    assert not marker.exists()
    assert (path / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary folders left behind


def test_empty_folder_is_filled_but_foreign_folder_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_tiny_pipeline(empty, "sd") / "model_index.json").is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a pipeline")
    with pytest.raises(FileExistsError):
        make_tiny_pipeline(foreign, "sd")
    assert (foreign / "notes.txt").exists()


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(fixtures, "_save", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_tiny_pipeline(tmp_path / "p", "flux")
    assert list(tmp_path.iterdir()) == []


def test_sharded_transformer_has_index_and_same_weights(tmp_path: Path) -> None:
    sharded = make_tiny_pipeline(tmp_path / "sharded", "flux", shard_size="2MB")
    plain = make_tiny_pipeline(tmp_path / "plain", "flux")

    folder = sharded / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert not list((sharded / "text_encoder").glob("*.index.json"))  # only the denoiser is sharded

    a = DiffusionPipeline.from_pretrained(sharded).transformer.state_dict()
    b = DiffusionPipeline.from_pretrained(plain).transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("kind", "denoiser"), [("flux", "transformer"), ("sd", "unet")])
def test_bench_denoiser_is_about_0_4b_parameters(kind: str, denoiser: str) -> None:
    build = fixtures._build_flux if kind == "flux" else fixtures._build_sd
    with init_empty_weights():
        model = getattr(build("bench"), denoiser)
    assert 0.35e9 < sum(p.numel() for p in model.parameters()) < 0.45e9


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        make_tiny_pipeline(tmp_path / "p", "sdxl")
    with pytest.raises(ValueError, match="size"):
        make_tiny_pipeline(tmp_path / "p", "flux", size="huge")


def test_cache_dir_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEQUANT_CACHE", str(tmp_path / "cache"))
    assert tiny_pipeline_cache_dir() == tmp_path / "cache"
    assert (tmp_path / "cache").is_dir()

    monkeypatch.delenv("PIPEQUANT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny_pipeline_cache_dir() == tmp_path / "home" / ".cache" / "pipequant"
