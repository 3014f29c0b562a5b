"""Every code block and command in README.md runs, against the tiny Flux pipeline, so the README cannot drift.

Python blocks run in order in one namespace (later blocks use what earlier ones made, as a reader
would); ``pipequant ...`` commands, in blocks and inline, run through the CLI; ``make`` targets must
exist. The only changes are those a tiny offline pipeline needs, listed in `PYTHON_CHANGES` and
`COMMAND_CHANGES`: Hub ids and placeholder paths become the tiny pipeline's folder, images are
generated small and in two steps, and the budget is scaled to the tiny pipeline's size.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipequant.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
MAKEFILE = README.parent / "Makefile"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE_COMMAND = re.compile(r"`(pipequant [^`]+)`")


def _python_changes(flux: Path) -> dict[str, str]:
    return {
        '"black-forest-labs/FLUX.1-dev"': repr(str(flux)),
        '"path/or/repo-id"': repr(str(flux)),
        '"FLUX.1-dev/transformer"': repr(str(flux / "transformer")),
        'pipe("photo of a cute dog")': 'pipe("photo of a cute dog", height=64, width=64, num_inference_steps=2)',
        'onload_device=torch.device("cuda")': 'onload_device=torch.device("cpu")',
    }


def _command_changes(flux: Path) -> dict[str, str]:
    return {"PATH": str(flux), "8GB": "10MB"}


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def _commands() -> list[str]:
    """Every `pipequant ...` line: those in sh blocks, then the inline ones, comments stripped."""
    lines = [line.split("  #")[0].strip() for block in _blocks("sh") for line in block.splitlines()]
    inline = INLINE_COMMAND.findall(FENCE.sub("", README.read_text()))
    return [line for line in [*lines, *inline] if line.startswith("pipequant ")]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPEQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _community_gguf(flux: Path, path: Path) -> None:
    """The file the README's community-file example names, written as such files are (BFL layout, Q4_K)."""
    from diffusers import FluxTransformer2DModel

    from pipequant import GGUFQuantizationConfig, load_model, save_gguf

    model = load_model(FluxTransformer2DModel, flux / "transformer", GGUFQuantizationConfig(quant_type="Q4_K"))
    save_gguf(model, path, layout="bfl")


def _loras(flux: Path) -> None:
    """The LoRA folders the README's LoRA example names (relative to the working folder): rank 4, random weights,
    made by peft for the tiny Flux transformer, saved by diffusers."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = FluxPipeline.from_pretrained(flux, torch_dtype=torch.bfloat16)
    for seed, folder in enumerate(("path/to/lora", "path/to/other_lora")):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        pipe.transformer.add_adapter(config, adapter_name=f"made{seed}")
        state = get_peft_model_state_dict(pipe.transformer, adapter_name=f"made{seed}")
        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state)


def test_every_python_block_runs_in_order(flux_path, in_tmp):
    blocks = _blocks("python")
    assert len(blocks) >= 6
    _community_gguf(flux_path, in_tmp / "flux1-dev-Q4_K_S.gguf")
    _loras(flux_path)
    namespace: dict = {}
    for number, block in enumerate(blocks, start=1):
        for old, new in _python_changes(flux_path).items():
            block = block.replace(old, new)
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {number} failed:\n{block}") from error
    assert namespace["pipe"].transformer.is_quantized  # the last block reloaded a saved quantized pipeline


def test_every_command_runs(flux_path, in_tmp):
    runner = CliRunner()
    commands = _commands()
    assert {"inspect", "demo", "quantize", "plan", "compare"} <= {shlex.split(c)[1] for c in commands}
    for command in commands:
        for old, new in _command_changes(flux_path).items():
            command = command.replace(old, new)
        args = shlex.split(command)[1:]
        if args[0] == "compare":
            args += ["--height", "64", "--width", "64", "--steps", "2"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"


def test_make_targets_the_readme_names_exist():
    targets = set(re.findall(r"^([\w-]+):", MAKEFILE.read_text(), re.M))
    named = {line.split()[1] for block in _blocks("sh") for line in block.splitlines() if line.startswith("make ")}
    assert named and named <= targets
