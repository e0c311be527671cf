"""Floating-point (minifloat) quantization grids as free functions over tensors.

A format ExMy has a sign bit, E exponent bits and M mantissa bits, and every code is a finite
number (no inf/NaN codes, as in E2M1 and LLM-FP4). With a real-valued exponent bias b the values are

    subnormal, exponent field 0:   (m / 2^M) * 2^(1 - b)
    normal, exponent field e > 0:  (1 + m / 2^M) * 2^(e - b)

and the largest is (2 - 2^-M) * 2^(2^E - 1 - b). The factor 2^-b comes out of every value, so a
real bias is the same thing as a scale: the values of bias b are those of bias 0 times 2^-b.

Rounding follows LLM-FP4 (Liu et al., 2023): clamp to the largest value, then
    step = 2^(max(floor(log2|x| + b), 1) - M - b),   x_q = round(x / step) * step
and the code of x_q is found on the way: with p = max(floor(log2|x| + b), 1) and k = round(|x| / step),
the magnitude's index is (p - 1) * 2^M + k (k may reach 2^(M+1): that is the next binade's first code).

Two storage formats engines load use E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives: bias 1) with a
scale per block of input columns:
- NVFP4: blocks of 16, scale in FP8 E4M3, divided by one float32 global scale per tensor;
- MXFP4: blocks of 32, scale a power of two stored as its E8M0 exponent (uint8, bias 127).
Codes are 4-bit: sign in bit 3, magnitude index in bits 0-2; two per byte, the even column low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import CompressorError

FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class FloatFormat:
    exponent: int
    mantissa: int

    @property
    def bits(self) -> int:
        return 1 + self.exponent + self.mantissa

    @property
    def name(self) -> str:
        return f"E{self.exponent}M{self.mantissa}"

    def max_value(self, bias: float = 0.0) -> float:
        return (2 - 2.0**-self.mantissa) * 2.0 ** (2**self.exponent - 1 - bias)


E3M0, E2M1, E1M2 = FloatFormat(3, 0), FloatFormat(2, 1), FloatFormat(1, 2)
E4M3, E5M2 = FloatFormat(4, 3), FloatFormat(5, 2)
FP4_FORMATS = {f.name: f for f in (E3M0, E2M1, E1M2)}
# Formats searched for simulated activation quantization, by bit width (LLM-FP4's W4A8 / W4A4).
ACT_FORMATS = {8: (E4M3, E5M2), 4: (E2M1, E3M0, E1M2)}
E2M1_BIAS = 1.0  # the standard E2M1 (OCP MX, NVFP4): largest value 6


def parse_format(name: str) -> FloatFormat:
    key = str(name).upper()
    if key not in FP4_FORMATS:
        raise CompressorError(f"unknown FP4 format {name!r}; choose one of: {', '.join(FP4_FORMATS)}")
    return FP4_FORMATS[key]


def magnitude_table(fmt: FloatFormat) -> torch.Tensor:
    """The 2^(E+M) non-negative values of `fmt` at bias 0, indexed by their code (float64)."""
    values = []
    for index in range(2 ** (fmt.exponent + fmt.mantissa)):
        e, m = index >> fmt.mantissa, index & (2**fmt.mantissa - 1)
        fraction = m / 2**fmt.mantissa
        values.append(fraction * 2.0 if e == 0 else (1 + fraction) * 2.0**e)
    return torch.tensor(values, dtype=torch.float64)


def representable_values(fmt: FloatFormat, bias: float = 0.0) -> torch.Tensor:
    """Every value `fmt` can hold at `bias`, sorted, zero once (float64)."""
    positive = magnitude_table(fmt) * 2.0**-bias
    return torch.cat([-positive.flip(0), positive]).unique()


def default_bias(fmt: FloatFormat, absmax: torch.Tensor) -> torch.Tensor:
    """The bias whose largest value equals absmax (LLM-FP4's starting point)."""
    absmax = absmax.double().clamp(min=1e-30)
    return (2**fmt.exponent - 1) - torch.log2(absmax / (2 - 2.0**-fmt.mantissa))


def fp_quantize(x: torch.Tensor, fmt: FloatFormat, bias: torch.Tensor | float) -> torch.Tensor:
    """Codes (uint8: sign << (E+M) | magnitude index) of x rounded onto `fmt` at `bias`.

    `bias` broadcasts against x (a scalar, or [rows, 1] for one bias per output channel).
    """
    x = x.double()
    bias = torch.as_tensor(bias, dtype=torch.float64, device=x.device)
    largest = (2 - 2.0**-fmt.mantissa) * torch.exp2((2**fmt.exponent - 1) - bias)
    magnitude = torch.minimum(x.abs(), largest)
    binade = torch.floor(torch.log2(magnitude) + bias).clamp(min=1)  # log2(0) = -inf -> 1
    step = torch.exp2(binade - fmt.mantissa - bias)
    k = torch.round(magnitude / step)
    index = (binade - 1) * 2**fmt.mantissa + k
    index = index.clamp(max=2 ** (fmt.exponent + fmt.mantissa) - 1)  # float noise at the top
    sign = (x < 0) & (index > 0)
    return (index + sign * 2 ** (fmt.exponent + fmt.mantissa)).to(torch.uint8)


def fp_dequantize(
    codes: torch.Tensor, fmt: FloatFormat, bias: torch.Tensor | float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The values of `codes` under `fmt` at `bias`."""
    half = 2 ** (fmt.exponent + fmt.mantissa)
    codes = codes.long()
    table = magnitude_table(fmt).to(codes.device)
    value = table[codes % half] * torch.where(codes >= half, -1.0, 1.0).double()
    bias = torch.as_tensor(bias, dtype=torch.float64, device=codes.device)
    return (value * torch.exp2(-bias)).to(dtype)


def fp_round(x: torch.Tensor, fmt: FloatFormat, bias: torch.Tensor | float) -> torch.Tensor:
    """x rounded onto the grid and back (float32)."""
    return fp_dequantize(fp_quantize(x, fmt, bias), fmt, bias)


def fp_step(x: torch.Tensor, fmt: FloatFormat, bias: torch.Tensor | float) -> torch.Tensor:
    """The grid's spacing where x lies (x clamped to the largest value), in x's dtype: the unit
    in which a learned rounding offset moves x (compressor.passes.reconstruct)."""
    bias = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    top = (2 - 2.0**-fmt.mantissa) * torch.exp2((2**fmt.exponent - 1) - bias)
    binade = torch.floor(torch.log2(torch.minimum(x.abs(), top)) + bias).clamp_(min=1)
    return torch.exp2(binade - fmt.mantissa - bias)


def fp_round_fast(x: torch.Tensor, fmt: FloatFormat, bias: torch.Tensor | float) -> torch.Tensor:
    """fp_round in x's dtype without building codes: for searches and simulated activations.
    Agrees with fp_round except at float32 rounding of exact ties."""
    bias = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
    top = (2 - 2.0**-fmt.mantissa) * torch.exp2((2**fmt.exponent - 1) - bias)
    step = fp_step(x, fmt, bias)
    return torch.copysign(torch.round(torch.minimum(x.abs(), top) / step) * step, x)


# --- block-scaled E2M1: NVFP4 and MXFP4 -------------------------------------------------------


def _blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = w.shape
    if cols % size:
        raise CompressorError(f"{cols} input columns are not a multiple of the block size {size}")
    return w.reshape(rows, cols // size, size)


def nvfp4_qparams(w: torch.Tensor, block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8-E4M3 block scales [rows, cols/16] as float32, float32 global scale [1]).

    The loader computes w = E2M1(code) * block_scale / global_scale; the global scale maps the
    tensor's largest block scale (absmax / 6) to the top of FP8's range (compressed-tensors' rule).
    """
    w = w.float()
    absmax = w.abs().amax()
    global_scale = torch.where(absmax > 0, FP8_E4M3_MAX * 6.0 / absmax, torch.ones_like(absmax))
    block_max = _blocks(w, block).abs().amax(-1)
    scale = (global_scale * block_max / 6.0).clamp(max=FP8_E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).float()
    return scale, global_scale.reshape(1).float()


def mxfp4_qparams(w: torch.Tensor, block: int = 32) -> torch.Tensor:
    """E8M0 exponents [rows, cols/32] (uint8, bias 127): per block, of the two powers of two
    around absmax / 6 (one clips the largest value to 6, the other does not), the one with the
    smaller squared rounding error."""
    blocks = _blocks(w.float(), block)
    block_max = blocks.abs().amax(-1).clamp(min=2.0**-126)
    low = torch.floor(torch.log2(block_max / 6.0))
    best_exp, best_err = low, None
    for exponent in (low, low + 1):
        scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
        err = ((fp_round(scaled, E2M1, E2M1_BIAS) - scaled) * torch.exp2(exponent).unsqueeze(-1))
        err = err.pow(2).sum(-1)
        if best_err is None:
            best_err = err
        else:
            best_exp = torch.where(err < best_err, exponent, best_exp)
            best_err = torch.minimum(err, best_err)
    return (best_exp + 127).clamp(0, 254).to(torch.uint8)


def mx_scale(exponents: torch.Tensor) -> torch.Tensor:
    return torch.exp2(exponents.float() - 127)


def block_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of w[rows, cols] given one effective scale per block ([rows, cols/block])."""
    block = w.shape[1] // scale.shape[1]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero block stays zero
    scaled = w.float() / safe.repeat_interleave(block, dim=1)
    return fp_quantize(scaled, E2M1, E2M1_BIAS)


def block_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    block = codes.shape[1] // scale.shape[1]
    values = fp_dequantize(codes, E2M1, E2M1_BIAS)
    return (values * scale.float().repeat_interleave(block, dim=1)).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols] of 4-bit codes -> uint8 [rows, cols/2], the even column in the low nibble."""
    if codes.shape[1] % 2:
        raise CompressorError("4-bit packing needs an even number of input columns")
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out



# --- how one weight matrix is stored: plain data, like grids.IntGrid -------------------------

FLOAT_FORMATS = {
    "nvfp4": "E2M1 codes, FP8-E4M3 scale per 16 inputs, float32 global scale (compressed-tensors)",
    "mxfp4": "E2M1 codes, power-of-two (E8M0) scale per 32 inputs (compressed-tensors)",
    "fp4": "LLM-FP4: per output channel, the searched format (E3M0/E2M1/E1M2) and exponent bias",
    "e2m1": "plain E2M1 per output channel, bias from the row's absmax (LLM-FP4's baseline)",
}
ROW_FORMATS = (E3M0, E2M1, E1M2)  # index stored per row in the LLM-FP4 layout


@dataclass(frozen=True)
class FloatGrid:
    format: str  # a key of FLOAT_FORMATS
    bits: int = 4
    symmetric: bool = True

    block: int = 0  # fp4 / e2m1: columns per exponent bias (0 = one per output channel)

    @property
    def group_size(self) -> int:
        return {"nvfp4": 16, "mxfp4": 32}.get(self.format, self.block)

    def num_groups(self, in_features: int) -> int:
        size = self.group_size
        return in_features // size if 0 < size < in_features else 1

    def is_ragged(self, in_features: int) -> bool:
        return bool(self.group_size) and in_features % self.group_size != 0


def float_grid(name: str, group_size: int = 0) -> FloatGrid:
    key = str(name).lower()
    if key not in FLOAT_FORMATS:
        raise CompressorError(
            f"unknown format {name!r}; choose one of: int, {', '.join(FLOAT_FORMATS)}"
        )
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
        raise CompressorError(f"group size must be 0 (per channel) or positive, got {group_size!r}")
    return FloatGrid(key, block=group_size if key in ("fp4", "e2m1") else 0)


def row_dequantize(codes: torch.Tensor, row_format: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LLM-FP4 layout -> float32 weight: each row's codes in its own format, times 2^-bias per
    (row, group of in/groups columns), scale [out, groups].

    The bias is applied as a stored float32 scale so that this, the in-memory model and the
    checkpoint loader all compute bit-identical weights.
    """
    values = torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    for index, fmt in enumerate(ROW_FORMATS):
        rows = row_format == index
        if rows.any():
            values[rows] = fp_dequantize(codes[rows], fmt, 0.0)
    return values * scale.float().repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)


def row_quantize(w: torch.Tensor, row_format: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes of w in the LLM-FP4 layout: quantizing w / 2^-b at bias 0 is quantizing w at bias b."""
    scaled = w.float() / scale.float().repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
    for index, fmt in enumerate(ROW_FORMATS):
        rows = row_format == index
        if rows.any():
            codes[rows] = fp_quantize(scaled[rows], fmt, 0.0)
    return codes
