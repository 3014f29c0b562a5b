"""Shared fixtures: tiny pipelines of real architectures, built once per test session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipequant import BitsAndBytesConfig, GGUFQuantizationConfig, QuantoConfig, TorchAoConfig
from pipequant.testing.fixtures import make_tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "flux", "flux")


@pytest.fixture(scope="session")
def sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "sd", "sd")


BACKEND_CONFIGS = {
    "bnb-nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "bnb-int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "torchao-int8wo": lambda: TorchAoConfig("int8wo"),
    "quanto-int8": lambda: QuantoConfig(weights_dtype="int8"),
    "gguf-q8_0": lambda: GGUFQuantizationConfig(quant_type="Q8_0"),
    "gguf-q4_k": lambda: GGUFQuantizationConfig(quant_type="Q4_K"),
}


"""One config per backend (and GGUF's two codec families), for the checks every backend must pass; each computes
in the dtype the model is loaded in."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `each_backend` runs once per `BACKEND_CONFIGS` entry, with a fresh config of it."""
    if "each_backend" in metafunc.fixturenames:
        configs = [make() for make in BACKEND_CONFIGS.values()]
        metafunc.parametrize("each_backend", configs, ids=list(BACKEND_CONFIGS))


def _generate(pipe, steps: int = 2, seed: int = 0, device: str = "cpu"):
    return pipe(
        "photo of a cute dog",
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator(device).manual_seed(seed),
        output_type="np",
    ).images[0]


@pytest.fixture(scope="session")
def generate():
    """generate(pipe, steps=2, seed=0, device="cpu") -> one small image as a numpy array, the same call everywhere
    (`device`: where the random generator lives, "cuda" for a pipeline on the GPU)."""
    return _generate


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, tensor in state_a.items():
        assert tensor.dtype == state_b[key].dtype and torch.equal(tensor, state_b[key]), key


@pytest.fixture(scope="session")
def assert_same_state():
    """assert_same_state(a, b): two modules' state dicts hold the same keys, dtypes and values."""
    return _assert_same_state


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run only where a CUDA GPU is present (CI has none; the device machine does)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
