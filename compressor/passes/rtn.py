"""Round-to-nearest: each weight snaps to its group's grid. No data, no error feedback."""

from __future__ import annotations

import torch

from compressor import finequant, grids
from compressor.passes import QUANT_KEYS, LinearState, QuantizedWeight, check_keys, grid_from_args
from compressor.stats import InputStats


def needs_data(args: dict) -> bool:
    return False


def validate(args: dict) -> None:
    """Fail early, before any model work, on settings this pass cannot use."""
    check_keys("rtn", args, QUANT_KEYS | finequant.AUTO_KEYS)
    finequant.validate(args)
    grid_from_args(finequant.stand_in(args))


def output_grid(args: dict):
    """The grid the weights end on (what the writer will store); with group_size auto the coarsest
    candidate stands in until the weights are seen (compressor.finequant)."""
    return grid_from_args(finequant.stand_in(args))


subgroup_args = finequant.subgroup_args  # group_size: auto -> a group size per matrix


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    grid = grid_from_args(args)
    scale, zero = grids.choose_qparams(layer.weight, grid, scale_dtype=layer.dtype)
    quantize_with_params(layer, grid, scale, zero)
    layer.methods.append("rtn")


def quantize_with_params(layer: LinearState, grid, scale, zero, act_order: bool = False) -> None:
    """Store codes for layer.weight on the given grid and replace the weight by its dequantized value.

    Dequantizing from the stored codes and scales (rather than keeping a float result) makes the
    in-memory model compute exactly what a loader of the packed checkpoint will compute.
    """
    codes = grids.quantize(layer.weight, scale, zero, grid)
    if layer.mask is not None:
        # Pruned weights must stay exactly zero: give them the code of 0.0 in their group.
        index = grids.group_index(codes.shape[1], grid.group_width(codes.shape[1]))
        codes = codes.where(layer.mask, zero[:, index].to(codes.dtype))
    layer.weight = grids.dequantize(codes, scale, zero, grid)
    layer.quant = QuantizedWeight(
        grid=grid, codes=codes, scale=scale.to(_scale_dtype(grid, layer.dtype)), zero=zero,
        act_order=act_order
    )


def _scale_dtype(grid, dtype: torch.dtype) -> torch.dtype:
    """The stored scale's dtype: the model's, or one that holds float16 values exactly (float16
    itself, or float32 beside a bfloat16/float32 model, so loaders multiply in full precision)."""
    return torch.promote_types(dtype, torch.float16) if grid.fp16_scale else dtype
