"""Learned lookup tables (`--format lut4|lut3`, compressor.lutgrids): GPTQ (or round to nearest) onto
per-row tables of 2^bits values that were learned for the layer.

Per linear, on its original weights: a float16 scale per group of columns (the group's largest
magnitude), then each row's table by k-means of w / scale weighted by the input's importance (the
diagonal of the layer's input Hessian, as any4 weights by activations). GPTQ then rounds column by
column onto those fixed tables, pushing each column's error onto the columns not yet rounded; once
the codes are chosen, each table is refitted in closed form for the least output error in the metric
of H (lutgrids.refit_tables: lower layer error than the k-means table, up to float16 rounding).
`solver: rtn` is data-free: unweighted k-means and nearest values.

Settings: format (lut4 | lut3), group_size (columns per scale, default 64; 0 = per row), table_rows
(rows sharing a table, default 1), solver (gptq | rtn), damp, act_order, blocksize, refit.
"""

from __future__ import annotations

import torch

from compressor import lutgrids
from compressor.errors import CompressorError
from compressor.lutgrids import LutGrid
from compressor.passes import LinearState, LutWeight, check_keys
from compressor.passes.gptq import GPTQOptions, error_feedback, output_error
from compressor.stats import InputStats

KEYS = {"format", "group_size", "table_rows", "solver", "damp", "act_order", "blocksize", "refit"}
SOLVERS = ("gptq", "rtn")


def validate(args: dict) -> None:
    check_keys("lut", args, KEYS)
    lutgrids.parse_grid(args)
    if args.get("solver", "gptq") not in SOLVERS:
        raise CompressorError(f"lut: solver must be gptq or rtn, got {args.get('solver')!r}")
    GPTQOptions.from_args(args)


def needs_data(args: dict) -> bool:
    return args.get("solver", "gptq") == "gptq"


def output_grid(args: dict) -> LutGrid:
    return lutgrids.parse_grid(args)


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    compress_many([layer], stats, args)


def compress_many(layers: list[LinearState], stats: InputStats | None, args: dict) -> None:
    """Linears of one input share its Hessian: their rows are stacked for one GPTQ column loop (rows
    are independent given H); scales and tables are fitted per linear."""
    grid = lutgrids.parse_grid(args)
    solver = args.get("solver", "gptq")
    if solver == "gptq" and (stats is None or stats.tokens == 0):
        raise CompressorError("lut with solver gptq needs calibration data")
    for layer in layers:
        if layer.mask is not None:
            raise CompressorError(f"{layer.name}: lookup tables after pruning are not supported")
    if len({layer.weight.shape[1] for layer in layers}) > 1:  # data-free: a whole block at once
        for layer in layers:
            compress_many([layer], stats, args)
        return
    options = GPTQOptions.from_args(args)
    hessian = stats.hessian() if solver == "gptq" else None
    importance = hessian.diagonal().float() if hessian is not None else None
    originals = [layer.weight.float() for layer in layers]
    scales = [lutgrids.fit_scales(w, grid) for w in originals]
    tables = [lutgrids.fit_tables(w, s, grid, importance) for w, s in zip(originals, scales, strict=True)]
    if solver == "gptq":
        w = torch.cat(originals)
        codes_t = torch.empty(w.shape[1], w.shape[0], dtype=torch.uint8)
        row_tables = torch.cat([lutgrids.row_tables(t, o.shape[0], grid) for t, o in zip(tables, originals,
                                                                                           strict=True)])
        rounder = lutgrids.column_rounder(torch.cat(scales), row_tables, grid, codes_t)
        _, _, damp = error_feedback(w, hessian, rounder, options)
        codes = list(codes_t.T.split([o.shape[0] for o in originals]))
        damped = hessian + damp * hessian.diagonal().mean() * torch.eye(len(hessian))
    else:
        codes = [lutgrids.round_to(w, s, t, grid) for w, s, t in zip(originals, scales, tables, strict=True)]
    for i, layer in enumerate(layers):
        metrics = {}
        if solver == "gptq":
            kmeans_values = lutgrids.values(codes[i], scales[i], tables[i], grid)
            before = output_error(originals[i], kmeans_values, hessian)
            if args.get("refit", True):
                refitted = lutgrids.refit_tables(originals[i], codes[i], scales[i], grid, damped)
                tables[i], codes[i] = lutgrids.sort_tables(refitted, codes[i].contiguous(), grid)
            metrics = {"gptq_damp": damp, "lut_output_error_before_refit": before}
        layer.weight = lutgrids.values(codes[i], scales[i], tables[i], grid)
        layer.quant = LutWeight(grid=grid, codes=codes[i].contiguous(), scale=scales[i].to(torch.float16),
                                table=tables[i].to(torch.float16),
                                act_order=solver == "gptq" and options.act_order)
        layer.methods.append(f"{grid.format}+{solver}")
        if hessian is not None:
            metrics["lut_output_error"] = output_error(originals[i], layer.weight, hessian)
        layer.metrics.update(metrics)

