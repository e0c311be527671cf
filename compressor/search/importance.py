"""Layer importance and the two-level allocation of Layer-Wise Quantization (Dumitru et al., 2024).

LIM (layer input modification): importance = -cos(block input, block output), averaged over the
calibration tokens; a block that turns the residual stream more matters more.
ZD (z-score distribution, data-free): the fraction of a block's weights with |w - mean| / std > 1
over its linears; the paper finds *fewer* such weights marks a *more* important layer
("smaller is better"), so importance = -fraction.

Allocation between two levels lo < hi: the least important blocks go to lo, as many as the target
needs (k = L * (hi - target) / (hi - lo) for an integer-bits target).
"""

from __future__ import annotations

import re

import torch

from compressor import budget
from compressor.errors import CompressorError
from compressor.model import block_linears, decoder_blocks
from compressor.passes import QUANT_KEYS, grid_from_args
from compressor.pipeline import output_hidden
from compressor.sparsity import check_sparsity, pattern_from_args, pruned_per_row

SCORES = ("lim", "zd")


@torch.no_grad()
def lim_scores(model, calibration_ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """-mean cosine similarity between each block's input and output hidden states (per token)."""
    _, blocks = decoder_blocks(model)
    sums = [0.0] * len(blocks)
    tokens = 0
    handles = []

    def hook(number):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output_hidden(output)
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[number] += float(cos.sum())

        return record

    for number, block in enumerate(blocks):
        handles.append(block.register_forward_hook(hook(number), with_kwargs=True))
    device = next(model.parameters()).device
    try:
        for chunk in calibration_ids.split(batch_size):
            model(input_ids=chunk.to(device), use_cache=False)
            tokens += chunk.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [-s / tokens for s in sums]


@torch.no_grad()
def zd_scores(model) -> list[float]:
    """-fraction of weights more than one standard deviation from their linear's mean."""
    _, blocks = decoder_blocks(model)
    scores = []
    for block in blocks:
        outside, total = 0, 0
        for linear in block_linears(block).values():
            w = linear.weight.float()
            z = (w - w.mean()).abs() / w.std()
            outside += int((z > 1).sum())
            total += w.numel()
        scores.append(-outside / total)
    return scores


def two_level_allocation(
    scores: list[float], cost_lo: list[int], cost_hi: list[int], limit: int
) -> list[bool]:
    """Which blocks get the higher level (True): the most important ones, as many as fit in `limit`.

    Blocks are raised in order of decreasing importance while the total stays within the limit.
    """
    raised = [False] * len(scores)
    total = sum(cost_lo)
    for block in sorted(range(len(scores)), key=lambda b: -scores[b]):
        step = cost_hi[block] - cost_lo[block]
        if total + step > limit:
            break
        raised[block] = True
        total += step
    return raised


def _block_cost(model, block_names: list[str], step: dict, bits: int, kind: str) -> int:
    grid = grid_from_args({**{k: v for k, v in step.items() if k in QUANT_KEYS}, "bits": bits})
    total = 0
    for name in block_names:
        out_features, in_features = model.get_submodule(name).weight.shape
        dense_bits = budget.DTYPE_BITS.get(str(model.dtype).removeprefix("torch."), 16)
        total += budget.linear_costs(out_features, in_features, grid, dense_bits, 0)[kind]
    return total


def _importance(model, score: str, calibration_ids) -> list[float]:
    if score not in SCORES:
        raise CompressorError(f"unknown importance score {score!r}; choose one of: {', '.join(SCORES)}")
    if score == "zd":
        return zd_scores(model)
    if calibration_ids is None:
        raise CompressorError("--allocate lim needs calibration data")
    return lim_scores(model, calibration_ids)


def _per_block_passes(prefix: str, step: dict, key: str, value_per_block: list) -> list[dict]:
    """One pass per distinct value, targeting its blocks by regex (the saved recipe reproduces it)."""
    passes = []
    for value in sorted(set(value_per_block)):
        chosen = [str(i) for i, v in enumerate(value_per_block) if v == value]
        regex = "re:^" + re.escape(prefix) + r"\.(" + "|".join(chosen) + r")\."
        passes.append({**step, key: value, "targets": [regex]})
    return passes


# GGUF types from cheapest to dearest, the ladder a GGUF allocation climbs (llama.cpp's fallbacks
# apply per tensor, so on 576-wide rows Q2_K and Q3_K both cost what Q4_0 does).
GGUF_LADDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")


def _gguf_block_cost(model, block_names: list[str], qtype: str, kind: str) -> int:
    from compressor.gguf_quants import GgufGrid, fitting_type

    total = 0
    for name in block_names:
        out_features, in_features = model.get_submodule(name).weight.shape
        grid = GgufGrid(fitting_type(qtype, in_features))
        total += budget.linear_costs(out_features, in_features, grid, 16, 0)[kind]
    return total


def allocate_recipe(
    model, step: dict, target: budget.Budget, score: str, calibration_ids
) -> tuple[list, dict]:
    """Expand one quantization step into per-block steps at two levels that meet `target`: two bit
    widths, or for a GGUF step two neighbouring types of GGUF_LADDER.

    Returns the recipe passes (one per level, with explicit block targets, so the saved recipe
    reproduces the allocation) and what was decided (scores, level per block, achieved budget).
    """
    if target.kind == "sparsity":
        raise CompressorError("a sparsity budget cannot be met by allocating bits; use --budget ...bpw")
    if score not in SCORES:
        raise CompressorError(f"unknown importance score {score!r}; choose one of: {', '.join(SCORES)}")
    prefix, blocks = decoder_blocks(model)
    names = [[f"{prefix}.{i}.{n}" for n in block_linears(b)] for i, b in enumerate(blocks)]
    weights = sum(model.get_submodule(n).weight.numel() for block in names for n in block)
    limit = budget.budget_limit(target, weights)
    if step.get("method") == "gguf":
        key, ladder = "type", list(GGUF_LADDER)
        costs = {t: [_gguf_block_cost(model, block, t, target.kind) for block in names] for t in ladder}
    else:
        key, ladder = "bits", list(range(2, 9))
        costs = {b: [_block_cost(model, block, step, b, target.kind) for block in names] for b in ladder}
    fitting = [level for level in ladder if sum(costs[level]) <= limit]
    if not fitting:
        cheapest = budget.achieved(target.kind, sum(costs[ladder[0]]), weights)
        raise CompressorError(f"budget {target} cannot be met: the cheapest setting ({ladder[0]}) costs "
                              f"{cheapest:.3f}{target.kind}")
    lo = fitting[-1]
    hi = ladder[min(ladder.index(lo) + 1, len(ladder) - 1)]
    scores = _importance(model, score, calibration_ids)
    raised = two_level_allocation(scores, costs[lo], costs[hi], limit) if hi != lo else [False] * len(blocks)
    total = sum(costs[hi][i] if up else costs[lo][i] for i, up in enumerate(raised))
    reached = budget.achieved(target.kind, total, weights)
    if target.kind == "bits" and key == "bits" and total != limit and hi != lo:
        step_size = (sum(costs[hi]) - sum(costs[lo])) / len(blocks) / weights
        raise CompressorError(
            f"{target.value:g} bits cannot be met exactly with {len(blocks)} blocks at {lo}/{hi} bits; "
            f"nearest: {reached:.4g} or {reached + step_size:.4g}"
        )
    per_block = [hi if up else lo for up in raised]
    info = {"score": score, "scores": scores, f"{key}_per_block": per_block,
            "budget": str(target), "achieved": reached}
    return _per_block_passes(prefix, step, key, per_block), info


def _kept(model, block_names: list[str], sparsity: float) -> int:
    pattern = pattern_from_args({"sparsity": sparsity})
    total = 0
    for name in block_names:
        out_features, in_features = model.get_submodule(name).weight.shape
        total += out_features * (in_features - pruned_per_row(in_features, pattern))
    return total


def allocate_sparsity_recipe(
    model, step: dict, score: str, calibration_ids, spread: float = 0.1
) -> tuple[list, dict]:
    """Expand one unstructured pruning step into per-block sparsities target +- spread.

    The most important blocks are pruned less (target - spread), as many as the budget allows; the
    rest more (target + spread). The total kept count never exceeds the uniform setting's; with
    equal-shaped blocks half go each way and the average is exactly the target.
    """
    if "sparsity" not in step or "pattern" in step:
        raise CompressorError("--allocate spreads an unstructured --sparsity over layers, not an N:M pattern")
    target = check_sparsity(step["sparsity"])
    if not 0 < spread <= min(target, 0.99 - target) + 1e-9:
        raise CompressorError(
            f"--spread {spread:g} must be positive and keep {target:g} +- spread within [0, 0.99]"
        )
    prefix, blocks = decoder_blocks(model)
    names = [[f"{prefix}.{i}.{n}" for n in block_linears(b)] for i, b in enumerate(blocks)]
    weights = sum(model.get_submodule(n).weight.numel() for block in names for n in block)
    limit = sum(_kept(model, block, target) for block in names)  # the uniform setting's kept count
    lo, hi = round(target + spread, 6), round(target - spread, 6)  # lo = cheaper = sparser
    cost_lo = [_kept(model, block, lo) for block in names]
    cost_hi = [_kept(model, block, hi) for block in names]
    scores = _importance(model, score, calibration_ids)
    spared = two_level_allocation(scores, cost_lo, cost_hi, limit)
    total = sum(cost_hi[i] if up else cost_lo[i] for i, up in enumerate(spared))
    sparsity_per_block = [hi if up else lo for up in spared]
    info = {"score": score, "scores": scores, "sparsity_per_block": sparsity_per_block,
            "budget": f"{target:g}sparsity", "achieved": budget.achieved("sparsity", total, weights)}
    return _per_block_passes(prefix, step, "sparsity", sparsity_per_block), info
