"""Load benchmark: pipequant against diffusers on the same ~0.4 B-parameter Flux transformer.

Each case runs in a fresh process (so one case's allocator state cannot help or hurt another):
wall time of the load, peak anonymous memory above the process's baseline after imports, and the
RSS high-water mark. The table is printed and written to bench/results/load.md.

With --pipeline, the whole Flux pipeline folder loads instead, the transformer quantized, each side
through its own call as a diffusers user writes it: diffusers' ``DiffusionPipeline.from_pretrained``
with its ``PipelineQuantizationConfig``, and pipequant's drop-in ``pipequant.DiffusionPipeline`` with the
same call (bench/results/load_pipeline.md). Medians of --runs runs, the cases taking turns.

    python bench/load.py                 # every case
    python bench/load.py --cases pipequant-nf4 diffusers-bf16
    python bench/load.py --pipeline --runs 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from table import publish  # run as a script, so this folder is first on sys.path

from pipequant.testing.memory import PeakSampler, anonymous_bytes, rss_high_water_mark

RESULTS = Path(__file__).resolve().parent / "results" / "load.md"
PIPELINE_RESULTS = RESULTS.with_name("load_pipeline.md")


def _ours(class_name: str, *args, **kwargs):
    return lambda: getattr(__import__("pipequant"), class_name)(*args, **kwargs)


def _diffusers(class_name: str, *args, **kwargs):
    return lambda: getattr(__import__("diffusers"), class_name)(*args, **kwargs)


def _diffusers_torchao_int8wo():
    """diffusers 0.42 takes a torchao config object only (a name is refused)."""
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _none():
    return None


# name -> (library, mode, config factory, source). Source "checkpoint" is the bf16 folder;
# "saved" is a folder pipequant saved already quantized with the same config (made once, before timing).
CASES = {
    "diffusers-bf16": ("diffusers", "bf16 (no quantization)", _none, "checkpoint"),
    "pipequant-bf16": ("pipequant", "bf16 (no quantization)", _none, "checkpoint"),
    "pipequant-nf4": (
        "pipequant",
        "bnb nf4",
        _ours("BitsAndBytesConfig", load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        "checkpoint",
    ),
    "pipequant-nf4-dq": (
        "pipequant",
        "bnb nf4 + double quant",
        _ours("BitsAndBytesConfig", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        "checkpoint",
    ),
    "pipequant-fp4": (
        "pipequant",
        "bnb fp4",
        _ours("BitsAndBytesConfig", load_in_4bit=True, bnb_4bit_quant_type="fp4"),
        "checkpoint",
    ),
    "pipequant-int8": ("pipequant", "bnb int8", _ours("BitsAndBytesConfig", load_in_8bit=True), "checkpoint"),
    "diffusers-torchao-int8wo": ("diffusers", "torchao int8wo", _diffusers_torchao_int8wo, "checkpoint"),
    "pipequant-torchao-int8wo": ("pipequant", "torchao int8wo", _ours("TorchAoConfig", "int8wo"), "checkpoint"),
    "diffusers-quanto-int8": (
        "diffusers",
        "quanto int8",
        _diffusers("QuantoConfig", weights_dtype="int8"),
        "checkpoint",
    ),
    "pipequant-quanto-int8": ("pipequant", "quanto int8", _ours("QuantoConfig", weights_dtype="int8"), "checkpoint"),
    "diffusers-quanto-int4": (
        "diffusers",
        "quanto int4",
        _diffusers("QuantoConfig", weights_dtype="int4"),
        "checkpoint",
    ),
    "pipequant-quanto-int4": ("pipequant", "quanto int4", _ours("QuantoConfig", weights_dtype="int4"), "checkpoint"),
    "pipequant-gguf-q8_0": ("pipequant", "gguf Q8_0", _ours("GGUFQuantizationConfig", quant_type="Q8_0"), "checkpoint"),
    "pipequant-gguf-q4_k": ("pipequant", "gguf Q4_K", _ours("GGUFQuantizationConfig", quant_type="Q4_K"), "checkpoint"),
    "pipequant-reload-nf4": (
        "pipequant",
        "reload saved bnb nf4",
        _ours("BitsAndBytesConfig", load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        "saved",
    ),
    "pipequant-reload-int8": (
        "pipequant",
        "reload saved bnb int8",
        _ours("BitsAndBytesConfig", load_in_8bit=True),
        "saved",
    ),
    "pipequant-reload-torchao-int8wo": (
        "pipequant",
        "reload saved torchao int8wo",
        _ours("TorchAoConfig", "int8wo"),
        "saved",
    ),
    "pipequant-reload-quanto-int8": (
        "pipequant",
        "reload saved quanto int8",
        _ours("QuantoConfig", weights_dtype="int8"),
        "saved",
    ),
    "pipequant-reload-gguf-q4_k": (
        "pipequant",
        "reload saved gguf Q4_K",
        _ours("GGUFQuantizationConfig", quant_type="Q4_K"),
        "saved",
    ),
}


def checkpoint_folder() -> Path:
    return pipeline_folder() / "transformer"


def pipeline_folder() -> Path:
    from pipequant.testing.fixtures import make_tiny_pipeline, tiny_pipeline_cache_dir

    return make_tiny_pipeline(tiny_pipeline_cache_dir() / "flux-bench", "flux", size="bench")


def largest_layer_nbytes(folder: Path) -> int:
    """Full-precision bytes of the largest module, from the safetensors headers."""
    from pipequant.checkpoint import SAFETENSORS_DTYPES, ComponentCheckpoint

    checkpoint = ComponentCheckpoint(folder)
    per_module: dict[str, int] = defaultdict(int)
    for key in checkpoint.keys():
        itemsize = SAFETENSORS_DTYPES[checkpoint.dtype(key)].itemsize
        per_module[key.rpartition(".")[0]] += math.prod(checkpoint.shape(key)) * itemsize
    return max(per_module.values())


def saved_folder(name: str) -> Path:
    from pipequant.testing.fixtures import tiny_pipeline_cache_dir

    return tiny_pipeline_cache_dir() / "flux-bench-saved" / name.removeprefix("pipequant-reload-")


def prepare_saved(name: str, folder: Path) -> None:
    """Quantize and save once (untimed), so reload rows time only the reload."""
    import torch
    from diffusers import FluxTransformer2DModel

    import pipequant

    target = saved_folder(name)
    if (target / "config.json").is_file():
        return
    model = pipequant.load_model(FluxTransformer2DModel, folder, CASES[name][2](), torch_dtype=torch.bfloat16)
    pipequant.save_model(model, target, overwrite=True)


def load_whole_pipeline(library: str, config):
    """The pipeline, transformer quantized with `config` (None: bf16), as each library's user loads it."""
    import torch

    if library == "diffusers":
        from diffusers import DiffusionPipeline
        from diffusers import PipelineQuantizationConfig as Config
    else:
        from pipequant import DiffusionPipeline
        from pipequant import PipelineQuantizationConfig as Config
    quantization = Config(quant_mapping={"transformer": config}) if config is not None else None
    return DiffusionPipeline.from_pretrained(
        pipeline_folder(), quantization_config=quantization, torch_dtype=torch.bfloat16
    )


def run_case(name: str, folder: Path, whole_pipeline: bool = False) -> dict:
    """Runs in the child process: import everything first, then measure only the load."""
    import torch
    from diffusers import FluxTransformer2DModel

    import pipequant
    from pipequant.report import component_memory

    library, _, make_config, source = CASES[name]
    config = make_config()
    if library == "pipequant" and config is not None:
        backend = pipequant.backends.backend_for(config)
        backend.require()
        __import__(backend.module_name)
    baseline = anonymous_bytes()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        if whole_pipeline:
            pipe = load_whole_pipeline(library, config)
        elif library == "diffusers":
            kwargs = {"quantization_config": config} if config is not None else {}
            model = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
        elif source == "saved":
            model = pipequant.load_model(FluxTransformer2DModel, saved_folder(name), torch_dtype=torch.bfloat16)
        else:
            model = pipequant.load_model(FluxTransformer2DModel, folder, config, torch_dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    if whole_pipeline:
        models = {name: value for name, value in pipe.components.items() if isinstance(value, torch.nn.Module)}
        model_bytes = sum(component_memory(name, model).bytes_after for name, model in models.items())
    else:
        model_bytes = component_memory("transformer", model).bytes_after
    return {
        "seconds": seconds,
        "baseline": baseline,
        "peak_above_baseline": sampler.peak - baseline,
        "rss_hwm": rss_high_water_mark(),
        "model_bytes": model_bytes,
    }


def reference_case(name: str) -> str | None:
    """What a row is compared with: diffusers in the same mode, or for a reload, quantizing from full precision."""
    if name.startswith("pipequant-reload-"):
        return "pipequant-" + name.removeprefix("pipequant-reload-")
    if name.startswith("pipequant-"):
        candidate = "diffusers-" + name.removeprefix("pipequant-")
        return candidate if candidate in CASES else None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    parser.add_argument("--pipeline", action="store_true", help="load the whole pipeline, transformer quantized")
    parser.add_argument("--runs", type=int, default=1, help="runs per case; the table shows medians")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = checkpoint_folder()
    if args.child:
        print(json.dumps(run_case(args.child, folder, args.pipeline)))
        return
    cases = args.cases or [name for name, case in CASES.items() if not (args.pipeline and case[3] == "saved")]
    if args.pipeline and any(CASES[name][3] == "saved" for name in cases):
        raise SystemExit("--pipeline loads the bf16 pipeline folder; the reload cases are transformer-only.")

    largest = largest_layer_nbytes(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    for name in cases:
        if CASES[name][3] == "saved":
            prepare_saved(name, folder)
    runs: dict[str, list[dict]] = defaultdict(list)
    for _ in range(args.runs):
        for name in cases:  # the cases take turns, so a burst of other work hits each alike
            # Page-cache the files the same way for every case, so no case pays the disk read alone.
            source = saved_folder(name) if CASES[name][3] == "saved" else pipeline_folder() if args.pipeline else folder
            for path in source.rglob("*.safetensors"):
                path.read_bytes()
            command = [sys.executable, __file__, "--child", name] + (["--pipeline"] if args.pipeline else [])
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            print(
                f"{name}: {result['seconds']:.2f} s, peak +{result['peak_above_baseline'] / 1e9:.3f} GB",
                file=sys.stderr,
            )
    rows = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} | {"n": len(results)}
        for name, results in runs.items()
    }
    print_and_write(rows, largest, args.pipeline)


def print_and_write(rows: dict[str, dict], largest: int, whole_pipeline: bool = False) -> None:
    header = [
        "case",
        "mode",
        "runs",
        "load s (median)",
        "time vs reference",
        "model GB",
        "peak anon above baseline GB",
        "RSS high-water GB",
        "peak / (model + largest layer)",
    ]
    lines = []
    for name, r in rows.items():
        _, mode, _, _ = CASES[name]
        reference = reference_case(name)
        ratio = f"{r['seconds'] / rows[reference]['seconds']:.2f} x {reference}" if reference in rows else "-"
        bound = r["model_bytes"] + largest
        lines.append(
            [
                name,
                mode,
                str(r["n"]),
                f"{r['seconds']:.2f}",
                ratio,
                f"{r['model_bytes'] / 1e9:.3f}",
                f"{r['peak_above_baseline'] / 1e9:.3f}",
                f"{r['rss_hwm'] / 1e9:.2f}",
                f"{r['peak_above_baseline'] / bound:.2f}",
            ]
        )
    import platform

    import torch

    intro = (
        f"`python bench/load.py` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"largest layer {largest / 1e6:.1f} MB in bf16. Each case in a fresh process; peak = anonymous memory "
        "(RSS less file-backed pages) sampled every 2 ms, above the process's memory after imports. "
        "Reference: diffusers in the same mode, or for a reload row, pipequant quantizing from the bf16 checkpoint."
    )
    if whole_pipeline:
        intro = intro.replace("`python bench/load.py`", "`python bench/load.py --pipeline`") + (
            " The whole Flux pipeline loads (transformer quantized, text encoders and VAE in bf16), through"
            " diffusers' DiffusionPipeline.from_pretrained with its PipelineQuantizationConfig, and through"
            " pipequant.DiffusionPipeline with the same call; model GB counts every model component."
        )
        title = "Loading a Flux pipeline with a 0.4 B-parameter transformer (bf16, page-cached), CPU"
        publish(PIPELINE_RESULTS, "Whole-pipeline load benchmark", intro, title, header, lines)
        return
    title = "Loading a 0.4 B-parameter Flux transformer (bf16 checkpoint, page-cached), CPU"
    publish(RESULTS, "Load benchmark", intro, title, header, lines)


if __name__ == "__main__":
    main()
