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
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import PeakSampler, anonymous_bytes, rss_high_water_mark  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "load.md"


def _pipequant_bnb(**kwargs):
    from pipequant import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


# name -> (library, quantization mode description, builder of the config or None)
CASES = {
    "diffusers-bf16": ("diffusers", "bf16 (no quantization)", lambda: None),
    "diffusers-quanto-int8": ("diffusers", "quanto int8", lambda: __import__("diffusers").QuantoConfig(weights_dtype="int8")),
    "pipequant-bf16": ("pipequant", "bf16 (no quantization)", lambda: None),
    "pipequant-nf4": ("pipequant", "bnb nf4", lambda: _pipequant_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "pipequant-nf4-dq": (
        "pipequant",
        "bnb nf4 + double quant",
        lambda: _pipequant_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    ),
    "pipequant-fp4": ("pipequant", "bnb fp4", lambda: _pipequant_bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "pipequant-int8": ("pipequant", "bnb int8", lambda: _pipequant_bnb(load_in_8bit=True)),
}


def checkpoint_folder() -> Path:
    from pipequant.fixtures import make_tiny_pipeline, tiny_pipeline_cache_dir

    return make_tiny_pipeline(tiny_pipeline_cache_dir() / "flux-bench", "flux", size="bench") / "transformer"


def largest_layer_nbytes(folder: Path) -> int:
    """Full-precision bytes of the largest module, from the safetensors headers."""
    from pipequant.checkpoint import ComponentCheckpoint

    checkpoint = ComponentCheckpoint(folder)
    per_module: dict[str, int] = defaultdict(int)
    element_bytes = {"BF16": 2, "F16": 2, "F32": 4}
    for key in checkpoint.keys():
        count = 1
        for dim in checkpoint.shape(key):
            count *= dim
        per_module[key.rpartition(".")[0]] += count * element_bytes[checkpoint.dtype(key)]
    return max(per_module.values())


def run_case(name: str, folder: Path) -> dict:
    """Runs in the child process: import everything first, then measure only the load."""
    import torch
    from diffusers import FluxTransformer2DModel

    import pipequant
    from pipequant.report import component_memory

    library, _, make_config = CASES[name]
    config = make_config()
    if library == "pipequant" and config is not None:
        pipequant.backends.backend_for(config).require()
        __import__(pipequant.backends.backend_for(config).module_name)
    baseline = anonymous_bytes()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        if library == "diffusers":
            kwargs = {"quantization_config": config} if config is not None else {}
            model = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
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
    rows = []
    for name in args.cases:
        # Page-cache the checkpoint the same way for every case, so no case pays the disk read alone.
        for path in folder.glob("*.safetensors"):
            path.read_bytes()
        out = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, env=env, check=False
        )
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, result))
        print(f"{name}: {result['seconds']:.2f} s, peak +{result['peak_above_baseline'] / 1e9:.2f} GB", file=sys.stderr)
    print_and_write(rows, largest)


def print_and_write(rows: list[tuple[str, dict]], largest: int) -> None:
    from rich.console import Console
    from rich.table import Table

    diffusers_bf16 = next((r["seconds"] for n, r in rows if n == "diffusers-bf16"), None)
    header = [
        "case", "library", "mode", "load s", "vs diffusers bf16", "model GB", "peak anon above baseline GB",
        "RSS high-water GB", "goal: peak <= 1.25 x (model + largest layer)",
    ]
    lines = []
    for name, r in rows:
        library, mode, _ = CASES[name]
        bound = 1.25 * (r["model_bytes"] + largest)
        lines.append([
            name, library, mode, f"{r['seconds']:.2f}",
            f"{r['seconds'] / diffusers_bf16:.2f} x" if diffusers_bf16 else "-",
            f"{r['model_bytes'] / 1e9:.3f}", f"{r['peak_above_baseline'] / 1e9:.3f}", f"{r['rss_hwm'] / 1e9:.2f}",
            f"{r['peak_above_baseline'] / bound:.2f} of bound ({'met' if r['peak_above_baseline'] <= bound else 'MISSED'})",
        ])
    table = Table(title="Loading a 0.4 B-parameter Flux transformer (bf16 checkpoint, page-cached), CPU")
    for column in header:
        table.add_column(column)
    for line in lines:
        table.add_row(*line)
    Console(width=200).print(table)
    import platform

    import torch

    md = [
        "# Load benchmark",
        "",
        f"`python bench/load.py` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"largest layer {largest / 1e6:.1f} MB in bf16. Each case in a fresh process; peak = anonymous memory "
        "(RSS less file-backed pages) sampled every 2 ms, above the process's memory after imports.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(line) + " |" for line in lines),
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(md))


if __name__ == "__main__":
    main()
