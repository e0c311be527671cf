"""4-bit floating-point weights: NVFP4, MXFP4, plain E2M1, and the LLM-FP4 format/bias search.

    format: nvfp4   E2M1 codes, FP8 scale per 16 inputs, a global scale (no data needed)
            mxfp4   E2M1 codes, power-of-two scale per 32 inputs (no data needed)
            e2m1    E2M1 with the bias from the absmax of each row (or group_size columns)
            fp4     LLM-FP4 (Liu et al., 2023): per output channel the format among `formats`
                    (E3M0, E2M1, E1M2), per channel or group the exponent bias, minimising the
                    row's output error on the calibration inputs
    act_bits: 8 | 4 (fp4, e2m1) also quantize the inputs, simulated (activation_search)
    gptq: true      after the scales / formats / biases are fixed, round the columns in GPTQ's
                    error-feedback loop on the same grid (act_order, damp as in GPTQ)

The LLM-FP4 search follows the paper's candidate set: for each format, the largest value swept over
linspace(0.01, 1.2, steps) x the absmax (each fixes a bias). Its objective, the mean squared error
of a row's output, is exactly d H d^T for the row's weight error d (H = 2/N X^T X), so rows are
searched independently. Scoring every candidate that way costs a matmul each; instead all are
screened with H's diagonal, and the `refine` best plus the plain E2M1 choice are scored exactly.
The plain choice among them means the search is never worse than `e2m1` on any row.
"""

from __future__ import annotations

import torch

from compressor import fpgrids
from compressor.errors import CompressorError
from compressor.fpgrids import E2M1, ROW_FORMATS, FloatFormat
from compressor.passes import FloatWeight, LinearState, check_keys, gptq
from compressor.passes.gptq import GPTQOptions
from compressor.stats import InputStats

KEYS = {"format", "group_size", "formats", "steps", "refine", "act_bits", "gptq", "act_order", "damp"}
DEFAULTS = {"format": "nvfp4", "group_size": 0, "formats": ["E3M0", "E2M1", "E1M2"], "steps": 100,
            "refine": 4, "act_bits": None, "gptq": False}
MAX_SHIFT = 8  # largest per-channel pre-shift of an activation channel (x 2^8)


def _settings(args: dict) -> dict:
    settings = {**DEFAULTS, **args}
    settings["grid"] = fpgrids.float_grid(settings["format"], settings["group_size"])
    formats = settings["formats"]
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    if not formats:
        raise CompressorError("fp4: formats must name at least one of E3M0, E2M1, E1M2")
    settings["formats"] = [fpgrids.parse_format(f.strip()) for f in formats]
    for key in ("steps", "refine"):
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CompressorError(f"fp4: {key} must be a positive integer, got {value!r}")
    if settings["act_bits"] is not None:
        if settings["act_bits"] not in fpgrids.ACT_FORMATS:
            raise CompressorError(f"act_bits must be 4 or 8, got {settings['act_bits']!r}")
        if settings["grid"].format not in ("fp4", "e2m1"):
            raise CompressorError("activation quantization (act_bits) needs format fp4 or e2m1")
    if not isinstance(settings["gptq"], bool):
        raise CompressorError(f"fp4: gptq must be true or false, got {settings['gptq']!r}")
    if not settings["gptq"] and ({"act_order", "damp"} & set(args)):
        raise CompressorError("fp4: act_order and damp apply only with gptq: true")
    settings["gptq_options"] = GPTQOptions.from_args(settings)
    return settings


def needs_data(args: dict) -> bool:
    fmt = str(args.get("format", DEFAULTS["format"])).lower()
    return fmt == "fp4" or args.get("act_bits") is not None or bool(args.get("gptq"))


def statistics(args: dict) -> set[str]:
    return {"hessian", "samples"} if args.get("act_bits") is not None else {"hessian"}


def validate(args: dict) -> None:
    """Fail early, before any model work, on settings this pass cannot use."""
    check_keys("fp4", args, KEYS)
    _settings(args)


def output_grid(args: dict) -> fpgrids.FloatGrid:
    """The grid the weights end on (what the writer will store)."""
    return _settings(args)["grid"]


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    compress_many([layer], stats, args)


def compress_many(layers: list[LinearState], stats: InputStats | None, args: dict) -> None:
    """Linears that share an input ([q,k,v], [gate,up]) share its activation quantizer, as one
    quantized tensor would feed them all, and the Hessian."""
    settings = _settings(args)
    grid = settings["grid"]
    needs_stats = grid.format == "fp4" or settings["act_bits"] is not None or settings["gptq"]
    if needs_stats and (stats is None or stats.tokens == 0):
        raise CompressorError(f"{grid.format} with these settings needs calibration data")
    activation = hessian = None
    if settings["act_bits"] is not None:
        weights = torch.cat([layer.weight.float() for layer in layers])
        activation = activation_search(stats.sample_rows(), weights, settings["act_bits"], settings["steps"])
    if grid.format == "fp4" or settings["gptq"]:
        hessian = stats.hessian()
        if activation is not None:  # the layers now see x * 2^shift
            multiplier = torch.exp2(activation["shift"].float())
            hessian = hessian * multiplier[:, None] * multiplier[None, :]
    for layer in layers:
        _compress_one(layer, hessian, settings, activation)


def _compress_one(layer: LinearState, hessian, settings: dict, activation: dict | None) -> None:
    grid = settings["grid"]
    w = layer.weight.float()
    global_scale = row_format = None
    if grid.format == "nvfp4":
        scale, global_scale = fpgrids.nvfp4_qparams(w)
    elif grid.format == "mxfp4":
        scale = fpgrids.mxfp4_qparams(w)
    else:
        width = _group_width(w.shape[1], grid.block)
        if activation is not None:
            w = w * torch.exp2(-activation["shift"].float())  # the pre-shift, folded into the columns
        if grid.format == "fp4":
            row_format, bias = search(w, hessian, settings["formats"], width,
                                      settings["steps"], settings["refine"])
        else:
            row_format = torch.full((w.shape[0],), ROW_FORMATS.index(E2M1), dtype=torch.uint8)
            bias = fpgrids.default_bias(E2M1, _group_absmax(w, width))
        scale = torch.exp2(-bias).float()  # [out, groups]: a real bias is a scale
    if settings["gptq"]:
        round_column = _column_rounder(grid.format, scale, global_scale, row_format, w.shape[1])
        w, _, damp = gptq.error_feedback(w, hessian, round_column, settings["gptq_options"], layer.mask)
        layer.metrics["gptq_damp"] = damp
    if grid.format == "nvfp4":
        codes = fpgrids.block_quantize(w, scale / global_scale)
    elif grid.format == "mxfp4":
        codes = fpgrids.block_quantize(w, fpgrids.mx_scale(scale))
    else:
        codes = fpgrids.row_quantize(w, row_format, scale)
    if layer.mask is not None:
        codes = codes.where(layer.mask, torch.zeros_like(codes))  # code 0 is +0 in every format
    quant = FloatWeight(grid=grid, codes=codes, scale=scale, global_scale=global_scale,
                        row_format=row_format)
    if activation is not None:
        quant.act_bits = settings["act_bits"]
        quant.act_format, quant.act_bias = activation["format"], activation["bias"]
        quant.act_shift = activation["shift"]
        layer.metrics["act_format"] = fpgrids.ACT_FORMATS[quant.act_bits][quant.act_format].name
    layer.weight = dequantize(quant)
    if activation is not None:
        # The stored weight carries 2^-shift in its columns and the loader's input quantizer
        # multiplies x by 2^shift. Powers of two are exact, so the model in memory keeps the
        # unshifted weight: the pipeline's later layers see the layer without its input rounding
        # (which only a hook could add), and nothing else changes.
        layer.weight = layer.weight * torch.exp2(activation["shift"].float())
    layer.quant = quant
    layer.methods.append("fp4+gptq" if settings["gptq"] else "fp4")
    if row_format is not None:
        counts = torch.bincount(row_format.long(), minlength=len(ROW_FORMATS)).tolist()
        layer.metrics["fp4_rows"] = {f.name: n for f, n in zip(ROW_FORMATS, counts, strict=True)}


def dequantize(quant: FloatWeight) -> torch.Tensor:
    """The float32 weight a loader reconstructs from the stored codes and scales."""
    fmt = quant.grid.format
    if fmt == "nvfp4":
        # compressed-tensors dequantizes NVFP4 in bfloat16 (E2M1 x FP8 / global scale), and so
        # must we for the reloaded checkpoint to compute what this model computes. MXFP4's
        # E2M1 x 2^k is exact in bfloat16 already.
        weight = fpgrids.block_dequantize(quant.codes, quant.scale / quant.global_scale)
        return weight.to(torch.bfloat16).float()
    if fmt == "mxfp4":
        return fpgrids.block_dequantize(quant.codes, fpgrids.mx_scale(quant.scale))
    return fpgrids.row_dequantize(quant.codes, quant.row_format, quant.scale)


def _column_rounder(fmt: str, scale: torch.Tensor, global_scale, row_format,
                    columns: int) -> gptq.ColumnRounder:
    """One column onto the fixed grid, as dequantize() will reconstruct it (for GPTQ's loop)."""
    if fmt in ("nvfp4", "mxfp4"):
        effective = scale / global_scale if fmt == "nvfp4" else fpgrids.mx_scale(scale)
        block = 16 if fmt == "nvfp4" else 32
        exact = torch.bfloat16 if fmt == "nvfp4" else torch.float32  # see dequantize()

        def round_column(col: int, upcoming: torch.Tensor) -> torch.Tensor:
            s = effective[:, col // block, None]
            codes = fpgrids.block_quantize(upcoming[0, :, None], s)
            return fpgrids.block_dequantize(codes, s).to(exact).float()[:, 0]

        return round_column
    width = columns // scale.shape[1]

    def round_column_row_formats(col: int, upcoming: torch.Tensor) -> torch.Tensor:
        s = scale[:, col // width, None]
        codes = fpgrids.row_quantize(upcoming[0, :, None], row_format, s)
        return fpgrids.row_dequantize(codes, row_format, s)[:, 0]

    return round_column_row_formats


def _group_width(in_features: int, group_size: int) -> int:
    if group_size <= 0 or group_size >= in_features:
        return in_features
    if in_features % group_size:
        raise CompressorError(
            f"{in_features} input columns are not a multiple of the group size {group_size}")
    return group_size


def _group_absmax(w: torch.Tensor, width: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, width).abs().amax(-1).clamp(min=1e-12)


def _error(w: torch.Tensor, row_format: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Weight error d = Q(w) - w of a configuration, exactly as it will be stored."""
    scale = torch.exp2(-bias).float()
    return fpgrids.row_dequantize(fpgrids.row_quantize(w, row_format, scale), row_format, scale) - w


def search(
    w: torch.Tensor, hessian: torch.Tensor, formats: list[FloatFormat], group_size: int = 0,
    steps: int = 100, refine: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-FP4's search: per row a format, per (row, group) a bias, minimising the row's output
    error d H d^T. Returns (index into ROW_FORMATS, uint8 [out]; bias, float64 [out, groups]).

    1. Screen: for every format and largest value (absmax x linspace(0.01, 1.2, steps)), coarse
       to fine, the error of each (row, group) weighted by H's diagonal.
    2. Format per row: the exact row error of each format at its screened biases, and of plain
       E2M1 at the absmax bias; the least wins.
    3. Bias per group, in turn: the `refine` best screened biases and the absmax one, scored by
       the exact change of the row error (cross-group terms of H included); the best is kept.
    """
    rows, cols = w.shape
    width = _group_width(cols, group_size)
    groups = cols // width
    absmax = _group_absmax(w, width)
    factors = torch.linspace(0.01, 1.2, steps, dtype=torch.float64)
    diagonal = hessian.diagonal().float().reshape(groups, width)
    w_groups = w.reshape(rows, groups, width)
    shortlist = {}  # format index -> factor indices [refine, rows, groups], best first
    for fmt in formats:
        def screen(index: torch.Tensor, fmt=fmt) -> torch.Tensor:
            """Diagonal-weighted error of each (row, group) at factor index [rows, groups]."""
            bias = fpgrids.default_bias(fmt, absmax * factors[index]).float().unsqueeze(-1)
            error = fpgrids.fp_round_fast(w_groups, fmt, bias) - w_groups
            return (error.square() * diagonal).sum(-1)

        # Every 5th candidate, then the 9 around each (row, group)'s best of those: the error is
        # close to unimodal in the largest value, and this is a third of the work of all of them.
        stride = 5 if steps > 25 else 1
        tried = [torch.full((rows, groups), j) for j in range(0, steps, stride)]
        errors = [screen(index) for index in tried]
        coarse = torch.stack(tried)[torch.stack(errors).argmin(0), torch.arange(rows)[:, None],
                                    torch.arange(groups)[None, :]]
        for offset in range(-4, 5) if stride > 1 else ():
            tried.append((coarse + offset).clamp(0, steps - 1))
            errors.append(screen(tried[-1]))
        best = torch.stack(errors).topk(min(refine, len(errors)), 0, largest=False).indices
        shortlist[ROW_FORMATS.index(fmt)] = torch.stack(tried).gather(0, best)

    def bias_of(index: int, factor: torch.Tensor) -> torch.Tensor:
        return fpgrids.default_bias(ROW_FORMATS[index], absmax * factor)

    def row_error(d: torch.Tensor) -> torch.Tensor:
        return ((d @ hessian) * d).sum(1).double()

    plain = ROW_FORMATS.index(E2M1)
    best_format = torch.full((rows,), plain, dtype=torch.uint8)
    best_bias = bias_of(plain, torch.ones(1, dtype=torch.float64))
    best_error = row_error(_error(w, best_format, best_bias))
    for index, top in shortlist.items():
        row_format = torch.full((rows,), index, dtype=torch.uint8)
        bias = bias_of(index, factors[top[0]])
        error = row_error(_error(w, row_format, bias))
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_format = torch.where(better, row_format, best_format)
        best_bias = torch.where(better.unsqueeze(1), bias, best_bias)

    # Coordinate descent over groups; each row keeps its format. With one group this is an exact
    # comparison of the shortlisted biases.
    d = _error(w, best_format, best_bias)
    hd = d @ hessian
    for g in range(groups):
        cols_g = slice(g * width, (g + 1) * width)
        h_gg = hessian[cols_g, cols_g]
        candidates = [torch.ones(rows, dtype=torch.float64)]
        for slot in range(min(refine, steps)):
            factor = torch.ones(rows, dtype=torch.float64)  # rows in a format not searched
            for index, top in shortlist.items():
                mine = best_format == index
                factor[mine] = factors[top[slot, mine, g]]
            candidates.append(factor)
        for factor in candidates:
            bias = best_bias.clone()
            for index in shortlist.keys() | {plain}:
                mine = best_format == index
                bias[mine, g] = fpgrids.default_bias(ROW_FORMATS[index], absmax[mine, g] * factor[mine])
            delta = (_error(w[:, cols_g], best_format, bias[:, g: g + 1]) - d[:, cols_g])
            change = (2 * (delta * hd[:, cols_g]).sum(1) + ((delta @ h_gg) * delta).sum(1)).double()
            better = change < -1e-12 * best_error.abs()
            if better.any():
                best_bias[better, g] = bias[better, g]
                d[better, cols_g] += delta[better]
                hd[better] += delta[better] @ hessian[cols_g, :]
                best_error = best_error + torch.where(better, change, torch.zeros_like(change))
    return best_format, best_bias


def activation_search(samples: torch.Tensor, weight: torch.Tensor, bits: int, steps: int = 100) -> dict:
    """LLM-FP4's activation quantizer for the linears sharing an input (weight: their rows
    stacked): a per-tensor format and exponent bias, after a per-channel pre-shift by a power of two.

    Activation outliers sit in a few channels; LLM-FP4 gives each channel its own bias, split into
    one real-valued tensor bias and an integer per-channel offset that is moved into the weight's
    column (x_c * 2^s_c times W[:, c] * 2^-s_c leaves the product unchanged). Here s_c scales each
    channel's largest value into the top binade of the tensor's largest; the tensor bias and the
    format are then searched over largest values absmax x linspace(0.01, 1.2, steps) to minimise
    the output error, approximated by the squared activation error weighted by each column's
    energy in the shifted weight (cross-channel terms dropped: one matmul per candidate saved).
    """
    x = samples.float()
    channel_max = x.abs().amax(0).clamp(min=1e-8)
    shift = torch.floor(torch.log2(channel_max.max() / channel_max)).clamp(0, MAX_SHIFT)
    x = x * torch.exp2(shift)
    column_energy = (weight.float() * torch.exp2(-shift)).square().sum(0)
    absmax = float(x.abs().max().clamp(min=1e-8))
    factors = torch.linspace(0.01, 1.2, steps).tolist()
    best = (float("inf"), 0, 0.0)
    for index, fmt in enumerate(fpgrids.ACT_FORMATS[bits]):
        def error_at(j: int, fmt=fmt) -> tuple[float, float]:
            bias = float(fpgrids.default_bias(fmt, torch.tensor(absmax * factors[j])))
            error = ((fpgrids.fp_round_fast(x, fmt, bias) - x).square().sum(0) * column_energy).sum()
            return float(error), bias

        # Every 5th candidate, then all candidates around the best of those (the error is close
        # to unimodal in the largest value): a fifth of the work.
        coarse = min(range(0, steps, 5), key=lambda j: error_at(j)[0])
        for j in range(max(coarse - 4, 0), min(coarse + 5, steps)):
            error, bias = error_at(j)
            if error < best[0]:
                best = (error, index, bias)
    return {"format": best[1], "bias": best[2], "shift": shift.to(torch.int8)}

