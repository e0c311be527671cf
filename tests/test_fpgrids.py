"""Minifloat grids against exhaustive enumeration; NVFP4/MXFP4 against compressed-tensors' layout."""

from __future__ import annotations

import pytest
import torch

from compressor import fpgrids
from compressor.errors import CompressorError
from compressor.fpgrids import E1M2, E2M1, E3M0, FloatFormat


def enumerate_values(exponent: int, mantissa: int, bias: float) -> list[float]:
    """Every value of ExMy at `bias`, written out from the bit fields (the definition itself)."""
    values = set()
    for sign in (1, -1):
        for e in range(2**exponent):
            for m in range(2**mantissa):
                if e == 0:
                    value = (m / 2**mantissa) * 2.0 ** (1 - bias)
                else:
                    value = (1 + m / 2**mantissa) * 2.0 ** (e - bias)
                values.add(sign * value)
    return sorted(values)


def test_e2m1_at_bias_one_is_the_standard_value_set():
    values = fpgrids.representable_values(E2M1, 1.0).tolist()
    positive = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert values == sorted({-v for v in positive} | set(positive))
    assert E2M1.max_value(1.0) == 6.0


@pytest.mark.parametrize("fmt", [E3M0, E2M1, E1M2, FloatFormat(3, 2), FloatFormat(4, 3)])
@pytest.mark.parametrize("bias", [0.0, 1.0, 2.7, -1.3])
def test_rounding_lands_on_the_nearest_enumerated_value(fmt, bias):
    grid = torch.tensor(enumerate_values(fmt.exponent, fmt.mantissa, bias), dtype=torch.float64)
    assert torch.allclose(fpgrids.representable_values(fmt, bias), grid, rtol=1e-12, atol=0)
    top = float(grid.max())
    # Dense sweep beyond the range, plus every representable value and the midpoints' neighbours.
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([torch.linspace(-1.3 * top, 1.3 * top, 20001, dtype=torch.float64), grid,
                   mids * (1 + 1e-9), mids * (1 - 1e-9)])
    codes = fpgrids.fp_quantize(x, fmt, bias)
    assert int(codes.max()) < 2**fmt.bits
    rounded = fpgrids.fp_dequantize(codes, fmt, bias, dtype=torch.float64)
    nearest_distance = (x.unsqueeze(1) - grid.unsqueeze(0)).abs().min(1).values
    assert torch.allclose((rounded - x).abs(), nearest_distance, rtol=1e-9, atol=1e-12 * top)
    on_grid = grid[(rounded.unsqueeze(1) - grid).abs().argmin(1)]
    assert torch.allclose(rounded, on_grid, rtol=1e-12, atol=0)
    # Every value is its own fixed point, and every code decodes to a distinct value.
    assert torch.allclose(fpgrids.fp_round(grid, fmt, bias).double(), grid, rtol=1e-6)


def test_codes_cover_every_value_once():
    for fmt in (E3M0, E2M1, E1M2):
        codes = torch.arange(2**fmt.bits, dtype=torch.uint8)
        values = fpgrids.fp_dequantize(codes, fmt, 0.0, dtype=torch.float64)
        # 16 codes, 15 distinct values: +0 and -0.
        assert len(values.unique()) == 2**fmt.bits - 1
        assert torch.equal(fpgrids.fp_quantize(values, fmt, 0.0)[values != 0], codes[values != 0])


def test_default_bias_puts_the_largest_value_at_absmax():
    absmax = torch.tensor([[0.01], [0.7], [13.0]])
    for fmt in (E3M0, E2M1, E1M2):
        bias = fpgrids.default_bias(fmt, absmax)
        top = (2 - 2.0**-fmt.mantissa) * torch.exp2((2**fmt.exponent - 1) - bias)
        assert torch.allclose(top.float(), absmax)


def test_a_real_bias_is_a_scale():
    x = torch.randn(64, dtype=torch.float64)
    shifted = fpgrids.fp_round(x, E2M1, 1.0 + 0.37).double()
    scaled = fpgrids.fp_round(x * 2**0.37, E2M1, 1.0).double() / 2**0.37
    assert torch.allclose(shifted, scaled, rtol=1e-6)


def test_nibble_packing_round_trips_and_matches_compressed_tensors():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = fpgrids.pack_nibbles(codes)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert torch.equal(fpgrids.unpack_nibbles(packed), codes)
    values = fpgrids.fp_dequantize(codes, E2M1, 1.0)
    assert torch.equal(pack_fp4_to_uint8(values), packed)
    theirs = unpack_fp4_from_uint8(packed, 8, 64, dtype=torch.float32)
    assert torch.equal(theirs, values)
    with pytest.raises(CompressorError):
        fpgrids.pack_nibbles(codes[:, :3])


def test_nvfp4_matches_compressed_tensors_dequantization():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    w = torch.randn(16, 64) * torch.rand(16, 1) * 3
    w[3, 16:32] = 0  # an all-zero block
    scale, global_scale = fpgrids.nvfp4_qparams(w)
    assert scale.shape == (16, 4) and global_scale.shape == (1,)
    assert torch.equal(scale.to(torch.float8_e4m3fn).float(), scale)  # exactly FP8
    codes = fpgrids.block_quantize(w, scale / global_scale)
    ours = fpgrids.block_dequantize(codes, scale / global_scale)
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16,
                            symmetric=True, dynamic=False, scale_dtype=torch.float8_e4m3fn)
    theirs = dequantize(fpgrids.fp_dequantize(codes, E2M1, 1.0), scale, args=args,
                        global_scale=global_scale, dtype=torch.float32)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    assert torch.equal(ours[3, 16:32], torch.zeros(16))
    # Every element rounds to its block's nearest grid point (blocks of 16).
    block_scale = (scale / global_scale).repeat_interleave(16, 1)
    grid = fpgrids.representable_values(E2M1, 1.0).float()
    scaled = (w / block_scale.clamp(min=1e-30)).clamp(-6, 6)
    nearest = grid[(scaled.unsqueeze(-1) - grid).abs().argmin(-1)]
    assert torch.allclose((ours / block_scale.clamp(min=1e-30) - scaled).abs(),
                          (nearest - scaled).abs(), atol=1e-5)


def test_mxfp4_scales_are_powers_of_two_and_no_worse_than_the_ocp_rule():
    w = torch.randn(32, 128) * 0.05
    exponents = fpgrids.mxfp4_qparams(w)
    assert exponents.dtype == torch.uint8 and exponents.shape == (32, 4)
    scale = fpgrids.mx_scale(exponents)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())
    ours = fpgrids.block_dequantize(fpgrids.block_quantize(w, scale), scale)
    # OCP MX rule: shared exponent floor(log2 absmax) - 2 (E2M1's largest binade), clipping above 6.
    ocp = torch.exp2(torch.floor(torch.log2(w.reshape(32, 4, 32).abs().amax(-1))) - 2)
    theirs = fpgrids.block_dequantize(fpgrids.block_quantize(w, ocp), ocp)
    err = ((ours - w) ** 2).reshape(32, 4, 32).sum(-1)
    err_ocp = ((theirs - w) ** 2).reshape(32, 4, 32).sum(-1)
    assert (err <= err_ocp + 1e-12).all() and err.sum() < err_ocp.sum()


def test_block_sizes_must_divide_the_input():
    with pytest.raises(CompressorError, match="multiple of the block size 16"):
        fpgrids.nvfp4_qparams(torch.randn(4, 24))
    with pytest.raises(CompressorError, match="unknown FP4 format"):
        fpgrids.parse_format("E4M4")
