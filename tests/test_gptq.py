"""The GPTQ solver against the plain OBS recurrence it implements, and against RTN."""

import pytest
import torch

from compressor import grids
from compressor.grids import IntGrid
from compressor.passes import LinearState, gptq
from compressor.passes.gptq import GPTQOptions, solve
from compressor.stats import InputStats


def correlated_inputs(tokens=2048, width=96, seed=0):
    """Inputs with correlated columns and uneven scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    x = torch.randn(tokens, width, generator=g) @ mix
    return x * torch.linspace(0.2, 3.0, width)


def reference_obs(weight, hessian, grid: IntGrid, damp=0.01, act_order=False):
    """Quantize columns in order; after each, update the rest with the explicit inverse Hessian and
    remove the column from it (the OBS recurrence; no Cholesky, no lazy batching)."""
    W = weight.double().clone()
    H = hessian.double().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype)
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(cols)
    width = grid.group_width(cols)
    index = grids.group_index(cols, width)
    if act_order or grid.group_size <= 0:
        scale, zero = grids.choose_qparams(weight.float() * (~dead), grid)
        scale, zero = scale.double(), zero.double()
    else:
        scale = torch.zeros(W.shape[0], grid.num_groups(cols), dtype=W.dtype)
        zero = torch.zeros_like(scale)
    Hinv = torch.linalg.inv(H)
    for col in order.tolist():
        g = index[col]
        if not act_order and grid.group_size > 0 and col % width == 0:
            one = IntGrid(bits=grid.bits, group_size=0, symmetric=grid.symmetric)
            s, z = grids.choose_qparams(W[:, col:col + width].float(), one)
            scale[:, g], zero[:, g] = s[:, 0].double(), z[:, 0].double()
        w = W[:, col]
        q = (torch.clamp(torch.round(w / scale[:, g]) + zero[:, g], 0, grid.maxq) - zero[:, g]) * scale[:, g]
        err = (w - q) / Hinv[col, col]
        W -= err[:, None] * Hinv[col][None, :]
        W[:, col] = q
        Hinv -= Hinv[:, col:col + 1] @ Hinv[col:col + 1, :] / Hinv[col, col]
        Hinv[col, :] = 0
        Hinv[:, col] = 0
    return W.float()


def output_error(x, weight, quantized):
    return ((x @ (weight - quantized).T) ** 2).mean().item()


@pytest.mark.parametrize(
    "grid, act_order",
    [
        (IntGrid(bits=4, group_size=0), False),
        (IntGrid(bits=3, group_size=32, symmetric=False), False),
        (IntGrid(bits=3, group_size=40, symmetric=True), False),  # 96 = 2 x 40 + ragged 16
        (IntGrid(bits=4, group_size=32, symmetric=False), True),
        (IntGrid(bits=2, group_size=0, symmetric=False), True),
    ],
)
def test_solver_matches_obs_reference(grid, act_order):
    torch.manual_seed(0)
    x = correlated_inputs()
    weight = torch.randn(24, 96)
    hessian = 2 * x.T @ x / x.shape[0]
    result = solve(weight, hessian, grid, GPTQOptions(act_order=act_order, blocksize=32))
    expected = reference_obs(weight, hessian, grid, act_order=act_order)
    # Float rounding can flip an element sitting on a rounding boundary; nearly all must agree.
    same = torch.isclose(result.weight, expected, atol=1e-4).float().mean().item()
    assert same > 0.99
    assert output_error(x, weight, result.weight) == pytest.approx(
        output_error(x, weight, expected), rel=0.02
    )


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 0), (2, 48)])
def test_gptq_beats_rtn_on_layer_reconstruction(bits, group):
    torch.manual_seed(1)
    x = correlated_inputs(seed=1)
    weight = torch.randn(32, 96)
    grid = IntGrid(bits=bits, group_size=group, symmetric=False)
    scale, zero = grids.choose_qparams(weight, grid)
    rtn = grids.fake_quantize(weight, scale, zero, grid)
    hessian = 2 * x.T @ x / x.shape[0]
    ours = solve(weight, hessian, grid, GPTQOptions(act_order=True)).weight
    assert output_error(x, weight, ours) < 0.8 * output_error(x, weight, rtn)


def test_result_is_on_the_stored_grid_and_dead_inputs_are_zeroed():
    torch.manual_seed(2)
    x = correlated_inputs(width=64)
    x[:, 7] = 0  # a dead input channel
    weight = torch.randn(16, 64)
    hessian = 2 * x.T @ x / x.shape[0]
    grid = IntGrid(bits=4, group_size=32, symmetric=False)
    result = solve(weight, hessian, grid, GPTQOptions(act_order=True))
    codes = grids.quantize(result.weight, result.scale, result.zero, grid)
    torch.testing.assert_close(grids.dequantize(codes, result.scale, result.zero, grid), result.weight)
    assert torch.equal(result.weight[:, 7], torch.zeros(16))


def test_damping_is_raised_when_cholesky_fails():
    weight = torch.randn(8, 16)
    hessian = -torch.eye(16)  # never positive definite at 1% damping
    hessian[0, 0] = 50.0
    result = solve(weight, hessian, IntGrid(bits=4, group_size=0), GPTQOptions(damp=0.01))
    assert result.damp > 0.01


def test_stacked_linears_equal_separate_solves():
    torch.manual_seed(3)
    x = correlated_inputs(width=64, seed=3)
    stats = InputStats(64)
    stats.add_batch(x)
    weights = [torch.randn(16, 64), torch.randn(8, 64)]
    args = {"bits": 3, "group_size": 32, "symmetric": False}
    together = [LinearState(f"l{i}", w.clone(), torch.float32) for i, w in enumerate(weights)]
    gptq.compress_many(together, stats, args)
    for i, w in enumerate(weights):
        alone = LinearState(f"l{i}", w.clone(), torch.float32)
        gptq.compress(alone, stats, args)
        torch.testing.assert_close(alone.weight, together[i].weight)
        assert torch.equal(alone.quant.codes, together[i].quant.codes)


@pytest.mark.parametrize("act_order", [True, False])
def test_the_pass_keeps_the_solvers_weights_not_a_rounding_of_the_originals(act_order):
    """compress() must store GPTQ's error-compensated weights, which beat RTN on the layer output."""
    from compressor.passes import rtn

    torch.manual_seed(4)
    x = correlated_inputs(width=96, seed=4)
    stats = InputStats(96)
    stats.add_batch(x)
    weight = torch.randn(32, 96)
    args = {"bits": 3, "group_size": 32, "symmetric": False, "act_order": act_order}
    ours = LinearState("l", weight.clone(), torch.float32)
    gptq.compress(ours, stats, args)
    solved = solve(weight, stats.hessian(), IntGrid(bits=3, group_size=32, symmetric=False),
                   GPTQOptions(act_order=act_order))
    torch.testing.assert_close(ours.weight, solved.weight)
    baseline = LinearState("l", weight.clone(), torch.float32)
    rtn.compress(baseline, None, {"bits": 3, "group_size": 32, "symmetric": False})
    assert output_error(x, weight, ours.weight) < 0.85 * output_error(x, weight, baseline.weight)


@pytest.mark.parametrize("act_order", [True, False])
def test_range_search_is_weighted_by_the_hessian_diagonal(act_order):
    # --mse in GPTQ: each group's range is searched for the least rounding error weighted by its
    # inputs' mean squares. With act-order the ranges are fitted once on the original weights;
    # without, the first group (fitted before any error feedback reaches it) sees them too.
    torch.manual_seed(5)
    x = correlated_inputs(width=64, seed=5)
    x[:, 9] *= 20  # one loud input
    weight = torch.randn(16, 64)
    weight[:, 9] *= 4
    hessian = 2 * x.T @ x / x.shape[0]
    grid = IntGrid(bits=3, group_size=32, symmetric=False, mse=True)
    result = solve(weight, hessian, grid, GPTQOptions(act_order=act_order))
    scale, zero = grids.choose_qparams(weight, grid, torch.float32, hessian.diagonal())
    plain_scale, _ = grids.choose_qparams(weight, grid, torch.float32)
    torch.testing.assert_close(result.scale[:, 0], scale[:, 0])
    assert not torch.allclose(scale[:, 0], plain_scale[:, 0])  # the weighting changed the choice
    if act_order:
        torch.testing.assert_close(result.scale, scale)
        torch.testing.assert_close(result.zero, zero)
