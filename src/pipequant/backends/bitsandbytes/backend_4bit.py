"""The "bitsandbytes_4bit" backend: bitsandbytes' `Linear4bit` (nf4 / fp4, optionally double-quantized scales).

The packed weight comes from `bnb_chunked` (bitsandbytes' bytes, a slice of blocks at a time); the layer is
bitsandbytes' own, so its state dict is the format diffusers and transformers save and load
(``weight``, ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ...meta_modules import no_init_on_meta
from .. import bnb_chunked
from ..base import Backend, LayerState, bias_nbytes, stored_linear
from .config import BitsAndBytesConfig
from .layer_parts import copy_bias, pop_required, set_bias

# the quant-state tensors Linear4bit's state dict holds beside "weight" (nested: double quantization)
_4BIT_STATISTICS = frozenset({"weight.absmax", "weight.quant_map"})
_4BIT_NESTED = frozenset({"weight.nested_absmax", "weight.nested_quant_map"})
_4BIT_BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # double quantization: uint8 block scales, one float32 scale per 256 of them
_4BIT_CODE_NBYTES = 16 * 4  # the nf4/fp4 code book, float32
_NESTED_CODE_NBYTES = 256 * 4  # the 8-bit code book of the block scales, float32
_TYPICAL_OFFSET = 0.10000000149011612  # a float32 (0.1) as Python prints it, for the JSON state's length


class BitsAndBytes4bitBackend(Backend[BitsAndBytesConfig]):
    name = "bitsandbytes_4bit"
    config_class = BitsAndBytesConfig
    module_name = "bitsandbytes"
    pip_extra = "bitsandbytes"
    cli_help = (
        "bitsandbytes Linear4bit, nf4 or fp4 (bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype)"
    )
    simple_form_defaults = {"load_in_4bit": True}
    presets = {
        "bnb-nf4": {"bnb_4bit_quant_type": "nf4"},
        "bnb-nf4-dq": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "bnb-fp4": {"bnb_4bit_quant_type": "fp4"},
    }
    plan_candidates = ("bnb-nf4",)

    def quantize(
        self, module_name: str, module: nn.Linear, config: BitsAndBytesConfig, device: torch.device
    ) -> nn.Module:
        import bitsandbytes as bnb

        storage = config.bnb_4bit_quant_storage or torch.uint8
        packed, quant_state = bnb_chunked.quantize_4bit(
            module.weight.data.to(device).contiguous(),
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
        )
        layer = _linear4bit(module, config, storage)
        layer.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=quant_state,
            blocksize=quant_state.blocksize,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = quant_state
        copy_bias(module, layer, device)
        return layer

    def restore(
        self, module: nn.Module, state: LayerState, config: BitsAndBytesConfig, device: torch.device
    ) -> nn.Module:
        """`Params4bit.from_prequantized` on the stored packed weight and quant-state tensors."""
        import bitsandbytes as bnb

        module = stored_linear(module, self.name)
        tensors = dict(state.tensors)
        packed = pop_required(tensors, "weight")
        bias = tensors.pop("bias", None)
        packed_state = [k for k in tensors if k.startswith("weight.quant_state.bitsandbytes__")]
        statistics = set(tensors) - set(packed_state)
        if len(packed_state) != 1 or statistics not in (_4BIT_STATISTICS, _4BIT_STATISTICS | _4BIT_NESTED):
            raise ValueError(
                f"not a bitsandbytes 4-bit layer: expected weight, {', '.join(sorted(_4BIT_STATISTICS))}, "
                f"optionally {', '.join(sorted(_4BIT_NESTED))}, and one weight.quant_state.bitsandbytes__<type> "
                f"tensor; found {sorted(state.tensors)}"
            )
        stored_type = packed_state[0].rpartition("__")[2]
        if stored_type != config.bnb_4bit_quant_type:
            raise ValueError(f"the layer is stored as {stored_type}, but its config says {config.bnb_4bit_quant_type}")
        layer = _linear4bit(module, config, packed.dtype)
        layer.weight = bnb.nn.Params4bit.from_prequantized(packed, tensors, device=device, module=layer)
        shape = tuple(layer.weight.quant_state.shape)
        values = module.out_features * module.in_features
        if shape != (module.out_features, module.in_features) or packed.numel() * packed.element_size() * 2 != values:
            raise ValueError(
                f"the stored weight ({packed.numel() * packed.element_size()} bytes for shape {shape}) does not fit "
                f"the layer {(module.out_features, module.in_features)}"
            )
        set_bias(layer, bias, device)
        return layer

    def is_quantized(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear4bit)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as F

        return F.dequantize_4bit(module.weight.data, module.weight.quant_state)

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Linear, config: BitsAndBytesConfig, dtype: torch.dtype
    ) -> int:
        """Packed nibbles, block scales (nested: uint8 plus their own scales), code book and bias.

        Exact but for the JSON quant state's double-quant offset, whose decimal digits vary by a
        few bytes per layer.
        """
        storage = config.bnb_4bit_quant_storage or torch.uint8
        # quantized in slices of whole blocks (bnb_chunked), which pack to exactly these sums
        numel = module.weight.numel()
        packed = (numel + 1) // (storage.itemsize * 2) * storage.itemsize
        blocks = -(numel // -_4BIT_BLOCKSIZE)
        state: dict[str, Any] = {
            "quant_type": config.bnb_4bit_quant_type,
            "blocksize": _4BIT_BLOCKSIZE,
            "dtype": str(dtype).strip("torch."),  # as bitsandbytes' QuantState.as_dict writes it
            "shape": [module.out_features, module.in_features],
        }
        scales = blocks * 4
        if config.bnb_4bit_use_double_quant:
            nested_blocks = -(blocks // -_NESTED_BLOCKSIZE)
            scales = blocks + nested_blocks * 4 + _NESTED_CODE_NBYTES
            state.update(nested_blocksize=_NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=_TYPICAL_OFFSET)
        return packed + scales + _4BIT_CODE_NBYTES + len(json.dumps(state)) + bias_nbytes(module, dtype)


def _linear4bit(module: nn.Linear, config: BitsAndBytesConfig, storage: torch.dtype) -> nn.Module:
    """An empty `Linear4bit` (on meta) of `module`'s shape, for a packed weight to be set on.

    bitsandbytes' own CPU path (on CPUs with AVX512-BF16) repacks the weight at the first forward
    and rounds its absmax to bfloat16; its state dict then undoes that only approximately (with
    double quantization the stored bytes change; without it the absmax comes back transposed,
    and the layer in memory is left broken). We turn that path off, so a layer saves exactly as
    it was quantized after any number of forwards. The general path it falls back to is as fast
    or faster for the hundreds of tokens per call of a diffusion model; the repacked path wins
    only for single-token calls.
    """
    import bitsandbytes as bnb

    with no_init_on_meta():
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=storage,
            device="meta",
        )
    layer.support_avx512bf16_for_cpu = False
    return layer
