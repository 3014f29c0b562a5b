"""The `pipequant` command."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .report import format_bytes, memory_report, memory_table

app = typer.Typer(help="Load diffusion pipelines and quantize their components while they load.", no_args_is_help=True)
# Wide enough for the tables when output is not a terminal (CI logs, pipes).
console = Console(width=None if Console().is_terminal else 120)

_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@app.command()
def inspect(path: str = typer.Argument(..., help="Pipeline folder or Hub repo id.")) -> None:
    """Show each component: class, parameters, stored dtypes and bytes (read from file headers, no weights loaded)."""
    from torch import nn

    from .checkpoint import ComponentCheckpoint
    from .loading import read_pipeline_index, resolve_pipeline_folder

    index = read_pipeline_index(resolve_pipeline_folder(path))
    table = Table(title=f"{index.pipeline_class_name} at {index.folder}")
    for column in ("component", "class", "tensors", "elements", "stored dtypes", "bytes"):
        table.add_column(column, justify="right" if column in ("tensors", "elements", "bytes") else "left")
    total = 0
    for name, entry in index.components.items():
        cls = index.component_class(name)
        if cls is None:
            continue
        if not issubclass(cls, nn.Module):
            table.add_row(name, f"{entry[0]}.{entry[1]}", "-", "-", "-", "-")
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
            nbytes += count * _SAFETENSORS_DTYPE_BYTES.get(dtype, 1)
        total += nbytes
        table.add_row(
            name, f"{entry[0]}.{entry[1]}", str(len(checkpoint.keys())), f"{elements / 1e6:.2f} M",
            ", ".join(d for d, _ in dtypes.most_common()), format_bytes(nbytes),
        )
    table.add_row("total", "", "", "", "", format_bytes(total), style="bold")
    console.print(table)


@app.command()
def demo(
    out: Path = typer.Option(Path("pipequant-demo"), help="Folder for the generated image."),
    size: str = typer.Option("tiny", help="Transformer size: tiny, or bench (about 0.4 B parameters)."),
) -> None:
    """Build a small Flux pipeline offline, load it with bitsandbytes nf4, generate an image, print memory before/after."""
    import torch

    from . import PipelineQuantizationConfig, load_pipeline
    from .fixtures import make_tiny_pipeline, tiny_pipeline_cache_dir

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
        "photo of a cute dog", num_inference_steps=4, height=64, width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    out.mkdir(parents=True, exist_ok=True)
    image_path = out / "demo.png"
    image.save(image_path)
    console.print(f"Generated {image.size[0]}x{image.size[1]} image in {time.perf_counter() - started:.2f} s: {image_path}")


@app.command()
def quantize(
    path: str = typer.Argument(..., help="Pipeline folder or Hub repo id."),
    backend: str = typer.Option(..., help="Quantization backend; 'gguf' writes one .gguf file."),
    qtype: str = typer.Option(..., "--type", help="GGML type, e.g. Q4_K, Q5_K, Q6_K, Q8_0."),
    out: Path = typer.Option(..., help="The .gguf file to write."),
    component: str = typer.Option(None, help="Component to quantize (default: transformer, else unet)."),
    rule: list[str] = typer.Option([], "--rule", help="PATTERN=TYPE: a per-layer type, first match wins (repeatable)."),
    keep: list[str] = typer.Option([], "--keep", help="Module pattern kept in full precision (repeatable)."),
    layout: str = typer.Option("auto", help="Tensor names: auto, bfl (Flux, for ComfyUI-GGUF / sd.cpp) or diffusers."),
    overwrite: bool = typer.Option(False, help="Replace an existing file."),
) -> None:
    """Quantize one component layer by layer as it loads and write it to a .gguf file (loadable by load_pipeline)."""
    from . import GGUFQuantizationConfig, load_model, save_gguf
    from .backends.gguf import type_fallbacks
    from .loading import read_pipeline_index, resolve_pipeline_folder

    if backend != "gguf":
        raise typer.BadParameter(
            f"{backend!r} has no single-file format; only 'gguf' is exported by this command "
            "(save other backends with pipequant.save_pipeline).",
            param_hint="--backend",
        )
    rules = dict(_pattern_rule(text) for text in rule)
    config = GGUFQuantizationConfig(quant_type=qtype, type_rules=rules or None, modules_to_not_convert=keep or None)
    index = read_pipeline_index(resolve_pipeline_folder(path))
    name = component or next((c for c in ("transformer", "unet") if c in index.components), None)
    if name is None or index.component_class(name) is None:
        raise typer.BadParameter(f"{index.pipeline_class_name} has no component {name!r}.", param_hint="--component")
    started = time.perf_counter()
    model = load_model(index.component_class(name), index.folder / name, config)
    written = save_gguf(model, out, layout=layout, overwrite=overwrite)
    fallbacks = type_fallbacks(model)
    console.print(
        f"Wrote {name} ({type(model).__name__}, {config!r}) to {written}: {format_bytes(written.stat().st_size)} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    for layer, (asked, stored) in fallbacks.items():
        console.print(f"  {layer}: {stored} (rows do not fit {asked} blocks)")


def _pattern_rule(text: str) -> tuple[str, str]:
    pattern, sep, qtype = text.rpartition("=")
    if not sep or not pattern:
        raise typer.BadParameter(f"{text!r} is not PATTERN=TYPE (e.g. '*.attn.to_q=Q8_0').", param_hint="--rule")
    return pattern, qtype


def main() -> None:
    app()
