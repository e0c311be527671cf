"""Sparsity patterns and mask selection, shared by every pruning pass.

User-facing N:M means N weights KEPT in every block of M consecutive input columns (the hardware
meaning: NVIDIA's 2:4 keeps 2 of 4). Pruning papers write "n:m" as n pruned of m; the two agree
only at 2:4 and 4:8, so patterns with N >= M are rejected rather than guessed at.

Masks are bool tensors shaped like the weight [out, in], True = kept. Unstructured sparsity prunes
exactly the same number of weights in every output row; N:M prunes exactly M - N in every block
of M along the input dimension. A ragged last block of r < M columns prunes floor(r * (M - N) / M).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compressor.errors import CompressorError


@dataclass(frozen=True)
class Pattern:
    """Either N:M (kept, block) or unstructured (a fraction pruned per row)."""

    sparsity: float  # fraction of weights pruned
    kept: int | None = None  # N of N:M
    block: int | None = None  # M of N:M

    @property
    def is_nm(self) -> bool:
        return self.block is not None

    @property
    def label(self) -> str:
        return f"{self.kept}:{self.block}" if self.is_nm else "unstructured"


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), N kept of M. Anything else is an error with the reason."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise CompressorError(f"pattern must look like N:M (N kept of every M), got {text!r}")
    kept, block = int(match[1]), int(match[2])
    if block < 2 or kept < 1 or kept >= block:
        raise CompressorError(
            f"pattern {text!r}: N:M keeps N of every M weights and needs 1 <= N < M "
            "(2:4 keeps 2 of 4; pruning papers' 'n:m' counts pruned weights instead)"
        )
    return kept, block


def check_sparsity(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompressorError(f"sparsity must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise CompressorError(f"sparsity must be in [0, 1), got {value}")
    return float(value)


def pattern_from_args(args: dict) -> Pattern:
    """From pass settings: `pattern: "2:4"` or `sparsity: 0.5` (unstructured), not both."""
    nm = args.get("pattern")
    if nm not in (None, "unstructured"):
        if "sparsity" in args:
            raise CompressorError("give either an N:M pattern or an unstructured sparsity, not both")
        kept, block = parse_nm(nm)
        return Pattern(sparsity=1 - kept / block, kept=kept, block=block)
    if "sparsity" not in args:
        raise CompressorError("pruning needs a sparsity (e.g. 0.5) or an N:M pattern (e.g. 2:4)")
    return Pattern(sparsity=check_sparsity(args["sparsity"]))


def pruned_per_row(in_features: int, pattern: Pattern) -> int:
    """How many weights each output row loses under `pattern`."""
    if not pattern.is_nm:
        return int(round(pattern.sparsity * in_features))
    full, tail = divmod(in_features, pattern.block)
    drop = pattern.block - pattern.kept
    return full * drop + tail * drop // pattern.block


def select_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the highest scores: per row (unstructured) or per block of M columns (N:M)."""
    rows, cols = scores.shape
    keep = torch.ones_like(scores, dtype=torch.bool)
    if not pattern.is_nm:
        prune = pruned_per_row(cols, pattern)
        if prune:
            lowest = torch.topk(scores, prune, dim=1, largest=False).indices
            keep.scatter_(1, lowest, False)
        return keep
    m, drop = pattern.block, pattern.block - pattern.kept
    full = cols // m * m
    if full:
        blocks = scores[:, :full].reshape(rows, -1, m)
        lowest = torch.topk(blocks, drop, dim=2, largest=False).indices
        keep[:, :full] = torch.ones_like(blocks, dtype=torch.bool).scatter_(2, lowest, False).reshape(
            rows, full)
    tail_drop = (cols - full) * drop // m
    if tail_drop:
        lowest = torch.topk(scores[:, full:], tail_drop, dim=1, largest=False).indices
        keep[:, full:] = torch.ones_like(scores[:, full:], dtype=torch.bool).scatter_(1, lowest, False)
    return keep


def mask_holds(mask: torch.Tensor, pattern: Pattern) -> bool:
    """Does `mask` prune exactly what `pattern` asks, in every row and every M-block?"""
    rows, cols = mask.shape
    pruned = (~mask).sum(1)
    if not pattern.is_nm:
        return bool((pruned == pruned_per_row(cols, pattern)).all())
    m, drop = pattern.block, pattern.block - pattern.kept
    full = cols // m * m
    blocks = (~mask[:, :full]).reshape(rows, -1, m).sum(2)
    tail = (~mask[:, full:]).sum(1)
    return bool((blocks == drop).all() and (tail == (cols - full) * drop // m).all())
