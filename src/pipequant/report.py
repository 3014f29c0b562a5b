"""What each component of a pipeline holds in memory, before and after quantization.

Bytes are real storage: a quantized layer counts its packed data and scales (asked of the backend
that made it), never `numel * element_size` of its logical shape.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from torch import nn

from .backends import get_backend
from .backends.base import tensor_nbytes
from .quantizing import QuantizationRecord, quantization_record
from .ui import format_bytes


@dataclasses.dataclass
class ComponentMemory:
    name: str
    class_name: str
    parameters: int
    dtype: str
    backend: str
    quantized_layers: int
    bytes_before: int
    bytes_after: int


def component_memory(name: str, model: nn.Module) -> ComponentMemory:
    record: QuantizationRecord | None = quantization_record(model)
    backend = get_backend(record.backend) if record is not None else None
    seen: set[int] = set()
    nbytes = 0
    dtypes: Counter[str] = Counter()
    for module in model.modules():
        if backend is not None and backend.is_quantized(module):
            nbytes += backend.layer_nbytes(module)
            continue
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            nbytes += tensor_nbytes(tensor)
            if tensor.is_floating_point():
                dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    if record is None:
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        before = nbytes
    else:
        params = record.parameter_count
        before = record.full_precision_nbytes
    return ComponentMemory(
        name=name,
        class_name=type(model).__name__,
        parameters=params,
        dtype=dtypes.most_common(1)[0][0] if dtypes else "-",
        backend=record.backend if record is not None else "-",
        quantized_layers=record.quantized_layers if record is not None else 0,
        bytes_before=before,
        bytes_after=nbytes,
    )


def memory_report(pipeline) -> list[ComponentMemory]:
    """One row per torch-model component of `pipeline` (a diffusers pipeline)."""
    return [
        component_memory(name, value) for name, value in pipeline.components.items() if isinstance(value, nn.Module)
    ]


def memory_table(rows: list[ComponentMemory], title: str = "Memory per component"):
    """A rich Table of `rows`, with a total line."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("component")
    table.add_column("class")
    table.add_column("params", justify="right")
    table.add_column("dtype")
    table.add_column("backend")
    table.add_column("layers", justify="right")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("ratio", justify="right")
    for row in rows:
        table.add_row(
            row.name,
            row.class_name,
            f"{row.parameters / 1e6:.1f} M",
            row.dtype,
            row.backend,
            str(row.quantized_layers),
            format_bytes(row.bytes_before),
            format_bytes(row.bytes_after),
            f"{row.bytes_after / row.bytes_before:.2f}" if row.bytes_before else "-",
        )
    before = sum(r.bytes_before for r in rows)
    after = sum(r.bytes_after for r in rows)
    table.add_row(
        "total",
        "",
        "",
        "",
        "",
        "",
        format_bytes(before),
        format_bytes(after),
        f"{after / before:.2f}" if before else "-",
        style="bold",
    )
    return table
