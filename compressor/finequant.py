"""FineQuant's adaptive granularity (Kim et al., arXiv 2308.09723): a group size per matrix, chosen
from the weights alone, so that scales are spent only where outliers would collapse the range.

FineQuant starts every matrix at one scale per output channel and halves the group while outliers
collapse the quantized range; its exact test is not published with code. The rule here is the
documented substitute (../shared/docs/ALGORITHMS-2.md, section F), computed with the grid the run
uses (bits, symmetric or not, full range, MSE clipping):

    err(G)  = mean squared round-to-nearest error of W with groups of G columns
    chosen  = the coarsest candidate G (per channel first, then 1024, 512, ... down to the finest)
              with err(G) <= (1 + tolerance) * err(finest candidate)

A matrix whose rows are evenly spread gets a coarse group (few scales); one with outlier columns,
where a wide group's scale is set by a few large weights and the rest round to a handful of codes,
gets a finer one. Linears that read the same input (q/k/v, gate/up) take the finest of their own
choices: vLLM loads each such set as one matrix with one scheme.

The group sizes are the setting `group_size: auto` of the rtn and gptq passes (`--group-size auto`),
with `auto_groups` (the candidates, 0 = per channel), `auto_tolerance` and `auto_divide` (only groups
that cut the row evenly); each layer's choice and the errors behind it are recorded in compress.json.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from compressor import grids
from compressor.errors import CompressorError

AUTO = "auto"
AUTO_KEYS = {"auto_groups", "auto_tolerance", "auto_divide"}
# Coarsest first: per channel (0), then halving down to FineQuant's kernel block (64).
DEFAULT_GROUPS = (0, 1024, 512, 256, 128, 64)
DEFAULT_TOLERANCE = 0.25
# The candidates vLLM's stock kernels serve (Marlin: per channel, 32, 64, 128), for --target vllm;
# a candidate that does not divide a matrix's columns is skipped there (a ragged group is not servable).
VLLM_GROUPS = (0, 128, 64)


def is_auto(args: dict) -> bool:
    return args.get("group_size") == AUTO


def validate(args: dict) -> None:
    """Reject bad auto settings (and auto settings without `group_size: auto`)."""
    if not is_auto(args):
        if AUTO_KEYS & set(args):
            raise CompressorError(f"{', '.join(sorted(AUTO_KEYS & set(args)))} need group_size: auto")
        return
    groups = args.get("auto_groups", list(DEFAULT_GROUPS))
    whole = [isinstance(g, int) and not isinstance(g, bool) and g >= -1 for g in groups] \
        if isinstance(groups, (list, tuple)) else []
    if not whole or not all(whole):
        raise CompressorError(f"auto_groups must be a list of group sizes (0 or -1 = per channel), "
                              f"got {groups!r}")
    tolerance = args.get("auto_tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 100:
        raise CompressorError(f"auto_tolerance must be a number >= 0 (0.25 = 25% above the finest group's "
                              f"error), got {tolerance!r}")
    if not isinstance(args.get("auto_divide", False), bool):
        raise CompressorError(f"auto_divide must be true or false, got {args['auto_divide']!r}")


def stand_in(args: dict) -> dict:
    """The settings with `auto` replaced by the coarsest candidate: what can be said of the grid before
    the weights are seen (validation, --target checks; every candidate has the same bits and zero
    points, and a vllm target's candidates are all servable)."""
    if not is_auto(args):
        return args
    rest = {k: v for k, v in args.items() if k not in AUTO_KEYS}
    return {**rest, "group_size": max(_groups(args), key=lambda g: g if g > 0 else float("inf"))}  # coarsest


def candidate_groups(in_features: int, groups=DEFAULT_GROUPS, divide: bool = False) -> list[int]:
    """The distinct groupings of a row of `in_features` among `groups`, coarsest first (0 = per
    channel; a group as wide as the row is per channel). `divide` keeps only groups that cut the row
    evenly (no ragged tail)."""
    found = set()
    for group in groups:
        group = 0 if group <= 0 or group >= in_features else group
        if divide and group and in_features % group:
            continue
        found.add(group)
    if not found:
        raise CompressorError(f"no candidate group size of {list(groups)} divides {in_features} columns")
    return sorted(found, key=lambda g: -g if g else -float("inf"))


def weight_error(weight: torch.Tensor, grid: grids.IntGrid) -> float:
    """Mean squared error of rounding `weight` to nearest on `grid` (its own scales and zeros)."""
    scale, zero = grids.choose_qparams(weight, grid)
    return float((grids.fake_quantize(weight, scale, zero, grid) - weight).pow(2).mean())


def choose_group_size(weight: torch.Tensor, grid: grids.IntGrid, groups=DEFAULT_GROUPS,
                      tolerance: float = DEFAULT_TOLERANCE, divide: bool = False
                      ) -> tuple[int, dict[int, float]]:
    """The rule of the module docstring for one matrix: (chosen group size, error of each candidate)."""
    candidates = candidate_groups(weight.shape[1], groups, divide)
    errors = {g: weight_error(weight, replace(grid, group_size=g)) for g in candidates}
    bound = (1 + tolerance) * errors[candidates[-1]]
    chosen = next(g for g in candidates if errors[g] <= bound)
    return chosen, errors


def subgroup_args(layers, args: dict) -> list[tuple[list, dict]]:
    """`args` with `group_size: auto` resolved: the layers split into the sets vLLM fuses (q/k/v,
    gate/up; any other linear alone), each set with the finest of its members' own choices (each
    layer's choice and errors are recorded in its metrics)."""
    if not is_auto(args):
        return [(layers, args)]
    from compressor.passes import grid_from_args

    settings = stand_in(args)
    grid = grid_from_args(settings)
    divide = bool(args.get("auto_divide", False))
    tolerance = float(args.get("auto_tolerance", DEFAULT_TOLERANCE))
    sets: dict[tuple, list] = {}
    for layer in layers:
        chosen, errors = choose_group_size(layer.weight, grid, _groups(args), tolerance, divide)
        finest = min(errors.values())
        relative = {str(g): round(e / finest, 4) if finest > 0 else 1.0 for g, e in errors.items()}
        layer.metrics["group_size_rule"] = {"own_choice": chosen, "tolerance": tolerance,
                                            "error_vs_finest": relative}
        sets.setdefault(_fused_set(layer.name), []).append(layer)
    return [(members, {**settings, "group_size": _finest(m.metrics["group_size_rule"]["own_choice"]
                                                         for m in members)})
            for members in sets.values()]


def _finest(groups) -> int:
    return min(groups, key=lambda g: g if g > 0 else float("inf"))


def _fused_set(name: str) -> tuple:
    """Linears vLLM loads as one matrix share a key (compressor.engines.FUSED); others have their own."""
    from compressor.engines import FUSED

    parent, _, local = name.rpartition(".")
    return next(((parent, fused) for fused in FUSED if local in fused), (name,))


def _groups(args: dict) -> list[int]:
    return [max(g, 0) for g in args.get("auto_groups", DEFAULT_GROUPS)]
