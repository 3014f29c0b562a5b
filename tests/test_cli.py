"""The `pipequant` command: inspect and demo, run as a user would."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from pipequant.cli import app

runner = CliRunner()


def test_inspect_lists_components_from_headers(flux_path):
    result = runner.invoke(app, ["inspect", str(flux_path)])
    assert result.exit_code == 0, result.output
    for name in ("transformer", "text_encoder_2", "FluxTransformer2DModel", "T5EncoderModel", "F32", "total"):
        assert name in result.output


def test_inspect_names_a_bad_folder(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code != 0
    assert "no model_index.json" in str(result.exception)


def test_demo_prints_memory_before_and_after_and_writes_an_image(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Before: bfloat16" in result.output and "After: nf4" in result.output
    assert "bitsandbytes_4bit" in result.output
    image = Image.open(Path(out) / "demo.png")
    assert image.size == (64, 64)


def test_quantize_saves_a_folder_that_inspect_describes_and_that_reloads(flux_path, tmp_path):
    import bitsandbytes as bnb
    import torch

    from pipequant import load_pipeline

    out = tmp_path / "flux-nf4"
    result = runner.invoke(
        app,
        [
            "quantize", str(flux_path), "--backend", "bitsandbytes_4bit", "--out", str(out),
            "--components", "transformer", "--kwargs", "bnb_4bit_quant_type=nf4",
            "--kwargs", "bnb_4bit_use_double_quant=true", "--dtype", "bfloat16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "bitsandbytes_4bit" in result.output and "Saved to" in result.output
    described = runner.invoke(app, ["inspect", str(out)])
    assert described.exit_code == 0, described.output
    assert "bnb_4bit_quant_type='nf4'" in described.output and "bnb_4bit_use_double_quant=True" in described.output
    pipe = load_pipeline(out, torch_dtype=torch.bfloat16)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.nested


def test_quantize_names_a_bad_option(flux_path, tmp_path):
    result = runner.invoke(
        app, ["quantize", str(flux_path), "--backend", "bitsandbytes_4bit", "--out", str(tmp_path / "x"),
              "--kwargs", "bnb_4bit_quant_typ=nf4"],
    )
    assert result.exit_code != 0
    assert "Did you mean 'bnb_4bit_quant_type'" in str(result.exception)
