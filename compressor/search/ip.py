"""AdaQuant's integer programme: per-unit levels that minimise the summed error under a size budget.

AdaQuant (Hubara et al., 2021) measures, for every layer and every bit width, how much the loss
grows when that layer alone is quantized, assumes the growths add up, and picks one width per
layer by an integer programme: minimise the summed growth subject to the total size. Here a unit
is a search unit (a vLLM fused group or one linear), the levels are the level database's, the
growth is the KL divergence from the dense model on held-out windows (the search's fitness) with
every other unit at the database's highest level, and the programme is a multiple-choice knapsack.

It is solved exactly by dynamic programming over the budget in units of the greatest common
divisor of the cost steps (for integer levels of one group size that divisor is a whole number of
weight rows, so a 135M model's budget is a few thousand cells).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce

import torch

from compressor.errors import CompressorError
from compressor.search.evopress import Space

# DP cells beyond this would be slow in memory and time: the cost steps share too small a divisor.
MAX_CELLS = 2_000_000


def measure_deltas(fitness: Callable[[list[int], list[int]], float], space: Space, windows: list[int],
                   done: list[list[float]] | None = None,
                   on_unit: Callable[[list[list[float]]], None] | None = None) -> list[list[float]]:
    """deltas[unit][level]: fitness with only `unit` at `level` minus fitness with every unit at the
    highest level (so the highest level costs nothing). `done` rows (from a resumed run) are kept;
    `on_unit` sees the rows after each unit, to save them."""
    top = space.levels - 1
    units = len(space.costs)
    # A fitness that can cache the baseline's block outputs runs each measurement from the unit's
    # own block on (compressor.search.fitness.KLFitness.prefix_from).
    baseline = getattr(fitness, "prefix_from", fitness)
    base = baseline([top] * units, windows)
    deltas = [list(row) for row in (done or [])]
    for unit in range(len(deltas), units):
        row = []
        for level in range(space.levels):
            if level == top:
                row.append(0.0)
                continue
            levels = [top] * units
            levels[unit] = level
            row.append(fitness(levels, windows) - base)
        deltas.append(row)
        if on_unit:
            on_unit(deltas)
    return deltas


def solve(costs: list[list[int]], deltas: list[list[float]], limit: int) -> list[int]:
    """The level per unit minimising sum(deltas) with sum(costs) <= limit (exact).

    A multiple-choice knapsack: each unit pays its cheapest level up front, then the DP spends the
    rest of the budget on upgrades, in cells of g = gcd of all upgrade costs.
    """
    if len(costs) != len(deltas) or any(len(c) != len(d) for c, d in zip(costs, deltas, strict=True)):
        raise CompressorError("costs and deltas must have one row per unit and one value per level")
    floor = [min(row) for row in costs]
    spare = limit - sum(floor)
    if spare < 0:
        raise CompressorError(f"no allocation fits: the cheapest levels need {sum(floor)} > {limit}")
    steps = [c - f for row, f in zip(costs, floor, strict=True) for c in row]
    cell = reduce(math.gcd, steps, 0) or 1
    cells = spare // cell
    if cells * len(costs) > MAX_CELLS:
        raise CompressorError(f"the integer programme would need {cells * len(costs):,} cells (cost steps "
                              f"share only a divisor of {cell}); use the evolutionary search instead")
    inf = float("inf")
    # best[c]: least summed delta of the units so far using exactly c cells of upgrades.
    best = torch.full((cells + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for row_cost, row_delta, f in zip(costs, deltas, floor, strict=True):
        new = torch.full_like(best, inf)
        pick = torch.zeros(cells + 1, dtype=torch.int16)
        for level, (cost, delta) in enumerate(zip(row_cost, row_delta, strict=True)):
            w = (cost - f) // cell
            if w > cells:
                continue
            candidate = torch.full_like(best, inf)
            candidate[w:] = best[: cells + 1 - w] + delta
            better = candidate < new
            new = torch.where(better, candidate, new)
            pick = torch.where(better, torch.tensor(level, dtype=torch.int16), pick)
        best = new
        choices.append(pick)
    c = int(torch.argmin(best))
    chosen = []
    for unit in range(len(costs) - 1, -1, -1):
        level = int(choices[unit][c])
        chosen.append(level)
        c -= (costs[unit][level] - floor[unit]) // cell
    chosen.reverse()
    return chosen
