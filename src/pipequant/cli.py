"""The `pipequant` command.

Options have one spelling across commands (``--component``, ``--config``, ``--dtype``, ``--out``;
older spellings stay as aliases). A user's mistake (a bad config, folder, budget or device) is one
line on stderr and exit code 2, as for a bad option; ``pipequant --debug ...`` shows the traceback.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from rich.table import Table

from .backends.base import MissingBackendError, QuantizationConfigError
from .checkpoint import CheckpointError
from .devices import DeviceError
from .loading import PipelineFolderError
from .planning import BudgetError
from .report import memory_report, memory_table
from .ui import format_bytes

#: errors whose message says what is wrong and how to fix it: shown as one line, without a traceback
USER_ERRORS = (
    QuantizationConfigError,
    PipelineFolderError,
    CheckpointError,
    BudgetError,
    DeviceError,
    MissingBackendError,
    FileExistsError,
)


class _Commands(typer.core.TyperGroup):
    """Runs a command; a user error becomes one line on stderr and exit code 2 unless --debug was given."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            if ctx.params.get("debug"):
                raise
            message = " ".join(str(error).split())
            click.echo(f"Error: {message}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Commands,
    help="Load diffusion pipelines and quantize their components while they load.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Wide enough for the tables when output is not a terminal (CI logs, pipes).
console = Console(width=None if Console().is_terminal else 200)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
) -> None:
    """Load diffusion pipelines and quantize their components while they load."""


@app.command()
def inspect(
    path: str = typer.Argument(..., help="Pipeline folder or Hub repo id."),
    config: str = typer.Option(
        None,
        help="Also estimate the bytes loading with this config would hold: MODE[:COMPONENTS], "
        "BACKEND[:COMPONENTS] or a .json file (see `pipequant plan --out`).",
    ),
    load_dtype: str = typer.Option(
        None, "--dtype", help="Load dtype of the estimate, e.g. bfloat16 (default: as stored)."
    ),
    all_modes: bool = typer.Option(
        False, "--all-modes", help="Also estimate every component in every mode that runs on CPU."
    ),
) -> None:
    """Show each component: class, parameters, stored dtypes and bytes (read from file headers, no weights loaded).

    With --config or --dtype, also what each component would hold once loaded, before and after
    quantizing, estimated exactly from headers and shapes.
    """
    from torch import nn

    from .checkpoint import SAFETENSORS_DTYPES, ComponentCheckpoint
    from .loading import read_pipeline_index, resolve_pipeline_folder

    index = read_pipeline_index(resolve_pipeline_folder(path))
    table = Table(title=f"{index.pipeline_class_name} at {index.folder}")
    for column in ("component", "class", "tensors", "elements", "stored dtypes", "bytes", "stored quantization"):
        table.add_column(column, justify="right" if column in ("tensors", "elements", "bytes") else "left")
    total = 0
    for name, entry in index.components.items():
        cls = index.component_class(name)
        if cls is None:
            continue
        if not issubclass(cls, nn.Module):
            table.add_row(name, f"{entry[0]}.{entry[1]}", "-", "-", "-", "-", "-")
            continue
        checkpoint = ComponentCheckpoint(index.folder / name)
        dtypes: Counter[str] = Counter()
        elements = nbytes = 0
        for key in checkpoint.keys():
            count = 1
            for dim in checkpoint.shape(key):
                count *= dim
            dtype = checkpoint.dtype(key)
            dtypes[dtype] += count
            elements += count
            nbytes += count * (SAFETENSORS_DTYPES[dtype].itemsize if dtype in SAFETENSORS_DTYPES else 1)
        total += nbytes
        table.add_row(
            name,
            f"{entry[0]}.{entry[1]}",
            str(len(checkpoint.keys())),
            f"{elements / 1e6:.2f} M",
            ", ".join(d for d, _ in dtypes.most_common()),
            format_bytes(nbytes),
            _stored_quantization(index.folder / name),
        )
    table.add_row("total", "", "", "", "", format_bytes(total), "", style="bold")
    console.print(table)
    if config is not None or load_dtype is not None:
        from .config_spec import parse_config
        from .planning.sizing import estimate

        quantization = parse_config(config) if config is not None else None
        title = f"Estimate: {config or 'no quantization'}, {load_dtype or 'stored dtypes'}"
        console.print(memory_table(estimate(index.folder, quantization, _dtype(load_dtype)), title=title))
    if all_modes:
        console.print(_modes_table(index.folder, _dtype(load_dtype)))


@app.command()
def demo(
    out: Path = typer.Option(Path("pipequant-demo"), help="Folder for the generated image."),
    size: str = typer.Option("tiny", help="Transformer size: tiny, or bench (about 0.4 B parameters)."),
) -> None:
    """Build a small Flux pipeline offline, load it with bitsandbytes nf4, generate an image, print memory
    before/after."""
    import torch

    from . import PipelineQuantizationConfig, load_pipeline
    from .testing.fixtures import make_tiny_pipeline, tiny_pipeline_cache_dir

    folder = make_tiny_pipeline(tiny_pipeline_cache_dir() / f"flux-{size}", "flux", size=size)
    console.print(f"Pipeline folder: {folder}")
    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=["transformer", "text_encoder_2"],
    )
    console.print(f"Config: {config!r}")
    reference = load_pipeline(folder, torch_dtype=torch.bfloat16)
    console.print(memory_table(memory_report(reference), title="Before: bfloat16"))
    del reference

    started = time.perf_counter()
    pipe = load_pipeline(folder, quantization_config=config, torch_dtype=torch.bfloat16, progress=True)
    console.print(f"Loaded and quantized in {time.perf_counter() - started:.2f} s")
    console.print(memory_table(memory_report(pipe), title="After: nf4 transformer and text_encoder_2"))

    started = time.perf_counter()
    image = pipe(
        "photo of a cute dog",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    out.mkdir(parents=True, exist_ok=True)
    image_path = out / "demo.png"
    image.save(image_path)
    console.print(
        f"Generated {image.size[0]}x{image.size[1]} image in {time.perf_counter() - started:.2f} s: {image_path}"
    )


def _backends_help() -> str:
    """`--backend`'s help: every registered backend with what its layers become and its main options."""
    from .backends import backends

    return "Quantization backend: " + "; ".join(f"{backend.name}: {backend.cli_help}" for backend in backends()) + "."


@app.command()
def quantize(
    path: str = typer.Argument(..., help="Pipeline folder or Hub repo id."),
    backend: str = typer.Option(..., help=_backends_help()),
    out: Path = typer.Option(
        ..., help="Folder for the quantized pipeline, or a .gguf file (one GGUF-quantized component)."
    ),
    components: list[str] = typer.Option(
        [], "--component", "--components", help="Component to quantize (repeatable; default: every model component)."
    ),
    kwargs: list[str] = typer.Option(
        [], "--kwargs", help="KEY=VALUE option of the backend's config (repeatable; its options: see --backend)."
    ),
    qtype: str = typer.Option(None, "--type", help="The config's quant_type, the same as --kwargs quant_type=TYPE."),
    rule: list[str] = typer.Option(
        [],
        "--rule",
        help="PATTERN=TYPE, an entry of the config's type_rules: a per-layer type, first match wins (repeatable).",
    ),
    keep: list[str] = typer.Option([], "--keep", help="Module pattern kept in full precision (repeatable)."),
    dtype: str = typer.Option(None, help="Load dtype, e.g. bfloat16 (default: as stored)."),
    layout: str = typer.Option(
        "auto", help=".gguf output: tensor names, auto, bfl (Flux, for ComfyUI-GGUF / sd.cpp) or diffusers."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
) -> None:
    """Quantize as the weights stream in, then save: a pipeline folder that reloads without quantizing, or a
    .gguf file (streamed: the model is never in memory whole)."""
    from . import PipelineQuantizationConfig, load_pipeline, save_pipeline

    options = dict(_key_value(text) for text in kwargs)
    if qtype is not None:
        options["quant_type"] = qtype
    if rule:
        options["type_rules"] = dict(_pattern_rule(text) for text in rule)
    if keep:
        options["modules_to_not_convert"] = keep
    if out.suffix == ".gguf":
        _quantize_to_gguf(path, backend, options, components, _dtype(dtype), out, layout, overwrite)
        return
    config = PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=options, components_to_quantize=components or None
    )
    started = time.perf_counter()
    pipe = load_pipeline(path, quantization_config=config, torch_dtype=_dtype(dtype), progress=True)
    console.print(memory_table(memory_report(pipe), title=f"{config!r}"))
    written = save_pipeline(pipe, out, overwrite=overwrite)
    console.print(
        f"Saved to {written} in {time.perf_counter() - started:.1f} s; load it with "
        f"pipequant.load_pipeline({str(written)!r})."
    )


def _quantize_to_gguf(path, backend, options, components, dtype, out: Path, layout: str, overwrite: bool) -> None:
    from . import GGUFQuantizationConfig, export_gguf
    from .backends.gguf import GGUFTypeFallbackWarning
    from .formats.gguf.reader import GGUFFile
    from .loading import read_pipeline_index, resolve_pipeline_folder

    if backend != "gguf":
        raise typer.BadParameter(
            f"a .gguf file holds GGUF blocks; {backend!r} saves to a folder (give --out a folder).",
            param_hint="--backend",
        )
    if len(components) > 1:
        raise typer.BadParameter("a .gguf file holds one component; name one.", param_hint="--component")
    config = GGUFQuantizationConfig.from_kwargs(options, context="pipequant quantize")
    index = read_pipeline_index(resolve_pipeline_folder(path))
    name = components[0] if components else next((c for c in ("transformer", "unet") if c in index.components), None)
    if name is None or name not in index.components or index.component_class(name) is None:
        raise typer.BadParameter(f"{index.pipeline_class_name} has no component {name!r}.", param_hint="--component")
    started = time.perf_counter()
    model_class = index.component_class(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GGUFTypeFallbackWarning)  # listed below, once
        written = export_gguf(
            model_class, index.folder / name, config, out, torch_dtype=dtype, layout=layout, overwrite=overwrite
        )
    console.print(
        f"Wrote {name} ({model_class.__name__}, {config!r}) to {written}: {format_bytes(written.stat().st_size)} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    file = GGUFFile(written)
    for layer, asked in file.metadata.type_fallbacks.items():
        console.print(f"  {layer}: {file.pieces[f'{layer}.weight'].ggml_type} (rows do not fit {asked} blocks)")


def _stored_quantization(folder: Path) -> str:
    """What a saved component's config.json says it holds, as the config that made it prints."""
    from .backends import config_from_dict
    from .restoring import stored_quantization_config

    stored = stored_quantization_config(folder)
    return "-" if stored is None else repr(config_from_dict(stored, context=str(folder)))


def _key_value(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as JSON where it is JSON (numbers, true/false, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"{text!r} is not KEY=VALUE.", param_hint="--kwargs")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@app.command()
def plan(
    path: str = typer.Argument(..., help="Pipeline folder or Hub repo id."),
    budget: str = typer.Option(..., help="Memory for the model components, e.g. 8GB, 7.5GiB, 500MB."),
    dtype: str = typer.Option(None, help="Load dtype, e.g. bfloat16 (default: as stored)."),
    mode: list[str] = typer.Option([], "--mode", help="Candidate mode (repeatable; default: the planner's list)."),
    component: list[str] = typer.Option(
        [], "--component", help="Component that may be quantized (repeatable; default: all)."
    ),
    out: Path = typer.Option(None, help="Write the chosen config to this .json file (for --config elsewhere)."),
    rows: int = typer.Option(32, help="Rows sampled per layer to measure errors."),
    columns: int = typer.Option(512, help="Columns read back per layer to measure errors."),
) -> None:
    """Choose the config that fits a memory budget with the least expected quality loss, and explain it."""
    from .config_spec import write_config
    from .planning import plan as make_plan
    from .presets import PLAN_CANDIDATES

    started = time.perf_counter()
    chosen, explanation = make_plan(
        path,
        budget,
        _dtype(dtype),
        candidates=mode or PLAN_CANDIDATES,
        components=component or None,
        rows=rows,
        columns=columns,
        progress=True,
    )
    console.print(explanation)
    console.print(f"Planned in {time.perf_counter() - started:.1f} s: {chosen!r}")
    if out is not None:
        console.print(
            f"Wrote {write_config(chosen, out)}" if chosen is not None else f"Fits unquantized; {out} not written."
        )


@app.command()
def compare(
    path: str = typer.Argument(..., help="Pipeline folder or Hub repo id."),
    config: list[str] = typer.Option(
        ...,
        "--config",
        help="A variant to compare: MODE[:COMPONENTS], BACKEND[:COMPONENTS] or a .json file (repeatable).",
    ),
    prompt: list[str] = typer.Option(..., "--prompt", help="Prompt (repeatable)."),
    seed: list[int] = typer.Option([0], "--seed", help="Seed (repeatable)."),
    steps: int = typer.Option(4, help="Inference steps."),
    height: int = typer.Option(None, help="Image height (default: the pipeline's)."),
    width: int = typer.Option(None, help="Image width (default: the pipeline's)."),
    dtype: str = typer.Option(None, help="Load dtype of every variant and the reference, e.g. bfloat16."),
    out: Path = typer.Option(Path("pipequant-compare"), help="Folder for grid.png and report.md."),
) -> None:
    """Generate with the full-precision pipeline and each quantized variant; report per-component and image quality."""
    from .config_spec import parse_config
    from .loading import load_pipeline
    from .quality import compare as run_compare

    torch_dtype = _dtype(dtype)
    reference = load_pipeline(path, torch_dtype=torch_dtype)
    variants = {
        spec: load_pipeline(path, parse_config(spec), torch_dtype=torch_dtype, progress=True) for spec in config
    }
    size = {key: value for key, value in (("height", height), ("width", width)) if value is not None}
    report = run_compare(reference, variants, prompt, seed, out_dir=out, num_inference_steps=steps, **size)
    console.print(report.markdown.read_text(), markup=False, highlight=False)
    console.print(f"Wrote {report.markdown} and {report.grid}")


def _modes_table(folder: Path, torch_dtype) -> Table:
    """Bytes of each model component (and the total) in full precision and in each mode that runs on CPU."""
    import torch

    from .planning.sizing import estimate
    from .presets import PRESETS, preset_pipeline_config, usable

    modes = {"full precision": None} | {m: preset_pipeline_config(m) for m in PRESETS if usable(m, torch.device("cpu"))}
    estimates = {mode: estimate(folder, config, torch_dtype) for mode, config in modes.items()}
    names = [row.name for row in estimates["full precision"]]
    table = Table(title="Estimated bytes per mode (every model component quantized)")
    table.add_column("mode")
    for name in [*names, "total"]:
        table.add_column(name, justify="right")
    for mode, rows in estimates.items():
        table.add_row(
            mode, *(format_bytes(r.bytes_after) for r in rows), format_bytes(sum(r.bytes_after for r in rows))
        )
    return table


def _dtype(name: str | None):
    from .backends.base import dtype_from_any

    return dtype_from_any(name, "--dtype")


def _pattern_rule(text: str) -> tuple[str, str]:
    pattern, sep, qtype = text.rpartition("=")
    if not sep or not pattern:
        raise typer.BadParameter(f"{text!r} is not PATTERN=TYPE (e.g. '*.attn.to_q=Q8_0').", param_hint="--rule")
    return pattern, qtype


def main() -> None:
    app()
