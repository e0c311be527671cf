"""PTQ1.61's grid (`--method ptq161`): a few salient input channels at 4 bits, the rest binarised.

Per linear [out, in], a one-dimensional mask picks the `salient` fraction of input channels whose
calibration inputs reach the largest |x|; their weights stay on a 4-bit asymmetric grid per row.
Every other weight becomes one of two values per row, times a learned factor per column:

    salient   w[r, j] = scale[r] * code[r, j] + low[r]              code in 0 .. 15
    binary    w[r, j] = (beta[r] + alpha[r] * sign[r, j]) * column[j]   sign in {-1, +1}

(PTQ1.61's (sign(w - mu_r) a_r + mu_r) r1_r r2_c with r1 folded into alpha and beta.) Stored, per
linear, everything packed densely in int32 words over the whole matrix, no padding per row:

    weight_mask       int32 [ceil(in / 32)]             1 bit per input channel: salient or not
    weight_salient    int32 [ceil(out * k * 4 / 32)]    the salient codes, row-major [out, k]
    weight_signs      int32 [ceil(out * (in - k) / 32)] 1 = +1, row-major [out, in - k]
    weight_row        float16 [out, 4]                  scale, low, alpha, beta
    weight_column     float16 [in - k]                  the binary part's column factors
    weight_shape      int64 [2]

so a 4096 x 4096 linear costs 1.6 + 0.02 bits per weight, and SmolLM2's 576-wide ones about 0.12
more (the per-row numbers spread over fewer columns). Free functions over tensors, as grids.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import CompressorError

FORMAT = "ptq161"
TENSORS = ("weight_mask", "weight_salient", "weight_signs", "weight_row", "weight_column", "weight_shape")
ROW_FIELDS = ("scale", "low", "alpha", "beta")  # weight_row's columns


@dataclass(frozen=True)
class BinaryGrid:
    """How one weight matrix is stored: plain data, shared by the pass, the writer and the loader."""

    salient: float = 0.2  # fraction of input channels kept at salient_bits
    salient_bits: int = 4

    format = FORMAT
    group_size = 0  # one set of numbers per row (for reports that ask)
    symmetric = False

    @property
    def bits(self) -> float:
        """The code bits per weight on average (the figure papers quote: 1.6 at 20% salient)."""
        return 1 + (self.salient_bits - 1) * self.salient

    def salient_count(self, in_features: int) -> int:
        return min(in_features, round(self.salient * in_features))

    def stored_bits(self, out_features: int, in_features: int) -> int:
        """Every stored bit of one linear (weight_shape aside, as for every other layout)."""
        k = self.salient_count(in_features)
        packed = words(in_features, 1) + words(out_features * k, self.salient_bits)
        packed += words(out_features * (in_features - k), 1)
        return 32 * packed + out_features * 64 + (in_features - k) * 16


def parse_grid(args: dict) -> BinaryGrid:
    """A BinaryGrid from recipe settings or a checkpoint's quantization_config, validated."""
    salient, bits = args.get("salient", 0.2), args.get("salient_bits", 4)
    if isinstance(salient, bool) or not isinstance(salient, (int, float)) or not 0 <= salient < 1:
        raise CompressorError(f"ptq161: salient must be a fraction of the input channels in [0, 1), got "
                              f"{salient!r}")
    if bits not in (2, 4, 8) or isinstance(bits, bool):
        raise CompressorError(f"ptq161: salient_bits must be 2, 4 or 8, got {bits!r}")
    return BinaryGrid(float(salient), bits)


def words(count: int, bits: int) -> int:
    """int32 words holding `count` codes of `bits` bits, packed densely."""
    return -(-count * bits // 32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, values < 2^bits, bits dividing 32) flattened into int32 words, the first
    code in the lowest bits; the last word padded with zeros."""
    per_word = 32 // bits
    flat = codes.reshape(-1).to(torch.int64)
    flat = torch.nn.functional.pad(flat, (0, words(flat.numel(), bits) * per_word - flat.numel()))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (flat.view(-1, per_word) << shifts).sum(1)
    return (packed - (packed >= 2**31) * 2**32).to(torch.int32)  # the same 32 bits, signed


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` codes (uint8) of pack_bits."""
    per_word = 32 // bits
    unsigned = packed.to(torch.int64) & (2**32 - 1)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (unsigned[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count].to(torch.uint8)


def salient_columns(absmax: torch.Tensor, grid: BinaryGrid) -> torch.Tensor:
    """bool [in]: the salient_count(in) input channels of largest calibration |x| (ties: lower index)."""
    k = grid.salient_count(len(absmax))
    order = torch.sort(absmax.float().cpu(), descending=True, stable=True).indices
    mask = torch.zeros(len(absmax), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def half(x: torch.Tensor) -> torch.Tensor:
    """Float16 values held in float32: what is stored, and what every computation uses."""
    return x.to(torch.float16).float()


def fit_binary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (beta, alpha) of the non-salient weights w [out, n]: their mean, and the mean
    |w - beta| (the least-squares alpha for signs sign(w - beta)), float16 values."""
    beta = half(w.float().mean(1))
    alpha = half((w.float() - beta[:, None]).abs().mean(1))
    return beta, alpha


def binarize(w: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """bool signs (True = +1) of w relative to each row's beta: sign(w - beta), ties to +1."""
    return w >= beta.to(w.dtype)[:, None]


def fit_salient(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (scale, low) of an asymmetric grid over w [out, k]: low = min, scale = range / (2^bits - 1),
    float16 values (scale 1 for a constant row)."""
    if w.shape[1] == 0:
        return torch.ones(w.shape[0]), torch.zeros(w.shape[0])
    low, high = w.float().amin(1), w.float().amax(1)
    scale = (high - low) / (2**bits - 1)
    return half(torch.where(scale > 0, scale, torch.ones_like(scale))), half(low)


def round_salient(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of the nearest grid value scale * code + low."""
    codes = torch.round((w.float() - low[:, None]) / scale[:, None])
    return torch.clamp(codes, 0, 2**bits - 1).to(torch.uint8)


def values(mask: torch.Tensor, salient_codes: torch.Tensor, signs: torch.Tensor, row: torch.Tensor,
           column: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] (float32) that a loader computes from the stored numbers."""
    row, column = row.float(), column.float()
    out_features = row.shape[0]
    weight = torch.empty(out_features, len(mask))
    scale, low, alpha, beta = row.unbind(1)
    weight[:, mask] = salient_codes.float() * scale[:, None] + low[:, None]
    sign = signs.float() * 2 - 1
    weight[:, ~mask] = (beta[:, None] + alpha[:, None] * sign) * column[None, :]
    return weight
