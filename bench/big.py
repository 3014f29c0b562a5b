"""The 12 B benchmark: a FLUX.1-dev-architecture transformer, read and quantized from a cold disk.

Writes the transformer (random bf16 weights, FLUX.1-dev's config: 19 double + 38 single blocks,
hidden 3072, 11.9 B parameters, 23.8 GB) into FOLDER once, shard by shard (never more than one
shard in memory), then loads it in fresh processes with the page cache dropped before each run
(where this process may write /proc/sys/vm/drop_caches; otherwise it says so and the runs are warm):

- a plain sequential read of the same files: the floor any load of them pays;
- pipequant in every CPU mode (bnb nf4, bnb int8, torchao int8wo, quanto int8, GGUF Q8_0, Q4_K);
- diffusers where it runs on CPU (torchao int8wo, quanto int8);
- pipequant exporting the transformer to a Q4_K .gguf (`pipequant quantize`), against the read,
  the quantization and the write of the same bytes.

Prints load time, time / read floor, time / diffusers, anonymous peak and RSS high-water mark
against (quantized bytes + largest layer), and writes bench/results/big.md.

    python bench/big.py /data/flux-12b                      # every case, medians of --runs runs
    python bench/big.py /data/flux-12b --cases read pipequant-nf4 --runs 1

About 25 GB of disk for the checkpoint (and 7 GB more for the Q4_K export): checked before writing.
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

# run as a script, so this folder is first on sys.path
from memory import PeakSampler, anonymous_bytes, rss_high_water_mark
from table import publish

RESULTS = Path(__file__).resolve().parent / "results" / "big.md"

#: FLUX.1-dev's transformer/config.json (the architecture; the weights here are random)
FLUX_DEV_CONFIG = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the checkpoint is (or is written)")
    args = parser.parse_args()
    write_checkpoint(args.folder)


if __name__ == "__main__":
    main()
