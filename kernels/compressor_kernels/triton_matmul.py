"""Triton dequantize-matmul over packed integer weights: CUDA, or the CPU under TRITON_INTERPRET=1.

The weights stay in the compressed-tensors layout the checkpoint holds: each row's `bits`-bit codes
packed densely along the input dimension into int32 words (a 3-, 5-, 6- or 7-bit code may straddle
two words), scales and zero points [out, groups], and each input column's group (`g_idx`, or
column // group_width), so act-order and ragged groups need no special case:

    y[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, g(k)]) * scale[n, g(k)]

Three kernels, the first two accumulating in float32 and reading every packed word once per output tile:
    GEMV (decode, a few rows of x): a program owns BLOCK_N outputs of one row of x and reduces
          over the inputs with elementwise products (no tensor cores needed at batch 1).
    GEMM (a few dozen rows): BLOCK_M x BLOCK_N output tiles through tl.dot, the weight tile
          dequantized in registers to x's dtype (float32 inputs multiply in IEEE float32, not TF32).
    dequantize (prefill, PackedLinear from TRITON_PREFILL_ROWS rows on): W written once in x's
          dtype into a workspace, then cuBLAS: at hundreds of rows its tiles beat a fused kernel.
The tile sizes are the fastest measured on an H200 (bench/gpu_kernels.py sweeps them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 4  # at most this many rows of x run as GEMVs, more as one GEMM
GEMV_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}
GEMM_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}
DEQUANTIZE_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}


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
def _gemm_kernel(x_ptr, y_ptr, packed_ptr, scale_ptr, zero_ptr, group_ptr, n_rows, n_out, n_in,
                 words_per_row, groups, stride_x, stride_y, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    row_x = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row_x[:, None] * stride_x + cols[None, :],
                    mask=(row_x[:, None] < n_rows) & (cols[None, :] < n_in), other=0.0)
        weight = _dequantized_tile(packed_ptr, scale_ptr, zero_ptr, group_ptr, rows, cols, n_out, n_in,
                                   words_per_row, groups, BITS)
        acc += tl.dot(x, tl.trans(weight.to(x.dtype)), input_precision=PRECISION)
    where = row_x[:, None] * stride_y + rows[None, :]
    tl.store(y_ptr + where, acc.to(y_ptr.dtype.element_ty),
             mask=(row_x[:, None] < n_rows) & (rows[None, :] < n_out))


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
                  group_of: torch.Tensor, bits: int, out_features: int, config: dict | None = None
                  ) -> torch.Tensor:
    """x2d [M, in] @ W^T -> [M, out] in x's dtype, W given by its packed codes (see module doc);
    config overrides the GEMV's or the GEMM's tile sizes (for the sweep in bench/gpu_kernels.py)."""
    x2d = x2d.contiguous()
    rows, in_features = x2d.shape
    y = torch.empty(rows, out_features, dtype=x2d.dtype, device=x2d.device)
    common = (packed, scale.contiguous(), zero.contiguous(), group_of.contiguous())
    sizes = (packed.shape[1], scale.shape[1])
    if rows <= GEMV_MAX_ROWS:
        config = config or GEMV_CONFIG
        grid = (rows, triton.cdiv(out_features, config["BLOCK_N"]))
        _gemv_kernel[grid](x2d, y, *common, out_features, in_features, *sizes, x2d.stride(0), y.stride(0),
                           BITS=bits, **config)
    else:
        config = config or GEMM_CONFIG
        grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(out_features, config["BLOCK_N"]))
        precision = "ieee" if x2d.dtype == torch.float32 else "tf32"  # tf32 is unused for 16-bit x
        _gemm_kernel[grid](x2d, y, *common, rows, out_features, in_features, *sizes, x2d.stride(0),
                           y.stride(0), BITS=bits, PRECISION=precision, **config)
    return y
