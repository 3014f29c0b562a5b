"""The torchao names pipequant accepts, and what each torchao config class takes and where it runs.

`QUANT_TYPES` maps diffusers' short names (``"int8wo"``) and torchao's old function names
(``"int8_weight_only"``) onto torchao 0.18's config classes; `FAMILIES` says which options each class
takes and which run on which device, so an impossible choice fails before any weight is read.
Plain data: importable without torchao.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """What one torchao config class accepts and where it runs."""

    options: tuple[str, ...]
    #: the torchao field our `group_size` option becomes (as `PerGroup(n)`); None: torchao's own `group_size`
    group_size_into: str | None = None
    runs_on_cpu: bool = True
    min_cuda_capability: tuple[int, int] | None = None
    #: why it cannot run on CPU, and the names to offer there instead
    cpu_problem: str = ""
    cpu_instead: str = ""


_INT8WO = "Int8WeightOnlyConfig"
_INT8DQ = "Int8DynamicActivationInt8WeightConfig"
_INT4WO = "Int4WeightOnlyConfig"
_INTXWO = "IntxWeightOnlyConfig"
_INT8DA_INTXW = "Int8DynamicActivationIntxWeightConfig"
_FLOAT8WO = "Float8WeightOnlyConfig"
_FLOAT8DQ = "Float8DynamicActivationFloat8WeightConfig"
_FLOAT8DA_INT4W = "Float8DynamicActivationInt4WeightConfig"

_UNPACKED_NOTE = "torchao stores it one value per byte, so it saves no memory over int8wo"

FAMILIES: dict[str, Family] = {
    _INT8WO: Family(("group_size", "granularity", "set_inductor_config"), group_size_into="granularity"),
    _INT8DQ: Family(("granularity", "act_mapping_type", "weight_only_decode", "set_inductor_config")),
    _FLOAT8WO: Family(("weight_dtype", "granularity", "set_inductor_config")),
    _INTXWO: Family(
        ("weight_dtype", "group_size", "granularity", "mapping_type", "scale_dtype"), group_size_into="granularity"
    ),
    _INT8DA_INTXW: Family(
        (
            "weight_dtype",
            "group_size",
            "weight_granularity",
            "weight_mapping_type",
            "weight_scale_dtype",
            "act_mapping_type",
        ),
        group_size_into="weight_granularity",
    ),
    _INT4WO: Family(
        ("group_size", "int4_packing_format", "int4_choose_qparams_algorithm", "set_inductor_config"),
        runs_on_cpu=False,
        cpu_problem="torchao's int4 weight-only layouts need CUDA kernels (tinygemm, mslk)",
        cpu_instead=f"'uint4wo' (4-bit values in groups of 64; {_UNPACKED_NOTE}) or 'int8wo'",
    ),
    _FLOAT8DQ: Family(
        ("activation_dtype", "weight_dtype", "granularity", "mm_config", "kernel_preference", "set_inductor_config"),
        runs_on_cpu=False,
        min_cuda_capability=(8, 9),
        cpu_problem="torchao's float8 dynamic activation quantization needs a CUDA GPU of compute capability 8.9+",
        cpu_instead="'float8wo' (float8 weights, full-precision activations) or 'int8dq'",
    ),
    _FLOAT8DA_INT4W: Family(
        (),  # no name maps here; known so that the object form is refused on CPU too
        runs_on_cpu=False,
        min_cuda_capability=(8, 9),
        cpu_problem="torchao's float8 x int4 kernel needs a CUDA GPU",
        cpu_instead="'int4dq' or 'int8dq'",
    ),
}

_FLOAT8DQ_E4M3 = {"activation_dtype": "float8_e4m3fn", "weight_dtype": "float8_e4m3fn"}

#: every quant_type name -> (torchao config class, options the name fixes; user options override them)
QUANT_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "int8wo": (_INT8WO, {}),
    "int8_weight_only": (_INT8WO, {}),
    "int8dq": (_INT8DQ, {}),
    "int8_dynamic_activation_int8_weight": (_INT8DQ, {}),
    # diffusers' int4 weight-only used the tinygemm layout; torchao 0.18's default ("plain") needs mslk
    "int4wo": (_INT4WO, {"int4_packing_format": "tile_packed_to_4d"}),
    "int4_weight_only": (_INT4WO, {"int4_packing_format": "tile_packed_to_4d"}),
    "int4dq": (_INT8DA_INTXW, {"weight_dtype": "int4", "group_size": 32}),
    "int8_dynamic_activation_int4_weight": (_INT8DA_INTXW, {"weight_dtype": "int4", "group_size": 32}),
    # as in diffusers: the short name means e5m2, the long name torchao's default (e4m3)
    "float8wo": (_FLOAT8WO, {"weight_dtype": "float8_e5m2"}),
    "float8wo_e5m2": (_FLOAT8WO, {"weight_dtype": "float8_e5m2"}),
    "float8wo_e4m3": (_FLOAT8WO, {"weight_dtype": "float8_e4m3fn"}),
    "float8_weight_only": (_FLOAT8WO, {}),
    "float8dq": (_FLOAT8DQ, {}),
    "float8_dynamic_activation_float8_weight": (_FLOAT8DQ, {}),
    "float8dq_e4m3": (_FLOAT8DQ, dict(_FLOAT8DQ_E4M3)),
    "float8dq_e4m3_tensor": (_FLOAT8DQ, {**_FLOAT8DQ_E4M3, "granularity": "tensor"}),
    "float8dq_e4m3_row": (_FLOAT8DQ, {**_FLOAT8DQ_E4M3, "granularity": "row"}),
    # diffusers' uintx_weight_only: asymmetric groups of 64, here on torchao 0.18's intx layout
    **{
        f"uint{bits}wo": (_INTXWO, {"weight_dtype": f"int{bits}", "mapping_type": "asymmetric", "group_size": 64})
        for bits in range(1, 8)
    },
    "intx_weight_only": (_INTXWO, {}),
}

#: the names whose torchao class runs on CPU, for messages
CPU_TYPES = [name for name, (class_name, _) in QUANT_TYPES.items() if FAMILIES[class_name].runs_on_cpu]
