"""Choosing how to store each layer under a byte budget: a multiple-choice knapsack with one family per component.

Each layer has options (full precision, or a mode: bytes and measured error); a component takes one
*family* of modes its single backend config can express. `solve` minimizes the sum over layers of
parameters x error within the budget: a Lagrangian search (error + weight x bytes, the weight bisected
until the total fits) picks each component's family and a first option per layer, then a greedy pass
spends the bytes left on the upgrades that remove the most error per byte.
"""

from __future__ import annotations

import dataclasses
import math

from ..ui import format_bytes

FULL = "full precision"


class BudgetError(ValueError):
    """No way of storing the pipeline fits the budget; the message gives the smallest possible size."""


@dataclasses.dataclass
class Option:
    """One way to store one layer: a mode (None: full precision), its bytes and its measured error."""

    mode: str | None
    nbytes: int
    error: float


@dataclasses.dataclass
class Layer:
    name: str
    parameters: int
    options: list[Option]  # full precision first


@dataclasses.dataclass
class Family:
    """One backend config for a component: the modes its layers may take (none: the component stays unquantized)."""

    label: str
    modes: tuple[str, ...]


@dataclasses.dataclass
class Component:
    name: str
    class_name: str
    full_nbytes: int
    #: bytes of everything but the layers that can be quantized
    fixed_nbytes: int
    layers: list[Layer]
    families: list[Family]


def allowed(layer: Layer, family: Family) -> list[Option]:
    return [o for o in layer.options if o.mode is None or o.mode in family.modes]


def cheapest(component: Component, family: Family) -> int:
    return component.fixed_nbytes + sum(min(o.nbytes for o in allowed(layer, family)) for layer in component.layers)


def check_feasible(components: list[Component], budget: int) -> None:
    smallest = sum(min(cheapest(c, f) for f in c.families) for c in components)
    if smallest > budget:
        raise BudgetError(
            f"No plan fits {format_bytes(budget)}: the smallest this pipeline can be made with these candidates is "
            f"{format_bytes(smallest)} ({smallest} bytes). Raise the budget, or allow smaller modes."
        )


def solve(components: list[Component], budget: int) -> list[tuple[Family, list[Option]]]:
    """Per component a family and an option per layer, under `budget`, minimizing sum(parameters x error)."""
    check_feasible(components, budget)  # again: a mode that failed on a layer leaves it full precision

    def pick(weight: float) -> list[tuple[Family, list[Option]]]:
        """The minimizer of error + weight x bytes, per component."""
        chosen = []
        for component in components:
            best = None
            for family in component.families:
                picks = [
                    min(
                        allowed(layer, family),
                        key=lambda o, n=layer.parameters: (n * o.error + weight * o.nbytes, o.nbytes),
                    )
                    for layer in component.layers
                ]
                cost = sum(layer.parameters * o.error + weight * o.nbytes for layer, o in zip(component.layers, picks))
                if best is None or cost < best[0]:
                    best = (cost, family, picks)
            assert best is not None
            chosen.append((best[1], best[2]))
        return chosen

    def total(chosen) -> int:
        return sum(c.fixed_nbytes + sum(o.nbytes for o in picks) for c, (_, picks) in zip(components, chosen))

    low, high = 0.0, 1.0
    while total(pick(high)) > budget:
        low, high = high, high * 4
        if high > 1e30:  # only ties in bytes left; take the cheapest assignment outright
            return _greedy_fill(components, _cheapest_choice(components), budget)
    for _ in range(60):
        middle = (low + high) / 2
        if total(pick(middle)) > budget:
            low = middle
        else:
            high = middle
    return _greedy_fill(components, pick(high), budget)


def _cheapest_choice(components: list[Component]) -> list[tuple[Family, list[Option]]]:
    chosen = []
    for component in components:
        family = min(component.families, key=lambda f: cheapest(component, f))
        chosen.append(
            (family, [min(allowed(layer, family), key=lambda o: (o.nbytes, o.error)) for layer in component.layers])
        )
    return chosen


def _greedy_fill(
    components: list[Component], chosen: list[tuple[Family, list[Option]]], budget: int
) -> list[tuple[Family, list[Option]]]:
    """Spend the budget left on the upgrades (within each component's family) that remove the most error per byte."""
    chosen = [(family, list(picks)) for family, picks in chosen]
    spent = sum(c.fixed_nbytes + sum(o.nbytes for o in picks) for c, (_, picks) in zip(components, chosen))
    while True:
        best = None
        for ci, (component, (family, picks)) in enumerate(zip(components, chosen)):
            for li, layer in enumerate(component.layers):
                current = picks[li]
                for option in allowed(layer, family):
                    gain = layer.parameters * (current.error - option.error)
                    extra = option.nbytes - current.nbytes
                    if gain <= 0 or spent + extra > budget:
                        continue
                    ratio = gain / extra if extra > 0 else math.inf
                    if best is None or ratio > best[0]:
                        best = (ratio, ci, li, option, extra)
        if best is None:
            return chosen
        _, ci, li, option, extra = best
        chosen[ci][1][li] = option
        spent += extra
