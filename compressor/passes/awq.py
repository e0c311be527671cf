"""AWQ's activation-aware scaling (Lin et al., 2024), folded into the weights before they are rounded.

Input channels that carry large activations matter more to the output. Scaling such a channel's
weight column up by s (and its input down by 1/s, folded into whatever produces the input: the
RMSNorm's gain before q/k/v and gate/up, up_proj's rows before down_proj) leaves the dense model's
function unchanged but gives those weights a finer share of the grid. Per sub-group of linears
that read the same input, one scale per input channel:

    s = a^alpha / w^(1 - alpha), normalised to a geometric mean of 1

where a is the channel's activation magnitude (root mean square over the calibration tokens) and
w its weights' mean magnitude relative to their group's largest (AutoAWQ's "duo scaling"). Alpha
is searched on a grid in [0, 1) for the least output error of the sub-group's linears after
round-to-nearest on the grid that follows,

    sum over linears of tr((Q(W diag s) diag(1/s) - W) H (...)^T),   H = the inputs' X^T X,

which is the exact mean squared output error over the calibration tokens (AWQ measures it by
running the quantized modules; with the Hessian in hand this needs no forward). Identity scaling
is a candidate too, so the pass never raises that error. The scaled weights and the Hessian of the
scaled inputs are handed to the next step (GPTQ or RTN), so the pair is "AWQ + GPTQ".

Settings: the grid keys of the quantization that follows (bits, group_size, symmetric,
full_range), `grid` (alpha values tried, default 20) and `duo` (weight term, default true).
"""

from __future__ import annotations

import torch

from compressor import grids
from compressor.errors import CompressorError
from compressor.passes import QUANT_KEYS, LinearState, Scope, check_keys, grid_from_args
from compressor.stats import InputStats

SCOPE = Scope.SUBGROUP


def needs_data(args: dict) -> bool:
    return True


def validate(args: dict) -> None:
    check_keys("awq", args, QUANT_KEYS | {"grid", "duo"})
    grid_from_args(args)
    points = args.get("grid", 20)
    if not isinstance(points, int) or isinstance(points, bool) or not 1 <= points <= 100:
        raise CompressorError(f"awq: grid must be an integer from 1 to 100, got {points!r}")


def statistics(args: dict) -> set[str]:
    return {"hessian"}


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    compress_many([layer], stats, args)


def output_error(weights: list[torch.Tensor], rounded: list[torch.Tensor], hessian: torch.Tensor) -> float:
    """sum_l tr((R_l - W_l) H (R_l - W_l)^T): the linears' output error summed over the tokens
    (H = 2/N X^T X, so this is twice the mean squared error per token)."""
    total = 0.0
    for w, r in zip(weights, rounded, strict=True):
        delta = r - w
        total += float(((delta @ hessian) * delta).sum())
    return total


def candidate_scales(activation: torch.Tensor, weights: list[torch.Tensor], grid: grids.IntGrid,
                     points: int, duo: bool) -> list[tuple[float, torch.Tensor]]:
    """(alpha, per-channel scale) for alpha = 0, 1/points, ..., (points - 1)/points."""
    stacked = torch.cat(weights)
    width = grid.group_width(stacked.shape[1])
    index = grids.group_index(stacked.shape[1], width)
    _, peak = grids.group_min_max(stacked.abs(), width)
    relative = stacked.abs() / peak.clamp(min=1e-12)[:, index]
    weight_term = relative.mean(0).clamp(min=1e-6)
    activation = activation.clamp(min=1e-6)
    candidates = []
    for step in range(points):
        alpha = step / points
        s = activation.pow(alpha) / (weight_term.pow(1 - alpha) if duo else 1.0)
        s = s / (s.max() * s.min()).sqrt()
        candidates.append((alpha, s.clamp(min=1e-4)))
    return candidates


def rtn_after_scaling(weight: torch.Tensor, scale: torch.Tensor, grid: grids.IntGrid) -> torch.Tensor:
    """Round W diag(s) to nearest on the grid and undo the scaling: what the layer computes on x."""
    scaled = weight * scale[None, :]
    q_scale, zero = grids.choose_qparams(scaled, grid, torch.float32)
    return grids.fake_quantize(scaled, q_scale, zero, grid) / scale[None, :]


def compress_many(layers: list[LinearState], stats: InputStats | None, args: dict) -> None:
    if stats is None:
        raise CompressorError("awq needs calibration data")
    grid = grid_from_args(args)
    if not stats.foldable:  # nothing to fold 1/s into (o_proj's attention input): leave it
        for layer in layers:
            layer.methods.append("awq")
            layer.metrics.update(awq_alpha="no producer")
        return
    hessian = stats.hessian()
    weights = [layer.weight for layer in layers]
    activation = (hessian.diagonal() / 2).clamp(min=0).sqrt()  # RMS of each input channel
    ones = torch.ones_like(activation)
    best_alpha, best_scale = None, ones
    best = output_error(weights, [rtn_after_scaling(w, ones, grid) for w in weights], hessian)
    identity = best
    for alpha, scale in candidate_scales(activation, weights, grid, int(args.get("grid", 20)),
                                         bool(args.get("duo", True))):
        error = output_error(weights, [rtn_after_scaling(w, scale, grid) for w in weights], hessian)
        if error < best:
            best, best_alpha, best_scale = error, alpha, scale
    for layer in layers:
        layer.methods.append("awq")
        layer.metrics.update(awq_alpha=best_alpha if best_alpha is not None else "identity",
                             awq_rtn_error_before=identity, awq_rtn_error_after=best)
    if best_alpha is None:
        return
    for layer in layers:
        layer.weight = layer.weight * best_scale[None, :]
    stats.scale_inputs_(best_scale)
