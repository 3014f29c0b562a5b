"""optimum-quanto layers: each linear layer becomes quanto's `QLinear` with frozen quantized weights.

This is what quanto's own `quantize(model, weights=...)` followed by `freeze(model)` makes, done one
layer at a time as the weights stream in, so quanto's kernels run the layers (int4 in bfloat16 uses
its tinygemm CPU/CUDA kernel) and their state dicts are quanto's format.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..meta_modules import no_init_on_meta
from . import int8_rows, row_blocks
from .base import (
    Backend,
    BackendConfig,
    LayerState,
    QuantizationConfigError,
    bias_nbytes,
    library_module,
    stored_linear,
)

WEIGHT_DTYPES = ("int2", "int4", "int8", "float8")
#: int8 is quanto's too, but needs calibration that loading cannot do (see `QuantoConfig`)
ACTIVATION_DTYPES = (None, "float8")


@dataclasses.dataclass(repr=False)
class QuantoConfig(BackendConfig):
    """quanto settings with diffusers' keyword names (`weights_dtype`), plus `activations_dtype`.

    float8 activations are quantized per tensor with quanto's uncalibrated scale of 1, which float8's
    relative precision tolerates (magnitudes above 448 are clipped); int8 activations would need
    calibration and are refused.

    transformers names them `weights` and `activations`; both are accepted as synonyms so code written
    for either library ports by changing the import.
    """

    quant_method: ClassVar[str] = "quanto"
    foreign_class_names: ClassVar[tuple[str, ...]] = ("QuantoConfig",)

    weights_dtype: str = "int8"
    activations_dtype: str | None = None
    weights: dataclasses.InitVar[str | None] = None
    activations: dataclasses.InitVar[str | None] = None

    def __post_init__(self, weights: str | None, activations: str | None) -> None:
        self.weights_dtype = _synonym("weights_dtype", self.weights_dtype, "weights", weights, default="int8")
        self.activations_dtype = _synonym(
            "activations_dtype", self.activations_dtype, "activations", activations, default=None
        )
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise QuantizationConfigError(
                f"weights_dtype={self.weights_dtype!r} is not a quanto weight type; use one of "
                f"{', '.join(WEIGHT_DTYPES)}."
            )
        if self.activations_dtype == "int8":
            raise QuantizationConfigError(
                "activations_dtype='int8' needs activation scales calibrated on sample inputs (quanto's Calibration "
                "context), and loading has no inputs: uncalibrated, quanto uses scale 1 and rounds every activation to "
                "an integer (25x the error of int8 weights alone on the tiny Flux fixture). Use activations_dtype=None "
                "or 'float8', or quantize and calibrate with optimum.quanto yourself."
            )
        if self.activations_dtype not in ACTIVATION_DTYPES:
            raise QuantizationConfigError(
                f"activations_dtype={self.activations_dtype!r} is not a quanto activation type; use None or 'float8'."
            )

    @classmethod
    def field_names(cls) -> list[str]:
        return [*super().field_names(), "weights", "activations"]

    @classmethod
    def from_foreign(cls, foreign: Any) -> QuantoConfig:
        """diffusers' `QuantoConfig(weights_dtype=...)`, or transformers'
        `QuantoConfig(weights=..., activations=...)`."""
        skip = getattr(foreign, "modules_to_not_convert", None)
        weights = getattr(foreign, "weights_dtype", None) or getattr(foreign, "weights", None)
        return cls(
            weights_dtype=weights,
            activations_dtype=getattr(foreign, "activations", None),
            modules_to_not_convert=list(skip) if skip else None,
        )

    def to_library(self, library: str, dtype: torch.dtype | None) -> Any:
        """transformers' `QuantoConfig(weights, activations)`, or diffusers' `QuantoConfig(weights_dtype)`.

        diffusers' class has no activation setting; float8 activations are kept on its object as
        ``activations_dtype`` (which its `to_dict` writes and its `from_dict` ignores), so nothing is hidden.
        """
        skip = list(self.modules_to_not_convert) if self.modules_to_not_convert else None
        module = library_module(library)
        if library == "transformers":
            return module.QuantoConfig(
                weights=self.weights_dtype, activations=self.activations_dtype, modules_to_not_convert=skip
            )
        with warnings.catch_warnings():  # diffusers deprecates quanto; the user chose it, warned by nothing of ours
            warnings.simplefilter("ignore", FutureWarning)
            config = module.QuantoConfig(weights_dtype=self.weights_dtype, modules_to_not_convert=skip)
        if self.activations_dtype is not None:
            config.activations_dtype = self.activations_dtype
        return config


def _synonym(name: str, value: Any, synonym: str, synonym_value: Any, *, default: Any) -> Any:
    if synonym_value is None:
        return value
    if value not in (default, synonym_value):
        raise QuantizationConfigError(f"{name}={value!r} and {synonym}={synonym_value!r} disagree; give only {name}.")
    return synonym_value


class QuantoBackend(Backend[QuantoConfig]):
    name = "quanto"
    config_class = QuantoConfig
    module_name = "optimum.quanto"
    pip_extra = "quanto"
    cli_help = "optimum-quanto QLinear (weights_dtype: int8, int4, int2, float8; activations_dtype: float8)"
    presets = {f"quanto-{dtype}": {"weights_dtype": dtype} for dtype in ("int8", "int4", "int2", "float8")}
    plan_candidates = ("quanto-int8", "quanto-int4")

    def quantize(self, module_name: str, module: nn.Linear, config: QuantoConfig, device: torch.device) -> nn.Module:
        module = module.to(device)
        # what quanto's `QLinear.from_module` does, less the memory it gives the layer's weight only to replace it
        layer = _qlinear_on_meta(module, config)
        layer.weight = module.weight
        layer.bias = module.bias
        layer.input_scale = torch.ones_like(layer.input_scale, device=device)
        layer.output_scale = torch.ones_like(layer.output_scale, device=device)
        if layer.weight.shape[0] > 1:  # quanto quantizes a one-row weight per tensor
            layer.weight = nn.Parameter(_weight_by_rows(layer))
        else:
            layer.freeze()
        return layer

    def estimate_layer_nbytes(
        self, module_name: str, module: nn.Linear, config: QuantoConfig, dtype: torch.dtype
    ) -> int:
        """Weight data, its scales (and shifts, below 8 bits) in `dtype`, the two activation scales, the bias.

        8-bit types keep one byte per weight and a scale per row; int4 / int2 pack 2 / 4 values
        per byte along rows of groups (see `quanto_group_size`), with a scale and a shift per group.
        """
        rows, columns = module.out_features, module.in_features
        bits = int(config.weights_dtype.removeprefix("int").removeprefix("float"))
        if bits == 8:
            weight = rows * columns + rows * dtype.itemsize
        else:
            group = quanto_group_size(columns)
            if group is not None:
                rows, columns = rows * columns // group, group
            per_byte = 8 // bits
            weight = -(rows // -per_byte) * columns + 2 * rows * dtype.itemsize
        return weight + 2 * dtype.itemsize + bias_nbytes(module, dtype)

    def is_quantized(self, module: nn.Module) -> bool:
        from optimum.quanto import QModuleMixin

        return isinstance(module, QModuleMixin)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.dequantize()

    # --- saving and restoring (see Backend); the stored form is QLinear's own state dict ---

    def restore(self, module: nn.Module, state: LayerState, config: QuantoConfig, device: torch.device) -> nn.Module:
        """A `QLinear` made on meta for the saved types, filled by quanto's own deserializer from the stored tensors."""
        layer = _qlinear_on_meta(stored_linear(module, self.name), config)
        try:
            layer.load_state_dict(state.tensors, strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(f"not a quanto {config.weights_dtype} layer: {error}") from error
        return layer.to(device)


def _qlinear_on_meta(module: nn.Linear, config: QuantoConfig) -> nn.Module:
    """quanto's `QLinear` of `module`'s shape and dtype for `config`'s types, on meta, built without initialisers."""
    from optimum.quanto import QLinear, qtypes

    activations = qtypes[f"q{config.activations_dtype}"] if config.activations_dtype else None
    weights = qtypes[f"q{config.weights_dtype}"]
    with no_init_on_meta():
        return QLinear.qcreate(module, weights=weights, activations=activations, device="meta")


def _weight_by_rows(layer: nn.Module) -> torch.Tensor:
    """What `layer.freeze()` makes of the layer's weight, quantized a block of rows at a time with
    quanto's own optimizer and kernels (see `row_blocks`: same bytes, several times faster).

    quanto's scales (and shifts) are per row, or per group within a row below 8 bits, so blocks of
    rows are independent; the sub-8-bit packing, which mixes rows, runs once on the whole.
    int8 on CPU takes our compiled kernel instead (`int8_rows`), checked against quanto on two rows.
    """
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

    weight = layer.weight.detach()
    qtype, group_size = layer.weight_qtype, layer.weight_group_size
    if qtype.bits == 8:

        def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            scale = layer.optimizer(rows, qtype=qtype, axis=0)
            return torch.ops.quanto.quantize_symmetric(rows, dtype=qtype.dtype, axis=0, scale=scale), scale

        fused = _int8_rows(weight, qtype, quantize_rows)
        data, scale = fused or row_blocks.quantize_by_rows(weight, quantize_rows, weight.device)
        return WeightQBytesTensor.create(
            qtype,
            0,
            size=weight.size(),
            stride=weight.stride(),
            data=data,
            scale=scale,
            activation_qtype=layer.activation_qtype,
        )

    def quantize_grouped_rows(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scale, shift = layer.optimizer(rows, qtype=qtype, axis=0, group_size=group_size)
        data = torch.ops.quanto.quantize_affine(
            rows, bits=qtype.bits, axis=0, group_size=group_size, scale=scale, shift=shift
        )
        count = rows.shape[0]  # quanto lays groups out as rows of their own: fold them back per weight row
        return data.view(count, -1), scale.view(count, -1), shift.view(count, -1)

    def packed_rows(rows: torch.Tensor) -> WeightQBitsTensor:
        data, scale, shift = quantize_grouped_rows(rows)
        group = group_size or rows.shape[1]
        return WeightQBitsTensor.create(
            qtype, 0, group_size, rows.size(), rows.stride(), data.view(-1, group), scale.view(-1, 1), shift.view(-1, 1)
        )

    if weight.device.type == "cpu":
        try:
            return _tinygemm_by_rows(weight, packed_rows)
        except row_blocks.NotRowSeparable:  # not quanto's tinygemm layout: packed once, whole, below
            pass
    data, scale, shift = row_blocks.quantize_by_rows(weight, quantize_grouped_rows, weight.device)
    group = group_size or weight.shape[1]
    return WeightQBitsTensor.create(
        qtype, 0, group_size, weight.size(), weight.stride(), data.view(-1, group), scale.view(-1, 1), shift.view(-1, 1)
    )


@functools.cache
def cpu_int4_pack_tile() -> int | None:
    """Rows per tile of torch's int4 packing for tinygemm on the CPU (`_convert_weight_to_int4pack_for_cpu`, which
    quanto's tinygemm weights use), or None if no block of up to 256 rows packs independently.

    The packing interleaves the rows of a tile (four float vectors' worth: 32 with AVX2, 64 with AVX512), so blocks
    of rows starting at multiples of it pack to consecutive rows of the whole weight's packing. The size is torch's
    build detail, not an API: it is found once by packing random codes whole and in blocks.
    """
    codes = torch.randint(0, 16, (1024, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = torch._convert_weight_to_int4pack_for_cpu(codes, innerKTiles=2)
    for rows in (16, 32, 64, 128, 256):
        blocks = [torch._convert_weight_to_int4pack_for_cpu(block, innerKTiles=2) for block in codes.split(rows)]
        if torch.equal(torch.cat(blocks), whole):
            return rows
    return None


def _tinygemm_by_rows(weight: torch.Tensor, packed_rows: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """quanto's tinygemm int4 weight (what it makes of bfloat16 groups of 128 on the CPU), a block of rows at a time.

    quanto quantizes the whole weight to one byte per code, then packs it through an int32 copy: temporaries of
    2.5 times the bfloat16 weight, on top of it. Here each block of rows is quantized and packed by quanto's own
    `WeightQBitsTensor.create` (`packed_rows`) and only the packed bytes and scales are kept, so one block's
    temporaries exist at a time; same bytes (the per-group scales and shifts are per row, and the packing's tiles
    stay within blocks, see `cpu_int4_pack_tile`). Raises `row_blocks.NotRowSeparable` where that does not hold, or
    (after the first block) where quanto picks another layout (int2, float16 weights, other group sizes).
    """
    from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
    from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

    tile = cpu_int4_pack_tile()
    if tile is None:
        raise row_blocks.NotRowSeparable("this torch's int4 packing does not pack blocks of rows independently")
    qtype, group_size = None, None

    def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal qtype, group_size
        packed = packed_rows(rows)
        if type(packed) is not TinyGemmWeightQBitsTensor:
            raise row_blocks.NotRowSeparable(f"quanto packs this weight as a {type(packed).__name__}")
        qtype, group_size = packed.qtype, packed._group_size
        # scales and shifts are laid out (groups, rows, 2): put the rows first to stack blocks of them
        return packed._data._data, packed._scale_shift.transpose(0, 1)

    data, scale_shift = row_blocks.quantize_by_rows(weight, quantize_rows, weight.device, align=tile)
    contiguous_stride = (weight.shape[1], 1)
    return TinyGemmWeightQBitsTensor(
        qtype,
        0,
        group_size,
        weight.size(),
        weight.stride(),
        TinyGemmPackedTensor(data, weight.size(), contiguous_stride),
        scale_shift.transpose(0, 1).contiguous(),
    )


def _int8_rows(
    weight: torch.Tensor, qtype: Any, quantize_rows: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An int8 weight by our compiled kernel (`int8_rows`), if it gives quanto's own bytes on the first two rows."""
    if qtype.dtype != torch.int8:
        return None
    return kernels.checked(
        kernel=int8_rows.quanto_int8_rows,
        library=quantize_rows,
        weight=weight,
        head=weight[:2],
        library_name="optimum-quanto",
    )


def quanto_group_size(in_features: int) -> int | None:
    """The group size quanto's `QLinear` picks for int4 / int2 weights (None: one group per row).

    The largest of 128, 96, 64 that divides the row, for rows longer than 128.
    """
    group_size = 128
    if in_features <= group_size:
        return None
    while in_features % group_size and group_size > 32:
        group_size -= 32
    return group_size if in_features % group_size == 0 else None


BACKENDS: tuple[Backend, ...] = (QuantoBackend(),)
