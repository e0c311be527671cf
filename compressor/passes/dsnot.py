"""DSnoT (Zhang et al., "Dynamic Sparse No Training"): training-free prune-and-grow on an existing mask.

An earlier pruning step (magnitude, Wanda, SparseGPT) leaves a mask; DSnoT swaps pruned and kept weights
within each output row so that the row's *expected* reconstruction error shrinks, with no backprop and
no weight update: a regrown weight gets its original (dense) value back. The per-row pruned count, and
for N:M every M-block's count, stays exactly what it was.

Notation, per input column j: mean_j and var_j of the calibration inputs, wanda_j = sqrt(E[x_j^2]).
With W the original dense weights and c_ij = W_ij * mean_j, the expected error of output i is

    eps_i = E[y_i - y_hat_i] = sum over pruned j of c_ij.

Sign convention (the one thing easy to get backwards):
  * regrowing a pruned weight g removes it from the pruned set:  eps' = eps - c_ig
  * pruning a kept weight p adds it to the pruned set:            eps'' = eps' + c_ip
So the grow step takes the pruned weight with the largest W_ij * mean_j / var_j^p when eps > 0 (its
c is most positive and cancels a positive eps) and the smallest when eps < 0. The prune step then
takes, among kept weights whose pruning moves eps' toward zero -- c_ip of the sign OPPOSITE to eps'
(the error after the grow), with |eps' + c_ip| < |eps'| -- the one with the smallest Wanda score
|W_ij| * wanda_j. A swap is applied only if it also lowers |eps| below its value before the cycle,
so |eps_i| never increases; a row with |eps_i| <= update_threshold, or with no such swap, stops for good.

N:M: the weight pruned in exchange comes from the regrown weight's own M-block; each block proposes
its best grow candidate and its matching prune candidate, and the row takes the best grow among the
blocks where such a swap exists. Unstructured masks are the same computation with one block per row.

As in the official code (zyxxmu/DSnoT), "mean_j" is the sum over tokens of x_j divided by the number
of calibration samples (the per-token mean times the sequence length), so update_threshold = 0.1
means what it means there.

Beyond the official code: after SparseGPT the kept weights carry its OBS update. They keep it here:
with W the current weights and W0 the dense ones, eps_i = sum_j (W0_ij - W_ij) * mean_j (the same
formula as above when W = W0 * mask), regrown weights come back with their dense value, and a
pruned-in-exchange weight contributes its current value. (The official code resets to W0 * mask.)
"""

from __future__ import annotations

import math

import torch

from compressor.errors import CompressorError
from compressor.passes import LinearState, check_keys
from compressor.sparsity import Pattern, parse_nm
from compressor.stats import InputStats

KEYS = {"max_cycles", "update_threshold", "power"}
DEFAULTS = {"max_cycles": 50, "update_threshold": 0.1, "power": 1.0}
_VAR_EPS = 1e-8  # guards var_j^p against constant input columns
_CHUNK_ELEMENTS = 1 << 22  # rows are independent: process them in chunks to bound memory


def needs_data(args: dict) -> bool:
    return True


def statistics(args: dict) -> set[str]:
    return {"hessian", "moments"}


def _number(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CompressorError(f"dsnot: {name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise CompressorError(f"dsnot: {name} must be >= {minimum}, got {value!r}")
    return float(value)


def _settings(args: dict) -> tuple[int, float, float]:
    check_keys("dsnot", args, KEYS)
    cycles = args.get("max_cycles", DEFAULTS["max_cycles"])
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0:
        raise CompressorError(f"dsnot: max_cycles must be an integer >= 0, got {cycles!r}")
    threshold = _number("update_threshold", args.get("update_threshold", DEFAULTS["update_threshold"]), 0.0)
    power = _number("power", args.get("power", DEFAULTS["power"]))
    return cycles, threshold, power


def validate(args: dict) -> None:
    """Fail early, before any model work, on settings this pass cannot use."""
    _settings(args)


def _block_of(pattern) -> int | None:
    """M for an N:M mask, None for unstructured; from the pattern the pruning step recorded."""
    if isinstance(pattern, Pattern):
        return pattern.block
    if pattern == "unstructured":
        return None
    if isinstance(pattern, str):
        return parse_nm(pattern)[1]
    raise CompressorError(
        f"dsnot: the pruning step before it recorded no usable sparsity pattern (got {pattern!r})"
    )


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    max_cycles, threshold, power = _settings(args)
    if layer.mask is None:
        raise CompressorError("dsnot refines a mask: put it after magnitude, wanda or sparsegpt")
    if stats is None or stats.tokens == 0:
        raise CompressorError("dsnot needs calibration data (input means and variances)")
    if layer.quant is not None:
        raise CompressorError("dsnot changes which weights are kept: put it before quantization")
    original = getattr(layer, "original", None)
    if original is None:
        raise CompressorError(f"dsnot needs the dense weights of {layer.name} to regrow pruned ones")
    if original.shape != layer.mask.shape:
        raise CompressorError(
            f"dsnot: dense weight {tuple(original.shape)} and mask {tuple(layer.mask.shape)} differ"
        )
    block = _block_of(layer.metrics.get("pattern"))
    try:
        mean = stats.column_mean()
        var = stats.column_variance()
        energy = stats.column_energy()
    except ValueError as exc:
        raise CompressorError(f"dsnot: {exc}")

    dense = original.detach().float()
    current = layer.weight.float() * layer.mask
    device = dense.device
    # The official statistic: sum over tokens / samples = per-token mean x tokens per sample.
    mean = mean.to(device, torch.float64) * (stats.tokens / max(stats.samples, 1))
    var_p = var.to(device, torch.float64).clamp_min(_VAR_EPS).pow(power)
    wanda = energy.to(device, torch.float64).clamp_min(0).sqrt()

    mask = layer.mask.to(device=device, dtype=torch.bool).clone()
    rows, cols = mask.shape
    width = block or cols
    padded = -(-cols // width) * width
    step = max(1, _CHUNK_ELEMENTS // max(padded, 1))
    cycles = swaps = 0
    for start in range(0, rows, step):
        part = slice(start, min(start + step, rows))
        keep, used, done = _refine(
            dense[part].double(), current[part].double(), mask[part], mean, var_p, wanda, width,
            threshold, max_cycles,
        )
        mask[part] = keep
        cycles, swaps = max(cycles, used), swaps + done

    # Weights kept throughout keep their current value (a SparseGPT update); regrown ones the dense.
    layer.weight = torch.where(layer.mask, current, dense) * mask
    layer.mask = mask
    layer.methods.append("dsnot")
    layer.metrics.update(dsnot_cycles=cycles, dsnot_swaps=swaps)


@torch.no_grad()
def _refine(
    dense: torch.Tensor, current: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor,
    var_p: torch.Tensor, wanda: torch.Tensor, width: int, threshold: float, max_cycles: int,
) -> tuple[torch.Tensor, int, int]:
    """Swap loop for a chunk of rows, in float64. Returns (new mask, cycles run, swaps made).

    `dense` gives the value a regrown weight comes back with, `current` (zero where pruned) the
    value a kept weight takes away when it is pruned in exchange.
    """
    rows, cols = dense.shape
    blocks = -(-cols // width)
    pad = blocks * width - cols

    def shaped(t: torch.Tensor, fill) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, pad), value=fill).reshape(t.shape[0], blocks, width)

    grow_c = dense * mean  # what regrowing j removes from eps
    prune_c = current * mean  # what pruning a kept j adds to eps
    eps = ((dense - current) * mean).sum(1)  # expected error per row
    grow_c3 = shaped(grow_c, 0.0)
    prune_c3 = shaped(prune_c, 0.0)
    grow3 = shaped(grow_c / var_p, 0.0)
    prune3 = shaped(current.abs() * wanda, 0.0)
    valid3 = shaped(torch.ones(1, cols, dtype=torch.bool, device=dense.device), False)
    keep3 = shaped(mask, False)  # padding columns are neither kept nor pruned (valid3 is False)
    offsets = torch.arange(blocks, device=dense.device) * width

    active = eps.abs() > threshold
    cycles = swaps = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        idx = active.nonzero().squeeze(1)
        e, keep = eps[idx], keep3[idx]
        pruned = ~keep & valid3
        sign = torch.where(e > 0, 1.0, -1.0).to(e.dtype)[:, None, None]
        # Grow: per block, the pruned weight whose c best cancels eps (largest sign*c/var^p).
        grow_val, grow_idx = (grow3[idx] * sign).masked_fill(~pruned, -math.inf).max(2)  # [a, blocks]
        e1 = e[:, None] - grow_c3[idx].gather(2, grow_idx[..., None]).squeeze(2)  # eps after the grow
        # Prune: kept weights in the same block whose pruning moves eps' toward zero (c opposite in
        # sign to eps') and leaves |eps''| below both |eps'| and the row's |eps| before this cycle.
        e2 = e1[..., None] + prune_c3[idx]
        bound = torch.minimum(e1.abs(), e.abs()[:, None])[..., None]
        ok = keep & valid3 & (e2.abs() < bound)
        prune_val, prune_idx = prune3[idx].masked_fill(~ok, math.inf).min(2)  # smallest Wanda score
        feasible = torch.isfinite(prune_val) & torch.isfinite(grow_val)
        best, chosen = grow_val.masked_fill(~feasible, -math.inf).max(1)  # best grow among blocks
        go = torch.isfinite(best)
        new_eps = e2.gather(2, prune_idx[..., None]).squeeze(2).gather(1, chosen[:, None]).squeeze(1)
        go &= new_eps.abs() < e.abs()  # guaranteed by `ok`; kept as the stated invariant

        rows_go = idx[go]
        grow_col = (offsets[chosen] + grow_idx.gather(1, chosen[:, None]).squeeze(1))[go]
        prune_col = (offsets[chosen] + prune_idx.gather(1, chosen[:, None]).squeeze(1))[go]
        flat = keep3.view(rows, -1)
        flat[rows_go, grow_col] = True
        flat[rows_go, prune_col] = False
        eps[rows_go] = new_eps[go]
        swaps += int(go.sum())
        # A row stops for good when no swap helped or its error is small enough.
        active[idx[~go]] = False
        active[rows_go] = eps[rows_go].abs() > threshold

    return keep3.reshape(rows, -1)[:, :cols], cycles, swaps
