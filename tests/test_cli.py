"""The `pipequant` command: inspect and demo, run as a user would."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    assert result.exit_code == 2
    assert "no model_index.json" in result.stderr


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
            "quantize",
            str(flux_path),
            "--backend",
            "bitsandbytes_4bit",
            "--out",
            str(out),
            "--component",
            "transformer",
            "--kwargs",
            "bnb_4bit_quant_type=nf4",
            "--kwargs",
            "bnb_4bit_use_double_quant=true",
            "--dtype",
            "bfloat16",
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
        app,
        [
            "quantize",
            str(flux_path),
            "--backend",
            "bitsandbytes_4bit",
            "--out",
            str(tmp_path / "x"),
            "--kwargs",
            "bnb_4bit_quant_typ=nf4",
        ],
    )
    assert result.exit_code == 2
    assert "Did you mean 'bnb_4bit_quant_type'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["quantize", "{flux}", "--backend", "torchao", "--kwargs", "quant_type=int8w", "--out", "{tmp}/x"],
            "Did you mean 'int8wo'?",
        ),
        (["plan", "{flux}", "--budget", "1KB"], "No plan fits 1.00 kB"),
        (["inspect", "{flux}", "--config", "bnb-nf5"], "bnb-nf5"),
        (["inspect", "{tmp}"], "has no model_index.json"),
    ],
)
def test_user_errors_are_one_line_on_stderr_with_exit_code_2(flux_path, tmp_path, args, message):
    args = [arg.format(flux=flux_path, tmp=tmp_path) for arg in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in result.output
    debug = runner.invoke(app, ["--debug", *args])
    assert debug.exit_code == 1 and message.split("'")[0] in str(debug.exception)  # the exception itself


def test_every_command_spells_each_option_one_way():
    """--component, --config, --dtype and --out mean the same everywhere; old spellings are aliases."""
    import typer.main

    group = typer.main.get_command(app)
    spellings: dict[str, set[str]] = {}
    for command in group.commands.values():
        for param in command.params:
            if param.name in ("component", "components", "config", "dtype", "load_dtype", "out"):
                spellings.setdefault(param.opts[0], set()).add(command.name)
    assert set(spellings) <= {"--component", "--config", "--dtype", "--out"}, spellings
    quantize = group.commands["quantize"]
    assert [p.opts for p in quantize.params if p.name == "components"] == [["--component", "--components"]]
