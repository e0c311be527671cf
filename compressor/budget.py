"""What a compressed linear costs on disk, in bits: the one accounting used by reports, inspect and
search. It mirrors the packed layout written by compressor.pack exactly; a test checks the
two against each other.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compressor.errors import CompressorError
from compressor.fpgrids import FloatGrid
from compressor.grids import IntGrid

DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
# A mixed-precision checkpoint (search, --allocate) has several schemes, whose asymmetric zero
# points are written as int8 blocks (compressor.pack.block_layers): its budget counts them so.
MIXED_PACKED_ZERO = False


def packed_words(count: int, bits: int) -> int:
    """int32 words holding `count` codes of `bits` bits, packed densely (compressed-tensors)."""
    return -(-count * bits // 32)


def float_linear_bits(out_features: int, in_features: int, grid: FloatGrid) -> int:
    """4-bit float codes (two per byte) + their scales, as compressor.pack writes them."""
    bits = out_features * -(-in_features // 2) * 8
    if grid.format in ("nvfp4", "mxfp4"):
        bits += out_features * grid.num_groups(in_features) * 8  # FP8 or E8M0 scale per block
        bits += 32 if grid.format == "nvfp4" else 0  # float32 global scale
    else:
        # LLM-FP4: a float32 scale (2^-bias) per group, a format index per row
        bits += out_features * (grid.num_groups(in_features) * 32 + 8)
    return bits


def quantized_linear_bits(
    out_features: int, in_features: int, grid: IntGrid | FloatGrid, scale_bits: int,
    packed_zero: bool | None = None,
) -> int:
    """Codes + scales (+ zero points when asymmetric) of one pack-quantized linear. Zero points are
    packed along the rows in a group/channel layout and int8 in a block layout (compressor.pack);
    packed_zero=None: as written by default (blocks only for ragged groups)."""
    if isinstance(grid, FloatGrid):
        return float_linear_bits(out_features, in_features, grid)
    if hasattr(grid, "stored_bits"):  # GGUF blocks (headers included), lookup tables (compressor.lutgrids)
        return grid.stored_bits(out_features, in_features)
    groups = grid.num_groups(in_features)
    bits = out_features * packed_words(in_features, grid.bits) * 32
    bits += out_features * groups * scale_bits
    if not grid.symmetric:
        if packed_zero is None:
            packed_zero = not grid.is_ragged(in_features)
        bits += groups * (packed_words(out_features, grid.bits) * 32 if packed_zero else out_features * 8)
    return bits


def bits_per_weight(layers: list[tuple]) -> dict:
    """Average stored bits per weight over (out, in, grid or None for dense, dense/scale bits
    [, packed_zero]) rows (quantized_linear_bits).

    Returns the stored figure and the integer-level average that papers quote (codes only).
    """
    numel = sum(row[0] * row[1] for row in layers)
    if numel == 0:
        return {"stored": 0.0, "levels": 0.0, "weights": 0}
    stored = sum(quantized_linear_bits(*row) if row[2] is not None else row[0] * row[1] * row[3]
                 for row in layers)
    levels = sum(o * i * (g.bits if g is not None else b) for o, i, g, b, *_ in layers)
    return {"stored": stored / numel, "levels": levels / numel, "weights": numel}


BUDGET_KINDS = {
    "bpw": "stored bits per weight (codes, scales, zero points), over the decoder-block linears",
    "bits": "integer bits per weight averaged over the decoder-block linears (the figure papers quote)",
    "sparsity": "fraction of the decoder-block linear weights pruned",
}


@dataclass(frozen=True)
class Budget:
    kind: str  # one of BUDGET_KINDS
    value: float

    def __str__(self) -> str:
        return f"{self.value:g}{self.kind}"


def parse_budget(text: str) -> Budget:
    """'3.5bpw' (stored), '3.25bits' (integer-level average) or '0.5sparsity'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(bpw|bits|sparsity)\s*", str(text))
    if not match:
        raise CompressorError(
            f"budget {text!r} not understood; write e.g. 3.5bpw (stored bits per weight), "
            "3.25bits (integer-level average) or 0.5sparsity"
        )
    value, kind = float(match.group(1)), match.group(2)
    if kind == "sparsity" and not 0 <= value < 1:
        raise CompressorError(f"a sparsity budget must be in [0, 1), got {value}")
    if kind != "sparsity" and value <= 0:
        raise CompressorError(f"a bits budget must be positive, got {value}")
    return Budget(kind, value)


def linear_costs(
    out_features: int, in_features: int, grid: IntGrid | None, dense_bits: int, kept: int,
    packed_zero: bool | None = MIXED_PACKED_ZERO,
) -> dict:
    """What one compressed linear costs under each budget kind, as integers (so sums are exact);
    by default as a mixed-precision checkpoint stores it (MIXED_PACKED_ZERO)."""
    numel = out_features * in_features
    stored = numel * dense_bits
    if grid is not None:
        stored = quantized_linear_bits(out_features, in_features, grid, dense_bits, packed_zero)
    return {"bpw": stored, "bits": numel * (grid.bits if grid else dense_bits), "sparsity": kept}


def budget_limit(budget: Budget, weights: int) -> int:
    """The largest total cost (as in linear_costs) that meets `budget` over `weights` weights."""
    if budget.kind == "sparsity":
        return math.floor((1 - budget.value) * weights + 1e-9)
    return math.floor(budget.value * weights + 1e-9)


def achieved(budget_kind: str, total_cost: int, weights: int) -> float:
    """A total cost expressed in the budget's unit (bits per weight, or sparsity)."""
    return 1 - total_cost / weights if budget_kind == "sparsity" else total_cost / weights
