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
