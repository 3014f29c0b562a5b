"""Load benchmark: pipequant against diffusers on the same ~0.4 B-parameter Flux transformer.

Each case runs in a fresh process (so one case's allocator state cannot help or hurt another):
wall time of the load, peak anonymous memory above the process's baseline after imports, and the
RSS high-water mark. The table is printed and written to bench/results/load.md.

    python bench/load.py                 # every case
    python bench/load.py --cases pipequant-nf4 diffusers-bf16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from table import publish  # run as a script, so this folder is first on sys.path

from pipequant.testing.memory import PeakSampler, anonymous_bytes, rss_high_water_mark

RESULTS = Path(__file__).resolve().parent / "results" / "load.md"


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
    from pipequant.testing.fixtures import make_tiny_pipeline, tiny_pipeline_cache_dir

    return make_tiny_pipeline(tiny_pipeline_cache_dir() / "flux-bench", "flux", size="bench") / "transformer"


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


def run_case(name: str, folder: Path) -> dict:
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
        if library == "diffusers":
            kwargs = {"quantization_config": config} if config is not None else {}
            model = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
        elif source == "saved":
            model = pipequant.load_model(FluxTransformer2DModel, saved_folder(name), torch_dtype=torch.bfloat16)
        else:
            model = pipequant.load_model(FluxTransformer2DModel, folder, config, torch_dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "baseline": baseline,
        "peak_above_baseline": sampler.peak - baseline,
        "rss_hwm": rss_high_water_mark(),
        "model_bytes": component_memory("transformer", model).bytes_after,
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
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = checkpoint_folder()
    if args.child:
        print(json.dumps(run_case(args.child, folder)))
        return

    largest = largest_layer_nbytes(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    for name in args.cases:
        if CASES[name][3] == "saved":
            prepare_saved(name, folder)
    rows = {}
    for name in args.cases:
        # Page-cache the files the same way for every case, so no case pays the disk read alone.
        source = saved_folder(name) if CASES[name][3] == "saved" else folder
        for path in source.glob("*.safetensors"):
            path.read_bytes()
        out = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, env=env, check=False
        )
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name}: {rows[name]['seconds']:.2f} s, peak +{rows[name]['peak_above_baseline'] / 1e9:.3f} GB",
            file=sys.stderr,
        )
    print_and_write(rows, largest)


def print_and_write(rows: dict[str, dict], largest: int) -> None:
    header = [
        "case",
        "mode",
        "load s",
        "time vs reference",
        "model GB",
        "peak anon above baseline GB",
        "RSS high-water GB",
        "peak / 1.25 x (model + largest layer)",
    ]
    lines = []
    for name, r in rows.items():
        _, mode, _, _ = CASES[name]
        reference = reference_case(name)
        ratio = f"{r['seconds'] / rows[reference]['seconds']:.2f} x {reference}" if reference in rows else "-"
        bound = 1.25 * (r["model_bytes"] + largest)
        lines.append(
            [
                name,
                mode,
                f"{r['seconds']:.2f}",
                ratio,
                f"{r['model_bytes'] / 1e9:.3f}",
                f"{r['peak_above_baseline'] / 1e9:.3f}",
                f"{r['rss_hwm'] / 1e9:.2f}",
                f"{r['peak_above_baseline'] / bound:.2f} ({'met' if r['peak_above_baseline'] <= bound else 'missed'})",
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
    title = "Loading a 0.4 B-parameter Flux transformer (bf16 checkpoint, page-cached), CPU"
    publish(RESULTS, "Load benchmark", intro, title, header, lines)


if __name__ == "__main__":
    main()
