"""Loading builds its models and quantized layers without running torch's initialisers on what it then replaces."""

from __future__ import annotations

import collections
import importlib

import pytest
import torch
from torch import nn

from pipequant import PipelineQuantizationConfig, load_pipeline, save_pipeline
from pipequant.meta_modules import INITIALISERS, meta_linear, no_init_on_meta


@pytest.fixture
def initialiser_calls(monkeypatch) -> collections.Counter:
    """Counts, by name, the calls of torch's initialisers: through `torch.nn.init` (torch's own modules) and through
    transformers' table of them (its models' `_init_weights`)."""
    calls: collections.Counter = collections.Counter()
    transformers_table = importlib.import_module("transformers.initialization").TORCH_INIT_FUNCTIONS
    for name in INITIALISERS:
        original = getattr(torch.nn.init, name)

        def counted(tensor, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, counted)
        monkeypatch.setitem(transformers_table, name, counted)
    return calls


def test_loading_and_reloading_run_no_initialiser(flux_path, tmp_path, each_backend, initialiser_calls):
    """The text encoders and the VAE are built on meta, the transformer's layers quantized, then saved and restored:
    no initialiser runs (before, each `nn.Linear` ran two, transformers' `_init_weights` one per weight)."""
    config = PipelineQuantizationConfig(quant_mapping={"transformer": each_backend})
    pipe = load_pipeline(flux_path, quantization_config=config, torch_dtype=torch.bfloat16)
    assert initialiser_calls == {}
    save_pipeline(pipe, tmp_path / "saved")
    initialiser_calls.clear()
    load_pipeline(tmp_path / "saved", torch_dtype=torch.bfloat16)
    assert initialiser_calls == {}


def test_real_tensors_are_initialised_as_without_it():
    torch.manual_seed(0)
    expected = nn.Linear(8, 4)
    torch.manual_seed(0)
    with no_init_on_meta():
        built = nn.Linear(8, 4)
        on_meta = meta_linear(8, 4, dtype=torch.bfloat16)
    assert torch.equal(built.weight, expected.weight) and torch.equal(built.bias, expected.bias)
    assert on_meta.weight.is_meta and on_meta.weight.dtype == torch.bfloat16 and on_meta.bias.shape == (4,)


def test_initialisers_are_restored_after_it(initialiser_calls):
    with pytest.raises(RuntimeError), no_init_on_meta():
        raise RuntimeError("leaving by an error")
    nn.Linear(2, 2, device="meta")
    assert initialiser_calls["kaiming_uniform_"] == 1 and initialiser_calls["uniform_"] == 1
