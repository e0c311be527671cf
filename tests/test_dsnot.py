"""DSnoT: prune-and-grow refinement of an existing mask, on small synthetic layers."""

from __future__ import annotations

import pytest
import torch

from compressor.errors import CompressorError
from compressor.passes import LinearState, dsnot
from compressor.sparsity import mask_holds, pattern_from_args
from compressor.stats import InputStats

PATTERNS = [("0.5", {"sparsity": 0.5}), ("2:4", {"pattern": "2:4"}), ("4:8", {"pattern": "4:8"})]


def magnitude_mask(weight: torch.Tensor, args: dict) -> torch.Tensor:
    """Keep the largest |W|: per row (unstructured) or per M-block along the input (N kept of M)."""
    rows, cols = weight.shape
    score = weight.abs()
    if "sparsity" in args:
        kept = cols - int(round(args["sparsity"] * cols))
        top = torch.topk(score, kept, 1).indices
        return torch.zeros_like(weight, dtype=torch.bool).scatter_(1, top, True)
    n, m = (int(v) for v in args["pattern"].split(":"))
    full = cols // m * m
    mask = torch.zeros_like(weight, dtype=torch.bool)
    blocks = score[:, :full].reshape(rows, -1, m)
    top = torch.topk(blocks, n, dim=2).indices
    mask[:, :full] = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, top, True).reshape(rows, full)
    tail = cols - full
    if tail:
        kept = tail - tail * (m - n) // m
        tail_mask = torch.zeros_like(score[:, full:], dtype=torch.bool)
        mask[:, full:] = tail_mask.scatter_(1, torch.topk(score[:, full:], kept, 1).indices, True)
    return mask


def make_case(args: dict, rows: int = 48, cols: int = 128, tokens: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=gen)
    offset = torch.randn(cols, generator=gen) * 1.5  # nonzero column means, so eps matters
    x = torch.randn(tokens, cols, generator=gen) * (0.5 + torch.rand(cols, generator=gen)) + offset
    stats = InputStats(cols, hessian=True, moments=True)
    stats.add_batch(x)
    mask = magnitude_mask(dense, args)
    pattern = pattern_from_args(args)
    layer = LinearState(name="lin", weight=dense * mask, dtype=torch.float32, mask=mask.clone(),
                        metrics={"pattern": pattern.label, "sparsity": pattern.sparsity})
    layer.original = dense.clone()
    return layer, stats, x, dense, pattern


def row_eps(dense: torch.Tensor, mask: torch.Tensor, stats: InputStats) -> torch.Tensor:
    mean = stats.column_mean().double()
    return (dense.double() * mean * ~mask).sum(1)


def output_error(x: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((x @ dense.T - x @ (dense * mask).T) ** 2).mean())


@pytest.mark.parametrize(("label", "args"), PATTERNS)
def test_counts_pattern_and_eps(label, args):
    layer, stats, x, dense, pattern = make_case(args)
    before = layer.mask.clone()
    eps_before = row_eps(dense, before, stats)
    dsnot.compress(layer, stats, {"criterion": "expectation"})

    assert layer.mask.dtype == torch.bool and layer.mask.shape == before.shape
    assert torch.equal((~layer.mask).sum(1), (~before).sum(1))
    assert mask_holds(layer.mask, pattern)
    eps_after = row_eps(dense, layer.mask, stats)
    assert (eps_after.abs() <= eps_before.abs() + 1e-9).all()
    assert layer.metrics["dsnot_swaps"] > 0
    assert 0 < layer.metrics["dsnot_cycles"] <= 50
    # A weight regrown in one cycle may be pruned again in a later one: at most 2 changes per swap.
    assert 0 < int((layer.mask != before).sum()) <= 2 * layer.metrics["dsnot_swaps"]
    assert eps_after.abs().mean() < 0.5 * eps_before.abs().mean()
    assert output_error(x, dense, layer.mask) < output_error(x, dense, before)
    assert layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, dense * layer.mask)
    assert layer.methods == ["dsnot"]
    assert layer.metrics["sparsity"] == pattern.sparsity and layer.metrics["pattern"] == pattern.label


def row_errors(x: torch.Tensor, dense: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each output's mean squared reconstruction error on the calibration inputs, in float64."""
    x = x.double()
    return ((x @ (dense.double() - weight.double()).T) ** 2).mean(0)


@pytest.mark.parametrize(("label", "args"), PATTERNS)
def test_error_criterion_never_raises_any_row_error(label, args):
    layer, stats, x, dense, pattern = make_case(args)
    before = layer.mask.clone()
    errors_before = row_errors(x, dense, dense * before)
    dsnot.compress(layer, stats, {})  # criterion "error" is the default

    assert torch.equal((~layer.mask).sum(1), (~before).sum(1))
    assert mask_holds(layer.mask, pattern)
    assert torch.equal(layer.weight, dense * layer.mask)
    errors_after = row_errors(x, dense, layer.weight)
    assert (errors_after <= errors_before * (1 + 1e-9)).all()
    # Magnitude masks ignore the inputs: the swaps recover a good part of the error.
    assert errors_after.sum() < 0.8 * errors_before.sum()
    assert layer.metrics["dsnot_swaps"] > 0 and 0 < layer.metrics["dsnot_cycles"] <= 50
    # The reported objective is the layer error with H = 2/N X^T X (2x the mean squared error).
    assert layer.metrics["dsnot_before"] == pytest.approx(2 * float(errors_before.sum()), rel=1e-4)
    assert layer.metrics["dsnot_after"] == pytest.approx(2 * float(errors_after.sum()), rel=1e-4)


def test_error_criterion_beats_the_papers_rule_on_the_calibration_error():
    results = {}
    for criterion in ("error", "expectation"):
        layer, stats, x, dense, _ = make_case({"pattern": "2:4"})
        dsnot.compress(layer, stats, {"criterion": criterion})
        results[criterion] = float(row_errors(x, dense, layer.weight).sum())
    assert results["error"] < results["expectation"]


def test_error_criterion_keeps_a_sparsegpt_update():
    """Kept weights carry an update: the error is measured against it, and kept weights keep it."""
    layer, stats, x, dense, pattern = make_case({"sparsity": 0.5}, seed=3)
    gen = torch.Generator().manual_seed(7)
    updated = (dense + 0.3 * torch.randn(dense.shape, generator=gen)) * layer.mask
    layer.weight = updated.clone()
    before = layer.mask.clone()
    errors_before = row_errors(x, dense, updated)
    dsnot.compress(layer, stats, {})

    after = layer.mask
    assert torch.equal((~after).sum(1), (~before).sum(1))
    assert (row_errors(x, dense, layer.weight) <= errors_before * (1 + 1e-9)).all()
    assert layer.metrics["dsnot_swaps"] > 0
    kept = before & after
    regrown = after & ~before
    assert regrown.any()
    assert torch.equal(layer.weight[kept], updated[kept])
    assert torch.equal(layer.weight[regrown], dense[regrown])
    assert (layer.weight[~after] == 0).all()


def test_error_criterion_on_a_ragged_tail_and_zero_cycles():
    layer, stats, x, dense, pattern = make_case({"pattern": "2:4"}, cols=130)
    before = layer.mask.clone()
    dsnot.compress(layer, stats, {})
    assert mask_holds(layer.mask, pattern) and layer.metrics["dsnot_swaps"] > 0
    assert (row_errors(x, dense, layer.weight) <= row_errors(x, dense, dense * before) * (1 + 1e-9)).all()

    layer, stats, _, dense, _ = make_case({"pattern": "2:4"})
    before = layer.mask.clone()
    dsnot.compress(layer, stats, {"max_cycles": 0})
    assert torch.equal(layer.mask, before) and layer.metrics["dsnot_swaps"] == 0


def test_ragged_nm_tail_keeps_pattern():
    args = {"pattern": "2:4"}
    layer, stats, _, dense, pattern = make_case(args, cols=130)
    before = layer.mask.clone()
    dsnot.compress(layer, stats, {"criterion": "expectation", "power": 0.0, "update_threshold": 0.0})
    assert mask_holds(before, pattern) and mask_holds(layer.mask, pattern)
    assert layer.metrics["dsnot_swaps"] > 0
    assert (row_eps(dense, layer.mask, stats).abs() <= row_eps(dense, before, stats).abs() + 1e-9).all()


def test_zero_cycles_and_high_threshold_leave_mask():
    layer, stats, _, dense, _ = make_case({"sparsity": 0.5})
    before = layer.mask.clone()
    dsnot.compress(layer, stats, {"max_cycles": 0})
    assert torch.equal(layer.mask, before)
    assert layer.metrics["dsnot_cycles"] == 0 and layer.metrics["dsnot_swaps"] == 0
    assert torch.equal(layer.weight, dense * before)

    layer, stats, _, _, _ = make_case({"sparsity": 0.5})
    before = layer.mask.clone()
    dsnot.compress(layer, stats, {"criterion": "expectation", "update_threshold": 1e9})
    assert torch.equal(layer.mask, before) and layer.metrics["dsnot_swaps"] == 0


def test_max_cycles_bounds_swaps_per_row():
    layer, stats, _, _, _ = make_case({"sparsity": 0.5})
    before = layer.mask.clone()
    dsnot.compress(layer, stats, {"max_cycles": 1})
    assert layer.metrics["dsnot_cycles"] == 1
    assert ((layer.mask != before).sum(1) <= 2).all()


def test_pass_interface():
    assert dsnot.needs_data({}) is True
    assert dsnot.statistics({}) == {"hessian"}
    assert dsnot.statistics({"criterion": "expectation"}) == {"moments"}
    dsnot.validate({})
    dsnot.validate({"criterion": "expectation", "max_cycles": 0, "update_threshold": 0, "power": 0.5})


@pytest.mark.parametrize(
    "args",
    [
        {"max_cycles": -1}, {"max_cycles": 1.5}, {"max_cycles": True}, {"update_threshold": -0.1},
        {"update_threshold": "x"}, {"power": "1"}, {"power": float("nan")}, {"cycles": 3},
        {"criterion": "mse"},
    ],
)
def test_bad_args(args):
    with pytest.raises(CompressorError):
        dsnot.validate(args)
    layer, stats, _, _, _ = make_case({"sparsity": 0.5}, rows=4, cols=16, tokens=32)
    with pytest.raises(CompressorError):
        dsnot.compress(layer, stats, args)


def test_errors():
    layer, stats, _, _, _ = make_case({"sparsity": 0.5}, rows=4, cols=16, tokens=32)
    layer.mask = None
    with pytest.raises(CompressorError, match="after magnitude, wanda or sparsegpt"):
        dsnot.compress(layer, stats, {})

    layer, stats, _, _, _ = make_case({"sparsity": 0.5}, rows=4, cols=16, tokens=32)
    with pytest.raises(CompressorError, match="calibration data"):
        dsnot.compress(layer, None, {})

    layer, _, _, _, _ = make_case({"sparsity": 0.5}, rows=4, cols=16, tokens=32)
    no_moments = InputStats(16, hessian=True, moments=False)
    no_moments.add_batch(torch.randn(8, 16))
    with pytest.raises(CompressorError, match="moments"):
        dsnot.compress(layer, no_moments, {"criterion": "expectation"})
    no_hessian = InputStats(16, hessian=False, moments=True)
    no_hessian.add_batch(torch.randn(8, 16))
    with pytest.raises(CompressorError, match="Hessian"):
        dsnot.compress(layer, no_hessian, {})

    layer, stats, _, _, _ = make_case({"sparsity": 0.5}, rows=4, cols=16, tokens=32)
    layer.original = None
    with pytest.raises(CompressorError, match="dense weights"):
        dsnot.compress(layer, stats, {})

    layer, stats, _, _, _ = make_case({"sparsity": 0.5}, rows=4, cols=16, tokens=32)
    del layer.metrics["pattern"]
    with pytest.raises(CompressorError, match="pattern"):
        dsnot.compress(layer, stats, {})
