"""Integer grids against per-group loops written out by hand."""

import pytest
import torch

from compressor import grids
from compressor.grids import IntGrid


def reference_qdq(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """The GPTQ reference quantizer, one group at a time (ragged tail included)."""
    maxq = 2**bits - 1
    out = torch.empty_like(w)
    width = w.shape[1] if group <= 0 else group
    for start in range(0, w.shape[1], width):
        x = w[:, start:start + width]
        xmin = x.min(1).values.clamp(max=0)
        xmax = x.max(1).values.clamp(min=0)
        if symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-xmin / scale)
        q = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, start:start + width] = scale[:, None] * (q - zero[:, None])
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32, 48, 100])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_per_group_reference(bits, group, symmetric):
    torch.manual_seed(bits * 7 + group)
    w = torch.randn(16, 160)  # 160 = 3 groups of 48 + a ragged 16; 100 + 60
    grid = IntGrid(bits=bits, group_size=group, symmetric=symmetric)
    scale, zero = grids.choose_qparams(w, grid)
    assert scale.shape == (16, grid.num_groups(160))
    got = grids.fake_quantize(w, scale, zero, grid)
    torch.testing.assert_close(got, reference_qdq(w, bits, group, symmetric), rtol=0, atol=1e-6)


def test_codes_in_range_and_round_trip():
    torch.manual_seed(0)
    w = torch.randn(8, 70)
    grid = IntGrid(bits=3, group_size=32, symmetric=False)
    scale, zero = grids.choose_qparams(w, grid)
    codes = grids.quantize(w, scale, zero, grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7
    deq = grids.dequantize(codes, scale, zero, grid)
    # Quantizing an on-grid tensor gives back the same codes.
    assert torch.equal(grids.quantize(deq, scale, zero, grid), codes)
    # Error is at most half a step per element.
    step = scale[:, grids.group_index(70, 32)]
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())


def test_symmetric_zero_is_exact_and_zero_groups_survive():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    grid = IntGrid(bits=4, group_size=32, symmetric=True)
    scale, zero = grids.choose_qparams(w, grid)
    assert torch.isfinite(scale).all()
    deq = grids.fake_quantize(w, scale, zero, grid)
    assert torch.equal(deq[1:], torch.zeros(3, 64))  # all-zero groups stay exactly zero
    assert deq[0, 16].item() == pytest.approx(w[0, 16].item(), abs=scale[0, 0].item() / 2)


def test_full_range_puts_each_extreme_on_the_extra_code():
    """llama.cpp's Q4_0 rule: scale = extreme / -8, so the extreme is exact and all 16 codes are used."""
    w = torch.tensor([[0.5, -0.25, 1.6, 0.0], [-2.4, 0.3, 1.0, 0.6], [0.0, 0.0, 0.0, 0.0]])
    grid = IntGrid(bits=4, group_size=4, symmetric=True, full_range=True)
    scale, zero = grids.choose_qparams(w, grid)
    torch.testing.assert_close(scale[:, 0], torch.tensor([-0.2, 0.3, -0.125]))
    assert torch.equal(zero, torch.full_like(zero, 8.0))
    codes = grids.quantize(w, scale, zero, grid)
    assert codes[0, 2] == 0 and codes[1, 0] == 0  # the extremes take code -8 (unsigned 0)
    assert codes[0].tolist() == [8 - 2, 8 + 1, 0, 8] and codes[1].tolist() == [0, 9, 11, 10]
    deq = grids.dequantize(codes, scale, zero, grid)
    assert deq[0, 2] == pytest.approx(1.6) and deq[1, 0] == pytest.approx(-2.4)
    assert torch.equal(deq[2], torch.zeros(4))
    # A finer step than the reference symmetric grid: lower error on Gaussian weights, never clipped.
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits in (3, 4):
        errors = {}
        for full in (False, True):
            g = IntGrid(bits=bits, group_size=64, symmetric=True, full_range=full)
            s, z = grids.choose_qparams(w, g)
            errors[full] = float((grids.fake_quantize(w, s, z, g) - w).pow(2).mean())
        assert errors[True] < 0.9 * errors[False]


def test_scales_are_rounded_to_the_storage_dtype():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    scale, _ = grids.choose_qparams(w, IntGrid(bits=4, group_size=32), scale_dtype=torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())


def test_mse_search_never_worse_than_minmax():
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    w[:, 5] *= 8  # an outlier column makes min-max ranges wasteful
    plain = IntGrid(bits=3, group_size=64, symmetric=False)
    searched = IntGrid(bits=3, group_size=64, symmetric=False, mse=True)
    err = {}
    for grid in (plain, searched):
        s, z = grids.choose_qparams(w, grid)
        err[grid.mse] = (grids.fake_quantize(w, s, z, grid) - w).abs().pow(2.4).sum().item()
    assert err[True] < err[False]


def reference_weighted_range_search(w, grid, importance, steps=100, max_shrink=0.8, norm=2.4):
    """Per group, every shrink factor tried in turn; the one of least importance-weighted error kept."""
    width = grid.group_width(w.shape[1])
    scales = []
    for start in range(0, w.shape[1], width):
        x, weights = w[:, start:start + width], importance[start:start + width]
        one = IntGrid(bits=grid.bits, group_size=0, symmetric=grid.symmetric)
        best_err, best_scale = torch.full((w.shape[0],), float("inf")), None
        for i in range(int(max_shrink * steps)):
            p = 1 - i / steps
            lo, hi = p * x.min(1).values.clamp(max=0), p * x.max(1).values.clamp(min=0)
            s, z = grids._params_from_range(lo[:, None], hi[:, None], one, torch.float32)
            err = ((grids.fake_quantize(x, s, z, one) - x).abs().pow(norm) * weights).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = s[:, 0] if best_scale is None else torch.where(better, s[:, 0], best_scale)
        scales.append(best_scale)
    return torch.stack(scales, 1)


@pytest.mark.parametrize("symmetric, group", [(False, 16), (True, 24)])  # 24: a ragged last group
def test_importance_weighted_range_search_matches_a_per_group_loop(symmetric, group):
    torch.manual_seed(3)
    w = torch.randn(6, 64)
    w[:, 3] *= 6
    importance = torch.rand(64) ** 4 * 10  # a few columns dominate, as activations' mean squares do
    grid = IntGrid(bits=3, group_size=group, symmetric=symmetric, mse=True)
    scale, _ = grids.choose_qparams(w, grid, torch.float32, importance)
    torch.testing.assert_close(scale, reference_weighted_range_search(w, grid, importance))


def test_importance_weighted_range_search_keeps_the_important_column():
    torch.manual_seed(4)
    w = torch.randn(16, 64)
    w[:, 5] *= 8  # an outlier column: the unweighted search clips it to spare the other 63
    importance = torch.full((64,), 0.01)
    importance[5] = 100.0  # ... but it is the input the layer's output depends on
    grid = IntGrid(bits=3, group_size=64, symmetric=False, mse=True)
    errors = {}
    for name, weights in (("plain", None), ("weighted", importance)):
        s, z = grids.choose_qparams(w, grid, torch.float32, weights)
        errors[name] = ((grids.fake_quantize(w, s, z, grid) - w).abs().pow(2.4) * importance).sum().item()
    assert errors["weighted"] < 0.5 * errors["plain"]
    # Equal importance everywhere is the unweighted search.
    s_even, _ = grids.choose_qparams(w, grid, torch.float32, torch.full((64,), 3.0))
    torch.testing.assert_close(s_even, grids.choose_qparams(w, grid, torch.float32)[0])
