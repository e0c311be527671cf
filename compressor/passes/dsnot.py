"""DSnoT (Zhang et al., "Dynamic Sparse No Training"): training-free prune-and-grow on an existing mask.

An earlier pruning step (magnitude, Wanda, SparseGPT) leaves a mask; DSnoT swaps pruned and kept weights
within each output row so that the row's reconstruction error shrinks, with no backprop and no weight
update: a regrown weight gets its original (dense) value back. The per-row pruned count, and for N:M
every M-block's count, stays exactly what it was. Each cycle makes at most one swap (one grow, one
prune in the same M-block) per row; a row that finds no useful swap stops for good; at most max_cycles.

Two criteria pick the swaps (`criterion`):

* "error" (default): the row's reconstruction error on the calibration inputs,
      err_i = E[(d_i . x)^2] = (E[d_i . x])^2 + Var[d_i . x] = d_i H d_i^T,
  where d_i = W0_i - W_i is what the row is missing (W0 dense, W current) and H = E[x x^T] the
  layer's input second moments, i.e. DSnoT's expected error and its variance term together, exactly.
  Per block it grows the pruned weight whose return lowers err_i most and prunes, in exchange, the
  kept weight of the same block that raises it least; the swap is made only if err_i drops. So err_i
  never increases: on SmolLM2-135M the paper's rule below made every Wanda and SparseGPT mask worse
  (bench/results/sparsity.md), this one cannot make the calibration error worse.
* "expectation": the paper's rule (zyxxmu/DSnoT). Per input column j, mean_j and var_j of the inputs,
  wanda_j = sqrt(E[x_j^2]); with c_ij = W0_ij * mean_j the expected error is
      eps_i = E[y_i - y_hat_i] = sum over pruned j of c_ij.
  Regrowing g gives eps' = eps - c_ig, pruning p gives eps'' = eps' + c_ip. Grow the pruned weight
  with the largest sign(eps) * c_ij / var_j^power; prune, among kept weights whose c has the sign
  opposite to eps' and that leave |eps''| below |eps'| and below |eps| before the cycle, the one with
  the smallest Wanda score |W_ij| * wanda_j. A row with |eps_i| <= update_threshold stops. As in the
  official code, mean_j is the sum over tokens divided by the number of calibration samples (the
  per-token mean times the sequence length), so update_threshold = 0.1 means what it means there.
  N:M: each block proposes its best grow and matching prune; the row takes the best grow among the
  blocks where such a swap exists. Unstructured masks are one block per row.

Beyond the official code: after SparseGPT the kept weights carry its OBS update, and they keep it
here (d_i above uses the current weights; the official code resets to W0 * mask); regrown weights
come back with their dense value. Every linear is refined, the MLP included.
"""

from __future__ import annotations

import math

import torch

from compressor.errors import CompressorError
from compressor.passes import LinearState, check_keys
from compressor.sparsity import Pattern, parse_nm
from compressor.stats import InputStats

KEYS = {"criterion", "max_cycles", "update_threshold", "power"}
CRITERIA = ("error", "expectation")
DEFAULTS = {"criterion": "error", "max_cycles": 50, "update_threshold": 0.1, "power": 1.0}
_VAR_EPS = 1e-8  # guards var_j^p against constant input columns
_CHUNK_ELEMENTS = 1 << 22  # rows are independent: process them in chunks to bound memory
_RELATIVE_GAIN = 1e-9  # "error": a swap must lower err_i by more than rounding noise, or cycles loop


def needs_data(args: dict) -> bool:
    return True


def statistics(args: dict) -> set[str]:
    # "error" needs the full input second moments; "expectation" only per-column sums.
    return {"hessian"} if _settings(args)[0] == "error" else {"moments"}


def _number(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CompressorError(f"dsnot: {name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise CompressorError(f"dsnot: {name} must be >= {minimum}, got {value!r}")
    return float(value)


def _settings(args: dict) -> tuple[str, int, float, float]:
    check_keys("dsnot", args, KEYS)
    criterion = args.get("criterion", DEFAULTS["criterion"])
    if criterion not in CRITERIA:
        raise CompressorError(f"dsnot: criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    cycles = args.get("max_cycles", DEFAULTS["max_cycles"])
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0:
        raise CompressorError(f"dsnot: max_cycles must be an integer >= 0, got {cycles!r}")
    threshold = _number("update_threshold", args.get("update_threshold", DEFAULTS["update_threshold"]), 0.0)
    power = _number("power", args.get("power", DEFAULTS["power"]))
    return criterion, cycles, threshold, power


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
    criterion, max_cycles, threshold, power = _settings(args)
    if layer.mask is None:
        raise CompressorError("dsnot refines a mask: put it after magnitude, wanda or sparsegpt")
    if stats is None or stats.tokens == 0:
        raise CompressorError("dsnot needs calibration data (input statistics)")
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
    dense = original.detach().float()
    current = layer.weight.float() * layer.mask
    device = dense.device
    try:
        if criterion == "error":
            # The scale of H does not matter (only signs of changes do); float64 keeps them exact.
            inputs = (stats.hessian().to(device, torch.float64),)
        else:
            # The official statistic: sum over tokens / samples = per-token mean x tokens per sample.
            mean = stats.column_mean().to(device, torch.float64) * (stats.tokens / max(stats.samples, 1))
            var_p = stats.column_variance().to(device, torch.float64).clamp_min(_VAR_EPS).pow(power)
            wanda = stats.column_energy().to(device, torch.float64).clamp_min(0).sqrt()
            inputs = (mean, var_p, wanda, threshold)
    except ValueError as exc:
        raise CompressorError(f"dsnot ({criterion}): {exc}")
    refine = _refine_error if criterion == "error" else _refine_expectation

    mask = layer.mask.to(device=device, dtype=torch.bool).clone()
    rows, cols = mask.shape
    width = block or cols
    padded = -(-cols // width) * width
    step = max(1, _CHUNK_ELEMENTS // max(padded, 1))
    cycles = swaps = 0
    before = after = 0.0
    for start in range(0, rows, step):
        part = slice(start, min(start + step, rows))
        keep, used, done, objective = refine(
            dense[part].double(), current[part].double(), mask[part], width, max_cycles, *inputs
        )
        mask[part] = keep
        cycles, swaps = max(cycles, used), swaps + done
        before, after = before + objective[0], after + objective[1]

    # Weights kept throughout keep their current value (a SparseGPT update); regrown ones the dense.
    layer.weight = torch.where(layer.mask, current, dense) * mask
    layer.mask = mask
    layer.methods.append("dsnot")
    # The criterion's objective summed over rows, before and after: "error" sum_i d_i H d_i^T with
    # H = 2/N sum x x^T (GPTQ's convention), "expectation" sum_i |eps_i|.
    layer.metrics.update(dsnot_cycles=cycles, dsnot_swaps=swaps, dsnot_before=before, dsnot_after=after)


def _blocks(cols: int, width: int, device) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(blocks, pad, block start columns, validity of each padded position) for rows cut in M-blocks."""
    blocks = -(-cols // width)
    pad = blocks * width - cols
    valid = torch.nn.functional.pad(torch.ones(1, cols, dtype=torch.bool, device=device), (0, pad))
    return blocks, pad, torch.arange(blocks, device=device) * width, valid.reshape(1, blocks, width)


@torch.no_grad()
def _refine_error(
    dense: torch.Tensor, current: torch.Tensor, mask: torch.Tensor, width: int, max_cycles: int,
    hessian: torch.Tensor,
) -> tuple[torch.Tensor, int, int, tuple[float, float]]:
    """Swap loop on err_i = d_i H d_i^T for a chunk of rows, in float64.

    With r_i = d_i H, changing d_i by delta at columns g and p changes err_i by
        (delta_g^2 H_gg + 2 delta_g r_g) + (delta_p^2 H_pp + 2 delta_p (r_p + delta_g H_gp)).
    Regrowing g sets d_g to 0 (delta_g = -d_g); pruning p loses its current value (delta_p = W_p).
    Everything lives in a [rows, blocks * width] layout (zero padding past the last column) so that
    each cycle is a handful of full passes; the parts of the scores that change only where a swap
    happens (the squared terms, +inf where a column cannot take part) are kept up to date in place.
    """
    rows, cols = dense.shape
    blocks, pad, offsets, valid3 = _blocks(cols, width, dense.device)
    padded = blocks * width

    def padded_cols(t: torch.Tensor, fill=0.0) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, pad), value=fill)

    h = padded_cols(hessian)  # [cols, padded]: row g of H
    flat_h = h.reshape(-1)
    diag = padded_cols(hessian.diagonal())
    valid = valid3.reshape(1, padded)
    dense = padded_cols(dense)
    weight = padded_cols(current)
    missing = dense - weight  # d
    response = missing[:, :cols] @ h  # r, zero in the padding
    keep = padded_cols(mask, False)
    grow_base = torch.where(valid & ~keep, missing.square() * diag, math.inf)
    prune_base = torch.where(keep, weight.square() * diag, math.inf)
    error = (missing * response).sum(1)
    start_error = float(error.sum())
    in_block = offsets[:, None] + torch.arange(width, device=dense.device)  # [blocks, width]

    def blocked(t: torch.Tensor) -> torch.Tensor:
        return t.view(rows, blocks, width)

    active = torch.ones(rows, dtype=torch.bool, device=dense.device)
    cycles = swaps = 0
    while cycles < max_cycles and bool(active.any()):
        cycles += 1
        # Grow: per block, the pruned weight whose return lowers err most on its own.
        grow_delta, grow_idx = blocked(torch.addcmul(grow_base, missing, response, value=-2)).min(2)
        grow_col = offsets + grow_idx  # [rows, blocks]
        delta_g = -missing.gather(1, grow_col)
        # Prune: the kept weight of the same block that raises err least, given that grow.
        h_gp = flat_h[grow_col[..., None] * padded + in_block]  # H[g, p] for p in g's block
        shifted = torch.addcmul(blocked(response), delta_g[..., None], h_gp)
        prune_delta, prune_idx = torch.addcmul(blocked(prune_base), blocked(weight), shifted, value=2).min(2)
        total, chosen = (grow_delta + prune_delta).min(1)
        # inf (no swap in any block) never passes; a row whose best swap does not help stops for good.
        active &= total < -_RELATIVE_GAIN * error.abs()
        at = active.nonzero().squeeze(1)
        block = chosen[at]
        g, p = grow_col[at, block], offsets[block] + prune_idx[at, block]
        dg, dp = -missing[at, g], weight[at, p]
        response[at] += dg[:, None] * h[g] + dp[:, None] * h[p]
        missing[at, g], missing[at, p] = 0.0, dense[at, p]
        weight[at, g], weight[at, p] = dense[at, g], 0.0
        keep[at, g], keep[at, p] = True, False
        grow_base[at, g], grow_base[at, p] = math.inf, dense[at, p].square() * diag[p]
        prune_base[at, p], prune_base[at, g] = math.inf, dense[at, g].square() * diag[g]
        error[at] += total[at]
        swaps += int(at.numel())

    return keep[:, :cols], cycles, swaps, (start_error, float(error.sum()))


@torch.no_grad()
def _refine_expectation(
    dense: torch.Tensor, current: torch.Tensor, mask: torch.Tensor, width: int, max_cycles: int,
    mean: torch.Tensor, var_p: torch.Tensor, wanda: torch.Tensor, threshold: float,
) -> tuple[torch.Tensor, int, int, tuple[float, float]]:
    """The paper's swap loop for a chunk of rows, in float64. Returns (new mask, cycles, swaps).

    `dense` gives the value a regrown weight comes back with, `current` (zero where pruned) the
    value a kept weight takes away when it is pruned in exchange.
    """
    rows, cols = dense.shape
    blocks, pad, offsets, valid3 = _blocks(cols, width, dense.device)

    def shaped(t: torch.Tensor) -> torch.Tensor:  # padding columns: zero, never kept nor pruned
        return torch.nn.functional.pad(t, (0, pad)).reshape(t.shape[0], blocks, width)

    grow_c = dense * mean  # what regrowing j removes from eps
    prune_c = current * mean  # what pruning a kept j adds to eps
    eps = ((dense - current) * mean).sum(1)  # expected error per row
    grow_c3 = shaped(grow_c)
    prune_c3 = shaped(prune_c)
    grow3 = shaped(grow_c / var_p)
    prune3 = shaped(current.abs() * wanda)
    keep3 = shaped(mask)

    start_eps = float(eps.abs().sum())
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

    return keep3.reshape(rows, -1)[:, :cols], cycles, swaps, (start_eps, float(eps.abs().sum()))
