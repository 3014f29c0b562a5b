"""LoRA on pipequant's quantized layers, through diffusers' and peft's own LoRA API.

`pipe.load_lora_weights`, `set_adapters`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights` and
`delete_adapters` are diffusers' own; peft wraps each targeted layer in a LoRA layer. For a layer pipequant
quantized (it carries its `BackendConfig`, `quantizing.LAYER_CONFIG_ATTRIBUTE`), that LoRA layer is
`QuantizedLoraLinear`, on every backend alike:

* unfused, it runs the quantized layer as it is and adds the LoRA beside it (peft's `lora.Linear.forward`),
  so GGUF layers take LoRAs too, as ComfyUI-GGUF patches its layers;
* fusing dequantizes the weight, adds the scaled deltas of the fused adapters and quantizes again with
  the layer's own backend and settings (`Backend.requantized`), so the fused model has the size it had;
* unfusing puts the original quantized layer back, byte for byte. Subtracting the delta from the fused
  weight instead (what peft does for bitsandbytes and torchao) quantizes a third time, and the layer would
  drift from its checkpoint with every fuse/unfuse. The original layer is kept beside the fused one until
  `unfuse_lora` or `unload_lora_weights` (which keeps the fused layer, as peft does): while fused, the
  LoRA-targeted layers take their quantized size twice.

peft's own dispatchers would take bitsandbytes, torchao and quanto layers with merges that fail, drift or are
wrong for them (bitsandbytes 4-bit's rebuilds its parameter from the wrong fields, torchao's unmerge quantizes
weight minus delta again, a plain `lora.Linear` adds to quanto's packed data) and reject `GGUFLinear`. peft takes
extra layer types only through `LoraConfig._register_custom_module`, per config, and
diffusers builds that config inside `load_lora_adapter` with no way in; so `register_with_peft` puts one
dispatcher in front of peft's list, and it claims only layers pipequant quantized.

Before that, diffusers' Flux `load_lora_weights` compares each LoRA's width with its layer's, which it reads from the
model's state dict (GGUF weights by their class, `GGUFParameter`, which ours are). A quanto model's state dict holds
`weight._data` and `weight._scale` and no `weight`, and diffusers fails with a KeyError, on its own quanto models
too; `register_with_peft` also gives that comparison the layers' own widths for quanto models
(`_expand_lora_state_dict`).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .backends import backend_for
from .backends.base import BackendConfig
from .quantizing import LAYER_CONFIG_ATTRIBUTE


class QuantizedLoraLinear(PeftLoraLinear):
    """peft's LoRA linear layer over a pipequant-quantized layer; fusing requantizes, unfusing restores the bytes."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config = kwargs["config"]
        if config.use_dora or config.lora_bias:
            raise ValueError(
                "pipequant's quantized layers take plain LoRA adapters; DoRA and lora_bias adapters need "
                "full-precision weights. Load the model without quantizing the LoRA-targeted layers "
                "(modules_to_not_convert)."
            )
        super().__init__(base_layer, adapter_name, **kwargs)
        #: the quantized layer as it was before the first fused adapter (a list, so it is not a submodule)
        self._unfused: list[nn.Module] = []

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fuse `adapter_names` (default: the active adapters): one quantization of the original weight plus every
        fused delta, so fusing adapters one by one rounds no more often than fusing them together."""
        # an adapter that targets other layers has nothing here, as in peft's merge
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not adapter_names:
            return
        original = self._unfused[0] if self._unfused else self.get_base_layer()
        config: BackendConfig = getattr(original, LAYER_CONFIG_ATTRIBUTE)
        backend = backend_for(config)
        weight = backend.dequantized_weight(original)
        fused = weight.float()
        for adapter in [*self.merged_adapters, *adapter_names]:
            fused += self.get_delta_weight(adapter).float()
        if safe_merge and not torch.isfinite(fused).all():
            raise ValueError(f"fusing the adapters {adapter_names} gives non-finite weights; the adapters are broken")
        layer = backend.requantized(original, fused.to(weight.dtype), config)
        setattr(layer, LAYER_CONFIG_ATTRIBUTE, config)
        layer.train(original.training)
        if not self._unfused:
            self._unfused.append(original)
        self.base_layer = layer
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the quantized layer from before the first fused adapter back."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.base_layer = self._unfused.pop()
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "pipequant." + super().__repr__()


def _create_new_module(original, lora_config, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if getattr(base, LAYER_CONFIG_ATTRIBUTE, None) is None:
        return original(lora_config, adapter_name, target, **kwargs)
    kwargs.pop("get_apply_tensor_subclass", None)  # torchao's requantizer, for peft's own torchao layer
    return QuantizedLoraLinear(target, adapter_name, config=lora_config, **kwargs)


def _expand_lora_state_dict(original, transformer: nn.Module, lora_state_dict: dict[str, torch.Tensor]) -> dict:
    """diffusers' `FluxLoraLoaderMixin._maybe_expand_lora_state_dict`, which zero-pads a LoRA narrower than its layer
    (a Flux LoRA on Flux Control's wider `x_embedder`), with the widths read from a quanto model's layers: its state
    dict, where diffusers looks them up, has no `<layer>.weight`."""
    if getattr(transformer, "quantization_method", None) != "quanto":
        return original(transformer=transformer, lora_state_dict=lora_state_dict)
    prefix, suffix = f"{FluxLoraLoaderMixin.transformer_name}.", ".lora_A.weight"
    for key in [key for key in lora_state_dict if key.startswith(prefix) and key.endswith(suffix)]:
        name, lora_a = key[len(prefix) : -len(suffix)], lora_state_dict[key]
        try:
            layer = transformer.get_submodule(name)
        except AttributeError:
            continue  # diffusers leaves LoRA layers the model lacks to peft, which ignores them
        if isinstance(layer, BaseTunerLayer):
            layer = layer.get_base_layer()
        width = layer.weight.shape[1]  # for a wider LoRA, diffusers has widened the layer before this
        if width > lora_a.shape[1]:
            lora_state_dict[key] = torch.cat([lora_a, lora_a.new_zeros(lora_a.shape[0], width - lora_a.shape[1])], 1)
    return lora_state_dict


def register_with_peft() -> None:
    """Route peft's LoRA layer creation for pipequant-quantized layers to `QuantizedLoraLinear`, and diffusers'
    Flux LoRA width check for quanto models to `_expand_lora_state_dict` (once)."""
    original_expand = FluxLoraLoaderMixin._maybe_expand_lora_state_dict.__func__
    if not getattr(original_expand, "pipequant", False):

        def expand(cls, transformer: nn.Module, lora_state_dict: dict[str, torch.Tensor]) -> dict:
            return _expand_lora_state_dict(partial(original_expand, cls), transformer, lora_state_dict)

        expand.pipequant = True  # type: ignore[attr-defined]
        FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(expand)
    original = LoraModel._create_new_module
    if getattr(original, "pipequant", False):
        return

    def create_new_module(lora_config, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        return _create_new_module(original, lora_config, adapter_name, target, **kwargs)

    create_new_module.pipequant = True  # type: ignore[attr-defined]
    LoraModel._create_new_module = staticmethod(create_new_module)
