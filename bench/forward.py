"""Forward benchmark: one forward of the quantized ~0.4 B-parameter Flux transformer against bf16, on CPU.

Every backend and mode that runs on CPU loads the same bf16 checkpoint through pipequant, then
runs the same inputs (a small token count, so the whole run takes minutes): median of several
timed forwards, run round-robin across modes after one warm-up, real bytes of the model, and the
output's relative error against bf16. The table is printed and written to bench/results/forward.md.

    python bench/forward.py                        # every mode
    python bench/forward.py --modes bf16 quanto-int8 --repeats 3
    python bench/forward.py --compiled             # each mode also compiled (fullgraph); to forward_compiled.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from table import publish  # run as a script, so this folder is first on sys.path

RESULTS = Path(__file__).resolve().parent / "results" / "forward.md"
COMPILED_RESULTS = RESULTS.with_name("forward_compiled.md")  # with --compiled: eager and compiled rows
COMPILED = " compiled"  # the suffix of a mode's compiled row
IMAGE_TOKENS = 64  # a 128 x 128 image: 16 x 16 latents in 2 x 2 patches
TEXT_TOKENS = 16


def _bnb(**kwargs):
    from pipequant import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs, bnb_4bit_compute_dtype=torch.bfloat16)


def _torchao(quant_type: str):
    from pipequant import TorchAoConfig

    return TorchAoConfig(quant_type)


def _quanto(weights_dtype: str):
    from pipequant import QuantoConfig

    return QuantoConfig(weights_dtype=weights_dtype)


def _gguf(quant_type: str):
    from pipequant import GGUFQuantizationConfig

    return GGUFQuantizationConfig(quant_type=quant_type, compute_dtype=torch.bfloat16)


# name -> (backend, mode, builder of the pipequant config; None for the bf16 baseline)
MODES: dict[str, tuple[str, str, Callable[[], object] | None]] = {
    "bf16": ("-", "bf16 (no quantization)", None),
    "bnb-nf4": ("bitsandbytes", "nf4", lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "bnb-fp4": ("bitsandbytes", "fp4", lambda: _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "bnb-int8": ("bitsandbytes", "int8 (LLM.int8)", lambda: _bnb(load_in_8bit=True)),
    "torchao-int8wo": ("torchao", "int8wo", lambda: _torchao("int8wo")),
    "torchao-int8dq": ("torchao", "int8dq", lambda: _torchao("int8dq")),
    "torchao-float8wo": ("torchao", "float8wo (e5m2)", lambda: _torchao("float8wo")),
    "quanto-int8": ("quanto", "int8 weights", lambda: _quanto("int8")),
    "quanto-int4": ("quanto", "int4 weights", lambda: _quanto("int4")),
    "quanto-float8": ("quanto", "float8 weights", lambda: _quanto("float8")),
    "gguf-q8_0": ("gguf", "Q8_0", lambda: _gguf("Q8_0")),
    "gguf-q6_k": ("gguf", "Q6_K", lambda: _gguf("Q6_K")),
    "gguf-q4_k": ("gguf", "Q4_K", lambda: _gguf("Q4_K")),
}


def checkpoint_folder() -> Path:
    from pipequant.testing.fixtures import make_tiny_pipeline, tiny_pipeline_cache_dir

    return make_tiny_pipeline(tiny_pipeline_cache_dir() / "flux-bench", "flux", size="bench") / "transformer"


def make_inputs(config) -> dict[str, torch.Tensor]:
    """The same seeded inputs for every mode: latents, text states, pooled text, ids, timestep, guidance."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    return {
        "hidden_states": randn(1, IMAGE_TOKENS, config.in_channels),
        "encoder_hidden_states": randn(1, TEXT_TOKENS, config.joint_attention_dim),
        "pooled_projections": randn(1, config.pooled_projection_dim),
        "timestep": torch.tensor([0.5], dtype=torch.bfloat16),
        "guidance": torch.tensor([3.5], dtype=torch.bfloat16),
        "img_ids": torch.zeros(IMAGE_TOKENS, 3),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
    }


def load(name: str, folder: Path) -> tuple[torch.nn.Module, float]:
    from diffusers import FluxTransformer2DModel

    from pipequant import load_model

    make_config = MODES[name][2]
    started = time.perf_counter()
    model = load_model(
        FluxTransformer2DModel, folder, make_config() if make_config else None, torch_dtype=torch.bfloat16
    )
    return model, time.perf_counter() - started


def timed_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, process CPU seconds, output) of one forward."""
    with torch.no_grad():  # as diffusers pipelines run (quanto's packed int2/int4 fail under inference_mode)
        wall, cpu = time.perf_counter(), time.process_time()
        output = model(**inputs).sample
        return time.perf_counter() - wall, time.process_time() - cpu, output.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per mode (after one warm-up)")
    parser.add_argument(
        "--compiled", action="store_true", help="add a row per mode for torch.compile(model, fullgraph=True)"
    )
    args = parser.parse_args()
    modes = ["bf16", *(m for m in args.modes if m != "bf16")]  # bf16 first: the reference for time and error
    folder = checkpoint_folder()
    load_before = os.getloadavg()[0]
    from pipequant.report import component_memory

    models, results = {}, {}
    for name in modes:
        models[name], load_seconds = load(name, folder)
        results[name] = {
            "load_seconds": load_seconds,
            "model_bytes": component_memory("transformer", models[name]).bytes_after,
            "wall": [],
            "cpu": [],
        }
        print(f"{name}: loaded in {load_seconds:.1f} s", flush=True)
    inputs = make_inputs(models["bf16"].config)
    if args.compiled:
        for name in modes:
            compiled = f"{name}{COMPILED}"
            started = time.perf_counter()
            models[compiled] = torch.compile(models[name], fullgraph=True)
            timed_forward(models[compiled], inputs)  # compiles
            seconds = time.perf_counter() - started
            results[compiled] = {**results[name], "compile_seconds": seconds, "wall": [], "cpu": []}
            print(f"{compiled}: compiled in {results[compiled]['compile_seconds']:.1f} s", flush=True)
        modes = [row for name in modes for row in (name, f"{name}{COMPILED}")]  # each mode's compiled row after it
    reference = timed_forward(models["bf16"], inputs)[2]
    for name in modes:  # warm-up (first-call dispatch, allocations) and the error against bf16
        output = timed_forward(models[name], inputs)[2]
        results[name]["error"] = ((output - reference).norm() / reference.norm()).item()
    # Round-robin, so a burst of other work on the machine hits every mode alike.
    for _ in range(args.repeats):
        for name in modes:
            wall, cpu, _ = timed_forward(models[name], inputs)
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
    rows = [(name, results[name]) for name in modes]
    for name, r in rows:
        print(f"{name}: median {statistics.median(r['wall']):.3f} s", flush=True)
    path = COMPILED_RESULTS if args.compiled else RESULTS
    print_and_write(path, rows, args.repeats, (load_before, os.getloadavg()[0]))


def print_and_write(path: Path, rows: list[tuple[str, dict]], repeats: int, load_average: tuple[float, float]) -> None:
    baseline = statistics.median(rows[0][1]["wall"])
    header = [
        "mode",
        "backend",
        "quantization",
        "forward median s",
        "min-max s",
        "vs bf16",
        "CPU s (median)",
        "model MB",
        "load s",
        "rel. error vs bf16",
    ]
    lines = []
    for name, r in rows:
        backend, mode, _ = MODES[name.removesuffix(COMPILED)]
        if name.endswith(COMPILED):
            mode += f", torch.compile (compiling {r['compile_seconds']:.0f} s)"
        median = statistics.median(r["wall"])
        lines.append(
            [
                name,
                backend,
                mode,
                f"{median:.3f}",
                f"{min(r['wall']):.2f}-{max(r['wall']):.2f}",
                f"{median / baseline:.2f} x",
                f"{statistics.median(r['cpu']):.2f}",
                f"{r['model_bytes'] / 1e6:.0f}",
                f"{r['load_seconds']:.1f}",
                f"{r['error']:.4f}",
            ]
        )
    title = (
        f"One forward of a 0.4 B-parameter Flux transformer, {IMAGE_TOKENS} image + {TEXT_TOKENS} text tokens, "
        f"CPU ({torch.get_num_threads()} threads)"
    )
    libraries = ", ".join(f"{name} {version(name)}" for name in ("torch", "bitsandbytes", "torchao", "optimum-quanto"))
    intro = "\n".join(
        [
            f"`python bench/forward.py` on {platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} "
            "torch "
            f"threads); {libraries}. Every mode loads the same bf16 checkpoint (`make_tiny_pipeline(..., 'flux', "
            f"size='bench')`) through pipequant and runs the same seeded inputs: {IMAGE_TOKENS} image tokens and "
            f"{TEXT_TOKENS} text tokens. All modes are loaded first; after one warm-up forward each, they run "
            f"round-robin {repeats} times, so a burst of other work hits every mode alike. CPU s is the process's CPU "
            "time per forward (all threads). Error is the relative L2 distance of the output from the bf16 output. "
            "Model MB counts real storage (packed data and scales). A compiled row (`--compiled`) runs "
            "`torch.compile(model, fullgraph=True)` of the same model; its first call, which compiles, is left out.",
            "",
            f"Load average (1 min) was {load_average[0]:.1f} at the start and {load_average[1]:.1f} at the end; above "
            "the "
            f"core count ({os.cpu_count()}), other processes shared the cores and the times are noisy.",
        ]
    )
    publish(path, "Forward benchmark", intro, title, header, lines)


if __name__ == "__main__":
    main()
