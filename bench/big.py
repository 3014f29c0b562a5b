"""The 12 B benchmark: a FLUX.1-dev-architecture transformer, read and quantized from a cold disk.

Writes the transformer (random bf16 weights, FLUX.1-dev's config: 19 double + 38 single blocks,
hidden 3072, 11.9 B parameters, 23.8 GB) into FOLDER once, shard by shard (never more than one
shard in memory), then loads it in fresh processes with the page cache dropped before each run
(where this process may write /proc/sys/vm/drop_caches; otherwise it says so and the runs are warm):

- a plain sequential read of the same files: the floor any load of them pays (the issue's goals are
  ratios to it); and, for comparison, the same files read by four threads taking turns at 64 MiB pieces
  (pipequant reads with four threads, around the page cache);
- pipequant in every CPU mode (bnb nf4, bnb int8, torchao int8wo, quanto int8, GGUF Q8_0, Q4_K);
- diffusers where it runs on CPU (torchao int8wo, quanto int8);
- the streamed export to a Q4_K .gguf file beside FOLDER (`export_gguf`, as `pipequant quantize --out x.gguf`),
  against the larger of the read floor, the Q4_K load and a plain write of the file's size;

Prints load time, time / read floor, time / diffusers, anonymous peak and RSS high-water mark
against (quantized bytes + largest layer), and writes bench/results/big.md.

    python bench/big.py /data/flux-12b                      # every case, medians of --runs runs
    python bench/big.py /data/flux-12b --cases read pipequant-nf4 --runs 1

About 25 GB of disk for the checkpoint: checked before writing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from table import publish  # run as a script, so this folder is first on sys.path

from pipequant.testing.memory import PeakSampler, anonymous_bytes, rss_high_water_mark

RESULTS = Path(__file__).resolve().parent / "results" / "big.md"

#: FLUX.1-dev's transformer/config.json (the architecture; the weights here are random)
FLUX_DEV_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
SHARD_BYTES = 2_200_000_000  # about the 2.2 GB of the shards BFL publishes (11 for this model)


# --------------------------------------------------------------------------------------------
# The checkpoint


def _empty_model():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel.from_config(FLUX_DEV_CONFIG)


def _shard_plan() -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors in state-dict order, cut into shards of about SHARD_BYTES (bf16)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, tensor in _empty_model().state_dict().items():
        nbytes = tensor.numel() * 2
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(tensor.shape)))
        size += nbytes
    return shards


def _shard_name(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index + 1:05d}-of-{count:05d}.safetensors"


def checkpoint_is_complete(folder: Path) -> bool:
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if not (folder / "config.json").is_file() or not index.is_file():
        return False
    names = set(json.loads(index.read_text())["weight_map"].values())
    return all((folder / name).is_file() for name in names)


def write_checkpoint(folder: Path) -> None:
    """Random bf16 weights in FLUX.1-dev's layout; one shard in memory at a time, each written atomically."""
    import torch
    from safetensors.torch import save_file

    if checkpoint_is_complete(folder):
        return
    plan = _shard_plan()
    needed = sum(2 * _numel(shape) for shard in plan for _, shape in shard)
    present = sum(path.stat().st_size for path in folder.glob("*.safetensors")) if folder.is_dir() else 0
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free + present < needed * 1.02:
        raise SystemExit(
            f"bench/big.py needs {needed / 1e9:.1f} GB for the checkpoint in {folder}, and {free / 1e9:.1f} GB "
            "are free there. Free some space or give a folder on a larger disk."
        )
    print(f"writing the {needed / 1e9:.1f} GB checkpoint to {folder} ({len(plan)} shards)", file=sys.stderr)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, shard in enumerate(plan):
        name = _shard_name(index, len(plan))
        weight_map.update({key: name for key, _ in shard})
        path = folder / name
        if path.is_file():
            continue
        # 0.02 as a trained transformer's weights; uniform is several times cheaper to draw than normal
        tensors = {
            key: torch.empty(shape).uniform_(-0.035, 0.035, generator=generator).to(torch.bfloat16)
            for key, shape in shard
        }
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, temporary, metadata={"format": "pt"})
        os.replace(temporary, path)
        del tensors
        print(f"  {name}", file=sys.stderr)
    index = {"metadata": {"total_size": needed}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.0", **FLUX_DEV_CONFIG}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --------------------------------------------------------------------------------------------
# The cases, each run in a fresh process


def _ours(class_name: str, *args, **kwargs):
    return lambda: getattr(__import__("pipequant"), class_name)(*args, **kwargs)


def _diffusers_torchao_int8wo():
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _diffusers_quanto_int8():
    from diffusers import QuantoConfig

    return QuantoConfig(weights_dtype="int8")


# name -> (library, mode, config factory); "read" and "write" are the disk's floors, "export-gguf-q4_k"
# writes the Q4_K .gguf file (`pipequant quantize --out x.gguf`) instead of loading
CASES = {
    "read": ("plain read", "sequential read of every shard", None),
    "read-4-threads": ("parallel read", "every shard read by 4 threads, alternate 64 MiB pieces", None),
    "write": ("plain write", "sequential write of the Q4_K file's size, synced", None),
    "pipequant-nf4": (
        "pipequant",
        "bnb nf4",
        _ours("BitsAndBytesConfig", load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    ),
    "pipequant-int8": ("pipequant", "bnb int8", _ours("BitsAndBytesConfig", load_in_8bit=True)),
    "pipequant-torchao-int8wo": ("pipequant", "torchao int8wo", _ours("TorchAoConfig", "int8wo")),
    "diffusers-torchao-int8wo": ("diffusers", "torchao int8wo", _diffusers_torchao_int8wo),
    "pipequant-quanto-int8": ("pipequant", "quanto int8", _ours("QuantoConfig", weights_dtype="int8")),
    "diffusers-quanto-int8": ("diffusers", "quanto int8", _diffusers_quanto_int8),
    "pipequant-gguf-q8_0": ("pipequant", "gguf Q8_0", _ours("GGUFQuantizationConfig", quant_type="Q8_0")),
    "pipequant-gguf-q4_k": ("pipequant", "gguf Q4_K", _ours("GGUFQuantizationConfig", quant_type="Q4_K")),
    "export-gguf-q4_k": ("export", "gguf Q4_K to .gguf", _ours("GGUFQuantizationConfig", quant_type="Q4_K")),
}


def drop_page_cache() -> bool:
    """Drop clean cached pages, so each run reads from the disk; False where not permitted (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("1\n")
        return True
    except OSError:
        return False


def plain_read(folder: Path) -> int:
    """Read every shard front to back in 16 MiB pieces into one reused buffer: what the disk allows."""
    buffer = bytearray(16 * 2**20)
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as file:
            while count := file.readinto(buffer):
                total += count
    return total


def parallel_read(folder: Path, threads: int = 4, piece: int = 64 * 2**20) -> int:
    """Read every shard with `threads` threads, each reading every `threads`-th `piece` into its own buffer."""
    from concurrent.futures import ThreadPoolExecutor

    def read_pieces(path: Path, first: int) -> int:
        buffer = bytearray(piece)
        total = 0
        with open(path, "rb", buffering=0) as file:
            for offset in range(first * piece, path.stat().st_size, threads * piece):
                total += os.preadv(file.fileno(), [buffer], offset)
        return total

    with ThreadPoolExecutor(threads) as pool:
        return sum(
            count
            for path in sorted(folder.glob("*.safetensors"))
            for count in pool.map(read_pieces, [path] * threads, range(threads))
        )


def plain_write(path: Path, nbytes: int) -> int:
    """Write `nbytes` to `path` in 16 MiB pieces and sync: the floor of writing a file that size."""
    buffer = bytes(16 * 2**20)
    written = 0
    with open(path, "wb", buffering=0) as file:
        while written < nbytes:
            written += file.write(buffer[: min(len(buffer), nbytes - written)])
        os.fsync(file.fileno())
    return written


def q4_k_nbytes(folder: Path) -> int:
    """The bytes of the transformer in Q4_K (what its .gguf file holds, less the header)."""
    import torch
    from diffusers import FluxTransformer2DModel

    import pipequant
    from pipequant.planning.sizing import estimate_component

    config = pipequant.GGUFQuantizationConfig(quant_type="Q4_K")
    return estimate_component("transformer", FluxTransformer2DModel, folder, config, torch.bfloat16).bytes_after


def run_case(name: str, folder: Path) -> dict:
    """In the child process: imports first, then only the load is measured."""
    import torch
    from diffusers import FluxTransformer2DModel

    import pipequant
    from pipequant.report import component_memory

    library, _, make_config = CASES[name]
    config = make_config() if make_config is not None else None
    output = folder.parent / f"{folder.name}-bench-output"
    output.unlink(missing_ok=True)
    write_bytes = q4_k_nbytes(folder) if library == "plain write" else 0
    if library in ("pipequant", "export"):
        backend = pipequant.backends.backend_for(config)
        backend.require()
        __import__(backend.module_name)
    baseline = anonymous_bytes()
    started = time.perf_counter()
    with PeakSampler() as sampler:
        model = None
        if library == "plain read":
            plain_read(folder)
        elif library == "parallel read":
            parallel_read(folder)
        elif library == "plain write":
            plain_write(output, write_bytes)
        elif library == "export":
            pipequant.export_gguf(
                FluxTransformer2DModel, folder, config, output.with_suffix(".gguf"), torch_dtype=torch.bfloat16
            )
        elif library == "diffusers":
            model = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config)
        else:
            model = pipequant.load_model(FluxTransformer2DModel, folder, config, torch_dtype=torch.bfloat16)
    seconds = time.perf_counter() - started
    output.unlink(missing_ok=True)
    output.with_suffix(".gguf").unlink(missing_ok=True)
    return {
        "seconds": seconds,
        "peak_above_baseline": sampler.peak - baseline,
        "rss_hwm": rss_high_water_mark(),
        "model_bytes": 0 if model is None else component_memory("transformer", model).bytes_after,
    }


def largest_layer_nbytes() -> int:
    """bf16 bytes of the largest module that owns weights (what one streamed layer costs in full precision)."""
    model = _empty_model()
    return max(sum(t.numel() * 2 for t in module.parameters(recurse=False)) for module in model.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the checkpoint is (or is written)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--runs", type=int, default=3, help="runs per case; the table shows medians")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.folder)))
        return
    write_checkpoint(args.folder)
    cold = drop_page_cache()
    if not cold:
        print("cannot drop the page cache (needs root): runs read from a warm cache", file=sys.stderr)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    runs: dict[str, list[dict]] = {name: [] for name in args.cases}
    for _ in range(args.runs):
        for name in args.cases:  # the cases take turns, so a burst of other work hits each alike
            drop_page_cache()
            out = subprocess.run(
                [sys.executable, __file__, args.folder, "--child", name],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if out.returncode != 0:
                print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            print(
                f"{name}: {result['seconds']:.1f} s, anon +{result['peak_above_baseline'] / 1e9:.2f} GB, "
                f"RSS high-water {result['rss_hwm'] / 1e9:.2f} GB",
                file=sys.stderr,
            )
    rows = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]} | {"n": len(results)}
        for name, results in runs.items()
        if results
    }
    print_and_write(rows, largest_layer_nbytes(), cold)


def print_and_write(rows: dict[str, dict], largest: int, cold: bool) -> None:
    header = [
        "case",
        "mode",
        "runs",
        "s (median)",
        "/ read floor",
        "/ 4-thread read",
        "/ diffusers",
        "/ max(read, Q4_K load, write)",
        "model GB",
        "anon peak GB",
        "anon / (model + largest)",
        "RSS high-water GB",
        "RSS / (model + largest)",
    ]
    floor = rows.get("read", {}).get("seconds")
    parallel = rows.get("read-4-threads", {}).get("seconds")
    parts = [rows.get(name, {}).get("seconds") for name in ("read", "pipequant-gguf-q4_k", "write")]
    export_bound = max(parts) if all(parts) else None
    lines = []
    for name, r in rows.items():
        library, mode, _ = CASES[name]
        theirs = rows.get(name.replace("pipequant-", "diffusers-")) if name.startswith("pipequant-") else None
        bound = r["model_bytes"] + largest
        quantized = r["model_bytes"] > 0
        lines.append(
            [
                name,
                mode,
                str(r["n"]),
                f"{r['seconds']:.1f}",
                f"{r['seconds'] / floor:.2f}" if floor and name not in ("read", "write") else "-",
                f"{r['seconds'] / parallel:.2f}"
                if parallel and name not in ("read", "read-4-threads", "write")
                else "-",
                f"{r['seconds'] / theirs['seconds']:.2f}" if theirs else "-",
                f"{r['seconds'] / export_bound:.2f}" if export_bound and name == "export-gguf-q4_k" else "-",
                f"{r['model_bytes'] / 1e9:.2f}" if quantized else "-",
                f"{r['peak_above_baseline'] / 1e9:.2f}",
                f"{r['peak_above_baseline'] / bound:.2f}" if quantized else "-",
                f"{r['rss_hwm'] / 1e9:.2f}",
                f"{r['rss_hwm'] / bound:.2f}" if quantized else "-",
            ]
        )
    import platform

    import torch

    intro = (
        f"`python bench/big.py FOLDER` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}: "
        f"a FLUX.1-dev-architecture transformer (11.9 B parameters, random bf16 weights, 11 shards), largest layer "
        f"{largest / 1e6:.0f} MB in bf16. Each run in a fresh process, "
        + ("the page cache dropped before each." if cold else "the page cache NOT dropped (not root).")
        + " Anon peak = anonymous memory (RSS less file-backed pages) sampled every 2 ms above the process after "
        "imports; RSS high-water = VmHWM, imports included. Medians of the runs."
    )
    publish(RESULTS, "12 B load benchmark", intro, "Loading FLUX.1-dev's transformer from disk, CPU", header, lines)


if __name__ == "__main__":
    main()
