"""Flux transformer tensor names: diffusers' layout and the original Black Forest Labs (BFL) layout.

The community Flux GGUF files, ComfyUI-GGUF and stable-diffusion.cpp use BFL names, where one
tensor holds several diffusers tensors stacked along rows (``img_attn.qkv`` = to_q, to_k, to_v;
single blocks' ``linear1`` = to_q, to_k, to_v, proj_mlp) and the final modulation stores (shift,
scale) where diffusers has (scale, shift). The table is diffusers' own
``convert_flux_transformer_checkpoint_to_diffusers``, written once as data so reading and writing
share it. Rows of a GGML tensor are quantized independently, so stacking and splitting act on raw
GGUF bytes as they do on plain weights: nothing is dequantized.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

#: the prefix checkpoints of the original repository put on every tensor (ComfyUI strips it, sd.cpp adds it)
BFL_PREFIX = "model.diffusion_model."


@dataclasses.dataclass(frozen=True)
class FusedTensor:
    """One BFL tensor and the diffusers tensors it holds, stacked along rows in this order.

    Every part but the last has as many rows as the model's hidden size; the last takes the rest.
    `swap_halves` (one part): the BFL tensor is the diffusers one with its two row halves swapped.
    """

    bfl: str
    parts: tuple[str, ...]
    swap_halves: bool = False


def _linear(bfl: str, *diffusers: str, swap_halves: bool = False) -> list[FusedTensor]:
    return [
        FusedTensor(f"{bfl}.{kind}", tuple(f"{part}.{kind}" for part in diffusers), swap_halves)
        for kind in ("weight", "bias")
    ]


def flux_tensors(double_blocks: int, single_blocks: int, guidance: bool) -> list[FusedTensor]:
    """Every tensor of a Flux transformer with these block counts, in BFL order."""
    embed = "time_text_embed"
    table = [
        *_linear("time_in.in_layer", f"{embed}.timestep_embedder.linear_1"),
        *_linear("time_in.out_layer", f"{embed}.timestep_embedder.linear_2"),
        *_linear("vector_in.in_layer", f"{embed}.text_embedder.linear_1"),
        *_linear("vector_in.out_layer", f"{embed}.text_embedder.linear_2"),
    ]
    if guidance:
        table += [
            *_linear("guidance_in.in_layer", f"{embed}.guidance_embedder.linear_1"),
            *_linear("guidance_in.out_layer", f"{embed}.guidance_embedder.linear_2"),
        ]
    table += [*_linear("txt_in", "context_embedder"), *_linear("img_in", "x_embedder")]
    for i in range(double_blocks):
        bfl, ours = f"double_blocks.{i}", f"transformer_blocks.{i}"
        table += [
            *_linear(f"{bfl}.img_mod.lin", f"{ours}.norm1.linear"),
            *_linear(f"{bfl}.txt_mod.lin", f"{ours}.norm1_context.linear"),
            *_linear(f"{bfl}.img_attn.qkv", *(f"{ours}.attn.to_{x}" for x in "qkv")),
            *_linear(f"{bfl}.txt_attn.qkv", *(f"{ours}.attn.add_{x}_proj" for x in "qkv")),
            FusedTensor(f"{bfl}.img_attn.norm.query_norm.scale", (f"{ours}.attn.norm_q.weight",)),
            FusedTensor(f"{bfl}.img_attn.norm.key_norm.scale", (f"{ours}.attn.norm_k.weight",)),
            FusedTensor(f"{bfl}.txt_attn.norm.query_norm.scale", (f"{ours}.attn.norm_added_q.weight",)),
            FusedTensor(f"{bfl}.txt_attn.norm.key_norm.scale", (f"{ours}.attn.norm_added_k.weight",)),
            *_linear(f"{bfl}.img_mlp.0", f"{ours}.ff.net.0.proj"),
            *_linear(f"{bfl}.img_mlp.2", f"{ours}.ff.net.2"),
            *_linear(f"{bfl}.txt_mlp.0", f"{ours}.ff_context.net.0.proj"),
            *_linear(f"{bfl}.txt_mlp.2", f"{ours}.ff_context.net.2"),
            *_linear(f"{bfl}.img_attn.proj", f"{ours}.attn.to_out.0"),
            *_linear(f"{bfl}.txt_attn.proj", f"{ours}.attn.to_add_out"),
        ]
    for i in range(single_blocks):
        bfl, ours = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table += [
            *_linear(f"{bfl}.modulation.lin", f"{ours}.norm.linear"),
            *_linear(f"{bfl}.linear1", *(f"{ours}.attn.to_{x}" for x in "qkv"), f"{ours}.proj_mlp"),
            FusedTensor(f"{bfl}.norm.query_norm.scale", (f"{ours}.attn.norm_q.weight",)),
            FusedTensor(f"{bfl}.norm.key_norm.scale", (f"{ours}.attn.norm_k.weight",)),
            *_linear(f"{bfl}.linear2", f"{ours}.proj_out"),
        ]
    table += [
        *_linear("final_layer.linear", "proj_out"),
        *_linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap_halves=True),
    ]
    return table


def _count(names: Iterable[str], block: str) -> int:
    pattern = re.compile(rf"^{re.escape(block)}\.(\d+)\.")
    indices = [int(match.group(1)) for name in names if (match := pattern.match(name))]
    return max(indices) + 1 if indices else 0


def is_bfl_flux(names: Iterable[str]) -> bool:
    """Whether tensor names (prefix stripped) are a Flux transformer in the BFL layout."""
    return any(name.startswith(("double_blocks.", "single_blocks.")) for name in names)


def flux_tensors_from_bfl(names: Iterable[str]) -> list[FusedTensor]:
    names = list(names)
    return flux_tensors(
        _count(names, "double_blocks"), _count(names, "single_blocks"), "guidance_in.in_layer.weight" in names
    )


def flux_tensors_from_diffusers(names: Iterable[str]) -> list[FusedTensor]:
    names = list(names)
    guidance = any(name.startswith("time_text_embed.guidance_embedder.") for name in names)
    return flux_tensors(_count(names, "transformer_blocks"), _count(names, "single_transformer_blocks"), guidance)


def strip_bfl_prefix(name: str) -> str:
    return name.removeprefix(BFL_PREFIX)
