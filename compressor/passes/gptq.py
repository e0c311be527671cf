"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

The solver follows the reference algorithm (ALGORITHMS.md): dead inputs zeroed, relative damping
with automatic retry when the Cholesky factorisation fails, lazy batch updates over column blocks,
act-order (columns by descending Hessian diagonal) with static groups so the stored groups stay
contiguous in the original column order, and ragged last groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compressor import finequant, grids
from compressor.errors import CompressorError
from compressor.grids import IntGrid
from compressor.passes import QUANT_KEYS, LinearState, check_keys, grid_from_args
from compressor.passes.rtn import quantize_with_params
from compressor.stats import InputStats

DAMP_RETRIES = (1, 3, 10, 30, 100)  # multiples of the requested damping tried in turn


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = True
    blocksize: int = 128

    @classmethod
    def from_args(cls, args: dict) -> GPTQOptions:
        damp = float(args.get("damp", 0.01))
        if not 0 < damp < 1:
            raise CompressorError(f"damping must be in (0, 1), got {damp}")
        return cls(damp=damp, act_order=bool(args.get("act_order", True)),
                   blocksize=int(args.get("blocksize", 128)))


def needs_data(args: dict) -> bool:
    return True


def validate(args: dict) -> None:
    """Fail early, before any model work, on settings this pass cannot use."""
    check_keys("gptq", args, QUANT_KEYS | {"damp", "act_order", "blocksize"} | finequant.AUTO_KEYS)
    finequant.validate(args)
    grid_from_args(finequant.stand_in(args))
    GPTQOptions.from_args(args)


def output_grid(args: dict) -> IntGrid:
    """The grid the weights end on (what the writer will store); with group_size auto the coarsest
    candidate stands in until the weights are seen (compressor.finequant)."""
    return grid_from_args(finequant.stand_in(args))


subgroup_args = finequant.subgroup_args  # group_size: auto -> a group size per matrix


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    compress_many([layer], stats, args)


def compress_many(layers: list[LinearState], stats: InputStats | None, args: dict) -> None:
    """Linears that share an input ([q,k,v], [gate,up]) share H: one solve over their stacked rows.

    GPTQ treats rows independently given H, so this equals solving each linear alone, with one
    Python column loop instead of several.
    """
    if stats is None:
        raise CompressorError("GPTQ needs calibration data")
    grid = grid_from_args(args)
    options = GPTQOptions.from_args(args)
    # One linear: its own weight, not a copy (a 2048 x 5632 float32 weight is 46 MB).
    weight = layers[0].weight if len(layers) == 1 else torch.cat([layer.weight for layer in layers])
    masks = [layer.mask for layer in layers]
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([m if m is not None else torch.ones_like(layer.weight, dtype=torch.bool)
                          for m, layer in zip(masks, layers, strict=True)])
    rows = [layer.weight.shape[0] for layer in layers]
    for layer in layers:
        layer.weight = None  # the stacked copy replaces them (large layers: memory counts)
    keep_unrounded = layers[0].keep_unrounded
    result = solve(weight, stats.hessian(), grid, options, layers[0].dtype, mask, keep_unrounded)
    del weight
    unrounded = result.unrounded.split(rows) if keep_unrounded else [None] * len(layers)
    for layer, weight, scale, zero, error, before in zip(
        layers, result.weight.split(rows), result.scale.split(rows), result.zero.split(rows),
        result.row_error.split(rows), unrounded, strict=True,
    ):
        layer.weight = weight  # on the grid already: the codes below are recovered exactly
        layer.unrounded = before
        quantize_with_params(layer, grid, scale, zero, act_order=options.act_order)
        layer.methods.append("gptq")
        layer.metrics.update(gptq_error=float(error.sum()), gptq_damp=result.damp)


@dataclass
class GPTQResult:
    weight: torch.Tensor  # float32, on the grid, original column order
    scale: torch.Tensor  # [out, groups] float32
    zero: torch.Tensor
    row_error: torch.Tensor  # per row: sum over columns of ((w - q) / Hinv_ii)^2 / 2, the solver's loss
    damp: float  # the damping that succeeded
    unrounded: torch.Tensor | None = None  # each column just before rounding (after error feedback)


def inverse_hessian_factor(make_hessian: Callable[[], torch.Tensor], damp: float
                            ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damping until it exists.

    `make_hessian()` returns a fresh copy of H for each attempt, which is factorised in place: at
    5632 inputs each square matrix is 127 MB, and this keeps two alive at most.
    """
    for multiple in DAMP_RETRIES:
        tried = min(damp * multiple, 1.0)
        matrix = make_hessian()
        matrix.diagonal().add_(tried * matrix.diagonal().mean())
        info = torch.empty((), dtype=torch.int32, device=matrix.device)
        torch.linalg.cholesky_ex(matrix, out=(matrix, info))  # lower factor, in place
        if info == 0:
            inverse = torch.cholesky_inverse(matrix)
            del matrix
            torch.linalg.cholesky_ex(inverse, upper=True, out=(inverse, info))
            if info == 0:
                return inverse, tried
    raise CompressorError(
        f"GPTQ: the Hessian is not positive definite even with damping {tried}; "
        "use more calibration samples or --method rtn"
    )


# round_column(col, upcoming) -> the column on the grid. col: the column's index in the original
# order; upcoming: the current column and the rest of its block, [k, rows], already updated (a
# dynamic group fits its parameters on them).
ColumnRounder = Callable[[int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def error_feedback(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    round_column: ColumnRounder,
    options: GPTQOptions = GPTQOptions(),
    mask: torch.Tensor | None = None,
    align: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ's column loop for any grid: round a column, push its error onto the columns after it.

    Returns (weight on the grid in the original column order, per-row solver loss, damping used).
    `align`: column blocks hold whole multiples of it (groups refitted inside the loop).
    """
    rows, cols = weight.shape
    if options.act_order:
        perm = torch.argsort(hessian.diagonal(), descending=True)
        if mask is not None:
            mask = mask[:, perm]
    else:
        perm = torch.arange(cols, device=weight.device)
    dead = (hessian.diagonal() == 0)[perm]

    def permuted_hessian() -> torch.Tensor:
        # Broadcast indices gather straight into one new matrix (H[perm][:, perm] makes two).
        H = hessian.float()[perm[:, None], perm[None, :]] if options.act_order else hessian.float().clone()
        H[dead, dead] = 1
        return H

    Hinv, damp = inverse_hessian_factor(permuted_hessian, options.damp)
    blocksize = max(align, options.blocksize // align * align)
    # The loop runs once per column: keep each column a contiguous row (work on W^T), so the
    # loop's cost is the arithmetic. One copy of the weight, permuted and transposed at once.
    Wt = weight.T[perm].float().contiguous()
    Wt[dead] = 0
    keep = mask.T.contiguous().float() if mask is not None else None
    original_column = perm.tolist()
    row_error = torch.zeros(rows, device=weight.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            q = round_column(original_column[col], W1[i:])
            if keep is not None:
                q = q * keep[col]
            Wt[col] = q  # the block works on its copy W1: row col of Wt is free for the result
            err = (W1[i] - q).div_(Hinv1[i, i])
            row_error.add_(err.square(), alpha=0.5)
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)

    inverse = torch.argsort(perm)
    return Wt.T[:, inverse].contiguous(), row_error, damp


@torch.no_grad()
def solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: IntGrid,
    options: GPTQOptions = GPTQOptions(),
    scale_dtype: torch.dtype = torch.float32,
    mask: torch.Tensor | None = None,
    keep_unrounded: bool = False,
) -> GPTQResult:
    """GPTQ onto an integer grid: error_feedback with the grid's rounding and group parameters.
    `keep_unrounded` also returns each column as it was just before rounding (one more copy of
    the weight), where a later pass learns the rounding from GPTQ's error-fed values."""
    rows, cols = weight.shape
    width = grid.group_width(cols)
    dead = hessian.diagonal() == 0
    # The range search (--mse) weighs each column's rounding error by its input's mean square:
    # W3 g64 asym after --rotate, 33.67 -> 31.94 on WikiText-2 against the unweighted search.
    importance = hessian.diagonal().float() if grid.mse else None
    # Static groups: with act-order, a group's parameters come from the original weights so the
    # stored groups stay contiguous in the original column order (no g_idx needed to load them).
    static = options.act_order and grid.group_size > 0
    if static or grid.group_size <= 0:
        # Per-channel ranges, like static groups, are fitted once on the original weights.
        scale, zero = grids.choose_qparams(weight.float() * (~dead), grid, scale_dtype, importance)
    else:
        groups = grid.num_groups(cols)
        scale = torch.zeros(rows, groups, device=weight.device)
        zero = torch.zeros(rows, groups, device=weight.device)
    groups_of = grids.group_index(cols, width).tolist()
    scale_t, zero_t = scale.T, zero.T  # views: a group refit below shows through
    unrounded_t = torch.empty(cols, rows, device=weight.device) if keep_unrounded else None

    def round_column(col: int, upcoming: torch.Tensor) -> torch.Tensor:
        if unrounded_t is not None:
            unrounded_t[col] = upcoming[0]
        g = groups_of[col]
        if not static and grid.group_size > 0 and col % width == 0:
            # Dynamic groups (original order, so upcoming holds the group): fit the group on its
            # already-updated columns.
            group = upcoming[:width].T
            weights = None if importance is None else importance[col:col + group.shape[1]]
            s, z = grids.choose_qparams(group, whole_row_grid(grid), scale_dtype, weights)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        s, z = scale_t[g], zero_t[g]
        return (torch.clamp(torch.round(upcoming[0] / s) + z, 0, grid.maxq) - z) * s

    align = width if grid.group_size > 0 else 1  # blocks hold whole groups, as the reference's do
    weight, row_error, damp = error_feedback(weight, hessian, round_column, options, mask, align)
    unrounded = None if unrounded_t is None else unrounded_t.T.contiguous()
    return GPTQResult(weight=weight, scale=scale, zero=zero, row_error=row_error, damp=damp,
                      unrounded=unrounded)


def output_error(original: torch.Tensor, value: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum_r (v_r - w_r)^T H (v_r - w_r): the layer's squared output error over the calibration,
    the objective GPTQ-style solvers lower (reported per layer in compress.json)."""
    error = value - original
    return float(((error @ hessian.float()) * error).sum())


def whole_row_grid(grid: IntGrid) -> IntGrid:
    """The same grid with one group spanning whatever slice it is given."""
    return dataclasses.replace(grid, group_size=0)
