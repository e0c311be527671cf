"""GPTQ, llama.cpp's importance-matrix rounding, or round-to-nearest onto llama.cpp's GGUF block types,
legacy and K-quants (compressor.gguf_quants), with llama.cpp's per-tensor presets (Q4_K_M and friends).

Each linear's block header is fitted once on its original weights with llama.cpp's importance-weighted
search (importance = the diagonal of the layer's input Hessian, i.e. what an importance matrix holds).
Then, by `solver`:

    gptq      GPTQ rounds column by column onto those fixed per-sub-block grids, pushing each
              column's error onto the columns not yet rounded (act-order by default; the grids are
              static, so the stored blocks keep the original column order)
    imatrix   round to nearest on the fitted grid, as llama-quantize does with an importance matrix
    rtn       round to nearest on a grid fitted without data (llama-quantize without a matrix)

and, with calibration data (gptq, imatrix) and `refit` (default true), the blocks' float16 numbers
are refitted in closed form for the least output error given the codes (gguf_quants.refit).

Measured on SmolLM2-135M (first 8 benchmark windows, dense 19.13; bench/results/gguf.md): at Q4_0
gptq 21.67, imatrix without the refit 21.23, imatrix with it 20.67 (llama-quantize with an importance
matrix 21.27): GPTQ's error feedback lowers the calibration error but not held-out perplexity on
these weights, which were stored as Q4_1 blocks of 32 to begin with. At the K presets GPTQ is the
better one (Q3_K_M 20.02 against 20.20, Q2_K 21.59 against 21.78), so it stays the default.

A `reconstruct` step after this one learns the blocks against each decoder block's dense output
(compressor.passes.reconstruct.LearnedGguf), the header only by default from the CLI (train:
scales): at Q3_K_M it takes SmolLM2 from 20.02 to 19.71, where learning the rounding from the
dense weights as AutoRound does (train: rounding) stays at 20.02: it restarts from round-to-nearest
on a header refitted for GPTQ's codes, and 50 steps do not get back past GPTQ.

Settings: type (a GGUF type such as q4_k, or a preset such as q4_k_m: then each linear gets the type
llama.cpp's preset gives a tensor of its role and depth), solver (gptq | imatrix | rtn), damp (of the
Hessian, for GPTQ and the refit), act_order and blocksize (gptq), refit. A row whose length is not a
multiple of the type's block falls back as llama.cpp does (Q4_K -> Q5_0, ...): module_args resolves
both before any work, so the plan shows the final types.
"""

from __future__ import annotations

import re

import torch

from compressor import gguf_quants
from compressor.errors import CompressorError
from compressor.gguf_quants import GgufGrid, GgufType
from compressor.passes import GgufWeight, LinearState, check_keys
from compressor.passes.gptq import GPTQOptions, error_feedback, output_error
from compressor.stats import InputStats

KEYS = {"type", "solver", "damp", "act_order", "blocksize", "refit"}
SOLVERS = ("gptq", "imatrix", "rtn")
DEFAULT_SOLVER = "gptq"

# llama.cpp's presets: the type most tensors get (llama_ftype_get_default_type)
PRESETS = {"q2_k": GgufType.Q2_K, "q3_k_s": GgufType.Q3_K, "q3_k_m": GgufType.Q3_K,
           "q3_k_l": GgufType.Q3_K, "q4_k_s": GgufType.Q4_K, "q4_k_m": GgufType.Q4_K,
           "q5_k_s": GgufType.Q5_K, "q5_k_m": GgufType.Q5_K, "q6_k": GgufType.Q6_K,
           **{t.value: t for t in GgufType}}

# Module name -> llama.cpp's tensor role (the Llama family's names; Qwen2 and Mistral share them).
ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _preset(args: dict) -> str:
    name = str(args.get("type", "q4_k_m")).lower()
    if name not in PRESETS:
        raise CompressorError(f"unknown GGUF type {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def validate(args: dict) -> None:
    check_keys("gguf", args, KEYS)
    _preset(args)
    if args.get("solver", DEFAULT_SOLVER) not in SOLVERS:
        raise CompressorError(f"gguf: solver must be one of {', '.join(SOLVERS)}, got {args.get('solver')!r}")
    GPTQOptions.from_args(args)


def needs_data(args: dict) -> bool:
    return args.get("solver", DEFAULT_SOLVER) != "rtn"


def output_grid(args: dict) -> GgufGrid:
    return GgufGrid(PRESETS[_preset(args)])


def _use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def preset_type(preset: str, role: str, layer: int, layers: int, gqa: int = 1,
                calibrated: bool = False) -> GgufType:
    """The type llama.cpp's preset gives a decoder tensor (llama-quant.cpp, llama_tensor_get_type_impl,
    for dense non-Falcon models; `calibrated`: an importance matrix is given)."""
    base = PRESETS[preset]
    k = GgufType
    if role == "attn_v":
        if preset == "q2_k":
            return k.Q4_K if gqa >= 4 else k.Q3_K
        if preset == "q3_k_m":
            return k.Q5_K if layer < 2 else k.Q4_K
        if preset == "q3_k_l":
            return k.Q5_K
        if preset in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, layers):
            return k.Q6_K
        if preset == "q4_k_s" and layer < 4:
            return k.Q5_K
    elif role == "ffn_down":
        if preset == "q2_k":
            return k.Q3_K
        if preset == "q3_k_m":
            return k.Q5_K if layer < layers // 16 else k.Q4_K
        if preset == "q3_k_l":
            return k.Q5_K
        if preset in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, layers):
            return k.Q6_K
        if preset == "q4_k_s" and layer < layers // 8:
            return k.Q5_K
        if preset in ("q4_0", "q5_0") and calibrated and layer < layers // 8:
            return k.Q4_1 if preset == "q4_0" else k.Q5_1
    elif role == "attn_output":
        if preset == "q2_k":
            return k.Q3_K
        if preset == "q3_k_m":
            return k.Q4_K
        if preset == "q3_k_l":
            return k.Q5_K
    return base


def module_args(args: dict, name: str, model) -> dict:
    """This linear's settings with `type` resolved: the preset's type for its role and depth, then
    llama.cpp's fallback where its rows do not fit the type's blocks."""
    from compressor.model import decoder_blocks

    preset = _preset(args)
    _, blocks = decoder_blocks(model)
    found = re.search(r"\.(\d+)\.", name)
    role = ROLES.get(name.rsplit(".", 1)[-1], "")
    config = getattr(model.config, "text_config", model.config)
    heads = getattr(config, "num_attention_heads", 1)
    gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
    calibrated = needs_data(args)
    qtype = preset_type(preset, role, int(found.group(1)) if found else 0, len(blocks), gqa, calibrated)
    in_features = model.get_submodule(name).weight.shape[1]
    return {**args, "type": gguf_quants.fitting_type(qtype, in_features).value}


def compress(layer: LinearState, stats: InputStats | None, args: dict) -> None:
    compress_many([layer], stats, args)


def compress_many(layers: list[LinearState], stats: InputStats | None, args: dict) -> None:
    """The linears of one input share its Hessian (and importance); those of one type are solved
    together, their rows stacked (GPTQ treats rows independently given H: one column loop)."""
    solver = args.get("solver", DEFAULT_SOLVER)
    calibrated = needs_data(args)  # rtn is llama-quantize without a matrix: it ignores any data given
    if calibrated and (stats is None or stats.tokens == 0):
        raise CompressorError(f"gguf with solver {solver} needs calibration data")
    hessian = stats.hessian() if calibrated else None
    importance = hessian.diagonal().float().clone() if hessian is not None else None
    options = GPTQOptions.from_args(args)
    for layer in layers:
        if layer.mask is not None:
            raise CompressorError(f"{layer.name}: GGUF blocks after pruning are not supported")
    widths = {layer.weight.shape[1] for layer in layers}
    if len(widths) > 1:  # without calibration data the linears come block by block, not by input
        for width in sorted(widths):
            compress_many([layer for layer in layers if layer.weight.shape[1] == width], stats, args)
        return
    qtype = gguf_quants.fitting_type(_preset(args), layers[0].weight.shape[1])
    rows = [layer.weight.shape[0] for layer in layers]
    w = torch.cat([layer.weight.float() for layer in layers])
    header = gguf_quants.fit(w, qtype, importance)
    metrics = {}
    damp = options.damp
    unrounded = None
    if solver == "gptq":
        rounder = gguf_quants.column_rounder(header)
        # Each column just before rounding, where a block pass learns the rounding from GPTQ's
        # error-fed weights (reconstruct's `start: init`).
        unrounded = torch.empty_like(w) if layers[0].keep_unrounded else None

        def round_column(col: int, upcoming: torch.Tensor) -> torch.Tensor:
            if unrounded is not None:
                unrounded[:, col] = upcoming[0]
            return rounder(col, upcoming)

        rounded, error, damp = error_feedback(w, hessian, round_column, options)
        metrics = {"gptq_damp": damp}
        codes = gguf_quants.round_to(rounded, header)
    else:
        codes = gguf_quants.round_to(w, header)
    if calibrated and args.get("refit", True):
        damped = hessian + damp * hessian.diagonal().mean() * torch.eye(len(hessian))
        header = gguf_quants.refit(w, codes, header, damped)
    values = gguf_quants.values(codes, header)
    parts = [header.split(rows), codes.split(rows), values.split(rows), w.split(rows),
             unrounded.split(rows) if unrounded is not None else [None] * len(layers)]
    for layer, part_header, part_codes, part_values, original, before in zip(layers, *parts, strict=True):
        layer.weight = part_values
        layer.unrounded = before
        layer.quant = GgufWeight(grid=GgufGrid(qtype), codes=part_codes, header=part_header,
                                 act_order=solver == "gptq" and options.act_order)
        layer.methods.append(f"gguf-{qtype.value}+{solver}")
        layer.metrics.update(metrics, gguf_type=qtype.value)
        if hessian is not None:  # the layer's output error, as GPTQ measures it
            layer.metrics["gguf_output_error"] = output_error(original, part_values, hessian)
