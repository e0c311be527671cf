"""rotate: fold the RMSNorm gains into the linears and rotate the residual stream by a Hadamard
matrix (QuaRot / SpinQuant R1), and each attention head's values too (R2), all inside the weights:
the model computes the same function, with flatter weights for the quantization that follows.

Settings:
    seed   int, default 0     the random signs of the Hadamard matrix (or the random rotation
                              where no Hadamard matrix of the hidden size can be built)
    heads  bool, default True also rotate each head's values (v_proj rows / o_proj columns)

A model pass: it runs once on the whole model before any block is compressed, so a quantization
pass after it sees (and collects its Hessians from) the rotated weights. See compressor.rotate.
"""

from __future__ import annotations

from compressor import rotate
from compressor.errors import CompressorError
from compressor.passes import Scope, check_keys

SCOPE = Scope.MODEL
KEYS = {"seed", "heads"}


def validate(args: dict) -> None:
    check_keys("rotate", args, KEYS)
    seed = args.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CompressorError(f"rotate: seed must be a non-negative integer, got {seed!r}")
    if not isinstance(args.get("heads", True), bool):
        raise CompressorError(f"rotate: heads must be true or false, got {args['heads']!r}")


def needs_data(args: dict) -> bool:
    return False


def transform(model, args: dict) -> dict:
    validate(args)
    seed, heads = args.get("seed", 0), args.get("heads", True)
    # Everything that can refuse the model does so before any parameter changes.
    layout = rotate.find_layout(model)
    if heads:
        rotate._attention_pairs(model)
    untied = rotate.fold_norms(model, layout)
    rotate.rotate_residual(model, rotate.orthogonal_matrix(layout.hidden, seed), layout)
    # R2 gets its own seed, so its signs are not R1's first head_dim signs.
    head_rotation = rotate.rotate_heads(model, seed + 1) if heads else None
    return {
        "hidden_rotation": rotate.rotation_label(layout.hidden),
        "untied_embeddings": untied,
        "head_rotation": head_rotation,
        "norms_folded": len(layout.norms),
        "readers": len(layout.readers),
        "writers": len(layout.writers),
    }
