"""PTQ1.61 (Zhao et al., 2025), the part that sees one sub-group: pick the salient input channels,
binarise the rest, round the salient ones to 4 bits (compressor.binarygrids). The block
reconstruction that follows (compressor.passes.reconstruct) then learns every row's and column's
numbers against the dense block's output, as PTQ1.61's block-wise optimisation, and with `train:
rounding` (`--method ptq161`'s default) the signs and codes too, from the values this pass kept
just before it binarised or rounded each weight (LinearState.unrounded).

Per sub-group (linears that read one input, so one mask for all of them): the `salient` fraction of
input channels with the largest calibration |x| is kept at 4 bits. Every row's binary values are
beta +- alpha, fitted on its non-salient weights (their mean, and the mean distance to it). Unlike
the paper, which rounds each part on its own, the columns are rounded GPTQ-style (`solver: gptq`):
the binarised columns first, each one's error pushed onto the columns not yet rounded, so the
salient columns, last, absorb the binarisation error and are then rounded to 4 bits on a per-row
grid fitted to their compensated values, again with error feedback (on their own sub-Hessian). Last,
each row's four numbers (scale, low, alpha, beta) are refitted in closed form for the least output
error in the metric of H, codes and signs fixed (refit_rows). `solver: rtn` binarises and rounds
each weight on its own (the paper's initialisation); the mask still needs calibration inputs.

Settings: salient (fraction, default 0.2), salient_bits (4), solver (gptq | rtn), damp, blocksize.
"""

from __future__ import annotations

import torch

from compressor import binarygrids
from compressor.binarygrids import BinaryGrid
from compressor.errors import CompressorError
from compressor.passes import BinaryWeight, LinearState, check_keys
from compressor.passes.gptq import GPTQOptions, error_feedback, output_error
from compressor.stats import InputStats

KEYS = {"salient", "salient_bits", "solver", "damp", "blocksize"}
SOLVERS = ("gptq", "rtn")


def validate(args: dict) -> None:
    check_keys("ptq161", args, KEYS)
    binarygrids.parse_grid(args)
    if args.get("solver", "gptq") not in SOLVERS:
        raise CompressorError(f"ptq161: solver must be gptq or rtn, got {args.get('solver')!r}")
    GPTQOptions.from_args(args)


def needs_data(args: dict) -> bool:
    return True  # the salient channels come from the calibration inputs


def statistics(args: dict) -> set[str]:
    return {"hessian", "absmax"}


def output_grid(args: dict) -> BinaryGrid:
    return binarygrids.parse_grid(args)


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    compress_many([layer], stats, args)


def compress_many(layers: list[LinearState], stats: InputStats | None, args: dict) -> None:
    """Linears of one input share its mask and Hessian: their rows are stacked for one solve (rows
    are independent given H)."""
    grid = binarygrids.parse_grid(args)
    if stats is None or stats.tokens == 0:
        raise CompressorError("ptq161 needs calibration data (its salient channels come from the inputs)")
    for layer in layers:
        if layer.mask is not None:
            raise CompressorError(f"{layer.name}: ptq161 after pruning is not supported")
    mask = binarygrids.salient_columns(stats.column_absmax(), grid)
    weight = torch.cat([layer.weight.float() for layer in layers])
    hessian = stats.hessian().float()
    beta, alpha = binarygrids.fit_binary(weight[:, ~mask])
    metrics = {}
    unrounded = None
    if args.get("solver", "gptq") == "gptq":
        signs, codes, scale, low, damp, unrounded = _error_fed(weight, hessian, mask, beta, alpha, grid,
                                                               GPTQOptions.from_args(args),
                                                               layers[0].keep_unrounded)
        metrics["gptq_damp"] = damp
    else:
        signs = binarygrids.binarize(weight[:, ~mask], beta)
        scale, low = binarygrids.fit_salient(weight[:, mask], grid.salient_bits)
        codes = binarygrids.round_salient(weight[:, mask], scale, low, grid.salient_bits)
    column = torch.ones(int((~mask).sum()))
    row = torch.stack([scale, low, alpha, beta], 1)
    before = output_error(weight, binarygrids.values(mask, codes, signs, row, column), hessian)
    row = refit_rows(weight, mask, codes, signs, column, hessian)
    value = binarygrids.values(mask, codes, signs, row, column)
    sizes = [layer.weight.shape[0] for layer in layers]
    kept = unrounded.split(sizes) if unrounded is not None else [None] * len(layers)
    for layer, w, v, c, s, r, fed in zip(layers, weight.split(sizes), value.split(sizes),
                                            codes.split(sizes), signs.split(sizes), row.split(sizes), kept,
                                            strict=True):
        layer.weight = v.clone()
        layer.unrounded = fed  # each weight just before it was binarised or rounded
        layer.quant = BinaryWeight(grid=grid, mask=mask.clone(), codes=c.contiguous(), signs=s.contiguous(),
                                   row=r.to(torch.float16), column=column.to(torch.float16))
        layer.methods.append(f"{grid.format}+{args.get('solver', 'gptq')}")
        layer.metrics.update(metrics, salient_channels=int(mask.sum()),
                             ptq161_output_error=output_error(w, v, hessian))
    layers[0].metrics["ptq161_output_error_before_refit"] = before  # the sub-group's, stacked


def _error_fed(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor,
               alpha: torch.Tensor, grid: BinaryGrid, options: GPTQOptions, keep_unrounded: bool = False):
    """GPTQ's column loop (compressor.passes.gptq.error_feedback): binarised columns first (by
    descending H diagonal), their errors fed onto the rest; then the compensated salient columns
    onto a per-row 4-bit grid fitted to them, with error feedback on their own sub-Hessian.
    `keep_unrounded` also returns every weight as it was just before it was binarised or rounded
    (what block reconstruction learns the signs and codes of), else None."""
    diagonal = hessian.diagonal()
    binary_columns, salient = (~mask).nonzero().squeeze(1), mask.nonzero().squeeze(1)
    order = torch.cat([binary_columns[diagonal[binary_columns].argsort(descending=True)], salient])
    n = len(binary_columns)
    rows = weight.shape[0]
    high, low_value = beta + alpha, beta - alpha
    signs_t = torch.empty(n, rows, dtype=torch.bool)
    unrounded_t = torch.empty(len(mask), rows) if keep_unrounded else None  # by position in `order`

    def binarize_column(col: int, upcoming: torch.Tensor) -> torch.Tensor:
        if col >= n:
            return upcoming[0]  # a salient column: left for the second solve, no error to feed
        if unrounded_t is not None:
            unrounded_t[col] = upcoming[0]
        positive = upcoming[0] >= beta
        signs_t[col] = positive
        return torch.where(positive, high, low_value)

    plain = GPTQOptions(damp=options.damp, act_order=False, blocksize=options.blocksize)
    fed, _, damp = error_feedback(weight[:, order], hessian[order[:, None], order[None, :]], binarize_column,
                                  plain)
    # Back to column order (signs are stored so): position of each column among the binary ones.
    position = torch.empty(len(mask), dtype=torch.long)
    position[binary_columns] = torch.arange(n)
    signs = torch.empty_like(signs_t)
    signs[position[order[:n]]] = signs_t
    signs = signs.T.contiguous()
    compensated = fed[:, n:]  # the salient columns, in column order
    scale, low = binarygrids.fit_salient(compensated, grid.salient_bits)
    codes_t = torch.empty(len(salient), rows, dtype=torch.uint8)

    def round_salient(col: int, upcoming: torch.Tensor) -> torch.Tensor:
        if unrounded_t is not None:
            unrounded_t[n + col] = upcoming[0]
        code = binarygrids.round_salient(upcoming[:1].T, scale, low, grid.salient_bits)[:, 0]
        codes_t[col] = code
        return code.float() * scale + low

    error_feedback(compensated, hessian[salient[:, None], salient[None, :]], round_salient,
                   GPTQOptions(damp=options.damp, act_order=True, blocksize=options.blocksize))
    unrounded = None
    if unrounded_t is not None:
        unrounded = torch.empty(rows, len(mask))
        unrounded[:, order] = unrounded_t.T
    return signs, codes_t.T.contiguous(), scale, low, damp, unrounded


def refit_rows(weight: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor, signs: torch.Tensor,
               column: torch.Tensor, hessian: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Each row's (scale, low, alpha, beta), float16 values, that minimise its output error
    (w_r - v_r)^T H (w_r - v_r) with codes and signs fixed: v_r = A_r x_r is linear in the four
    numbers, so each row is one 4 x 4 least-squares solve (A_r^T H A_r) x_r = A_r^T H w_r."""
    rows, cols = weight.shape
    solution = torch.empty(rows, 4)
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        basis = torch.zeros(part.stop - part.start, cols, 4)
        basis[:, mask, 0] = codes[part].float()
        basis[:, mask, 1] = 1.0
        basis[:, ~mask, 2] = (signs[part].float() * 2 - 1) * column.float()
        basis[:, ~mask, 3] = column.float()
        h_basis = torch.einsum("ij,rjk->rik", hessian, basis)
        system = basis.transpose(1, 2) @ h_basis
        rhs = torch.einsum("rjk,rj->rk", h_basis, weight[part].float())
        # A part with no columns (no salient channel) has an empty row: a ridge keeps it solvable.
        diagonal = system.diagonal(dim1=1, dim2=2)
        ridge = 1e-6 * diagonal.abs().mean(-1, keepdim=True).clamp_min(1e-30)
        system = system + torch.diag_embed(ridge.expand_as(diagonal) + (diagonal == 0) * 1.0)
        solution[part] = torch.linalg.solve(system, rhs)
    # An unused number keeps a harmless value: scale 1 without salient channels.
    if not mask.any():
        solution[:, 0] = 1.0
    return binarygrids.half(solution)

