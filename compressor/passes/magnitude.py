"""Magnitude pruning: drop the smallest |W| in every output row (unstructured) or every block of M
input columns (N:M, N kept of M). No data, no weight update; the data-free baseline.

Also home of the bookkeeping every pruning pass shares (`begin_pruning`, `finish_pruning`).
"""

from __future__ import annotations

import torch

from compressor.errors import CompressorError
from compressor.passes import LinearState, check_keys
from compressor.sparsity import Pattern, pattern_from_args, select_mask
from compressor.stats import InputStats

PATTERN_KEYS = {"pattern", "sparsity"}


def needs_data(args: dict) -> bool:
    return False


def statistics(args: dict) -> set[str]:
    return set()


def validate(args: dict) -> None:
    """Fail early, before any model work, on settings this pass cannot use."""
    check_keys("magnitude", args, PATTERN_KEYS)
    pattern_from_args(args)


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    validate(args)
    pattern = pattern_from_args(args)
    begin_pruning(layer, "magnitude")
    mask = select_mask(layer.weight.float().abs(), pattern)
    finish_pruning(layer, mask, pattern, "magnitude")


def begin_pruning(layer: LinearState, method: str) -> None:
    """A linear is pruned once, before any quantization: masks are never combined."""
    if layer.mask is not None:
        raise CompressorError(
            f"{method}: {layer.name} is already pruned; give each linear at most one pruning step"
        )
    if layer.quant is not None:
        raise CompressorError(
            f"{method}: {layer.name} is already quantized; put the pruning step before quantization"
        )


def finish_pruning(layer: LinearState, mask: torch.Tensor, pattern: Pattern, method: str,
                   weight: torch.Tensor | None = None) -> None:
    """Store the mask (True = kept), zero the pruned weights and record what was done."""
    weight = layer.weight if weight is None else weight
    weight = weight.float()
    layer.weight = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    layer.mask = mask
    layer.methods.append(method)
    layer.metrics.update(pattern=pattern.label, sparsity=float((~mask).float().mean()))
