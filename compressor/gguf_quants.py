"""llama.cpp's GGUF block types as grids: fit a block's parameters, round onto them, write the bytes.

Every type, legacy or K-quant, is one affine grid per sub-block once its header is decoded:

    value = step * code + offset          code in [0, 2^bits - 1]

    type   block  sub  bits  header (per block)                         step        offset
    Q4_0    32    32    4    d (fp16)                                    d           -8 d
    Q4_1    32    32    4    d, m (fp16)                                 d           m
    Q5_0    32    32    5    d                                           d           -16 d
    Q5_1    32    32    5    d, m                                        d           m
    Q8_0    32    32    8    d                                           d           -128 d
    Q2_K   256    16    2    d, dmin (fp16), 4-bit scale + 4-bit min/16   d sc        -dmin m
    Q3_K   256    16    3    d, 6-bit signed scale per 16                 d sc        -4 d sc
    Q4_K   256    32    4    d, dmin, 6-bit scale + 6-bit min per 32      d sc        -dmin m
    Q5_K   256    32    5    d, dmin, 6-bit scale + 6-bit min per 32      d sc        -dmin m
    Q6_K   256    16    6    d, int8 scale per 16                         d sc        -32 d sc
    IQ4_NL  32    32    4    d                                 value = d * TABLE[code] (16 values)

(llama.cpp's symmetric types store signed codes: ours are those plus 2^(bits-1)). Since d is a float16
and sc a small integer, step is exact in float32 and so is every value: the weights computed here are
the ones llama.cpp and gguf-py decode.

`fit` chooses the header the way llama.cpp's quantizer does with an importance matrix: per sub-block,
a weighted least-squares search over candidate scales (and mins), weights = importance *
sqrt(sigma^2 + x^2) (importance = the mean squared input of each column, the diagonal of GPTQ's
Hessian); then the K-quants' sub-block scales and mins are themselves rounded onto the 4/6/8-bit grid
of the block's d / dmin. GPTQ (compressor.passes.gguf) then rounds column by column onto the fixed
(step, offset) grid with error feedback; `encode` writes the bytes exactly as ggml lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from compressor.errors import CompressorError

QK_K = 256


class GgufType(str, Enum):
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q8_0 = "q8_0"
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q5_K = "q5_k"
    Q6_K = "q6_k"
    IQ4_NL = "iq4_nl"

    @classmethod
    def parse(cls, value: str | GgufType) -> GgufType:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise CompressorError(f"unknown GGUF type {value!r}; choose {', '.join(t.value for t in cls)}")

    @property
    def ggml(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.name]


@dataclass(frozen=True)
class BlockSpec:
    block: int  # weights per block (a row's length must be a multiple)
    sub: int  # weights sharing one step and offset
    bits: int  # bits per code
    asymmetric: bool  # an offset (min) of its own per sub-block
    scale_bits: int  # K-quants: bits of each sub-block's scale (and min); 0 = legacy (fp16 d per block)
    nbytes: int  # bytes per block

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


SPECS = {
    GgufType.Q4_0: BlockSpec(32, 32, 4, False, 0, 18),
    GgufType.Q4_1: BlockSpec(32, 32, 4, True, 0, 20),
    GgufType.Q5_0: BlockSpec(32, 32, 5, False, 0, 22),
    GgufType.Q5_1: BlockSpec(32, 32, 5, True, 0, 24),
    GgufType.Q8_0: BlockSpec(32, 32, 8, False, 0, 34),
    GgufType.Q2_K: BlockSpec(QK_K, 16, 2, True, 4, 84),
    GgufType.Q3_K: BlockSpec(QK_K, 16, 3, False, 6, 110),
    GgufType.Q4_K: BlockSpec(QK_K, 32, 4, True, 6, 144),
    GgufType.Q5_K: BlockSpec(QK_K, 32, 5, True, 6, 176),
    GgufType.Q6_K: BlockSpec(QK_K, 16, 6, False, 8, 210),
    GgufType.IQ4_NL: BlockSpec(32, 32, 4, False, 0, 18),
}

# IQ4_NL's codes index a fixed non-uniform table (value = d * table[code]), denser near zero than
# Q4_0's even steps at the same 4.5 bits per weight (ggml-common.h, kvalues_iq4nl).
TABLES = {GgufType.IQ4_NL: (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)}

# The replacement when a row is not a multiple of 256: llama.cpp's (llama-quant.cpp,
# tensor_type_fallback), except that Q2_K and Q3_K fall back to IQ4_NL, as llama.cpp's did before
# it switched to Q4_0: the same 4.5 bits per weight on a finer grid.
FALLBACK = {GgufType.Q2_K: GgufType.IQ4_NL, GgufType.Q3_K: GgufType.IQ4_NL, GgufType.Q4_K: GgufType.Q5_0,
            GgufType.Q5_K: GgufType.Q5_1, GgufType.Q6_K: GgufType.Q8_0}
LLAMA_CPP_FALLBACK = {**FALLBACK, GgufType.Q2_K: GgufType.Q4_0, GgufType.Q3_K: GgufType.Q4_0}


@dataclass(frozen=True)
class GgufGrid:
    """A linear stored as GGUF blocks of one type (the record's grid, beside grids.IntGrid)."""

    qtype: GgufType

    @property
    def format(self) -> str:
        return "gguf"

    @property
    def bits(self) -> int:
        return SPECS[self.qtype].bits

    @property
    def group_size(self) -> int:
        return SPECS[self.qtype].sub

    @property
    def symmetric(self) -> bool:
        return not SPECS[self.qtype].asymmetric

    def stored_bits(self, out_features: int, in_features: int) -> int:
        spec = SPECS[self.qtype]
        return out_features * (in_features // spec.block) * spec.nbytes * 8


def bits_per_weight(qtype: GgufType) -> float:
    spec = SPECS[qtype]
    return spec.nbytes * 8 / spec.block


def fitting_type(qtype: GgufType, in_features: int, fallbacks: dict | None = None) -> GgufType:
    """The type a row of `in_features` weights gets: `qtype`, or its fallback (FALLBACK, or
    LLAMA_CPP_FALLBACK for llama.cpp's own choice)."""
    qtype = GgufType.parse(qtype)
    if in_features % SPECS[qtype].block == 0:
        return qtype
    fallback = (fallbacks or FALLBACK).get(qtype)
    if fallback is None or in_features % SPECS[fallback].block:
        raise CompressorError(f"rows of {in_features} weights fit no GGUF block type (multiples of 32)")
    return fallback


@dataclass
class BlockHeader:
    """A matrix's block parameters as stored: d (and dmin) per block, the K-quants' integer scale
    (and min) per sub-block. Tensors over [rows, blocks] and [rows, sub-blocks]."""

    qtype: GgufType
    d: torch.Tensor  # float16 [rows, blocks]
    dmin: torch.Tensor | None = None  # float16 [rows, blocks]: K asymmetric; legacy asymmetric: m
    scale: torch.Tensor | None = None  # int16 [rows, subs]: the multiplier of d (signed for Q3_K/Q6_K)
    min: torch.Tensor | None = None  # int16 [rows, subs]: the multiplier of dmin

    def split(self, rows: list[int]) -> list[BlockHeader]:
        """One header per consecutive run of `rows` rows (the linears of a stacked solve)."""
        parts = {name: None if value is None else value.split(rows)
                 for name, value in (("d", self.d), ("dmin", self.dmin), ("scale", self.scale),
                                     ("min", self.min))}
        return [BlockHeader(self.qtype, **{name: None if value is None else value[i]
                                           for name, value in parts.items()})
                for i in range(len(rows))]

    def to(self, device) -> BlockHeader:
        return BlockHeader(self.qtype, *(None if value is None else value.to(device)
                                         for value in (self.d, self.dmin, self.scale, self.min)))

    def step_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, offset) float32 [rows, sub-blocks]: value = step * code + offset (for a table type,
        value = step * table[code], offset 0)."""
        spec = SPECS[self.qtype]
        per_block = spec.block // spec.sub
        d = self.d.float().repeat_interleave(per_block, dim=1)
        step = d if self.scale is None else d * self.scale.float()
        if self.qtype in TABLES:
            offset = torch.zeros_like(step)
        elif spec.asymmetric:
            if self.scale is None:
                offset = self.dmin.float()  # legacy: m itself
            else:
                offset = -self.dmin.float().repeat_interleave(per_block, dim=1) * self.min.float()
        else:
            offset = -(2 ** (spec.bits - 1)) * step
        return step, offset


def _sub_blocks(w: torch.Tensor, width: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(rows, cols // width, width)


def _nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the table value nearest to each x (the table sorted ascending)."""
    middles = (table[1:] + table[:-1]) / 2
    return torch.bucketize(x.contiguous(), middles.to(x.device))


def _best_scale(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, inverses) -> torch.Tensor:
    """Scale per sub-block, value = scale * table[q]: for each candidate inverse scale x is rounded
    to the nearest table value and the scale refitted by weighted least squares; the best weighted
    fit wins (llama.cpp's make_qx_quants and quantize_row_iq4_nl_impl). x, weight: [..., n]."""
    table = table.to(x.device)
    best_score = torch.full(x.shape[:-1], -1.0, device=x.device)
    best = torch.zeros(x.shape[:-1], device=x.device)
    for inverse in inverses:
        q = table[_nearest(inverse[..., None] * x, table)]
        sum_qx = (weight * q * x).sum(-1)
        sum_q2 = (weight * q * q).sum(-1)
        score = torch.where(sum_q2 > 0, sum_qx * sum_qx / sum_q2.clamp_min(1e-30), torch.zeros_like(sum_q2))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best = torch.where(better, sum_qx / sum_q2.clamp_min(1e-30), best)
    return best


def _signed_extreme(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the value of largest magnitude per sub-block, the same with 1 where it is 0)."""
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return extreme, torch.where(extreme == 0, torch.ones_like(extreme), extreme)


def _fit_symmetric(x: torch.Tensor, weight: torch.Tensor, nmax: int) -> torch.Tensor:
    """Signed scale, value = scale * q with q in [-nmax, nmax - 1]: candidate steps around
    extreme / -nmax (make_qx_quants)."""
    extreme, safe = _signed_extreme(x)
    table = torch.arange(-nmax, nmax, dtype=torch.float32)
    best = _best_scale(x, weight, table, [-(nmax + 0.1 * i) / safe for i in range(-9, 10)])
    return torch.where(extreme == 0, torch.zeros_like(best), best)


def _fit_table(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, tries: int = 7) -> torch.Tensor:
    """Scale per sub-block, value = scale * table[q]: candidate scales around extreme / table[0]
    (quantize_row_iq4_nl_impl)."""
    extreme, safe = _signed_extreme(x)
    inverses = [-table[0] / safe, *((i + table[0]) / safe for i in range(-tries, tries + 1))]
    best = _best_scale(x, weight, table, inverses)
    return torch.where(extreme == 0, torch.zeros_like(best), best)


def _fit_asymmetric(x: torch.Tensor, weight: torch.Tensor, nmax: int, rmin: float = -1.0,
                    rdelta: float = 0.1, nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale >= 0, mn >= 0) per sub-block, value = scale * q - mn with q in [0, nmax]: llama.cpp's
    make_qkx2_quants (candidate ranges, each refitted by weighted least squares, min kept <= 0)."""
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    span = (hi - lo).clamp_min(1e-30)
    sum_w = weight.sum(-1)
    sum_x = (weight * x).sum(-1)

    def error_of(scale, low):
        q = torch.clamp(torch.round((x - low[..., None]) / scale.clamp_min(1e-30)[..., None]), 0, nmax)
        return (weight * (scale[..., None] * q + low[..., None] - x) ** 2).sum(-1)

    best_scale = span / nmax
    best_low = lo
    best_error = error_of(best_scale, best_low)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / span
        q = torch.clamp(torch.round(iscale[..., None] * (x - lo[..., None])), 0, nmax)
        sum_l = (weight * q).sum(-1)
        sum_l2 = (weight * q * q).sum(-1)
        sum_xl = (weight * q * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        scale = (sum_w * sum_xl - sum_x * sum_l) / det.clamp_min(1e-30)
        low = (sum_l2 * sum_x - sum_l * sum_xl) / det.clamp_min(1e-30)
        positive = low > 0  # the min stays <= 0 (zero representable), scale refitted alone
        scale = torch.where(positive, sum_xl / sum_l2.clamp_min(1e-30), scale)
        low = torch.where(positive, torch.zeros_like(low), low)
        usable = (det > 0) & (scale > 0)
        error = torch.where(usable, error_of(scale, low), torch.full_like(scale, float("inf")))
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_low = torch.where(better, low, best_low)
    flat = hi == lo
    return torch.where(flat, torch.zeros_like(best_scale), best_scale), -best_low


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def fit(w: torch.Tensor, qtype: GgufType | str, importance: torch.Tensor | None = None) -> BlockHeader:
    """The block header of w[rows, cols] (cols a multiple of the type's block) on `qtype`.
    `importance[cols]`: each input column's mean square activation (None: all equal)."""
    qtype = GgufType.parse(qtype)
    spec = SPECS[qtype]
    w = w.float()
    rows, cols = w.shape
    if cols % spec.block:
        raise CompressorError(f"{qtype.value}: rows of {cols} weights are not a multiple of {spec.block}")
    blocks = _sub_blocks(w, spec.block)
    # llama.cpp's weighting: importance * sqrt(sigma^2 + x^2), sigma^2 from the block's mean square.
    sigma2 = blocks.square().mean(-1, keepdim=True) * (2 if spec.block == QK_K else 1)
    weight = torch.sqrt(sigma2 + blocks.square())
    if importance is not None:
        weight = weight * importance.float().clamp_min(0).reshape(1, -1, spec.block)
        weight = weight + 1e-12 * weight.amax(-1, keepdim=True).clamp_min(1e-30)  # dead columns
    x = blocks.reshape(rows, cols // spec.sub, spec.sub)
    weight = weight.reshape(rows, cols // spec.sub, spec.sub)
    half = 2 ** (spec.bits - 1)
    if qtype in TABLES:
        table = torch.tensor(TABLES[qtype], dtype=torch.float32)
        return BlockHeader(qtype, _half(_fit_table(x, weight, table)))
    if spec.scale_bits == 0:  # legacy: the fitted scale (and min) are the block's fp16 header
        if spec.asymmetric:
            scale, mn = _fit_asymmetric(x, weight, spec.maxq, rmin=-0.9, rdelta=0.05, nstep=36)
            return BlockHeader(qtype, _half(scale), dmin=_half(-mn))
        return BlockHeader(qtype, _half(_fit_symmetric(x, weight, half)))

    per_block = spec.block // spec.sub
    if spec.asymmetric:  # Q2_K, Q4_K, Q5_K: unsigned scales and mins against d and dmin
        scale, mn = _fit_asymmetric(x, weight, spec.maxq)
        levels = 2**spec.scale_bits - 1
        scale_b, mn_b = scale.reshape(rows, -1, per_block), mn.reshape(rows, -1, per_block)
        top_s, top_m = scale_b.amax(-1, keepdim=True), mn_b.amax(-1, keepdim=True)
        # llama.cpp: integer = round(value * levels / block max), d = block max / levels
        inv_s = torch.where(top_s > 0, levels / top_s.clamp_min(1e-30), 0)
        inv_m = torch.where(top_m > 0, levels / top_m.clamp_min(1e-30), 0)
        q_s = torch.round(scale_b * inv_s).clamp(0, levels)
        q_m = torch.round(mn_b * inv_m).clamp(0, levels)
        return BlockHeader(qtype, _half(top_s.squeeze(-1) / levels), dmin=_half(top_m.squeeze(-1) / levels),
                           scale=q_s.reshape(rows, -1).to(torch.int16),
                           min=q_m.reshape(rows, -1).to(torch.int16))
    # Q3_K, Q6_K: signed scales against d = extreme / -2^(scale_bits - 1)
    scale = _fit_symmetric(x, weight, half).reshape(rows, -1, per_block)
    extreme = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))
    levels = 2 ** (spec.scale_bits - 1)
    iscale = torch.where(extreme != 0, -levels / torch.where(extreme == 0, 1.0, extreme), 0.0)
    q_s = torch.round(iscale * scale).clamp(-levels, levels - 1)
    d = torch.where(extreme != 0, 1 / torch.where(iscale == 0, 1.0, iscale), 0.0)
    return BlockHeader(qtype, _half(d.squeeze(-1)), scale=q_s.reshape(rows, -1).to(torch.int16))


def _code_values(qtype: GgufType, codes: torch.Tensor) -> torch.Tensor:
    """What each code multiplies the step by: the code itself, or its table value."""
    if qtype in TABLES:
        return torch.tensor(TABLES[qtype], dtype=torch.float32, device=codes.device)[codes.long()]
    return codes.float()


def column_rounder(header: BlockHeader):
    """round(col, x) -> x (one column of weights, [rows]) on its sub-block's grid, as floats: what
    GPTQ's error feedback (passes.gptq.error_feedback) rounds with."""
    spec = SPECS[header.qtype]
    step, offset = header.step_offset()
    step_t, offset_t = step.T.contiguous(), offset.T.contiguous()  # one row per sub-block
    table = torch.tensor(TABLES[header.qtype], dtype=torch.float32) if header.qtype in TABLES else None

    def round_column(col: int, upcoming: torch.Tensor) -> torch.Tensor:
        s, o = step_t[col // spec.sub], offset_t[col // spec.sub]
        scaled = (upcoming[0] - o) / torch.where(s == 0, 1.0, s)
        if table is not None:
            return s * table.to(s.device)[_nearest(scaled, table)]
        q = torch.where(s == 0, 0.0, torch.round(scaled)).clamp(0, spec.maxq)
        return s * q + o

    return round_column


def round_to(w: torch.Tensor, header: BlockHeader) -> torch.Tensor:
    """Codes of w[rows, cols] on the header's per-sub-block grids."""
    step, offset = header.step_offset()
    sub = w.shape[1] // step.shape[1]
    step = step.repeat_interleave(sub, dim=1)
    offset = offset.repeat_interleave(sub, dim=1)
    zero_step = step == 0
    scaled = (w.float() - offset) / torch.where(zero_step, 1.0, step)
    if header.qtype in TABLES:
        return _nearest(scaled, torch.tensor(TABLES[header.qtype], dtype=torch.float32)).to(torch.uint8)
    q = torch.where(zero_step, 0.0, torch.round(scaled))
    return q.clamp(0, SPECS[header.qtype].maxq).to(torch.uint8)


def values(codes: torch.Tensor, header: BlockHeader) -> torch.Tensor:
    """The float32 weights the codes stand for (what llama.cpp computes)."""
    step, offset = header.step_offset()
    sub = codes.shape[1] // step.shape[1]
    return (step.repeat_interleave(sub, dim=1) * _code_values(header.qtype, codes)
            + offset.repeat_interleave(sub, dim=1))


def quantize(w: torch.Tensor, qtype: GgufType | str, importance: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, BlockHeader]:
    """Round to nearest onto the fitted grid: (codes, header)."""
    header = fit(w, qtype, importance)
    return round_to(w, header), header


# --- the bytes, as ggml lays them out (ggml-common.h) ---------------------------------------------

def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().contiguous().numpy()


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return _np(x.to(torch.float16))[..., None].view(np.uint8)


def _pack_crumbs(q: np.ndarray) -> np.ndarray:
    """[..., 256] 2-bit values -> [..., 64]: per half of 128, byte l holds q[l], q[l+32], q[l+64] and
    q[l+96] from the low bits up."""
    q = q.reshape(*q.shape[:-1], 2, 4, 32).astype(np.uint8)
    out = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return out.reshape(*q.shape[:-3], 64)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins [..., 8] -> the 12 bytes of Q4_K/Q5_K (get_scale_min_k4's inverse)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    return out


def _pack_q3_scales(sc: np.ndarray) -> np.ndarray:
    """16 6-bit scales (stored + 32) [..., 16] -> the 12 bytes of Q3_K."""
    sc = sc.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:8] = (sc[..., 0:8] & 0xF) | ((sc[..., 8:16] & 0xF) << 4)
    high = sc >> 4  # 2 bits each: scale j goes to byte 8 + j % 4, bits 2 * (j // 4)
    for j in range(16):
        out[..., 8 + j % 4] |= high[..., j] << (2 * (j // 4))
    return out


def encode(codes: torch.Tensor, header: BlockHeader) -> np.ndarray:
    """The GGUF bytes [rows, blocks * block_bytes] of `codes` [rows, cols] under `header`."""
    qtype = header.qtype
    spec = SPECS[qtype]
    rows, cols = codes.shape
    nblocks = cols // spec.block
    q = _np(codes).astype(np.uint8).reshape(rows, nblocks, spec.block)
    d = _f16_bytes(header.d)
    if qtype in (GgufType.Q4_0, GgufType.Q4_1, GgufType.Q5_0, GgufType.Q5_1, GgufType.Q8_0, GgufType.IQ4_NL):
        parts = [d]
        if spec.asymmetric:
            parts.append(_f16_bytes(header.dmin))
        if spec.bits == 5:
            bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            parts.append(bits.sum(-1, dtype=np.uint32)[..., None].view(np.uint8))
        if spec.bits == 8:
            parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        else:
            parts.append((q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4))
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    subs = spec.block // spec.sub
    sc = _np(header.scale).reshape(rows, nblocks, subs)
    if qtype == GgufType.Q2_K:
        mn = _np(header.min).reshape(rows, nblocks, subs)
        parts = [(sc | (mn << 4)).astype(np.uint8), _pack_crumbs(q), d, _f16_bytes(header.dmin)]
    elif qtype == GgufType.Q3_K:
        hmask = np.zeros((rows, nblocks, 32), dtype=np.uint8)
        high = (q >> 2) & 1  # element j: byte j % 32, bit j // 32
        for bit in range(8):
            hmask |= high[..., bit * 32:(bit + 1) * 32] << bit
        parts = [hmask, _pack_crumbs(q & 3), _pack_q3_scales(sc + 32), d]
    elif qtype in (GgufType.Q4_K, GgufType.Q5_K):
        mn = _np(header.min).reshape(rows, nblocks, subs)
        pairs = q.reshape(rows, nblocks, 4, 2, 32)  # 64 weights per 32 bytes: first 32 low, next 32 high
        low = (pairs[..., 0, :] & 0xF) | ((pairs[..., 1, :] & 0xF) << 4)
        parts = [d, _f16_bytes(header.dmin), _pack_k_scales(sc, mn)]
        if qtype == GgufType.Q5_K:
            high = (q >> 4) & 1  # element 32 * k + j: byte j, bit k
            qh = np.zeros((rows, nblocks, 32), dtype=np.uint8)
            for k in range(8):
                qh |= high[..., k * 32:(k + 1) * 32] << k
            parts.append(qh)
        parts.append(low.reshape(rows, nblocks, 128))
    else:  # Q6_K
        half = q.reshape(rows, nblocks, 2, 4, 32)  # per 128: four runs of 32
        ql = np.concatenate([(half[..., 0, :] & 0xF) | ((half[..., 2, :] & 0xF) << 4),
                             (half[..., 1, :] & 0xF) | ((half[..., 3, :] & 0xF) << 4)], axis=-1)
        qh = ((half[..., 0, :] >> 4) | ((half[..., 1, :] >> 4) << 2) | ((half[..., 2, :] >> 4) << 4)
              | ((half[..., 3, :] >> 4) << 6))
        parts = [ql.reshape(rows, nblocks, 128), qh.reshape(rows, nblocks, 64),
                 sc.astype(np.int8).view(np.uint8), d]
    return np.concatenate([p.astype(np.uint8) for p in parts], axis=-1).reshape(rows, -1)


def decode(data: np.ndarray, qtype: GgufType | str, cols: int) -> torch.Tensor:
    """float32 weights [rows, cols] from GGUF bytes, by gguf-py's reference decoder."""
    from gguf import quants

    qtype = GgufType.parse(qtype)
    flat = quants.dequantize(np.ascontiguousarray(data).reshape(-1), qtype.ggml)
    return torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(-1, cols).copy())


# --- a closed-form refit of the float header once the codes are fixed ------------------------------

def refit(w: torch.Tensor, codes: torch.Tensor, header: BlockHeader, hessian: torch.Tensor,
          chunk: int = 256) -> BlockHeader:
    """The header's float16 numbers (d, and m / dmin) that minimise the layer's output error
    (w - v)^T H (w - v) per row, given the codes and the K-quants' integer sub-block scales and mins.

    Every value is linear in them: v_j = d_B(j) a_j + m_B(j) b_j with a_j, b_j fixed by the codes
    (legacy: a = q - 2^(bits-1) or q, b = 1; K-quants: a = sc (q - ...), b = -min), so the best header
    is one small least-squares solve per row, in the metric of the input Hessian H. GPTQ chose the
    codes for the header fitted before it; this moves the header to where those codes are best.
    """
    spec = SPECS[header.qtype]
    rows, cols = w.shape
    blocks, width = cols // spec.block, spec.block
    q = codes.float()
    multiplier = 1.0 if header.scale is None else header.scale.float().repeat_interleave(spec.sub, 1)
    if header.qtype in TABLES:
        q = _code_values(header.qtype, codes)
    bases = [multiplier * (q if spec.asymmetric or header.qtype in TABLES else q - 2 ** (spec.bits - 1))]
    if spec.asymmetric:
        bases.append(torch.ones_like(q) if header.min is None
                     else -header.min.float().repeat_interleave(spec.sub, 1))
    hessian = hessian.float()
    by_block = hessian.reshape(blocks, width, cols)  # H's rows grouped by block
    target = w.float() @ hessian  # rows of (H w)
    count = len(bases) * blocks
    solved = torch.empty(rows, count)
    for start in range(0, rows, chunk):
        part = slice(start, min(start + chunk, rows))
        n = part.stop - part.start
        system = torch.empty(n, count, count)
        rhs = torch.empty(n, count)
        for i, a in enumerate(bases):
            a = a[part].reshape(n, blocks, width)
            rhs[:, i * blocks:(i + 1) * blocks] = (a * target[part].reshape(n, blocks, width)).sum(-1)
            # (a restricted to block b)^T H: one [n, width] x [width, cols] product per block
            a_h = torch.einsum("rbi,bik->rbk", a, by_block).reshape(n, blocks, blocks, width)
            for k, b in enumerate(bases):
                gram = (a_h * b[part].reshape(n, 1, blocks, width)).sum(-1)
                system[:, i * blocks:(i + 1) * blocks, k * blocks:(k + 1) * blocks] = gram
        # A block whose codes carry no signal (all on zero) has an empty row: a small ridge keeps the
        # solve defined and sends its number to 0, which changes none of its values.
        diagonal = system.diagonal(dim1=1, dim2=2)
        ridge = 1e-6 * diagonal.abs().mean(-1, keepdim=True).clamp_min(1e-30)
        system = system + torch.diag_embed(ridge.expand_as(diagonal) + (diagonal == 0) * 1.0)
        solved[part] = torch.linalg.solve(system, rhs)
    d = _half(solved[:, :blocks])
    if not spec.asymmetric:
        return BlockHeader(header.qtype, d, scale=header.scale)
    return BlockHeader(header.qtype, d, dmin=_half(solved[:, blocks:]), scale=header.scale, min=header.min)
