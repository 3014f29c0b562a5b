"""LoRA benchmark: a rank-16 LoRA on the quantized ~0.4 B-parameter Flux transformer, per backend, beside bf16, on CPU.

Every mode loads the same bf16 checkpoint as bench/forward.py, then takes the same LoRA (rank 16 on every attention
and feed-forward linear layer, random weights made by peft) through diffusers' model API: load time
(`load_lora_adapter`), fuse time (`fuse_lora`: dequantize, add, quantize again), median forward time with the LoRA
unfused and fused (same inputs as bench/forward.py), and the model's bytes before the LoRA and after fusing and
unloading it (`unload_lora`): fusing keeps the model's quantized size. The table is printed and written to
bench/results/lora.md.

    python bench/lora.py
    python bench/lora.py --modes bf16 gguf-q4_k --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch
from forward import MODES, checkpoint_folder, load, make_inputs, timed_forward  # run as a script: bench/ is on the path
from table import publish

RESULTS = Path(__file__).resolve().parent / "results" / "lora.md"
RANK = 16
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]
DEFAULT_MODES = ["bf16", "bnb-nf4", "bnb-int8", "torchao-int8wo", "quanto-int8", "gguf-q8_0", "gguf-q4_k"]


def make_lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A rank-16 LoRA with random A and B (peft's `init_lora_weights=False`) for `model`'s architecture."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=TARGETS), "made")
    state = {key: value.clone() for key, value in get_peft_model_state_dict(model, adapter_name="made").items()}
    model.delete_adapters("made")
    return state


def model_bytes(model: torch.nn.Module) -> int:
    from pipequant.report import component_memory

    return component_memory("transformer", model).bytes_after


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def round_robin(models: dict, inputs: dict, repeats: int) -> dict[str, float]:
    """Median forward seconds per mode, the modes taking turns (after a warm-up each), so a burst of other work
    on the machine hits every mode alike."""
    for model in models.values():
        timed_forward(model, inputs)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(timed_forward(model, inputs)[0])
    return {name: statistics.median(values) for name, values in times.items()}


def run(modes: list[str], lora: dict[str, torch.Tensor], inputs: dict, repeats: int) -> dict[str, dict]:
    models = {name: load(name, checkpoint_folder())[0] for name in modes}
    results = {name: {"before": model_bytes(model)} for name, model in models.items()}
    for name, model in models.items():
        results[name]["load"] = timed(lambda: model.load_lora_adapter(lora, prefix=None, adapter_name="lora"))
    for name, seconds in round_robin(models, inputs, repeats).items():
        results[name]["unfused"] = seconds
    for name, model in models.items():
        results[name]["fuse"] = timed(lambda: model.fuse_lora(lora_scale=1.0))
    for name, seconds in round_robin(models, inputs, repeats).items():
        results[name]["fused"] = seconds
    for name, model in models.items():
        model.unload_lora()
        results[name]["after"] = model_bytes(model)
        print(f"{name}: {results[name]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=DEFAULT_MODES)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per mode and state (after a warm-up)")
    args = parser.parse_args()
    modes = ["bf16", *(m for m in args.modes if m != "bf16")]
    load_before = os.getloadavg()[0]
    reference, _ = load("bf16", checkpoint_folder())
    lora = make_lora(reference)
    inputs = make_inputs(reference.config)
    del reference
    results = run(modes, lora, inputs, args.repeats)
    base = results["bf16"]
    header = [
        "mode",
        "quantization",
        "LoRA load s",
        "fuse s",
        "forward unfused s",
        "forward fused s",
        "fused vs bf16 fused",
        "model MB before",
        "MB fused + unloaded",
    ]
    lines = [
        [
            name,
            MODES[name][1],
            f"{r['load']:.2f}",
            f"{r['fuse']:.2f}",
            f"{r['unfused']:.3f}",
            f"{r['fused']:.3f}",
            f"{r['fused'] / base['fused']:.2f} x",
            f"{r['before'] / 1e6:.1f}",
            f"{r['after'] / 1e6:.1f}",
        ]
        for name, r in results.items()
    ]
    libraries = ", ".join(
        f"{n} {version(n)}" for n in ("torch", "diffusers", "peft", "bitsandbytes", "torchao", "optimum-quanto")
    )
    intro = "\n".join(
        [
            f"`python bench/lora.py --repeats {args.repeats}` on {platform.machine()}, {os.cpu_count()} cores "
            f"({torch.get_num_threads()} torch threads); {libraries}. Each mode loads the 0.4 B-parameter Flux "
            "transformer "
            f"of bench/forward.py, takes a rank-{RANK} LoRA on its {len(TARGETS)} kinds of linear layers through "
            "`load_lora_adapter`, runs forwards unfused, fuses (`fuse_lora`), runs forwards fused, and unloads the "
            "LoRA "
            "(`unload_lora`, keeping the fused weights). All modes are loaded first; forward times are medians of "
            f"{args.repeats} forwards of bench/forward.py's inputs per mode, the modes taking turns after a warm-up "
            "each. Model MB counts real storage (packed data and scales) before the LoRA and after fusing and "
            "unloading.",
            "",
            f"Load average (1 min) was {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end; above "
            "the "
            f"core count ({os.cpu_count()}), other processes shared the cores and the times are noisy.",
        ]
    )
    title = f"Rank-{RANK} LoRA on a 0.4 B-parameter Flux transformer, CPU"
    publish(RESULTS, "LoRA benchmark", intro, title, header, lines)


if __name__ == "__main__":
    main()
