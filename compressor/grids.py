"""Integer quantization grids as free functions over tensors.

One notion of granularity covers every case: a weight W[out, in] is cut along its input dimension
into groups of `group_size` columns (0 = the whole row, i.e. per-channel). The last group may be
shorter than the others ("ragged"), which is how a 576-wide input is quantized with groups of 128.

Codes are unsigned integers in [0, 2^bits - 1]; the dequantized value is scale * (code - zero).
A symmetric grid is the same formula with zero fixed at 2^(bits-1), so that code 2^(bits-1) is 0.0:
this is the GPTQ reference convention and, after subtracting 2^(bits-1), the signed convention of
compressed-tensors ([-8, 7] at 4 bits) -- one formula serves both.

The GPTQ reference symmetric grid spends its range as scale = 2 * absmax / maxq: the largest positive
weight falls between codes and the code -2^(bits-1) is reached only by clipping. The *full-range*
symmetric grid (llama.cpp's Q4_0, AutoRound's default) divides the group's extreme weight, with its
sign, by -2^(bits-1): the extreme lands exactly on the extra negative code and every step is
2^(bits-1) / (maxq / 2) finer (7.5/8 at 4 bits, 3.5/4 at 3). The scale is then negative for half of
the groups; the stored layout and the dequantization are unchanged, so every loader reads it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = range(2, 9)


@dataclass(frozen=True)
class IntGrid:
    """How one weight matrix is quantized: plain data, shared by RTN, GPTQ and the writer."""

    bits: int = 4
    group_size: int = 128  # 0 = per-channel (one scale per output row)
    symmetric: bool = True
    mse: bool = False  # search a shrunken range that minimises the rounding error
    full_range: bool = False  # symmetric only: signed scale, the extreme weight on code -2^(bits-1)
    fp16_scale: bool = False  # scales rounded to float16 whatever the model's dtype (GGUF's blocks)

    @property
    def format(self) -> str:
        return "int"  # beside fpgrids.FloatGrid's nvfp4, mxfp4, fp4, e2m1

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size <= 0 else min(self.group_size, in_features)

    def num_groups(self, in_features: int) -> int:
        width = self.group_width(in_features)
        return -(-in_features // width)

    def is_ragged(self, in_features: int) -> bool:
        return in_features % self.group_width(in_features) != 0


def sign_offset(bits: int) -> int:
    """The code of 0.0 on a symmetric grid, and what turns our unsigned codes into the signed
    codes compressed-tensors stores ([-8, 7] at 4 bits)."""
    return 2 ** (bits - 1)


def to_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return (codes.to(torch.int16) - sign_offset(bits)).to(torch.int8)


def from_signed(signed: torch.Tensor, bits: int) -> torch.Tensor:
    return (signed.to(torch.int16) + sign_offset(bits)).to(torch.uint8)


def group_index(in_features: int, group_width: int) -> torch.Tensor:
    """Column -> group number; the last group takes whatever columns are left."""
    return torch.arange(in_features) // group_width


def group_min_max(w: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) min and max of w[rows, cols]; a ragged tail is padded with neutral values."""
    rows, cols = w.shape
    groups = -(-cols // width)
    pad = groups * width - cols
    lo = torch.nn.functional.pad(w, (0, pad), value=float("inf")).view(rows, groups, width)
    hi = torch.nn.functional.pad(w, (0, pad), value=float("-inf")).view(rows, groups, width)
    return lo.amin(-1), hi.amax(-1)


def _params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, grid: IntGrid, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for ranges [xmin, xmax] (0 is always kept representable)."""
    if grid.fp16_scale:
        scale_dtype = torch.float16
    xmin = xmin.clamp(max=0)
    xmax = xmax.clamp(min=0)
    if grid.symmetric and grid.full_range:
        extreme = torch.where(xmax >= -xmin, xmax, xmin)
        extreme = torch.where(extreme == 0, 1.0, extreme)  # an all-zero group: any scale is exact
        scale = (extreme / -sign_offset(grid.bits)).to(scale_dtype).float()
        return scale, torch.full_like(scale, sign_offset(grid.bits))
    if grid.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    # An all-zero group would give scale 0 and NaN codes; any scale represents it exactly.
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / grid.maxq
    # The stored scale is what the loader multiplies by: round it to the storage dtype first so
    # that the in-memory model and the reloaded checkpoint see bit-identical weights.
    scale = scale.to(scale_dtype).float()
    if grid.symmetric:
        zero = torch.full_like(scale, sign_offset(grid.bits))
    else:
        zero = torch.round(-xmin / scale).clamp(0, grid.maxq)
    return scale, zero


def choose_qparams(
    w: torch.Tensor, grid: IntGrid, scale_dtype: torch.dtype | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [rows, groups] (float32) for w[rows, cols] under `grid`.

    `importance` [cols] (with `grid.mse`): how much each column's rounding error counts in the range
    search, e.g. the diagonal of the layer's input Hessian (the mean square of each input), which
    is what that error costs the layer's output; None counts every column alike."""
    scale_dtype = scale_dtype or w.dtype
    w = w.float()
    width = grid.group_width(w.shape[1])
    xmin, xmax = group_min_max(w, width)
    scale, zero = _params_from_range(xmin, xmax, grid, scale_dtype)
    if grid.mse:
        scale, zero = _mse_search(w, xmin, xmax, scale, zero, grid, scale_dtype, importance)
    return scale, zero


def _mse_search(w, xmin, xmax, scale, zero, grid, scale_dtype, importance=None, steps=100, max_shrink=0.8,
                norm=2.4):
    """GPTQ's optional range search: shrink [xmin, xmax] while the rounding error (|err|^2.4, each
    column's weighted by its importance) drops."""
    width = grid.group_width(w.shape[1])
    index = group_index(w.shape[1], width).to(w.device)
    weights = None if importance is None else importance.float().to(w.device)
    best = torch.full_like(scale, float("inf"))
    for i in range(int(max_shrink * steps)):
        p = 1 - i / steps
        s, z = _params_from_range(p * xmin, p * xmax, grid, scale_dtype)
        err = (fake_quantize(w, s, z, grid) - w).abs().pow(norm)
        if weights is not None:
            err = err * weights
        err = torch.zeros_like(best).index_add_(1, index, err)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Integer codes (uint8) of w[rows, cols] given per-(row, group) scale and zero."""
    index = group_index(w.shape[1], grid.group_width(w.shape[1])).to(w.device)
    q = torch.round(w.float() / scale[:, index]) + zero[:, index]
    return q.clamp(0, grid.maxq).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """scale * (code - zero), broadcast per group; computed as the checkpoint loader computes it."""
    index = group_index(codes.shape[1], grid.group_width(codes.shape[1])).to(codes.device)
    return ((codes.float() - zero[:, index]) * scale[:, index]).to(dtype)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    """Round w onto the grid and back (float32)."""
    return dequantize(quantize(w, scale, zero, grid), scale, zero, grid)

