"""The explanation `plan` returns: per component the choice, its bytes and expected error, as rich tables."""

from __future__ import annotations

import dataclasses

from ..ui import format_bytes


@dataclasses.dataclass
class ComponentPlan:
    """The explanation of one component's choice: one row of the plan table."""

    name: str
    class_name: str
    choice: str
    quantized_layers: int
    kept_layers: int
    nbytes: int
    full_nbytes: int
    #: parameters of the component's quantizable layers, and their parameter-weighted mean relative weight error
    parameters: int
    error: float
    #: the same, and bytes, for each candidate mode on all layers: what the choice was weighed against
    alternatives: dict[str, tuple[int, float]]


@dataclasses.dataclass
class Explanation:
    """Why the plan is what it is: per component the choice, its bytes and expected error. Prints as tables."""

    components: list[ComponentPlan]
    budget: int
    rows: int
    columns: int

    @property
    def total(self) -> int:
        return sum(c.nbytes for c in self.components)

    @property
    def error(self) -> float:
        """The parameter-weighted mean error over every quantizable layer of the pipeline."""
        parameters = sum(c.parameters for c in self.components)
        return sum(c.parameters * c.error for c in self.components) / parameters if parameters else 0.0

    def table(self):
        from rich.table import Table

        table = Table(
            title=f"Plan for a budget of {format_bytes(self.budget)}",
            caption=(
                f"error: relative weight error ||W - Q(W)|| / ||W||, parameter-weighted over each component's linear "
                f"layers, measured on {self.rows} rows x {self.columns} columns per layer"
            ),
        )
        for column in ("component", "class", "choice", "layers quantized / kept", "bytes", "full precision", "error"):
            table.add_column(column, justify="right" if column in ("bytes", "full precision", "error") else "left")
        for row in self.components:
            table.add_row(
                row.name,
                row.class_name,
                row.choice,
                f"{row.quantized_layers} / {row.kept_layers}",
                format_bytes(row.nbytes),
                format_bytes(row.full_nbytes),
                f"{row.error:.4f}",
            )
        full = sum(c.full_nbytes for c in self.components)
        table.add_row(
            "total", "", "", "", format_bytes(self.total), format_bytes(full), f"{self.error:.4f}", style="bold"
        )
        return table

    def alternatives_table(self):
        """Bytes and error of each candidate mode applied to all of a component's layers."""
        from rich.table import Table

        modes = list(dict.fromkeys(mode for c in self.components for mode in c.alternatives))
        table = Table(title="Candidates per component (every layer in one mode): bytes, error")
        table.add_column("component")
        for mode in modes:
            table.add_column(mode, justify="right")
        for row in self.components:
            cells = []
            for mode in modes:
                if mode in row.alternatives:
                    nbytes, error = row.alternatives[mode]
                    cells.append(f"{format_bytes(nbytes)}, {error:.4f}")
                else:
                    cells.append("-")
            table.add_row(row.name, *cells)
        return table

    def __rich__(self):
        from rich.console import Group

        if not any(c.alternatives for c in self.components):  # it fit unquantized: nothing was weighed
            return self.table()
        return Group(self.table(), self.alternatives_table())
