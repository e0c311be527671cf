"""Compression passes. A pass is a module compressor/passes/<name>.py, registered in PASSES, that
declares the scope it works at, so the one sequential pipeline (compressor.pipeline) can drive any
of them:

    SCOPE = Scope.MODEL      once, before the blocks, on the whole model (embeddings, norms and head
                             included): transform(model, args) -> dict of figures for the manifest
    SCOPE = Scope.SUBGROUP   (the default) the linears of a block that read the same input, with
                             their input statistics: compress(layer: LinearState, stats, args)
                             updates the layer in place (weight, quantization, mask); optionally
                             compress_many(layers, stats, args) and statistics(args) -> set[str]
                             ({"hessian", "moments", "samples", "absmax"}; default {"hessian"}). A
                             sub-group pass may rescale the input channels (AWQ): it scales
                             the weights' columns, calls stats.scale_inputs_(s) where
                             stats.foldable, and the pipeline folds 1/s into the input's
                             producer (compressor.scaling)
    SCOPE = Scope.BLOCK      a whole decoder block once its linears are compressed, with the block's
                             calibration inputs and the dense block's outputs as targets:
                             refine(block, records, data: BlockData, args) may change every
                             parameter of the block and the records' quantization parameters

and every pass has
    validate(args)                                reject bad settings before any work
    needs_data(args) -> bool                      does it need calibration data?
and optionally
    output_grid(args)                             the grid the weights end on (inspect, --target)
    module_args(args, name, model) -> dict        its settings specialised for one module, when the
                                                  plan is built (GGUF presets: a type per tensor role)
    subgroup_args(layers, args) -> [(layers, args)]  a sub-group pass's settings specialised from
                                                  the weights themselves, just before it runs, for
                                                  sets of the layers (FineQuant: a group size per
                                                  matrix, one per fused set); may record metrics

Several sub-group steps may apply to the same linear in order (for example prune, then quantize
the survivors); they share the layer's statistics, so the Hessian is accumulated once. The records
(LinearState) are the only thing the writer reads.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType

import torch

from compressor.binarygrids import BinaryGrid
from compressor.errors import CompressorError
from compressor.fpgrids import FloatGrid
from compressor.gguf_quants import BlockHeader, GgufGrid
from compressor.grids import SUPPORTED_BITS, IntGrid
from compressor.lutgrids import LutGrid


@dataclass
class QuantizedWeight:
    """Integer codes and their grid parameters, ready to be packed."""

    grid: IntGrid
    codes: torch.Tensor  # uint8 [out, in], values in [0, 2^bits - 1]
    scale: torch.Tensor  # [out, groups], the checkpoint's scale dtype
    zero: torch.Tensor  # [out, groups], integers stored as float32
    act_order: bool = False


@dataclass
class FloatWeight:
    """4-bit floating-point codes and their scales (compressor.fpgrids), ready to be packed."""

    grid: FloatGrid
    codes: torch.Tensor  # uint8 [out, in], 4-bit codes: sign in bit 3
    scale: torch.Tensor  # nvfp4: FP8 values [out, in/16]; mxfp4: E8M0 uint8 [out, in/32]; fp4: [out, 1]
    global_scale: torch.Tensor | None = None  # nvfp4: float32 [1]
    row_format: torch.Tensor | None = None  # fp4 / e2m1: uint8 [out], index into ROW_FORMATS
    act_order: bool = False
    # Simulated activation quantization (fp4 / e2m1 with act_bits): the input x becomes
    # fp_round(x * 2^act_shift, ACT_FORMATS[act_bits][act_format], act_bias); the weight's columns
    # carry 2^-act_shift already.
    act_bits: int | None = None
    act_format: int | None = None
    act_bias: float | None = None
    act_shift: torch.Tensor | None = None  # int8 [in]


@dataclass
class GgufWeight:
    """Codes on llama.cpp's GGUF blocks (compressor.gguf_quants) and their block header."""

    grid: GgufGrid
    codes: torch.Tensor  # uint8 [out, in], value = step * code + offset per sub-block
    header: BlockHeader
    act_order: bool = False


@dataclass
class LutWeight:
    """Codes into learned per-row tables, with a scale per group of columns (compressor.lutgrids)."""

    grid: LutGrid
    codes: torch.Tensor  # uint8 [out, in], indices into the row's table
    scale: torch.Tensor  # float16 [out, groups]
    table: torch.Tensor  # float16 [tables, 2^bits], ascending
    act_order: bool = False


@dataclass
class BinaryWeight:
    """PTQ1.61: salient input channels at 4 bits per row, the rest binarised (compressor.binarygrids)."""

    grid: BinaryGrid
    mask: torch.Tensor  # bool [in], True = a salient channel
    codes: torch.Tensor  # uint8 [out, k], the salient channels' codes, in column order
    signs: torch.Tensor  # bool [out, in - k], True = +1
    row: torch.Tensor  # float16 [out, 4]: scale, low, alpha, beta (binarygrids.ROW_FIELDS)
    column: torch.Tensor  # float16 [in - k], the binary part's column factors
    act_order: bool = False


@dataclass
class LinearState:
    """One linear layer as the passes see it: a float32 working copy of its weight and what was done."""

    name: str
    weight: torch.Tensor  # float32 [out, in]
    dtype: torch.dtype  # the model's dtype, for the final weight and the stored scales
    quant: QuantizedWeight | FloatWeight | GgufWeight | LutWeight | BinaryWeight | None = None
    mask: torch.Tensor | None = None  # bool [out, in], True = kept (sparsity passes)
    original: torch.Tensor | None = None  # the weight before any pass (DSnoT regrows from it)
    methods: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    # The weight just before it was rounded onto its grid (GPTQ: after error feedback), float32:
    # what a block pass learns the rounding of. Only kept when one follows (keep_unrounded).
    keep_unrounded: bool = False
    unrounded: torch.Tensor | None = None


@dataclass
class Step:
    """One pass applied to one linear: the method's name and its settings (plain data from a recipe)."""

    method: str
    args: dict = field(default_factory=dict)


class Scope(str, Enum):
    """What a pass sees and may change (see the module docstring)."""

    MODEL = "model"
    SUBGROUP = "subgroup"
    BLOCK = "block"


# The registry: method name -> the module that implements it (imported on first use).
PASSES: dict[str, str | ModuleType] = {
    name: f"compressor.passes.{name}"
    for name in ("rotate",  # model scope
                 "awq", "rtn", "gptq", "fp4", "gguf", "lut", "ptq161",  # sub-group
                 "magnitude", "wanda", "sparsegpt", "dsnot",
                 "reconstruct")  # block scope
}


def register_pass(method: str, module: str | ModuleType) -> None:
    """Add a pass (a module path or an object with the module's functions) under `method`."""
    PASSES[method] = module


def get_pass(method: str) -> ModuleType:
    module = PASSES.get(method)
    if module is None:
        raise CompressorError(f"unknown method {method!r}; choose one of: {', '.join(PASSES)}")
    if isinstance(module, str):
        module = PASSES[method] = importlib.import_module(module)
    return module


def scope_of(method: str) -> Scope:
    return getattr(get_pass(method), "SCOPE", Scope.SUBGROUP)


def apply_steps(layers: list[LinearState], steps: list[Step], stats) -> None:
    """Apply the same steps to linears that share an input, batched where a pass can (compress_many)."""
    for step in steps:
        module = get_pass(step.method)
        split = getattr(module, "subgroup_args", lambda layers, args: [(layers, args)])
        for members, args in split(layers, step.args):
            if hasattr(module, "compress_many"):
                module.compress_many(members, stats, args)
            else:
                for layer in members:
                    module.compress(layer, stats, args)


def grid_from_args(args: dict) -> IntGrid:
    """Validate and build an integer grid from user settings (bits, group_size, symmetric, mse,
    full_range)."""
    bits = args.get("bits", 4)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise CompressorError(f"bits must be an integer from 2 to 8, got {bits!r}")
    group_size = args.get("group_size", 128)
    if group_size == "auto":
        raise CompressorError("group_size: auto (FineQuant's choice per matrix) is a setting of the rtn and "
                              "gptq passes")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < -1:
        raise CompressorError(
            f"group size must be a positive integer, or 0 / -1 for per-channel; got {group_size!r}"
        )
    full_range = bool(args.get("full_range", False))
    if full_range and not args.get("symmetric", True):
        raise CompressorError("full_range is a symmetric grid; an asymmetric grid already uses every code")
    return IntGrid(
        bits=bits,
        group_size=max(group_size, 0),
        symmetric=bool(args.get("symmetric", True)),
        mse=bool(args.get("mse", False)),
        full_range=full_range,
        fp16_scale=bool(args.get("fp16_scale", False)),
    )


QUANT_KEYS = {"bits", "group_size", "symmetric", "mse", "full_range", "fp16_scale"}


def check_keys(method: str, args: dict, allowed: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise CompressorError(
            f"{method}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )
