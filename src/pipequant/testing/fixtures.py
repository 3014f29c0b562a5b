"""Offline diffusers pipeline folders with real architectures and random weights.

Tests, the demo and the benchmarks need complete pipeline folders (``model_index.json`` plus one
sub-folder per component, weights in safetensors) without any hub access. This module builds them
from configs and from-scratch tokenizers, so the loader sees exactly the layout of a hub snapshot.

Dimensions were chosen so that the in_features of every linear layer in the text encoders and the
transformer / UNet is a multiple of 64 (256 where cheap), which is what block quantizers
(blocks of 32 / 64 / 256) need:

* CLIP text encoder (both kinds, every size): hidden 256, MLP 512, 2 layers, 4 heads x 64,
  77 positions, byte-level BPE vocabulary of 514 tokens.
* T5 encoder (flux, every size): d_model 256, d_ff 512 (gated-gelu), 2 layers, 4 heads x 64,
  character-level unigram vocabulary of 292 pieces (incl. 100 sentinels).
* VAE (every size): 4 levels (32, 64, 64, 64), so the scale factor is 8; flux: 16 latent channels,
  scaling factor 0.3611 and shift 0.1159, no quant convs (as in FLUX.1); sd: 4 latent channels,
  scaling factor 0.18215.
* Flux transformer, ``size="tiny"``: 2 heads x 64 (hidden 128), 2 double + 2 single blocks,
  about 1.9 M parameters. ``size="bench"``: 12 heads x 128 (hidden 1536), 3 double + 4 single
  blocks, about 0.41 B parameters.
* SD UNet, ``size="tiny"``: channels (64, 128), 1 cross-attention level, about 4.1 M parameters.
  ``size="bench"``: channels (256, 512, 1024, 1024), 1 layer per block, about 0.37 B parameters.

``size="tiny"`` is saved in float32 (folders of about 23 MB for flux and 26 MB for sd, built in
well under a second); ``size="bench"`` is saved in bfloat16, every component, with the
transformer / UNet sharded into 200 MB files (folders of about 790 MB for flux, 700 MB for sd).
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

KINDS = ("flux", "sd")
SIZES = ("tiny", "bench")

TEXT_WIDTH = 256
"""Hidden size of both text encoders; the transformer / UNet conditioning dims must match it."""

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

FLUX_TRANSFORMER_CONFIGS: dict[str, dict] = {
    "tiny": {
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 64,
        "num_attention_heads": 2,
        "axes_dims_rope": (16, 24, 24),
    },
    "bench": {
        "num_layers": 3,
        "num_single_layers": 4,
        "attention_head_dim": 128,
        "num_attention_heads": 12,
        "axes_dims_rope": (16, 56, 56),
    },
}
"""Per-size FluxTransformer2DModel arguments; the rest (channels, text dims) is shared."""

UNET_CONFIGS: dict[str, dict] = {
    "tiny": {
        "block_out_channels": (64, 128),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 2,
    },
    "bench": {
        "block_out_channels": (256, 512, 1024, 1024),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "attention_head_dim": 8,
    },
}
"""Per-size UNet2DConditionModel arguments (attention_head_dim is the head count, as in SD 1.x)."""

BENCH_SHARD_SIZE = "200MB"

_FLUX_VAE_SCALING = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
_SD_VAE_SCALING = {"scaling_factor": 0.18215}


def tiny_pipeline_cache_dir() -> Path:
    """Folder for built fixtures (``$PIPEQUANT_CACHE`` or ``~/.cache/pipequant``), created if missing.

    Building is cheap but not free; the demo reuses folders across runs from here.
    """
    root = os.environ.get("PIPEQUANT_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "pipequant"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_tiny_pipeline(
    path: str | Path,
    kind: str = "flux",
    *,
    size: str = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    shard_size: str | None = None,
) -> Path:
    """Build a random-weight ``kind`` pipeline folder at ``path`` and return ``path``.

    ``kind`` is ``"flux"`` (FluxPipeline) or ``"sd"`` (StableDiffusionPipeline); ``size`` is
    ``"tiny"`` or ``"bench"`` (see the module docstring). The same (kind, size, seed) always
    gives byte-identical weights. ``shard_size`` (e.g. ``"2MB"``) shards the transformer / UNet
    weights with an index json; it defaults to unsharded for tiny and 200 MB for bench.

    A complete folder (one with ``model_index.json``) is returned as is unless ``overwrite``;
    the folder path is the cache key, so pass a new path (or ``overwrite``) for other arguments.
    The build goes to a temporary folder beside ``path`` and is renamed into place, so an
    interrupted build never leaves a folder that looks complete.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    path = Path(path)
    if _is_complete(path) and not overwrite:
        return path
    if path.exists() and not overwrite and any(path.iterdir()):
        raise FileExistsError(f"{path} exists, is not a pipeline folder and overwrite is False")
    if shard_size is None and size == "bench":
        shard_size = BENCH_SHARD_SIZE

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = _build_flux(size) if kind == "flux" else _build_sd(size)
        if size == "bench":
            _to_bfloat16(pipe)
        _save(pipe, tmp, shard_size)
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _is_complete(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _to_bfloat16(pipe: DiffusionPipeline) -> None:
    """Cast every model; ``Module.bfloat16`` avoids ``ModelMixin.to``'s keep-in-fp32 warning."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.bfloat16()


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an old folder there is moved aside first and then deleted.

    If a concurrent build completed ``path`` first, its result is kept and ``tmp`` is dropped.
    """
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        path.replace(old / "pipeline")
    try:
        tmp.replace(path)
    except OSError:
        if not _is_complete(path):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save(pipe: DiffusionPipeline, folder: Path, shard_size: str | None) -> None:
    """Save like ``DiffusionPipeline.save_pretrained`` but shard only the denoiser."""
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if name in ("transformer", "unet") and shard_size is not None:
            component.save_pretrained(folder / name, max_shard_size=shard_size)
        else:
            component.save_pretrained(folder / name)


def _build_flux(size: str) -> FluxPipeline:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    vae = _vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **_FLUX_VAE_SCALING)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,  # latents are packed in 2x2 patches
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        **FLUX_TRANSFORMER_CONFIGS[size],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _build_sd(size: str) -> StableDiffusionPipeline:
    tokenizer = _clip_tokenizer()
    vae = _vae(latent_channels=4, **_SD_VAE_SCALING)
    unet = UNet2DConditionModel(
        sample_size=8,  # default image of 64 px with the VAE's scale factor of 8
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=32,
        **UNET_CONFIGS[size],
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _vae(**kwargs) -> AutoencoderKL:
    channels = (32, 64, 64, 64)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        **kwargs,
    )


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE without merges: every byte (plus its end-of-word form) is a token.

    Any text tokenizes, one token per byte, which is all a random-weight encoder needs.
    """
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [f"{ch}</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5Tokenizer:
    """Character-level unigram over printable ASCII, word-initial and inner forms; others map to <unk>."""
    chars = [ch for ch in string.printable if not ch.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{ch}", -3.0) for ch in chars] + [(ch, -4.0) for ch in chars]
    return T5Tokenizer(vocab=pieces, model_max_length=T5_MAX_LENGTH)


def _clip_text_model(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=TEXT_WIDTH // 64,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_WIDTH,
        d_kv=64,
        d_ff=2 * TEXT_WIDTH,
        num_layers=2,
        num_heads=TEXT_WIDTH // 64,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()
