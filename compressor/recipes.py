"""Recipes from options: the one place where `compress quantize` / `compress sparsify` and the
Python API (compressor.quantize, compressor.sparsify) turn their options into passes.

Each builder returns a Job: the recipe (plain data, as a recipe YAML would hold it), the importance
allocation if one was asked for (compressor.search.importance), and a short tag naming the run
(the default output folder's suffix). Every option is checked here, before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressor.errors import CompressorError
from compressor.finequant import AUTO, VLLM_GROUPS
from compressor.lutgrids import LUT_FORMATS

RECONSTRUCT_ITERS = 50  # --reconstruct's steps per block (AutoRound's light recipe)
GGUF_RECONSTRUCT_TRAIN = "scales"  # what --reconstruct learns on GGUF blocks unless told
# After pruning alone the surviving weights keep learning well past 50 steps (SmolLM2, SparseGPT
# 50%: 37.29 at 50, 35.48 at 100, 33.92 at 200; 2:4: 62.15 at 50, 55.48 at 100, 50.16 at 200), and
# the steps cost little beside a block's full-window error checks (50%: 14 min at 50 steps, 17 at 200).
SPARSE_RECONSTRUCT_ITERS = 200


@dataclass
class Job:
    recipe: dict
    allocation: dict | None
    tag: str
    export: str | None = None  # a GGUF type: the checkpoint is written as one GGUF file of it


def with_transforms(passes: list[dict], rotate: bool = False, reconstruct: bool = False,
                    reconstruct_train: str | None = None, reconstruct_iters: int | None = None
                    ) -> tuple[list[dict], str]:
    """`passes` with the rotation (a model pass) first and the block reconstruction last (learning
    `reconstruct_train`, default rounding), and the tag's suffix for them."""
    suffix = ""
    if rotate:
        passes = [{"method": "rotate"}, *passes]
        suffix += "-rot"
    if reconstruct:
        passes = [*passes, {"method": "reconstruct", "train": reconstruct_train or "rounding",
                            "iters": reconstruct_iters or RECONSTRUCT_ITERS}]
        suffix += "-rec"
    elif reconstruct_train is not None or reconstruct_iters is not None:
        raise CompressorError("--reconstruct-train / --reconstruct-iters need --reconstruct")
    return passes, suffix


def quantize_job(bits: float = 4, group_size: int | None = None, symmetric: bool = True,
                 method: str | None = None, number_format: str = "int", act_bits: int | None = None,
                 act_order: bool = True, mse: bool = False, damp: float = 0.01,
                 allocate: str | None = None, budget: str | None = None, rotate: bool = False,
                 reconstruct: bool = False, reconstruct_train: str | None = None,
                 reconstruct_iters: int | None = None, full_range: bool = False, awq: bool = False,
                 target: str = "any", embeddings: str = "keep") -> Job:
    """The options of `compress quantize` (see its --help) as a recipe."""
    if embeddings not in ("keep", "int8"):
        raise CompressorError(f"unknown --embeddings {embeddings!r}; choose keep or int8")
    if number_format.lower() == "gguf" or number_format.lower().startswith("gguf:"):
        if embeddings != "keep":
            raise CompressorError("--format gguf: the GGUF file holds its embeddings quantized already "
                                  "(Q6_K, or Q8_0 where rows are not a multiple of 256)")
        return with_target(_gguf_job(number_format.partition(":")[2].lower(), bits, group_size, symmetric,
                                     method, act_order, mse, damp, allocate, budget, rotate, reconstruct,
                                     reconstruct_train, reconstruct_iters, full_range, awq), target)
    if method == "ptq161":
        if embeddings != "keep":
            raise CompressorError("--method ptq161: the embeddings stay as they are (a ptq161 checkpoint "
                                  "holds one layout; --embeddings int8 is not combined with it yet)")
        job = _ptq161_job(bits, group_size, symmetric, number_format, act_bits, mse, allocate, budget, rotate,
                          reconstruct_train, reconstruct_iters, full_range, awq)
    elif number_format.lower() in LUT_FORMATS:
        if embeddings != "keep":
            raise CompressorError(f"--format {number_format}: the embeddings stay as they are (a "
                                  "lookup-table checkpoint holds one layout; --embeddings int8 is not "
                                  "combined with it yet)")
        job = _lut_job(number_format.lower(), bits, group_size, symmetric, method, act_bits, act_order, mse,
                       damp, allocate, budget, rotate, reconstruct, reconstruct_train, reconstruct_iters,
                       full_range, awq)
    else:
        job = _quantize_job(bits, group_size, symmetric, method, number_format, act_bits, act_order, mse,
                            damp, allocate, budget, rotate, reconstruct, reconstruct_train, reconstruct_iters,
                            full_range, awq)
    if group_size == AUTO and target == "vllm":
        # Only the group sizes vLLM's kernels take, and only where they cut the rows evenly.
        for step in job.recipe["passes"]:
            if step.get("group_size") == AUTO:
                step.update(auto_groups=list(VLLM_GROUPS), auto_divide=True)
    if embeddings == "int8":
        job.recipe["embeddings"] = "int8"
        job.tag += "-e8"
    return with_target(job, target)


def _gguf_job(gguf_type, bits, group_size, symmetric, method, act_order, mse, damp, allocate, budget,
              rotate, reconstruct, reconstruct_train, reconstruct_iters, full_range, awq) -> Job:
    """--format gguf:TYPE: GPTQ (or RTN) onto llama.cpp's blocks of TYPE (a block type, or a preset
    that gives each tensor role its type), optionally after AWQ / a rotation; then exported."""
    from compressor.budget import parse_budget
    from compressor.passes.gguf import PRESETS

    if gguf_type not in PRESETS and not (gguf_type == "" and allocate):
        raise CompressorError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(PRESETS)} (or "
                              "--format gguf with --allocate lim|zd --budget NBPW)")
    if bits != 4 or group_size is not None or not symmetric or full_range or mse:
        raise CompressorError(f"--format gguf:{gguf_type} fixes the grid: drop --bits, --group-size, --asym, "
                              "--full-range and --mse")
    allocation = None
    if allocate is not None:
        if allocate not in ("lim", "zd") or budget is None:
            raise CompressorError("--format gguf allocates types with --allocate lim|zd --budget NBPW")
        if awq or rotate:
            raise CompressorError("--format gguf --allocate: drop --awq and --rotate (one GGUF step)")
        allocation = {"score": allocate, "budget": parse_budget(budget)}
        gguf_type = "q4_k"  # a placeholder for validation: the allocation picks each block's type
    elif budget is not None:
        raise CompressorError("--budget needs --allocate lim|zd")
    from compressor.passes.gguf import DEFAULT_SOLVER, SOLVERS

    method = method or DEFAULT_SOLVER
    if method not in SOLVERS:
        raise CompressorError(f"--format gguf: --method {' or '.join(SOLVERS)}, got {method!r}")
    step = {"method": "gguf", "type": gguf_type, "solver": method}
    if method == "gptq":
        step["act_order"] = act_order
    if method != "rtn":  # GPTQ's and the refit's damping of the Hessian
        step["damp"] = damp
    # AWQ searches its scales on the nearest integer grid (4-bit, groups of 32) of the GGUF blocks.
    awq_step = [{"method": "awq", "bits": 4, "group_size": 32, "symmetric": True}] if awq else []
    # On GGUF blocks the header alone is what pays: codes kept, the integer sub-block scales and
    # mins (float16 d and m of the legacy types) learned (Q3_K_M on SmolLM2, 8 windows: GPTQ 20.02,
    # + rounding 20.02, + scales 19.71; bench/results/gguf.md).
    if reconstruct and reconstruct_train is None:
        reconstruct_train = GGUF_RECONSTRUCT_TRAIN
    passes, suffix = with_transforms([*awq_step, step], rotate=rotate, reconstruct=reconstruct,
                                     reconstruct_train=reconstruct_train, reconstruct_iters=reconstruct_iters)
    name = f"{allocate}-{budget}" if allocation else gguf_type
    return Job({"passes": passes}, allocation, f"{method}-{name}{'-awq' if awq else ''}{suffix}",
               export=name)


def _lut_job(lut_format, bits, group_size, symmetric, method, act_bits, act_order, mse, damp, allocate,
             budget, rotate, reconstruct, reconstruct_train, reconstruct_iters, full_range, awq) -> Job:
    """--format lut4|lut3: GPTQ (or data-free k-means and round to nearest) onto learned per-row
    tables with a float16 scale per --group-size columns (compressor.passes.lut), optionally after a
    rotation and followed by block reconstruction (tables, scales and codes learned per block)."""
    if method not in (None, "gptq", "rtn"):
        raise CompressorError(f"--format {lut_format}: only --method gptq or rtn produce lookup tables, "
                              f"not {method!r}")
    refused = {"--bits": bits != 4, "--asym": not symmetric, "--full-range": full_range, "--mse": mse,
               "--act-bits": act_bits is not None, "--allocate/--budget": allocate or budget,
               "--awq": awq, "--group-size auto": group_size == AUTO}
    given = [flag for flag, used in refused.items() if used]
    if given:
        raise CompressorError(f"--format {lut_format} learns its own levels: drop {', '.join(given)} (the "
                              "table replaces bits, zero points and ranges)")
    group_size = 64 if group_size is None else max(group_size, 0)
    method = method or "gptq"
    step = {"method": "lut", "format": lut_format, "group_size": group_size, "solver": method}
    if method == "gptq":
        step.update(act_order=act_order, damp=damp)
    # Learned tables take the default, rounding: on SmolLM2 (lut4 g64, 50 steps) it reached 23.57 (KL
    # 0.084) where learning only the tables and scales reached 23.70 (KL 0.089; bench/results/quantize.md).
    passes, suffix = with_transforms([step], rotate, reconstruct, reconstruct_train, reconstruct_iters)
    granularity = f"g{group_size}" if group_size else "-row"
    return Job({"passes": passes}, None, f"{method}-{lut_format}{granularity}{suffix}")


# PTQ1.61's block optimisation: steps per block (the CLI's --reconstruct-iters when given).
PTQ161_ITERS = 100


def _ptq161_job(bits, group_size, symmetric, number_format, act_bits, mse, allocate, budget, rotate,
                reconstruct_train, reconstruct_iters, full_range, awq) -> Job:
    """--method ptq161: salient channels at 4 bits, the rest binarised, GPTQ-style
    (compressor.passes.ptq161), then block by block the signs, the salient codes and every row's
    and column's numbers learned against the dense block (compressor.passes.reconstruct, train:
    rounding; `--reconstruct-train scales` keeps the signs and codes)."""
    refused = {"--bits": bits != 4, "--group-size": group_size is not None, "--asym": not symmetric,
               "--format": number_format.lower() != "int", "--act-bits": act_bits is not None, "--mse": mse,
               "--full-range": full_range, "--allocate/--budget": allocate or budget, "--awq": awq,
               "--reconstruct-train": reconstruct_train not in (None, "rounding", "scales")}
    given = [flag for flag, used in refused.items() if used]
    if given:
        raise CompressorError(f"--method ptq161 fixes its layout (20% of input channels at 4 bits per row, "
                              f"the rest one bit): drop {', '.join(given)}")
    if rotate:
        raise CompressorError("--method ptq161 picks its salient channels by their activation outliers, "
                              "which a rotation spreads over every channel: drop --rotate")
    passes = [{"method": "ptq161"}, {"method": "reconstruct", "train": reconstruct_train or "rounding",
                                     "norms": True,
                                     "iters": reconstruct_iters or PTQ161_ITERS}]
    return Job({"passes": passes}, None, "ptq161")


def with_target(job: Job, target: str) -> Job:
    """The job with the engine its layout must suit (compressor.pack.Target) in its recipe."""
    from compressor.pack import Target

    target = Target.parse(target)
    if target is not Target.ANY:
        job.recipe["target"] = target.value
    return job


def _quantize_job(bits, group_size, symmetric, method, number_format, act_bits, act_order, mse, damp,
                  allocate, budget, rotate, reconstruct, reconstruct_train, reconstruct_iters, full_range,
                  awq) -> Job:
    from compressor.budget import parse_budget
    from compressor.fpgrids import float_grid

    transforms = dict(rotate=rotate, reconstruct=reconstruct, reconstruct_train=reconstruct_train,
                      reconstruct_iters=reconstruct_iters)
    if not math.isfinite(bits):
        raise CompressorError(f"--bits must be a number of bits from 2 to 8, got {bits}")
    if number_format.lower() != "int":
        float_grid(number_format)  # an unknown name fails here, before any work
        if allocate is not None or budget is not None or bits != 4:
            raise CompressorError(f"--format {number_format} is 4-bit: no --bits other than 4, "
                                  "--allocate or --budget")
        step = {"method": "fp4", "format": number_format.lower()}
        tag = step["format"]
        if method not in (None, "rtn", "gptq"):
            raise CompressorError(f"unknown --method {method!r} for --format; choose rtn or gptq")
        if method == "gptq":
            step.update(gptq=True, act_order=act_order, damp=damp)
            tag += "-gptq"
        if act_bits is not None:
            step["act_bits"] = act_bits
            tag += f"-a{act_bits}"
        if group_size not in (None, 0, -1) and step["format"] in ("fp4", "e2m1"):
            step["group_size"] = group_size
            tag += f"-g{group_size}"
        elif group_size not in (None, 0, -1):
            raise CompressorError(f"--format {number_format} has a fixed block size; drop --group-size")
        if awq:
            raise CompressorError("--awq searches its scales for an integer grid; use --format int")
        if reconstruct and act_bits is not None:
            raise CompressorError("--reconstruct does not learn layers whose inputs are quantized too "
                                  "(--act-bits)")
        if reconstruct and step["format"] == "mxfp4" and reconstruct_train == "scales":
            raise CompressorError("--reconstruct-train scales has nothing to learn on --format mxfp4 "
                                  "(its scales are powers of two); use rounding or full")
        passes, suffix = with_transforms([step], **transforms)
        return Job({"passes": passes}, None, tag + suffix)
    if act_bits is not None:
        raise CompressorError("--act-bits needs --format fp4 or --format e2m1")
    group_size = 128 if group_size is None else group_size
    if group_size == AUTO and (awq or allocate is not None):
        raise CompressorError("--group-size auto chooses a group per matrix from its weights: it does not "
                              "combine with --awq or --allocate, which need one grid up front")
    method = method or "gptq"
    if method not in ("gptq", "rtn"):
        raise CompressorError(f"unknown --method {method!r}; choose gptq or rtn"
                              + (" (AWQ scaling before either: --awq)" if method == "awq" else ""))
    allocation = None
    if allocate is not None:
        target = parse_budget(budget) if budget else parse_budget(f"{bits}bits")
        allocation = {"score": allocate, "budget": target}
        bits = 4  # a placeholder for validation: the allocation picks the widths
    elif budget is not None:
        raise CompressorError("--budget needs --allocate lim|zd (or use `compress search`)")
    elif bits != int(bits):
        raise CompressorError(f"fractional --bits {bits:g} needs --allocate lim or --allocate zd")
    step = {"method": method, "bits": int(bits), "group_size": group_size, "symmetric": symmetric}
    if full_range:
        if not symmetric:
            raise CompressorError("--full-range is a symmetric grid: drop --asym (zero points already "
                                  "use every code)")
        step["full_range"] = True
    if mse:
        step["mse"] = True
    if method == "gptq":
        step.update(act_order=act_order, damp=damp)
    if awq and allocation:
        raise CompressorError("--awq scales for one grid: it does not combine with --allocate (use a recipe)")
    if allocate == "ip" and (method != "gptq" or mse or full_range):
        raise CompressorError("--allocate ip chooses among GPTQ levels of the level database: drop "
                              "--method rtn, --mse and --full-range")
    if allocation and (rotate or reconstruct):
        raise CompressorError("--allocate spreads one quantization pass: use a recipe (compress run) "
                              "to combine it with --rotate / --reconstruct")
    grid_keys = {k: step[k] for k in ("bits", "group_size", "symmetric", "full_range") if k in step}
    steps = [{"method": "awq", **grid_keys}, step] if awq else [step]
    passes, suffix = with_transforms(steps, **transforms)
    if awq:
        suffix = "-awq" + suffix
    width = f"{allocation['budget']}-{allocate}" if allocation else f"w{int(bits)}"
    granularity = "-gauto" if group_size == AUTO else f"g{group_size}" if group_size > 0 else "-channel"
    tag = (f"{method}-{width}" + granularity
           + ("-full" if full_range else "") + suffix)
    return Job({"passes": passes}, allocation, tag)


def sparsify_job(pattern: str | None = None, sparsity: float | None = None, method: str = "wanda",
                 dsnot: bool = False, allocate: str | None = None, spread: float = 0.1,
                 dsnot_criterion: str = "error", max_cycles: int = 50, update_threshold: float = 0.1,
                 rotate: bool = False, reconstruct: bool = False, reconstruct_train: str | None = None,
                 reconstruct_iters: int | None = None) -> Job:
    """The options of `compress sparsify` (see its --help) as a recipe."""
    from compressor.sparsity import check_sparsity, parse_nm

    if (pattern is None) == (sparsity is None):
        raise CompressorError("give exactly one of --pattern N:M or --sparsity F")
    if pattern is not None:
        parse_nm(pattern)  # the reason a pattern is wrong, before anything is loaded
    else:
        check_sparsity(sparsity)
    passes = [{"method": method, **({"pattern": pattern} if pattern else {"sparsity": sparsity})}]
    if dsnot:
        passes.append({"method": "dsnot", "criterion": dsnot_criterion, "max_cycles": max_cycles,
                       "update_threshold": update_threshold})
    if allocate is not None and (rotate or reconstruct):
        raise CompressorError("--allocate spreads one pruning pass: use a recipe (compress run) "
                              "to combine it with --rotate / --reconstruct")
    if reconstruct and reconstruct_iters is None:
        reconstruct_iters = SPARSE_RECONSTRUCT_ITERS
    passes, suffix = with_transforms(passes, rotate, reconstruct, reconstruct_train, reconstruct_iters)
    allocation = None
    if allocate is not None:
        if pattern is not None:
            raise CompressorError("--allocate spreads an unstructured --sparsity, not an N:M --pattern")
        allocation = {"score": allocate, "spread": spread}
    label = pattern.replace(":", "of") if pattern else f"s{round(100 * sparsity)}"
    tag = f"{method}-{label}" + (f"-{allocate}" if allocate else "") + ("-dsnot" if dsnot else "") + suffix
    return Job({"passes": passes}, allocation, tag)
