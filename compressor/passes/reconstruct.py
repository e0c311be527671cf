"""Block-wise reconstruction: once a block's linears are quantized (GPTQ, RTN) or pruned, learn what
their format allows so that the block's output matches the dense block's on the calibration windows.

The loss is the mean squared error between the compressed block's output (on the calibration
inputs it receives in the compressed model) and the dense block's output (ALGORITHMS-2.md A).
What is learned, by `train`:

    rounding  AutoRound / SignRound: a rounding offset per weight and a range multiplier per group
              (and a zero-point offset per group on an asymmetric grid), over the dense weights,
              by signed gradient descent with a linearly decaying step, from round-to-nearest
              on the initialising pass's scales (`start: dense`, as AutoRound); `start: init`
              learns around what the initialising pass rounded instead (GPTQ's error-fed weights)
    full      Block-AP (EfficientQAT): the weights themselves, the scales and the zero points under
              fake quantization, by Adam
    scales    only the numbers beside the codes, codes fixed (EfficientQAT's E2E-QP, per block): a
              range multiplier (and zero-point offset) per group of an integer grid; every row's
              and column's numbers of PTQ1.61's layout (compressor.binarygrids), by Adam. Under
              rounding or full, PTQ1.61's signs and salient codes are learned too (LearnedBinary:
              rounding by signed descent within half a step, full by Adam, unbounded)

4-bit float grids (NVFP4, MXFP4, LLM-FP4, E2M1) are learned on their own grid (LearnedFloat): the
rounding offset is in units of the grid's local spacing, NVFP4's block scales stay on FP8 and
MXFP4's on powers of two. GGUF blocks (LearnedGguf) are learned on llama.cpp's grid: rounding
offsets in steps of each sub-block, and the header's numbers moved only to values the file can hold
(the K-quants' integer sub-block scales and mins, the legacy types' float16 d and m). Learned
lookup tables (LearnedLut) learn their table values and group scales, under rounding their codes
(an offset in units of the table's local spacing), under full the weights that pick the codes. A
pruned linear keeps its mask exactly; in a sparse linear that is not quantized, the surviving
weights are learned (Adam). Rounding goes through the straight-through estimator. The forwards run
in bfloat16 autocast on CUDA and on CPUs with native bf16 (AMX/AVX512-BF16; elsewhere bf16 is
emulated and ~7x slower than float32, so `bf16: auto` keeps float32); parameters, the loss and the
final rounding are float32. Each step learns from `batch` calibration windows (AutoRound's light
recipe: 4 windows, 50 steps). The result is kept only where it lowers the block's error on all
calibration windows (evaluated in float32): reconstruction never leaves a block worse than its
initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

from compressor import binarygrids, fpgrids, gguf_quants, grids, lutgrids
from compressor.errors import CompressorError
from compressor.fpgrids import E2M1
from compressor.model import block_linears
from compressor.passes import (
    BinaryWeight,
    FloatWeight,
    GgufWeight,
    LinearState,
    LutWeight,
    QuantizedWeight,
    Scope,
    check_keys,
)
from compressor.pipeline import BlockData, batch_rows

SCOPE = Scope.BLOCK
TRAIN = ("rounding", "full", "scales")
TARGETS = ("dense", "compressed")
STARTS = ("dense", "init")


@dataclass(frozen=True)
class ReconstructOptions:
    train: str = "rounding"
    iters: int = 100  # optimiser steps per block, one calibration chunk each
    lr: float | None = None  # default: 1/iters for rounding (AutoRound); Adam's relative to the
    # weights' mean size: 1e-3 under fake quantization (full), 1e-2 for sparse float weights;
    # SCALES_LR for scales
    # The targets: the dense block on the dense model's own stream (dense), or on the compressed
    # model's stream (compressed). ("targets" in a recipe step picks modules.)
    target_stream: str = "dense"
    batch: int = 4  # calibration windows per step
    # Rounding and full: learn around the dense weights (dense: AutoRound's round-to-nearest start)
    # or around what the initialising pass rounded (init: GPTQ's error-fed weights). Measured on
    # SmolLM2's first 4 blocks at W4 g64 (full range; 64 C4 windows; KL of the whole model, the
    # other blocks dense, on 16 held-out windows): GPTQ 0.0292, GPTQ + learning from init 0.0290
    # to 0.0408 (by step size and loss), RTN 0.0562, RTN + learning from dense 0.0248. Around
    # GPTQ's weights the offsets only undo its error feedback; from the dense weights they find
    # better codes than GPTQ's. (The block error still starts from the initialising pass's result:
    # the learned codes are kept only where they beat it.) None: dense for rounding; init for full,
    # whose Adam steps of 1e-3 do not get from the dense weights back to GPTQ's error in 50 steps.
    start: str | None = None
    bf16: bool | str = "auto"  # autocast the forwards: auto = where the hardware has bf16 matmuls
    seed: int = 0
    # AdaQuant's statistics tuning, as its LLM analogue: the block's norm gains (1-D weights of its
    # RMSNorm / LayerNorm modules) are learned too (Adam, 1e-3 relative), correcting the shift in
    # activation statistics that quantization leaves.
    norms: bool = False

    @classmethod
    def from_args(cls, args: dict) -> ReconstructOptions:
        check_keys("reconstruct", args,
                   {"train", "iters", "lr", "target_stream", "batch", "start", "bf16", "seed", "norms"})
        options = cls(**args)
        if options.bf16 not in (True, False, "auto"):
            raise CompressorError(f"reconstruct: bf16 must be true, false or auto, got {options.bf16!r}")
        if not isinstance(options.batch, int) or isinstance(options.batch, bool) or options.batch < 1:
            raise CompressorError(f"reconstruct: batch must be a positive integer, got {options.batch!r}")
        if options.train not in TRAIN:
            raise CompressorError(
                f"reconstruct: train must be one of {', '.join(TRAIN)}, got {options.train!r}")
        if options.start is not None and options.start not in STARTS:
            raise CompressorError(
                f"reconstruct: start must be one of {', '.join(STARTS)}, got {options.start!r}")
        if options.target_stream not in TARGETS:
            raise CompressorError(f"reconstruct: target_stream must be one of {', '.join(TARGETS)}, "
                                  f"got {options.target_stream!r}")
        if not isinstance(options.iters, int) or isinstance(options.iters, bool) or options.iters < 1:
            raise CompressorError(f"reconstruct: iters must be a positive integer, got {options.iters!r}")
        if options.lr is not None and not (isinstance(options.lr, (int, float)) and 0 < options.lr < 1):
            raise CompressorError(f"reconstruct: lr must be in (0, 1), got {options.lr!r}")
        return options


def validate(args: dict) -> None:
    ReconstructOptions.from_args(args)


def needs_data(args: dict) -> bool:
    return True


def target_stream(args: dict) -> str:
    return ReconstructOptions.from_args(args).target_stream


# Adam's step for learned scales (train: scales and PTQ1.61's numbers), which are all O(1) multipliers
# or offsets in units of the row's own step: PTQ1.61 trains its factors with 5e-4 to 1e-3 over
# 2,560 steps; a block here gets 100. On SmolLM2's first three blocks (PTQ1.61, 100 steps) 2e-2
# left a lower block error than 5e-3 in each, 5e-2 a higher one.
SCALES_LR = 2e-2


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


class LearnedLinear:
    """One linear's trainable quantization (or sparse weights) and how to make its weight."""

    def __init__(self, state: LinearState, dense: torch.Tensor, current: torch.Tensor, train: str,
                 start: str | None = None):
        self.state, self.train = state, train
        self.mask = None if state.mask is None else state.mask.to(dense.device)
        quant = state.quant
        self.params: dict[str, torch.Tensor] = {}
        self.signed: list[torch.Tensor] = []  # parameters moved by signed descent (rounding)
        # Adam's step relative to the weights' mean size: a sparse float layer has no grid to stay
        # near, and on SmolLM2's 2:4 blocks 1e-2 lowered the block error about twice as much as
        # 1e-3 in 50 steps; weights under fake quantization move less (rounding does the rest).
        self.weight_lr = 1e-2 if quant is None else 1e-3
        self.scale_lr = SCALES_LR if train == "scales" else 1e-3  # range multipliers, zero offsets
        if quant is None:  # sparse only: learn the surviving weights
            self.params["weight"] = current.float().clone().requires_grad_()
            return
        grid = quant.grid
        self.grid = grid
        self.index = grids.group_index(dense.shape[1], grid.group_width(dense.shape[1])).to(dense.device)
        self.scale0 = quant.scale.float().to(dense.device)
        self.zero0 = quant.zero.float().to(dense.device)
        # What learning starts around (ReconstructOptions.start): the dense weight (RTN's codes), or
        # what the initialising pass rounded, GPTQ's error-fed weight (its codes are exactly
        # round(before / s)). Its fractions tell which weights sit near a rounding boundary, where a
        # small learned move flips the code (as in AutoRound).
        start = start or ("dense" if train == "rounding" else "init")
        unrounded = state.unrounded
        before = dense if unrounded is None or start == "dense" else unrounded.to(dense.device)
        if train == "rounding":
            self.latent = before.float() / self.scale0[:, self.index]
            self.params["offset"] = torch.zeros_like(self.latent, requires_grad=True)
            self.params["range"] = torch.ones_like(self.scale0, requires_grad=True)
            self.signed += [self.params["offset"], self.params["range"]]
        elif train == "scales":  # the codes stay: their distance from the zero point, in steps
            self.latent = quant.codes.float().to(dense.device) - self.zero0[:, self.index]
            self.params["range"] = torch.ones_like(self.scale0, requires_grad=True)
        else:  # full: weights, scales and zero points (Block-AP)
            self.params["weight"] = before.float().clone().requires_grad_()
            self.params["range"] = torch.ones_like(self.scale0, requires_grad=True)
        if not grid.symmetric:
            self.params["zero"] = torch.zeros_like(self.zero0, requires_grad=True)
            if train == "rounding":
                self.signed.append(self.params["zero"])

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale0 * self.params["range"]
        zero = self.zero0
        if "zero" in self.params:
            zero = torch.clamp(round_ste(self.zero0 + self.params["zero"]), 0, self.grid.maxq)
        return scale, zero

    def units(self) -> torch.Tensor:
        """The weight in grid units before rounding (codes minus zero)."""
        scale, zero = self.scale_zero()
        if self.train == "scales":
            return self.latent + (self.zero0 - zero)[:, self.index]
        if self.train == "rounding":
            ratio = self.scale0[:, self.index] / scale[:, self.index]
            return (self.latent + self.params["offset"]) * ratio
        return self.params["weight"] / scale[:, self.index]

    def weight(self) -> torch.Tensor:
        if self.state.quant is None:
            w = self.params["weight"]
        else:
            scale, zero = self.scale_zero()
            z = zero[:, self.index]
            q = torch.clamp(round_ste(self.units()) + z, 0, self.grid.maxq)
            w = scale[:, self.index] * (q - z)
        return w if self.mask is None else w * self.mask

    @torch.no_grad()
    def clamp_(self) -> None:
        if "offset" in self.params:
            self.params["offset"].clamp_(-0.5, 0.5)
        self.params.get("range", torch.ones(1)).clamp_(0.5, 1.5)
        if "zero" in self.params:
            self.params["zero"].clamp_(-2.0, 2.0)

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedWeight | None]:
        """The weight as the checkpoint stores it, and its codes (computed as the writer packs them)."""
        if self.state.quant is None:
            w = self.weight()
            return w.to(dtype), None
        scale, zero = self.scale_zero()
        scale = scale.to(self.state.quant.scale.dtype).float()  # what the loader multiplies by
        zero = torch.round(zero)
        units = self.units()
        codes = torch.clamp(torch.round(units) + zero[:, self.index], 0, self.grid.maxq)
        if self.mask is not None:
            codes = codes.where(self.mask, zero[:, self.index])
        codes = codes.to(torch.uint8)
        stored = self.state.quant
        quant = QuantizedWeight(grid=self.grid, codes=codes.cpu(), scale=scale.to(stored.scale.dtype).cpu(),
                                zero=zero.cpu(), act_order=stored.act_order)
        return grids.dequantize(codes, scale, zero, self.grid, dtype), quant


class LearnedFloat:
    """A 4-bit float layer (NVFP4, MXFP4, LLM-FP4, E2M1: compressor.fpgrids) learned on its own grid,
    as AutoRound does for MXFP4/NVFP4. In grid units u = w / s (s the block's effective scale):

        rounding  u = latent + offset x (the grid's spacing at latent), offset in [-0.5, 0.5], from
                  the dense weights; the spacing makes an offset mean what it means on an integer
                  grid, half a step either way, though E2M1's steps grow from 0.5 to 2
        full      the weights themselves under fake quantization (Adam), from the dense weights
                  (the fp4 pass keeps no error-fed weights to start from)
        scales    the codes stay; only the scales move (MXFP4: nothing to learn)

    and, except for MXFP4 (whose scales are powers of two), a range multiplier per block on the
    scale. NVFP4's block scales are stored in FP8 E4M3: the forward rounds them there too
    (straight-through), so the checkpoint holds exactly the scale that was trained."""

    def __init__(self, state: LinearState, dense: torch.Tensor, train: str):
        quant: FloatWeight = state.quant
        self.state, self.train = state, train
        device = dense.device
        self.mask = None if state.mask is None else state.mask.to(device)
        self.kind = quant.grid.format
        self.row_format = None if quant.row_format is None else quant.row_format.to(device)
        self.global_scale = None if quant.global_scale is None else quant.global_scale.float().to(device)
        stored = quant.scale.to(device)
        self.scale0 = fpgrids.mx_scale(stored) if self.kind == "mxfp4" else stored.float()
        self.index = torch.arange(dense.shape[1], device=device) // (dense.shape[1] // self.scale0.shape[1])
        self.weight_lr, self.scale_lr = 1e-3, SCALES_LR if train == "scales" else 1e-3
        self.params: dict[str, torch.Tensor] = {}
        self.signed: list[torch.Tensor] = []
        s0 = _nonzero(self.effective_scale(self.scale0))[:, self.index]
        if train == "rounding":
            self.latent = dense.float() / s0
            with torch.no_grad():
                self.spacing = self._per_format(self.latent, fpgrids.fp_step)
            self.params["offset"] = torch.zeros_like(self.latent, requires_grad=True)
            self.signed.append(self.params["offset"])
        elif train == "scales":  # the codes' own values: rounding leaves them where they are
            self.latent = self._per_format(quant.codes.to(device), _code_values)
        else:
            self.params["weight"] = dense.float().clone().requires_grad_()
        # The largest value of each row's format: units beyond it are clipped with a zero gradient
        # (as the integer grid's clamp), so a range multiplier sees what clipping costs.
        if self.row_format is None:
            self.top = torch.tensor(E2M1.max_value(fpgrids.E2M1_BIAS), device=device)
        else:
            tops = torch.tensor([f.max_value() for f in fpgrids.ROW_FORMATS], device=device)
            self.top = tops[self.row_format.long()][:, None]
        if self.kind != "mxfp4":
            self.params["range"] = torch.ones_like(self.scale0, requires_grad=True)
            if train == "rounding":
                self.signed.append(self.params["range"])

    def _per_format(self, x: torch.Tensor, function) -> torch.Tensor:
        """function(x rows, format, bias) for each row's format: E2M1 at bias 1 in the block-scaled
        layouts, each row's own format at bias 0 in LLM-FP4's (its bias lives in the scale)."""
        if self.row_format is None:
            return function(x, E2M1, fpgrids.E2M1_BIAS)
        out = torch.zeros(x.shape, device=x.device)
        for index, fmt in enumerate(fpgrids.ROW_FORMATS):
            rows = self.row_format == index
            if rows.any():
                out[rows] = function(x[rows], fmt, 0.0).float()
        return out

    def effective_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """What a weight's grid value is multiplied by (NVFP4: the FP8 block scale / global)."""
        return scale / self.global_scale if self.kind == "nvfp4" else scale

    def stored_scale(self) -> torch.Tensor:
        """The block scales as the checkpoint will hold them (NVFP4: on FP8 E4M3, straight-through)."""
        if "range" not in self.params:
            return self.scale0
        scale = self.scale0 * self.params["range"]
        if self.kind == "nvfp4":
            fp8 = scale.clamp(max=fpgrids.FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
            scale = scale + (fp8 - scale).detach()
        return scale

    def units(self, scale: torch.Tensor) -> torch.Tensor:
        s = _nonzero(self.effective_scale(scale))[:, self.index]
        if self.train == "rounding":
            s0 = _nonzero(self.effective_scale(self.scale0))[:, self.index]
            return (self.latent + self.params["offset"] * self.spacing) * (s0 / s)
        if self.train == "scales":
            return self.latent
        return self.params["weight"] / s

    def weight(self) -> torch.Tensor:
        scale = self.stored_scale()
        units = torch.maximum(torch.minimum(self.units(scale), self.top), -self.top)
        with torch.no_grad():
            rounded = self._per_format(units, fpgrids.fp_round_fast)
        w = (units + (rounded - units).detach()) * self.effective_scale(scale)[:, self.index]
        return w if self.mask is None else w * self.mask

    @torch.no_grad()
    def clamp_(self) -> None:
        if "offset" in self.params:
            self.params["offset"].clamp_(-0.5, 0.5)
        if "range" in self.params:
            self.params["range"].clamp_(0.5, 1.5)

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, FloatWeight]:
        from compressor.passes.fp4 import dequantize

        scale = self.stored_scale()
        codes = self._per_format(self.units(scale), _codes).to(torch.uint8)
        if self.mask is not None:
            codes = codes.where(self.mask, torch.zeros_like(codes))  # code 0 is +0 in every format
        stored = self.state.quant
        kept = stored.scale if self.kind == "mxfp4" else scale.detach().to(stored.scale.dtype)
        quant = FloatWeight(grid=stored.grid, codes=codes.cpu(), scale=kept.cpu(),
                            global_scale=stored.global_scale, row_format=stored.row_format,
                            act_order=stored.act_order)
        return dequantize(quant).to(dtype), quant


class LearnedGguf:
    """A linear on llama.cpp's GGUF blocks (compressor.gguf_quants) learned on its own grid. Every
    value is step x code + offset per sub-block (step x table[code] for IQ4_NL), step and offset
    made of the block header's numbers exactly as the file holds them:

        rounding  x = dense + offset x step0 (x the table's local spacing for IQ4_NL), the offset
                  per weight in [-0.5, 0.5], from the dense weights or, with `start: init`, from
                  what GPTQ rounded (its error-fed weights; GPTQ's own codes exactly where the
                  pass's header refit is off, since the refit moves the header after GPTQ rounded)
        full      the weights themselves under fake quantization (Adam)
        scales    the codes stay; only the header moves

    The header learned: the K-quants' integer sub-block scale times a multiplier in [0.5, 1.5]
    and their integer min plus an offset of at most 2, both rounded to integers in every forward
    (straight-through); the legacy types' float16 d times a multiplier, and Q4_1/Q5_1's m plus an
    offset in steps, rounded to float16. The block's d and dmin of the K-quants stay as fitted."""

    def __init__(self, state: LinearState, dense: torch.Tensor, train: str, start: str | None = None):
        quant: GgufWeight = state.quant
        self.state, self.train = state, train
        device = dense.device
        self.mask = None
        header = quant.header
        self.qtype, self.spec = header.qtype, gguf_quants.SPECS[header.qtype]
        self.per_block = self.spec.block // self.spec.sub
        self.index = torch.arange(dense.shape[1], device=device) // self.spec.sub
        self.d0 = header.d.float().to(device)
        self.dmin0 = None if header.dmin is None else header.dmin.float().to(device)
        self.sc0 = None if header.scale is None else header.scale.float().to(device)
        self.mn0 = None if header.min is None else header.min.float().to(device)
        table = gguf_quants.TABLES.get(self.qtype)
        self.table = None if table is None else torch.tensor(table, dtype=torch.float32, device=device)
        self.weight_lr, self.scale_lr = 1e-3, SCALES_LR if train == "scales" else 1e-3
        self.params: dict[str, torch.Tensor] = {}
        self.signed: list[torch.Tensor] = []
        with torch.no_grad():
            step0, _ = self.step_offset()
        self.codes = quant.codes.to(device)
        before = dense if state.unrounded is None or (start or "dense") == "dense" else state.unrounded
        before = before.float().to(device)
        if train == "rounding":
            spacing = step0[:, self.index]
            if self.table is not None:
                nearest = gguf_quants._nearest(before / _nonzero(spacing), self.table)
                spacing = spacing * local_spacing(self.table)[nearest]
            self.before, self.spacing = before, spacing
            self.params["offset"] = torch.zeros_like(before, requires_grad=True)
            self.signed.append(self.params["offset"])
        elif train == "full":
            self.params["weight"] = before.clone().requires_grad_()
        self.params["range"] = torch.ones_like(step0, requires_grad=True)
        if self.spec.asymmetric:
            self.params["zero"] = torch.zeros_like(step0, requires_grad=True)
        if train == "rounding":
            self.signed += [self.params["range"]] + ([self.params["zero"]] if self.spec.asymmetric else [])

    def _header_numbers(self, exact) -> dict[str, torch.Tensor]:
        """The header's numbers with the learned moves, each put on what the file stores by `exact`
        (straight-through rounding while training, plain rounding at the end)."""
        spec, levels = self.spec, 2**self.spec.scale_bits
        rng, zero = self.params.get("range", 1.0), self.params.get("zero", 0.0)  # before they exist: none
        numbers = {"d": self.d0, "dmin": self.dmin0}
        if self.sc0 is None:  # legacy: float16 d (and m) per block of one sub-block
            numbers["d"] = exact(self.d0 * rng, "half")
            if self.dmin0 is not None:
                numbers["dmin"] = exact(self.dmin0 + zero * self.d0.abs(), "half")
            return numbers
        low, high = (0, levels - 1) if spec.asymmetric else (-levels // 2, levels // 2 - 1)
        numbers["scale"] = torch.clamp(exact(self.sc0 * rng, "int"), low, high)
        if self.mn0 is not None:
            numbers["min"] = torch.clamp(exact(self.mn0 + zero, "int"), 0, levels - 1)
        return numbers

    def step_offset(self, numbers: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, offset) [rows, sub-blocks], as gguf_quants.BlockHeader.step_offset computes them."""
        numbers = numbers or self._header_numbers(_ste_exact)
        d = numbers["d"].repeat_interleave(self.per_block, dim=1)
        step = d if self.sc0 is None else d * numbers["scale"]
        if self.table is not None:
            return step, torch.zeros_like(step)
        if not self.spec.asymmetric:
            return step, -(2 ** (self.spec.bits - 1)) * step
        if self.sc0 is None:
            return step, numbers["dmin"]
        return step, -numbers["dmin"].repeat_interleave(self.per_block, dim=1) * numbers["min"]

    def _latent(self) -> torch.Tensor:
        if self.train == "rounding":
            return self.before + self.params["offset"] * self.spacing
        return self.params["weight"]

    def weight(self) -> torch.Tensor:
        step, offset = self.step_offset()
        step, offset = step[:, self.index], offset[:, self.index]
        if self.train == "scales":
            q = self.codes.float() if self.table is None else self.table[self.codes.long()]
            return step * q + offset
        units = (self._latent() - offset) / _nonzero(step)
        if self.table is None:
            return step * torch.clamp(round_ste(units), 0, self.spec.maxq) + offset
        units = torch.clamp(units, self.table[0], self.table[-1])
        with torch.no_grad():
            rounded = self.table[gguf_quants._nearest(units, self.table)]
        return (units + (rounded - units).detach()) * step

    @torch.no_grad()
    def clamp_(self) -> None:
        if "offset" in self.params:
            self.params["offset"].clamp_(-0.5, 0.5)
        self.params["range"].clamp_(0.5, 1.5)
        if "zero" in self.params:
            self.params["zero"].clamp_(-2.0, 2.0)

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, GgufWeight]:
        numbers = self._header_numbers(_exact)
        header = gguf_quants.BlockHeader(
            self.qtype, numbers["d"].to(torch.float16).cpu(),
            dmin=None if numbers["dmin"] is None else numbers["dmin"].to(torch.float16).cpu(),
            scale=None if self.sc0 is None else numbers["scale"].to(torch.int16).cpu(),
            min=None if self.mn0 is None else numbers["min"].to(torch.int16).cpu())
        codes = (self.codes if self.train == "scales"
                 else gguf_quants.round_to(self._latent().detach(), header.to(self.d0.device)))
        quant = GgufWeight(grid=self.state.quant.grid, codes=codes.cpu(), header=header,
                           act_order=self.state.quant.act_order)
        return gguf_quants.values(codes, header.to(codes.device)).to(dtype), quant


def local_spacing(table: torch.Tensor) -> torch.Tensor:
    """Per value of an ascending table (along its last dimension): the mean gap to its neighbours
    (the one gap at either end), the unit of a rounding offset on a non-uniform grid."""
    gaps = table.diff(dim=-1)
    return torch.cat([gaps[..., :1], (gaps[..., 1:] + gaps[..., :-1]) / 2, gaps[..., -1:]], dim=-1)


def _ste_exact(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x rounded to an integer or to float16 forward, identity backward."""
    return round_ste(x) if kind == "int" else x + (x.to(torch.float16).float() - x).detach()


@torch.no_grad()
def _exact(x: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.round(x) if kind == "int" else x.to(torch.float16).float()


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero block's scale is 0 (its weights too): divide by 1 there instead."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _codes(units: torch.Tensor, fmt, bias) -> torch.Tensor:
    return fpgrids.fp_quantize(units, fmt, bias).float()


def _code_values(codes: torch.Tensor, fmt, bias) -> torch.Tensor:
    return fpgrids.fp_dequantize(codes, fmt, bias)


class LearnedLut:
    """Learned lookup tables (compressor.lutgrids) refined on their own layout: every table value
    (an offset in units of its table's mean gap) and every group's float16 scale (a multiplier), by
    Adam; with `train: rounding` the codes too, AutoRound-style: an offset per weight in units of
    its table's local spacing, by signed descent, from the dense weights; with `train: full` the
    weights themselves (Block-AP), by Adam, from the values the initialising pass stored (`start:
    dense`: from the dense weights). Either way each weight takes the nearest value of its current
    table (straight-through). What is stored is float16 tables in ascending order (codes
    renumbered) and float16 scales, exactly what the forward used."""

    def __init__(self, state: LinearState, dense: torch.Tensor, current: torch.Tensor, train: str,
                 start: str | None = None):
        quant: LutWeight = state.quant
        self.state, self.grid = state, quant.grid
        device = dense.device
        self.codes = quant.codes.to(device)
        self.scale0, self.table0 = quant.scale.float().to(device), quant.table.float().to(device)
        gap = self.table0.diff(dim=1).mean(1, keepdim=True)
        self.gap = torch.where(gap > 0, gap, torch.ones_like(gap))
        self.weight_lr, self.scale_lr = 1e-3, SCALES_LR
        self.params = {"table": torch.zeros_like(self.table0, requires_grad=True),
                       "range": torch.ones_like(self.scale0, requires_grad=True)}
        self.signed: list[torch.Tensor] = []
        self.learns_codes = train != "scales"  # rounding and full
        if train == "rounding":
            rows, cols = dense.shape
            start_scale = lutgrids.spread(self.scale0, cols, self.grid)
            tables = lutgrids.row_tables(self.table0, rows, self.grid)
            units = dense.float() / _nonzero(start_scale)
            self.before = dense.float()
            self.spacing = local_spacing(tables).gather(1, lutgrids.nearest(units, tables)) * start_scale
            self.params["offset"] = torch.zeros_like(self.before, requires_grad=True)
            self.signed.append(self.params["offset"])
        elif train == "full":  # from the stored values (start: init, the default) or the dense weights
            before = dense if start == "dense" else current
            self.params["weight"] = before.float().clone().requires_grad_()

    def tables_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [tables, levels] (not necessarily ascending while learning) and scales [out, groups]."""
        return self.table0 + self.params["table"] * self.gap, self.scale0 * self.params["range"]

    def _units_tables(self, table: torch.Tensor, scale: torch.Tensor):
        """Each weight in units of its scale, each row's ascending table [out, levels], the scales
        spread over the columns."""
        rows, cols = self.codes.shape
        spread = lutgrids.spread(scale, cols, self.grid)
        tables = lutgrids.row_tables(table, rows, self.grid).sort(dim=1).values
        if "weight" in self.params:
            units = self.params["weight"] / _nonzero(spread)
        else:
            units = (self.before + self.params["offset"] * self.spacing) / _nonzero(spread)
        return torch.minimum(torch.maximum(units, tables[:, :1]), tables[:, -1:]), tables, spread

    def weight(self) -> torch.Tensor:
        table, scale = self.tables_scale()
        if not self.learns_codes:
            return lutgrids.values(self.codes, scale, table, self.grid)
        units, tables, spread = self._units_tables(table, scale)
        picked = tables.gather(1, lutgrids.nearest(units.detach(), tables.detach()))
        return (picked + units - units.detach()) * spread  # the table's value; d/d(units) = 1

    @torch.no_grad()
    def clamp_(self) -> None:
        self.params["range"].clamp_(0.5, 1.5)
        if "offset" in self.params:
            self.params["offset"].clamp_(-0.5, 0.5)

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, LutWeight]:
        table, scale = (binarygrids.half(x) for x in self.tables_scale())
        if self.learns_codes:
            table = table.sort(dim=1).values
            units, tables, _ = self._units_tables(table, scale)
            codes = lutgrids.nearest(units, tables).to(torch.uint8)
        else:
            table, codes = lutgrids.sort_tables(table, self.codes, self.grid)
        quant = LutWeight(grid=self.grid, codes=codes.cpu().contiguous(), scale=scale.to(torch.float16).cpu(),
                          table=table.to(torch.float16).cpu(), act_order=self.state.quant.act_order)
        return lutgrids.values(codes, scale, table, self.grid).to(dtype), quant


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """+1 where x >= 0, else -1, forward; identity backward."""
    return x + (torch.where(x >= 0, 1.0, -1.0) - x).detach()


class LearnedBinary:
    """PTQ1.61's numbers (compressor.binarygrids) learned: every row's scale, low, alpha and beta as
    offsets in units of the row's own step (scale for the salient pair, alpha for the binary pair),
    every binary column's factor as a multiplier, by Adam. With `train: rounding` the signs and the
    salient codes are learned too, AutoRound-style: an offset per weight, by signed descent, added
    to where the weight stood just before GPTQ binarised or rounded it (in steps: half the distance
    from beta in units of alpha for a sign, in units of scale for a code), so a weight near its
    boundary flips with a small move and the start is exactly the stored one. With `train: full`
    (Block-AP) the same offsets are moved by Adam (SCALES_LR, in steps) and not held within half a
    step."""

    scale_lr = SCALES_LR

    def __init__(self, state: LinearState, device: torch.device, train: str = "scales"):
        quant: BinaryWeight = state.quant
        self.state = state
        mask = quant.mask.to(device)
        # Dense [out, in] matrices once, so each step is elementwise (no masked indexing to
        # differentiate): the codes where salient, +-1 where binary, 0 elsewhere.
        self.salient = mask.float()
        self.binary_index = (~mask).nonzero().squeeze(1)
        self.codes = torch.zeros(len(quant.row), len(mask), device=device)
        self.codes[:, mask] = quant.codes.float().to(device)
        self.signs = torch.zeros_like(self.codes)
        self.signs[:, ~mask] = quant.signs.float().to(device) * 2 - 1
        self.row0, self.column0 = quant.row.float().to(device), quant.column.float().to(device)
        unit = self.row0[:, [0, 0, 2, 2]].abs()
        self.unit = torch.where(unit > 0, unit, torch.ones_like(unit))
        self.params = {"row": torch.zeros_like(self.row0, requires_grad=True),
                       "column": torch.ones_like(self.column0, requires_grad=True)}
        self.signed: list[torch.Tensor] = []
        self.latent = None
        self.full = train == "full"
        if train != "scales" and state.unrounded is not None:
            self.latent = self._latent(state.unrounded.to(device).float())
            self.params["offset"] = torch.zeros_like(self.latent, requires_grad=True)
            if not self.full:  # rounding: signed descent within half a step; full: Adam, unbounded
                self.signed.append(self.params["offset"])

    def _latent(self, before: torch.Tensor) -> torch.Tensor:
        """Each weight's position in steps, consistent with the stored codes and signs: a code's
        unrounded value within its rounding interval, a sign's half-distance (sign kept, at least
        1e-3 from the boundary). The numbers were refitted after rounding, so the raw positions
        are clamped to what the stored state says."""
        scale, low, alpha, beta = self.row0.unbind(1)
        factor = torch.ones(len(self.salient), device=before.device)
        factor[self.binary_index] = self.column0
        code = (before - low[:, None]) / self.unit[:, :1]
        code = torch.minimum(torch.maximum(code, self.codes - 0.499), self.codes + 0.499)
        half = (before / factor - beta[:, None]) / (2 * self.unit[:, 2:3])
        half = torch.where(self.signs > 0, half.clamp_min(1e-3), half.clamp_max(-1e-3))
        return torch.where(self.salient > 0, code, half)

    def numbers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.row0 + self.params["row"] * self.unit, self.column0 * self.params["column"]

    def codes_signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The salient codes and the signs as the forward uses them (straight-through when learned)."""
        if self.latent is None:
            return self.codes, self.signs
        moved = self.latent + self.params["offset"]
        codes = torch.clamp(round_ste(moved), 0, 2 ** self.state.quant.grid.salient_bits - 1)
        return codes * self.salient, sign_ste(moved) * (1 - self.salient)

    def weight(self) -> torch.Tensor:
        """binarygrids.values, as one elementwise expression over [out, in]."""
        row, column = self.numbers()
        codes, signs = self.codes_signs()
        scale, low, alpha, beta = row.unbind(1)
        factor = torch.zeros(len(self.salient), device=column.device).index_put((self.binary_index,), column)
        binary = (beta[:, None] * (1 - self.salient) + alpha[:, None] * signs) * factor
        return codes * scale[:, None] + low[:, None] * self.salient + binary

    def clamp_(self) -> None:
        if self.latent is not None and not self.full:
            self.params["offset"].clamp_(-0.5, 0.5)

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, BinaryWeight]:
        row, column = (binarygrids.half(x).cpu() for x in self.numbers())
        stored = self.state.quant
        codes, signs = (x.cpu() for x in self.codes_signs())
        mask = stored.mask
        codes = codes[:, mask].to(torch.uint8).contiguous()
        signs = (signs[:, ~mask] > 0).contiguous()
        quant = BinaryWeight(grid=stored.grid, mask=mask, codes=codes, signs=signs,
                             row=row.to(torch.float16), column=column.to(torch.float16))
        return binarygrids.values(mask, codes, signs, row, column).to(dtype), quant


def _autocast(device: torch.device, bf16: bool | str):
    if bf16 == "auto":
        from compressor.pipeline import native_bf16

        bf16 = native_bf16(device)
    enabled = bool(bf16) and device.type in ("cpu", "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _windows(data: BlockData, batch: int) -> list[tuple[int, int, int]]:
    """(chunk, first row, last row) of every `batch` windows, within the pipeline's chunks."""
    return [(c, start, min(start + batch, len(hidden)))
            for c, hidden in enumerate(data.inputs) for start in range(0, len(hidden), batch)]


def _forward(block, weights: dict[str, torch.Tensor], hidden, kwargs, device):
    from compressor.pipeline import output_hidden, to_device

    output = functional_call(block, weights, args=(hidden.to(device),), kwargs=to_device(kwargs, device))
    return output_hidden(output)


@torch.no_grad()
def block_error(block, data: BlockData, params: dict[str, torch.Tensor] | None = None) -> float:
    """Mean squared error of the block's output against the targets over every calibration chunk
    (float32), with `params` (parameter name -> tensor) in place of the block's own where given."""
    total, count = 0.0, 0
    for hidden, kwargs, target in zip(data.inputs, data.kwargs, data.targets, strict=True):
        out = _forward(block, params or {}, hidden, kwargs, data.device)
        total += float((out.float() - target.to(data.device).float()).pow(2).sum())
        count += target.numel()
    return total / count


def _learnable(state: LinearState) -> bool:
    """Integer grids, 4-bit float grids, GGUF blocks, lookup tables, PTQ1.61's layout and sparse
    float weights. Float layers whose inputs are quantized too are left as they are (their stored
    columns carry the activation quantizer's shift)."""
    if isinstance(state.quant, FloatWeight):
        return state.quant.act_bits is None
    return (isinstance(state.quant, (QuantizedWeight, BinaryWeight, GgufWeight, LutWeight))
            or (state.quant is None and state.mask is not None))


def _learner(state: LinearState, dense: torch.Tensor, current: torch.Tensor, options: ReconstructOptions):
    if isinstance(state.quant, BinaryWeight):
        return LearnedBinary(state, dense.device, options.train)
    if isinstance(state.quant, FloatWeight):
        return LearnedFloat(state, dense, options.train)
    if isinstance(state.quant, GgufWeight):
        return LearnedGguf(state, dense, options.train, options.start)
    if isinstance(state.quant, LutWeight):
        return LearnedLut(state, dense, current, options.train, options.start)
    return LearnedLinear(state, dense, current, options.train, options.start)


def refine(block, records: dict[str, LinearState], data: BlockData, args: dict) -> None:
    options = ReconstructOptions.from_args(args)
    linears = block_linears(block)
    learned = {
        name: _learner(state, data.dense_weights[name].to(data.device), linears[name].weight.data, options)
        for name, state in records.items()
        if name in linears and _learnable(state)
    }
    learned = {name: unit for name, unit in learned.items() if unit.params}  # MXFP4 under scales
    if not learned:
        return
    norms = norm_gains(block) if options.norms else {}
    tuned = {name: gain.detach().float().clone().requires_grad_() for name, gain in norms.items()}
    before = block_error(block, data)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        with torch.enable_grad():  # the pipeline runs under no_grad
            _train(block, learned, tuned, data, options)
    finally:
        for param in frozen:
            param.requires_grad_(True)
    results = {name: unit.final(linears[name].weight.dtype) for name, unit in learned.items()}
    final_norms = {name: gain.detach().to(norms[name].dtype) for name, gain in tuned.items()}
    after = block_error(block, data, {**{f"{name}.weight": weight for name, (weight, _) in results.items()},
                                      **final_norms})
    kept = after < before
    if kept:
        for name, gain in final_norms.items():
            norms[name].data.copy_(gain)
    for name, (weight, quant) in results.items():
        state = records[name]
        if kept:
            linears[name].weight.data.copy_(weight)
            if quant is not None:
                state.quant = quant
        state.unrounded = None
        state.methods.append("reconstruct")
        state.metrics.update(block_error_before=before, block_error_after=min(before, after),
                             reconstruct_kept=kept)


def norm_gains(block) -> dict[str, torch.Tensor]:
    """The block's norm gains by parameter name: 1-D weights of modules named like norms."""
    return {f"{name}.weight": module.weight for name, module in block.named_modules()
            if "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None),
                                                                    torch.Tensor)
            and module.weight.dim() == 1}


def _train(block, learned: dict[str, LearnedLinear], norms: dict[str, torch.Tensor], data: BlockData,
           options: ReconstructOptions) -> None:
    generator = torch.Generator().manual_seed(options.seed)
    signed = [p for unit in learned.values() for p in unit.signed]
    adam_params = [p for unit in learned.values() for key, p in unit.params.items()
                   if not any(p is s for s in signed)] + list(norms.values())
    sign_lr = options.lr or 1.0 / options.iters
    adam = None
    if adam_params:
        # Weights move relative to their own size; scale multipliers and zero offsets are O(1).
        groups = [{"params": [gain], "lr": 1e-3 * float(gain.detach().abs().mean())}
                  for gain in norms.values()]
        for unit in learned.values():
            for key, p in unit.params.items():
                if any(p is s for s in signed):
                    continue
                size = float(p.detach().abs().mean()) if key == "weight" else 1.0
                base_lr = unit.weight_lr if key == "weight" else unit.scale_lr
                groups.append({"params": [p], "lr": (options.lr or base_lr) * size})
        adam = torch.optim.Adam(groups)
        base = [g["lr"] for g in adam.param_groups]
    windows = _windows(data, options.batch)
    for step in range(options.iters):
        chunk, start, stop = windows[int(torch.randint(len(windows), (1,), generator=generator))]
        rows = len(data.inputs[chunk])
        weights = {f"{name}.weight": unit.weight() for name, unit in learned.items()}
        weights.update(norms)
        with _autocast(data.device, options.bf16):
            out = _forward(block, weights, data.inputs[chunk][start:stop],
                           batch_rows(data.kwargs[chunk], rows, start, stop), data.device)
        target = data.targets[chunk][start:stop].to(data.device).float()
        loss = (out.float() - target).pow(2).mean()
        if not math.isfinite(loss.item()):
            raise CompressorError("reconstruct: the loss became NaN/Inf; try --no-bf16 or a lower lr")
        params = signed + adam_params
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        decay = 1 - step / options.iters  # linear to zero, as AutoRound
        with torch.no_grad():
            for p, g in zip(signed, grads[:len(signed)], strict=True):
                if g is not None:
                    p.sub_(sign_lr * decay * torch.sign(g))
            if adam is not None:
                for p, g in zip(adam_params, grads[len(signed):], strict=True):
                    p.grad = g
                for group, lr in zip(adam.param_groups, base, strict=True):
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / options.iters))
                adam.step()
            for unit in learned.values():
                unit.clamp_()
