"""The "bitsandbytes_8bit" backend: bitsandbytes' `Linear8bitLt` (LLM.int8: int8 rows, one float32 scale per row).

On CPU the rows come from our compiled kernel (`int8_rows`), checked against bitsandbytes on two rows; the layer
is bitsandbytes' own, so its state dict (``weight``, ``SCB``, ``weight_format``) is diffusers' and transformers'.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ...meta_modules import no_init_on_meta
from .. import int8_rows, row_blocks
from ..base import Backend, LayerState, bias_nbytes, stored_linear
from .config import BitsAndBytesConfig
from .layer_parts import copy_bias, pop_required, set_bias


def _int8_vectorwise_quant(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' LLM.int8 weight format (int8 rows, one float32 absmax per row) of float16 rows,
    as `Linear8bitLt` makes it."""
    import bitsandbytes.functional as F

    int8_rows, row_scales, _ = F.int8_vectorwise_quant(rows.to(torch.float16))
    return int8_rows, row_scales


class BitsAndBytes8bitBackend(Backend[BitsAndBytesConfig]):
    name = "bitsandbytes_8bit"
    config_class = BitsAndBytesConfig
    module_name = "bitsandbytes"
    pip_extra = "bitsandbytes"
    cli_help = "bitsandbytes Linear8bitLt, LLM.int8 rows (llm_int8_threshold)"
    simple_form_defaults = {"load_in_8bit": True}
    presets = {"bnb-int8": {}}
    plan_candidates = ("bnb-int8",)

    def quantize(
        self, module_name: str, module: nn.Linear, config: BitsAndBytesConfig, device: torch.device
    ) -> nn.Module:
        # Int8Params.to() quantizes only when moving off the CPU-resident copy; calling the
        # functional API directly works the same wherever the weight already is.
        weight = module.weight.data.to(device)
        # the compiled kernel where it applies (CPU), checked against bitsandbytes on two rows
        compiled = kernels.checked(
            kernel=int8_rows.bitsandbytes_int8_rows,
            library=_int8_vectorwise_quant,
            weight=weight,
            head=weight[:2],
            library_name="bitsandbytes",
        )
        int8_weight, row_scales = compiled or row_blocks.quantize_by_rows(weight, _int8_vectorwise_quant, device)
        layer = _linear8bit(module, config, int8_weight, row_scales)
        copy_bias(module, layer, device)
        return layer

    def restore(
        self, module: nn.Module, state: LayerState, config: BitsAndBytesConfig, device: torch.device
    ) -> nn.Module:
        """An `Int8Params` on the stored int8 rows, with the stored row scales as its SCB."""
        module = stored_linear(module, self.name)
        tensors = dict(state.tensors)
        weight = pop_required(tensors, "weight")
        row_scales = pop_required(tensors, "SCB")
        bias = tensors.pop("bias", None)
        weight_format = tensors.pop("weight_format", None)  # written by bitsandbytes; 0 means row-major
        if tensors or weight.dtype != torch.int8:
            raise ValueError(
                f"not a bitsandbytes 8-bit layer: expected an int8 weight, SCB and weight_format, "
                f"found {sorted(state.tensors)} with a {weight.dtype} weight"
            )
        if weight_format is not None and int(weight_format.item()) != 0:
            raise ValueError(f"weight_format={int(weight_format.item())}; only row-major (0) weights are supported")
        if tuple(weight.shape) != (module.out_features, module.in_features) or tuple(row_scales.shape) != (
            module.out_features,
        ):
            raise ValueError(
                f"the stored weight {tuple(weight.shape)} and SCB {tuple(row_scales.shape)} do not fit the layer "
                f"{(module.out_features, module.in_features)}"
            )
        layer = _linear8bit(module, config, weight.to(device), row_scales.to(device))
        set_bias(layer, bias, device)
        return layer

    def is_quantized(self, module: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(module, bnb.nn.Linear8bitLt)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        """float16, the dtype LLM.int8 quantizes from (`_int8_vectorwise_quant`). The first forward moves the row
        scales from the parameter to the layer's state."""
        import bitsandbytes.functional as F

        row_scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return F.int8_vectorwise_dequant(module.weight.data, row_scales).to(torch.float16)

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Linear, config: BitsAndBytesConfig, dtype: torch.dtype
    ) -> int:
        """int8 weight, a float32 scale per row (SCB), the one-byte weight_format, and the bias."""
        return module.weight.numel() + module.out_features * 4 + 1 + bias_nbytes(module, dtype)


def _linear8bit(
    module: nn.Linear, config: BitsAndBytesConfig, int8_weight: torch.Tensor, row_scales: torch.Tensor
) -> nn.Module:
    import bitsandbytes as bnb

    with no_init_on_meta():
        layer = bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            has_fp16_weights=False,
            threshold=config.llm_int8_threshold,
            device="meta",
        )
    param = bnb.nn.Int8Params(int8_weight, requires_grad=False, has_fp16_weights=False)
    param.CB = int8_weight
    param.SCB = row_scales
    layer.weight = param
    return layer
