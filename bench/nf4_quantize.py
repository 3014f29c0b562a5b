"""4-bit quantize throughput: pipequant's paths against bitsandbytes' `quantize_4bit`, on CPU.

On CPU pipequant runs its compiled kernel (bitsandbytes' arithmetic in one pass, same bytes);
elsewhere it calls bitsandbytes' own function on block-aligned slices (same bytes, bounded
temporaries). Both are timed here against one whole-tensor `quantize_4bit` call. MB/s of bf16
weights, best of 5, on the weight shapes of a Flux transformer. Writes bench/results/nf4_quantize.md.

    python bench/nf4_quantize.py
"""

from __future__ import annotations

import time
from pathlib import Path

import bitsandbytes.functional as F
import torch

from pipequant.backends import bnb_chunked

RESULTS = Path(__file__).resolve().parent / "results" / "nf4_quantize.md"
SHAPES = [(3072, 3072), (12288, 3072), (3072, 15360)]


def best_seconds(run, repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    rows = []
    for shape in SHAPES:
        weight = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
        megabytes = weight.numel() * 2 / 1e6
        for quant_type in ("nf4", "fp4"):
            theirs = best_seconds(lambda: F.quantize_4bit(weight, quant_type=quant_type))
            compiled = best_seconds(
                lambda: bnb_chunked.quantize_4bit(
                    weight, quant_type=quant_type, compress_statistics=False, quant_storage=torch.uint8
                )
            )
            chunks = best_seconds(
                lambda: bnb_chunked._by_slices(
                    weight.reshape(-1), 64, quant_type, torch.uint8, bnb_chunked.CHUNK_ELEMENTS
                )
            )
            rows.append(
                (f"{shape[0]}x{shape[1]}", quant_type, megabytes / theirs, megabytes / compiled, megabytes / chunks)
            )
    header = (
        "| weight | type | bitsandbytes quantize_4bit MB/s | pipequant compiled MB/s | ratio "
        "| pipequant chunks MB/s | ratio |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    lines += [f"| {w} | {t} | {a:.0f} | {b:.0f} | {b / a:.2f} x | {c:.0f} | {c / a:.2f} x |" for w, t, a, b, c in rows]
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(
        "# 4-bit quantize throughput (CPU)\n\n`python bench/nf4_quantize.py`, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; MB/s of bf16 weights, best of 5.\n\n{text}\n"
    )


if __name__ == "__main__":
    main()
