"""Wanda: prune by |W_ij| * sqrt(mean x_j^2), per output row or per block of M input columns
(Sun et al., 2023). Needs calibration data for the per-column input energy, which is the Hessian's
diagonal the pipeline accumulates anyway. No weight update.
"""

from __future__ import annotations

import torch

from compressor.errors import CompressorError
from compressor.passes import LinearState, check_keys
from compressor.passes.magnitude import PATTERN_KEYS, begin_pruning, finish_pruning
from compressor.sparsity import pattern_from_args, select_mask
from compressor.stats import InputStats


def needs_data(args: dict) -> bool:
    return True


def statistics(args: dict) -> set[str]:
    return {"hessian"}


def validate(args: dict) -> None:
    """Fail early, before any model work, on settings this pass cannot use."""
    check_keys("wanda", args, PATTERN_KEYS)
    pattern_from_args(args)


def scores(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(s_j), s_j the mean squared input of column j."""
    return weight.float().abs() * energy.float().clamp(min=0).sqrt().to(weight.device)


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    validate(args)
    pattern = pattern_from_args(args)
    if stats is None or stats.tokens == 0:
        raise CompressorError("wanda needs calibration data (input statistics)")
    try:
        energy = stats.column_energy()
    except ValueError as error:
        raise CompressorError(f"wanda: {error}")
    begin_pruning(layer, "wanda")
    mask = select_mask(scores(layer.weight, energy), pattern)
    finish_pruning(layer, mask, pattern, "wanda")
