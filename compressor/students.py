"""The student of `compress distill`: a checkpoint of this project (or a dense model and a target
format) read back into records, and one trainable unit per compressed linear.

A unit holds the tensors training may move (`params`) and makes the linear's weight from them on
every forward, through the grid's straight-through estimator, so the loss sees exactly the weights
the checkpoint will hold:

    params   integer grids: latent float weights and the grid's range / zero-point offsets,
             re-rounded every step (reconstruct's Block-AP unit); sparse students: the surviving
             weights, mask fixed
    scales   integer grids: only the range multipliers and zero-point offsets, codes fixed
             (EfficientQAT's E2E-QP)
    lora     ApiQ-style adapters B @ A beside the fixed student weight, initialised from the
             truncated SVD of the error to the teacher's weight; merged and rounded back onto the
             student's grid (its scales) at the end
    ternary  BitNet b1.58: latent float weights, {-1, 0, 1} x absmean (or median) of |W| per tensor
             or per row; activations 8-bit absmax per token while training; written as a 2-bit
             symmetric per-channel integer checkpoint (codes 1, 2, 3) that transformers loads.
             Optionally phased in (`ramp`): the forward sees w + lam * (Q(w) - w), lam rising
             linearly from 0 to 1 over the first part of training, so a pretrained model is not
             thrown into ternary all at once (the warm-up of HF's 1.58-bit fine-tuning study)
    N:M      progressive gradient flow (pgf: the pruned weights enter the forward scaled by a
             factor that decays to 0, masks re-chosen by magnitude until then), SR-STE (sparse
             forward, dense gradient, pruned weights decayed) or a fixed mask

`final(dtype)` returns the weight as the checkpoint stores it and its codes (or None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compressor import grids
from compressor.errors import CompressorError
from compressor.grids import IntGrid, sign_offset
from compressor.passes import LinearState, QuantizedWeight
from compressor.passes.reconstruct import LearnedLinear
from compressor.sparsity import Pattern, mask_holds, select_mask

PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
QUANTIZERS = ("absmean", "median")
SCHEDULES = ("pgf", "srste", "fixed")
DECAYS = ("linear", "exp")
TERNARY_GRID = IntGrid(bits=2, group_size=0, symmetric=True)


@dataclass
class Student:
    model: torch.nn.Module
    tokenizer: object
    records: dict[str, LinearState]  # the compressed linears (empty for a dense student)
    manifest: dict | None  # compress.json of a checkpoint of this project; None for a dense model


# -- reading a student -----------------------------------------------------------------------------
def load_student(source, dense_target: bool) -> Student:
    """The model dequantized, and a record per compressed linear with its codes / mask as stored.
    `dense_target`: a dense model is accepted (the run gives it a format: ternary or N:M)."""
    from compressor.files import tensor_reader
    from compressor.job import read_manifest
    from compressor.model import load_model, read_json
    from compressor.runtime import _targets, read_linear

    folder = Path(source.path)
    manifest = read_manifest(folder) if folder.is_dir() and not source.gguf_file else None
    if manifest is None and not dense_target:
        raise CompressorError(f"{source.label} is not a checkpoint of this project (no compress.json); "
                              "a dense student needs --format ternary or --pattern N:M")
    model, tokenizer = load_model(source)
    records: dict[str, LinearState] = {}
    if manifest is None:
        return Student(model, tokenizer, records, None)
    if manifest.get("embeddings"):
        raise CompressorError(f"{source.label}: int8 embeddings in the file are not trained by distill; "
                              "distill the checkpoint made without --embeddings int8")
    qconfig = read_json(folder / "config.json").get("quantization_config") or {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = _targets(qconfig, linears) if qconfig.get("quant_method") == "compressed-tensors" else {}
    _, read = tensor_reader(folder)
    for name, entry in manifest["modules"].items():
        weight = linears[name].weight
        state = LinearState(name=name, weight=weight.detach().float().clone(), dtype=weight.dtype,
                            methods=list(entry.get("methods", [])))
        if "bits" in entry:
            if entry.get("format", "int") != "int" or name not in targets:
                raise CompressorError(f"{name}: distill trains integer-grid (GPTQ / RTN) and sparse "
                                      f"students; this layer is {entry.get('format', '?')}")
            stored = read_linear(name, targets[name], read)
            grid = IntGrid(bits=stored.bits, group_size=entry["group_size"], symmetric=stored.zero is None,
                           full_range=bool(entry.get("full_range", False)))
            zero = stored.zero if stored.zero is not None else torch.full_like(stored.scale,
                                                                               sign_offset(stored.bits))
            state.quant = QuantizedWeight(grid=grid, codes=stored.codes.to(torch.uint8),
                                          scale=read(f"{name}.weight_scale").reshape(stored.scale.shape),
                                          zero=zero, act_order=bool(entry.get("act_order", False)))
        if "sparsity" in entry or any(m in PRUNING_METHODS for m in state.methods):
            state.mask = state.weight != 0
            state.metrics["pattern"] = entry.get("pattern", "unstructured")
        records[name] = state
    return Student(model, tokenizer, records, manifest)


def check_pattern(records: dict[str, LinearState], pattern: Pattern) -> None:
    """A sparse student trained under --pattern must hold it already."""
    for name, state in records.items():
        if state.quant is not None or state.mask is None:
            raise CompressorError(f"--pattern trains a dense or sparse float student; {name} is "
                                  f"{'quantized' if state.quant is not None else 'dense'}")
        if not mask_holds(state.mask, pattern):
            raise CompressorError(f"{name}: the student's mask does not hold the pattern {pattern.label}")


# -- units -------------------------------------------------------------------------------------------
def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def quantize_activations(x: torch.Tensor, bits: int, mix: float = 1.0) -> torch.Tensor:
    """Symmetric absmax per token (BitNet b1.58), straight-through; `mix` < 1 moves x only that
    fraction of the way to its quantized value (the ternary ramp)."""
    top = 2 ** (bits - 1) - 1
    step = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / top
    return x + mix * (torch.clamp(torch.round(x / step), -top - 1, top) * step - x).detach()


class TernaryUnit:
    """BitNet b1.58: w = s * clamp(round(W / s), -1, 1), s = absmean (or median) of |W|, all STE.
    With `ramp` > 0 the quantization is phased in over that fraction of training (`mix`)."""

    def __init__(self, weight: torch.Tensor, quantizer: str = "absmean", per_channel: bool = False,
                 ramp: float = 0.0):
        self.quantizer, self.per_channel, self.ramp = quantizer, per_channel, ramp
        self.params = {"weight": weight.detach().float().clone()}
        self.mask = None
        self.update(0.0)

    def update(self, progress: float) -> None:
        """At `progress` (0..1) of training: how far the forward has moved onto the ternary grid."""
        self.mix = min(1.0, progress / self.ramp) if self.ramp > 0 else 1.0

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        a = w.detach().abs()
        if not self.per_channel:
            a = a.reshape(1, -1)
        if self.quantizer == "absmean":
            return a.mean(dim=1, keepdim=True).clamp(min=1e-8)
        return a.median(dim=1, keepdim=True).values.clamp(min=1e-8)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / self.scale(w)), -1, 1)

    def weight(self) -> torch.Tensor:
        w = self.params["weight"]
        return w + self.mix * (self.codes(w) * self.scale(w) - w).detach()

    def clamp_(self) -> None:
        pass

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedWeight]:
        w = self.params["weight"]
        scale = self.scale(w).expand(w.shape[0], 1).to(dtype).float()
        codes = (self.codes(w) + sign_offset(2)).to(torch.uint8)
        zero = torch.full_like(scale, sign_offset(2))
        quant = QuantizedWeight(grid=TERNARY_GRID, codes=codes.cpu(), scale=scale.to(dtype).cpu(),
                                zero=zero.cpu())
        return grids.dequantize(codes, scale, zero, TERNARY_GRID, dtype), quant


class SparseTrainUnit:
    """N:M sparse training of latent weights (see the module docstring for the schedules)."""

    SRSTE_DECAY = 2e-4  # SR-STE's lambda_W: the pruned weights' extra decay

    def __init__(self, weight: torch.Tensor, pattern: Pattern, schedule: str,
                 mask: torch.Tensor | None = None, decay: str = "linear", decay_end: float = 0.75):
        self.pattern, self.schedule, self.decay, self.decay_end = pattern, schedule, decay, decay_end
        self.params = {"weight": weight.detach().float().clone()}
        self.mask = mask.clone() if mask is not None else select_mask(weight.detach().abs().float(), pattern)
        self.factor = 1.0 if schedule == "pgf" else 0.0

    def update(self, progress: float) -> None:
        """At `progress` (0..1) of training: the pgf factor, and masks re-chosen until decay_end."""
        if self.schedule == "fixed":
            return
        if self.schedule == "pgf":
            self.factor = pgf_factor(progress, self.decay, self.decay_end)
        if progress < self.decay_end:
            self.mask = select_mask(self.params["weight"].detach().abs(), self.pattern)

    def weight(self) -> torch.Tensor:
        w = self.params["weight"]
        if self.schedule == "srste":
            return SrSte.apply(w, self.mask, self.SRSTE_DECAY)
        if self.schedule == "pgf" and self.factor > 0:
            return torch.where(self.mask, w, w * self.factor)
        return w * self.mask

    def clamp_(self) -> None:
        pass

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        if self.schedule != "fixed":
            self.mask = select_mask(self.params["weight"].abs(), self.pattern)
        return (self.params["weight"] * self.mask).to(dtype), None


class SrSte(torch.autograd.Function):
    """SR-STE: forward w * mask; backward the dense gradient plus decay * w on the pruned weights."""

    @staticmethod
    def forward(ctx, w, mask, decay):
        ctx.save_for_backward(w, mask)
        ctx.decay = decay
        return w * mask

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        return grad + ctx.decay * w * ~mask, None, None


def pgf_factor(progress: float, decay: str, end: float) -> float:
    """The factor on pruned weights: 1 at the start, 0 from `end` on (linear, or exponential from 1
    to 1e-3 then 0)."""
    if progress >= end:
        return 0.0
    if decay == "linear":
        return 1.0 - progress / end
    return math.exp(math.log(1e-3) * progress / end)


class LoraUnit:
    """Adapters beside the fixed student weight: the latent weight is base + B @ A, and on a
    quantized student it goes through the grid (the student's own scales and zero points,
    straight-through) on every forward, so merging and rounding at the end writes exactly what
    was trained. Masked where pruned.

    With `keep` the adapters stay apart (a PEFT adapter beside the unchanged student): the weight
    is base + B @ A unrounded and unmasked, as PEFT computes it at run time."""

    def __init__(self, state: LinearState, base: torch.Tensor, teacher: torch.Tensor, rank: int,
                 generator: torch.Generator, keep: bool = False):
        self.state, self.base, self.keep = state, base.detach().float(), keep
        self.mask, self.quant = state.mask, state.quant
        out_features, in_features = base.shape
        rank = min(rank, out_features, in_features)
        error = teacher.detach().float() - self.base
        if self.mask is not None:
            error = error * self.mask
        # A spans the error's leading input directions (its SVD, scaled by the root of the singular
        # values), B starts at 0: the first step already moves along the error, yet the start is the
        # student itself. (Starting at B @ A = the truncated error and rounding it would discard
        # GPTQ's error-fed codes: on a tiny W2 student that start was worse than the student.) A
        # rotated student's error is in another basis: A random, as LoRA starts.
        if error.norm() < teacher.float().norm():
            _, s, vh = torch.linalg.svd(error, full_matrices=False)
            a = s[:rank].sqrt()[:, None] * vh[:rank]
        else:
            a = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        b = torch.zeros(out_features, rank)
        self.params = {"lora_a": a.contiguous(), "lora_b": b.contiguous()}
        if self.quant is not None:
            self.index = grids.group_index(in_features, self.quant.grid.group_width(in_features))

    def merged(self) -> torch.Tensor:
        return self.base + self.params["lora_b"] @ self.params["lora_a"]

    def codes(self, ste: bool = True) -> torch.Tensor:
        units = self.merged() / self.quant.scale.float()[:, self.index]
        rounded = round_ste(units) if ste else torch.round(units)
        return torch.clamp(rounded + self.quant.zero[:, self.index], 0, self.quant.grid.maxq)

    def weight(self) -> torch.Tensor:
        if self.keep:
            return self.merged()
        if self.quant is None:
            w = self.merged()
        else:
            index = self.index
            w = self.quant.scale.float()[:, index] * (self.codes() - self.quant.zero[:, index])
        return w if self.mask is None else w * self.mask

    def clamp_(self) -> None:
        pass

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedWeight | None]:
        """The weight and codes to store: the student's own with `keep`, else the merged ones."""
        quant = self.quant
        if self.keep:
            return self.base.to(dtype), quant
        if quant is None:
            return self.weight().to(dtype), None
        codes = self.codes(ste=False)
        if self.mask is not None:
            codes = codes.where(self.mask, quant.zero[:, self.index])
        codes = codes.to(torch.uint8)
        merged = QuantizedWeight(grid=quant.grid, codes=codes, scale=quant.scale, zero=quant.zero,
                                 act_order=quant.act_order)
        return grids.dequantize(codes, quant.scale.float(), quant.zero, quant.grid, dtype), merged


class GridUnit:
    """An integer-grid linear: w = scale0 * range * (clamp(round(u) + zero0) - clamp(round(zero0 + dz)))
    per group. `u` is each weight's distance from the zero point in steps (the codes at the start);
    training it (params) flips codes through the straight-through estimator, while the range
    multipliers and zero offsets (params and scales) move every value of their group. The codes
    are anchored to the stored zero point, so the range's gradient is the codes' own (q - z) and
    not LSQ's (round(u) - u), which is 0 on the grid a trained checkpoint starts from."""

    def __init__(self, state: LinearState, train_codes: bool):
        quant: QuantizedWeight = state.quant
        self.state, self.grid, self.mask = state, quant.grid, state.mask
        out_features, in_features = quant.codes.shape
        self.index = grids.group_index(in_features, quant.grid.group_width(in_features))
        self.scale0, self.zero0 = quant.scale.float(), quant.zero.float()
        units = quant.codes.float() - self.zero0[:, self.index]
        self.params = {"range": torch.ones_like(self.scale0)}
        if train_codes:
            self.params["units"] = units
        else:
            self.units = units
        if not quant.grid.symmetric:
            self.params["zero"] = torch.zeros_like(self.zero0)

    def codes(self, ste: bool = True) -> torch.Tensor:
        units = self.params.get("units", getattr(self, "units", None))
        rounded = round_ste(units) if ste else torch.round(units)
        return torch.clamp(rounded + self.zero0[:, self.index], 0, self.grid.maxq)

    def scale_zero(self, ste: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        zero = self.zero0
        if "zero" in self.params:
            shifted = self.zero0 + self.params["zero"]
            zero = torch.clamp(round_ste(shifted) if ste else torch.round(shifted), 0, self.grid.maxq)
        return self.scale0 * self.params["range"], zero

    def weight(self) -> torch.Tensor:
        scale, zero = self.scale_zero()
        w = scale[:, self.index] * (self.codes() - zero[:, self.index])
        return w if self.mask is None else w * self.mask

    @torch.no_grad()
    def clamp_(self) -> None:
        self.params["range"].clamp_(0.5, 1.5)
        if "zero" in self.params:
            self.params["zero"].clamp_(-2.0, 2.0)

    @torch.no_grad()
    def final(self, dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedWeight]:
        scale, zero = self.scale_zero(ste=False)
        stored = self.state.quant
        scale = scale.to(stored.scale.dtype)
        codes = self.codes(ste=False)
        if self.mask is not None:
            codes = codes.where(self.mask, zero[:, self.index])
        codes = codes.to(torch.uint8)
        quant = QuantizedWeight(grid=self.grid, codes=codes.cpu(), scale=scale.cpu(), zero=zero.cpu(),
                                act_order=stored.act_order)
        return grids.dequantize(codes, scale.float(), zero, self.grid, dtype), quant


def make_unit(state: LinearState, train: str, teacher: torch.Tensor | None = None, rank: int = 16,
              generator: torch.Generator | None = None, keep_adapter: bool = False):
    """The unit that trains a record's linear as `train` (params | scales | lora) says."""
    if train == "lora":
        return LoraUnit(state, state.weight, teacher, rank, generator or torch.Generator().manual_seed(0),
                        keep_adapter)
    if state.quant is None:
        if train == "scales":
            raise CompressorError(f"{state.name}: --train scales needs quantized layers; this one is "
                                  "sparse float (train params or lora)")
        return LearnedLinear(state, state.weight, state.weight, "full")  # the surviving weights
    return GridUnit(state, train_codes=train == "params")


class StudentLinear(torch.nn.Module):
    """A linear whose weight its unit makes on every forward (so the grid's rounding, a mask or an
    adapter is part of what the loss sees); the unit's tensors are this module's parameters."""

    def __init__(self, unit, bias: torch.Tensor | None, act_bits: int | None = None):
        super().__init__()
        self.unit, self.act_bits = unit, act_bits
        self.trained = torch.nn.ParameterDict({key: torch.nn.Parameter(value.detach().clone())
                                               for key, value in unit.params.items()})
        unit.params = self.trained
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = quantize_activations(x, self.act_bits, getattr(self.unit, "mix", 1.0))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.unit.weight().to(x.dtype), bias)
