"""Triton dequantize-matmul over packed integer weights: CUDA, or the CPU under TRITON_INTERPRET=1.

The weights stay in the compressed-tensors layout the checkpoint holds: each row's `bits`-bit codes
packed densely along the input dimension into int32 words (a 3-, 5-, 6- or 7-bit code may straddle
two words), scales and zero points [out, groups], and each input column's group (`g_idx`, or
column // group_width), so act-order and ragged groups need no special case:

    y[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, g(k)]) * scale[n, g(k)]

Two kernels:
    GEMV (decode: up to GEMV_MAX_ROWS rows of x): a program owns BLOCK_N outputs of one row of x and
          reduces over the inputs with elementwise products in float32 (no tensor cores at batch 1).
    dequantize (more rows): W written once in x's dtype into a workspace, then cuBLAS. On an H200
          this beat the best of 8 tile configurations of a fused tl.dot dequantize-GEMM in 9 of 10
          cells (5 layer shapes at 16 and 512 rows) by 1.7-20x (bench/results/gpu_kernels.md), so
          the fused GEMM was dropped.
The tile sizes are the fastest of the sweep in bench/gpu_kernels.py on an H200 (geometric mean over
the 7B Llama and SmolLM2 layer shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 4  # at most this many rows of x run as GEMVs; more: dequantize, then cuBLAS
GEMV_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4}
DEQUANTIZE_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4}


@triton.jit
def _dequantized_tile(packed_ptr, scale_ptr, zero_ptr, group_ptr, rows, cols, n_out, n_in, words_per_row,
                      groups, BITS: tl.constexpr):
    """W[rows, cols] in float32 (zero outside the matrix)."""
    inside = (rows[:, None] < n_out) & (cols[None, :] < n_in)
    bit = cols.to(tl.int64) * BITS
    word = bit // 32
    shift = bit % 32
    base = packed_ptr + rows[:, None].to(tl.int64) * words_per_row + word[None, :]
    # Two neighbouring words as one unsigned 64-bit value, so a straddling code reads whole.
    low = tl.load(base, mask=inside, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    high_inside = inside & (word[None, :] + 1 < words_per_row)
    high = tl.load(base + 1, mask=high_inside, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    code = ((high << 32) | low) >> shift[None, :] & ((1 << BITS) - 1)
    group = tl.load(group_ptr + cols, mask=cols < n_in, other=0).to(tl.int64)
    where = rows[:, None].to(tl.int64) * groups + group[None, :]
    scale = tl.load(scale_ptr + where, mask=inside, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + where, mask=inside, other=0.0).to(tl.float32)
    return (code.to(tl.float32) - zero) * scale


@triton.jit
def _gemv_kernel(x_ptr, y_ptr, packed_ptr, scale_ptr, zero_ptr, group_ptr, n_out, n_in, words_per_row,
                 groups, stride_x, stride_y, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        weight = _dequantized_tile(packed_ptr, scale_ptr, zero_ptr, group_ptr, rows, cols, n_out, n_in,
                                   words_per_row, groups, BITS)
        x = tl.load(x_ptr + m * stride_x + cols, mask=cols < n_in, other=0.0).to(tl.float32)
        acc += tl.sum(weight * x[None, :], axis=1)
    tl.store(y_ptr + m * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < n_out)


@triton.jit
def _dequantize_kernel(w_ptr, packed_ptr, scale_ptr, zero_ptr, group_ptr, n_out, n_in, words_per_row, groups,
                       BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    weight = _dequantized_tile(packed_ptr, scale_ptr, zero_ptr, group_ptr, rows, cols, n_out, n_in,
                               words_per_row, groups, BITS)
    tl.store(w_ptr + rows[:, None].to(tl.int64) * n_in + cols[None, :], weight.to(w_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_out) & (cols[None, :] < n_in))


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_of: torch.Tensor,
               bits: int, out: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """W [out_features, in_features] written into `out` (its dtype) from the packed codes."""
    config = config or DEQUANTIZE_CONFIG
    n_out, n_in = out.shape
    grid = (triton.cdiv(n_out, config["BLOCK_N"]), triton.cdiv(n_in, config["BLOCK_K"]))
    _dequantize_kernel[grid](out, packed, scale.contiguous(), zero.contiguous(), group_of.contiguous(), n_out,
                             n_in, packed.shape[1], scale.shape[1], BITS=bits, **config)
    return out


def packed_matmul(x2d: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group_of: torch.Tensor, bits: int, out_features: int, workspace: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x2d [M, in] @ W^T -> [M, out] in x's dtype, W given by its packed codes (see module doc).
    workspace: a [out, in] buffer of x's dtype for the dequantized W (more than GEMV_MAX_ROWS rows);
    config overrides the GEMV's tile sizes (for the sweep in bench/gpu_kernels.py)."""
    x2d = x2d.contiguous()
    rows, in_features = x2d.shape
    if rows > GEMV_MAX_ROWS:
        if workspace is None:
            workspace = torch.empty(out_features, in_features, dtype=x2d.dtype, device=x2d.device)
        return x2d @ dequantize(packed, scale, zero, group_of, bits, workspace).T
    y = torch.empty(rows, out_features, dtype=x2d.dtype, device=x2d.device)
    config = config or GEMV_CONFIG
    grid = (rows, triton.cdiv(out_features, config["BLOCK_N"]))
    _gemv_kernel[grid](x2d, y, packed, scale.contiguous(), zero.contiguous(), group_of.contiguous(),
                       out_features, in_features, packed.shape[1], scale.shape[1], x2d.stride(0), y.stride(0),
                       BITS=bits, **config)
    return y
