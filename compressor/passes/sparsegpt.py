"""SparseGPT: prune a weight column by column, pushing each pruned weight's loss onto the columns not
yet visited through the inverse Hessian of the layer's inputs (Frantar & Alistarh, 2023).

The machinery is GPTQ's (dead inputs, damping with retry, upper Cholesky factor U of H^-1, lazy
updates over column blocks) with the quantized column replaced by the masked one. The mask is chosen
on the current, already updated weights with the OBS saliency w^2 / U_jj^2:

- unstructured: at the start of each solver block [a, b), every row loses the
  pruned_per_row(b) - pruned_per_row(a) lowest-scoring weights of the block, so each row loses
  exactly pruned_per_row(in_features) in total;
- N:M: at the first column of each block of M (aligned to multiples of M), every row loses its M - N
  lowest-scoring weights of that block, as in the reference code. The solver block is a multiple of M,
  so no M-block straddles two solver blocks; a ragged tail follows compressor.sparsity.

With `bits` (and optionally group_size, symmetric, mse) the surviving weights are also quantized in
the same sweep, each group's grid fitted when the sweep reaches it on its updated columns (weights
already chosen for pruning left out of the range). Pruned weights stay exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressor import grids
from compressor.errors import CompressorError
from compressor.grids import IntGrid
from compressor.passes import QUANT_KEYS, LinearState, check_keys, grid_from_args
from compressor.passes.gptq import inverse_hessian_factor, whole_row_grid
from compressor.passes.magnitude import PATTERN_KEYS, begin_pruning, finish_pruning
from compressor.passes.rtn import quantize_with_params
from compressor.sparsity import Pattern, pattern_from_args, pruned_per_row, select_mask
from compressor.stats import InputStats


@dataclass(frozen=True)
class SparseGPTOptions:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    blocksize: int = 128  # columns per lazy-update block (rounded to whole M-blocks and groups)

    @classmethod
    def from_args(cls, args: dict) -> SparseGPTOptions:
        damp = args.get("damp", 0.01)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise CompressorError(f"sparsegpt: damping must be a number in (0, 1), got {damp!r}")
        blocksize = args.get("blocksize", 128)
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise CompressorError(f"sparsegpt: blocksize must be a positive integer, got {blocksize!r}")
        return cls(damp=float(damp), blocksize=blocksize)


def needs_data(args: dict) -> bool:
    return True


def statistics(args: dict) -> set[str]:
    return {"hessian"}


def output_grid(args: dict) -> IntGrid | None:
    """The joint-quantization grid, or None when the step only prunes."""
    given = QUANT_KEYS & set(args)
    if not given:
        return None
    if "bits" not in args:
        raise CompressorError(
            f"sparsegpt: {', '.join(sorted(given))} only apply with bits (joint quantization)"
        )
    return grid_from_args(args)


def validate(args: dict) -> None:
    """Fail early, before any model work, on settings this pass cannot use."""
    check_keys("sparsegpt", args, PATTERN_KEYS | QUANT_KEYS | {"damp", "blocksize"})
    pattern_from_args(args)
    SparseGPTOptions.from_args(args)
    output_grid(args)


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    compress_many([layer], stats, args)


def compress_many(layers: list[LinearState], stats: InputStats | None, args: dict) -> None:
    """Linears sharing an input share H; rows are solved independently given H, so one solve over
    the stacked rows equals solving each linear alone."""
    validate(args)
    pattern = pattern_from_args(args)
    options = SparseGPTOptions.from_args(args)
    grid = output_grid(args)
    if stats is None:
        raise CompressorError("sparsegpt needs calibration data (input statistics)")
    try:
        hessian = stats.hessian()
    except ValueError as error:
        raise CompressorError(f"sparsegpt: {error}")
    for layer in layers:
        begin_pruning(layer, "sparsegpt")
    weight = torch.cat([layer.weight for layer in layers])
    result = solve(weight, hessian, pattern, options, grid, layers[0].dtype)
    rows = [layer.weight.shape[0] for layer in layers]
    parts = zip(result.weight.split(rows), result.mask.split(rows), result.row_error.split(rows), strict=True)
    for index, (layer, (w, mask, error)) in enumerate(zip(layers, parts, strict=True)):
        finish_pruning(layer, mask.contiguous(), pattern, "sparsegpt", weight=w.contiguous())
        if grid is not None:
            scale = result.scale.split(rows)[index]
            zero = result.zero.split(rows)[index]
            quantize_with_params(layer, grid, scale, zero)
        layer.metrics.update(sparsegpt_error=float(error.sum()), sparsegpt_damp=result.damp)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # float32 [out, in], zero where pruned (on the grid when quantizing)
    mask: torch.Tensor  # bool [out, in], True = kept
    scale: torch.Tensor | None  # [out, groups] float32 when quantizing
    zero: torch.Tensor | None
    row_error: torch.Tensor  # per row: sum over columns of ((w - q) / Hinv_ii)^2 / 2
    damp: float  # the damping that succeeded


def solver_blocksize(blocksize: int, in_features: int, pattern: Pattern, grid: IntGrid | None) -> int:
    """A column block holding whole M-blocks and whole quantization groups."""
    unit = pattern.block if pattern.is_nm else 1
    if grid is not None and grid.group_size > 0:
        unit = math.lcm(unit, grid.group_width(in_features))
    return max(unit, blocksize // unit * unit)


@torch.no_grad()
def solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    options: SparseGPTOptions = SparseGPTOptions(),
    grid: IntGrid | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> SparseGPTResult:
    W = weight.float().clone()
    rows, cols = W.shape
    dead = hessian.diagonal() == 0
    W[:, dead] = 0

    def dead_filled_hessian() -> torch.Tensor:
        H = hessian.float().clone().to(W.device)
        H[dead, dead] = 1
        return H

    Hinv, damp = inverse_hessian_factor(dead_filled_hessian, options.damp)
    blocksize = solver_blocksize(options.blocksize, cols, pattern, grid)

    scale = zero = None
    width = cols
    if grid is not None:
        width = grid.group_width(cols)
        if grid.group_size <= 0:
            # Per-channel ranges are fitted once, on the original weights (as the reference does).
            scale, zero = grids.choose_qparams(W, grid, scale_dtype)
        else:
            scale = torch.zeros(rows, grid.num_groups(cols), device=W.device)
            zero = torch.zeros_like(scale)
    dynamic = grid is not None and grid.group_size > 0

    # Work on W^T so that each column is a contiguous row of the loop (as in gptq.solve).
    Wt = W.T.contiguous()
    Qt = torch.zeros_like(Wt)
    keep = torch.ones(cols, rows, dtype=torch.bool, device=W.device)  # mask^T; chosen as we go
    row_error = torch.zeros(rows, device=W.device)
    m = pattern.block if pattern.is_nm else 0

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag_sq = Hinv1.diagonal().square()[:, None]
        keep1 = keep[i1:i2]  # a view: choices below show through
        if not pattern.is_nm:
            prune = pruned_per_row(i2, pattern) - pruned_per_row(i1, pattern)
            if prune:
                lowest = torch.topk(W1.square() / diag_sq, prune, dim=0, largest=False).indices
                keep1.scatter_(0, lowest, False)
        for i in range(i2 - i1):
            col = i1 + i
            if m and col % m == 0:
                score = W1[i:i + m].square() / diag_sq[i:i + m]
                keep1[i:i + m] = select_mask(score.T, pattern).T
            if dynamic and col % width == 0:
                group = W1[i:i + width] * keep1[i:i + width]
                s, z = grids.choose_qparams(group.T, whole_row_grid(grid), scale_dtype)
                scale[:, col // width], zero[:, col // width] = s[:, 0], z[:, 0]
            w = W1[i]
            q = w * keep1[i]
            if grid is not None:
                g = col // width if dynamic else 0
                s, z = scale[:, g], zero[:, g]
                # A pruned weight (0) lands on code z, i.e. exactly 0.
                q = (torch.clamp(torch.round(q / s) + z, 0, grid.maxq) - z) * s
            Qt[col] = q
            err = (w - q).div_(Hinv1[i, i])
            row_error.add_(err.square(), alpha=0.5)
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)

    mask = keep.T
    weight = torch.where(mask, Qt.T, torch.zeros((), device=W.device))
    return SparseGPTResult(weight=weight.contiguous(), mask=mask.contiguous(), scale=scale, zero=zero,
                           row_error=row_error, damp=damp)
