"""What a compressed linear costs on disk, in bits: the one accounting used by reports, inspect and
(later) search. It mirrors the packed layout written by compressor.pack exactly; a test checks the
two against each other.
"""

from __future__ import annotations

from compressor.grids import IntGrid

DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def packed_words(count: int, bits: int) -> int:
    """int32 words holding `count` codes of `bits` bits, packed densely (compressed-tensors)."""
    return -(-count * bits // 32)


def quantized_linear_bits(out_features: int, in_features: int, grid: IntGrid, scale_bits: int) -> int:
    """Codes + scales (+ zero points when asymmetric) of one pack-quantized linear."""
    groups = grid.num_groups(in_features)
    bits = out_features * packed_words(in_features, grid.bits) * 32
    bits += out_features * groups * scale_bits
    if not grid.symmetric:
        bits += out_features * groups * 8  # asymmetric grids are stored as blocks: int8 zero points
    return bits


def bits_per_weight(layers: list[tuple[int, int, IntGrid | None, int]]) -> dict:
    """Average stored bits per weight over (out, in, grid or None for dense, dense/scale bits) rows.

    Returns the stored figure and the integer-level average that papers quote (codes only).
    """
    numel = sum(o * i for o, i, _, _ in layers)
    if numel == 0:
        return {"stored": 0.0, "levels": 0.0, "weights": 0}
    stored = sum(
        quantized_linear_bits(o, i, g, b) if g is not None else o * i * b for o, i, g, b in layers
    )
    levels = sum(o * i * (g.bits if g is not None else b) for o, i, g, b in layers)
    return {"stored": stored / numel, "levels": levels / numel, "weights": numel}
