"""Loading a checkpoint in the LLM-FP4 layout, which no engine reads: each row of a linear has its
own 4-bit format (E3M0, E2M1 or E1M2) and exponent bias, stored as

    weight_packed  uint8 [out, in/2]   two codes per byte, the even column in the low nibble
    weight_format  uint8 [out]         index into quantization_config["row_formats"]
    weight_scale   float32 [out, groups]  2^-bias per (row, group of in/groups columns)
    weight_shape   int64 [2]

and, when the activations were quantized too (simulated: no kernel runs it), the input quantizer:

    input_shift    int8 [in]     x is multiplied by 2^shift per channel (the weight holds 2^-shift)
    input_bias     float32 [1]   the tensor's exponent bias
    input_format   uint8 [1]     index into quantization_config["input_activations"]["formats"]

The model is built from its config and every weight is filled from the files, the packed linears
dequantized exactly as the compression pass computed them (so logits match bit for bit).

Stock transformers would warn about the unknown quant_method, skip it and build a model with
random weights in place of the packed ones. So the written config.json names a model type
transformers does not have, with the real one beside it, and points AutoConfig at a notice module
in the folder: `from_pretrained(out)` stops with transformers' "contains custom code" error, and
with trust_remote_code=True the notice says how to load the file. read_config undoes the renaming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from compressor import fpgrids
from compressor.errors import CompressorError
from compressor.files import tensor_files


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, path in tensor_files(folder).items():
        with safe_open(str(path), framework="pt") as handle:
            tensors[key] = handle.get_tensor(key)
    return tensors


def dequantized_state_dict(folder: Path, qconfig: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The checkpoint's tensors with every packed linear replaced by its float32 weight, and the
    input quantizers (module -> (format, bias, shift)) of the linears that have one."""
    if qconfig.get("format") == "gguf":
        return gguf_state_dict(folder, qconfig), {}
    if str(qconfig.get("format")).startswith("lut"):
        return lut_state_dict(folder, qconfig), {}
    if qconfig.get("format") == "ptq161":
        return binary_state_dict(folder, qconfig), {}
    names = qconfig.get("row_formats")
    if names != [f.name for f in fpgrids.ROW_FORMATS]:
        raise CompressorError(f"unsupported LLM-FP4 row formats {names!r}")
    tensors = read_state_dict(folder)
    activations = qconfig.get("input_activations")
    quantizers = {}
    for module in qconfig.get("targets", []):
        packed, row_format, scale, shape = _pop(tensors, folder, module, "weight_packed", "weight_format",
                                                "weight_scale", "weight_shape")
        shape = shape.tolist()
        codes = fpgrids.unpack_nibbles(packed)
        if list(codes.shape) != shape or row_format.shape[0] != shape[0]:
            raise CompressorError(f"{folder}: {module} packed tensors do not match shape {shape}")
        tensors[f"{module}.weight"] = fpgrids.row_dequantize(codes, row_format, scale)
        if activations:
            formats = [fpgrids.FloatFormat(int(n[1]), int(n[3])) for n in activations["formats"]]
            fmt = formats[int(tensors.pop(f"{module}.input_format")[0])]
            bias = float(tensors.pop(f"{module}.input_bias")[0])
            quantizers[module] = (fmt, bias, tensors.pop(f"{module}.input_shift"))
    return tensors, quantizers


def _pop(tensors: dict, folder: Path, module: str, *names: str) -> list[torch.Tensor]:
    """The module's tensors `names`, taken out of `tensors`; a missing one is one clear error."""
    try:
        return [tensors.pop(f"{module}.{name}") for name in names]
    except KeyError as missing:
        raise CompressorError(f"{folder}: {module} lacks tensor {missing}") from None


def gguf_state_dict(folder: Path, qconfig: dict) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint of GGUF blocks (compressor.passes.gguf), each decoded by gguf-py."""
    from compressor import gguf_quants

    tensors = read_state_dict(folder)
    for module, qtype in (qconfig.get("types") or {}).items():
        data, shape = _pop(tensors, folder, module, "weight_gguf", "weight_shape")
        rows, cols = shape.tolist()
        spec = gguf_quants.SPECS[gguf_quants.GgufType.parse(qtype)]
        if list(data.shape) != [rows, cols // spec.block * spec.nbytes]:
            raise CompressorError(f"{folder}: {module} blocks do not match shape {[rows, cols]} ({qtype})")
        tensors[f"{module}.weight"] = gguf_quants.decode(data.numpy(), qtype, cols)
    return tensors


def lut_state_dict(folder: Path, qconfig: dict) -> dict[str, torch.Tensor]:
    """The tensors of a lookup-table checkpoint (compressor.passes.lut), each linear's weight
    scale * table[code] computed from the stored float16 numbers as the pass computed it."""
    from compressor import lutgrids
    from compressor.pack import unpack_lut_codes

    grid = lutgrids.parse_grid(qconfig)
    tensors = read_state_dict(folder)
    for module in qconfig.get("targets", []):
        packed, scale, table, shape = _pop(tensors, folder, module, "weight_packed", "weight_scale",
                                           "weight_table", "weight_shape")
        rows, cols = shape = shape.tolist()
        expected = ([rows, -(-cols * grid.bits // 32)], [rows, grid.num_groups(cols)],
                    [grid.num_tables(rows), grid.levels])
        if [list(packed.shape), list(scale.shape), list(table.shape)] != list(expected):
            raise CompressorError(f"{folder}: {module} tensors do not match shape {shape} ({grid.format})")
        codes = unpack_lut_codes(packed, grid.bits, shape)
        tensors[f"{module}.weight"] = lutgrids.values(codes, scale, table, grid)
    return tensors


def binary_state_dict(folder: Path, qconfig: dict) -> dict[str, torch.Tensor]:
    """The tensors of a PTQ1.61 checkpoint (compressor.passes.ptq161), each linear's weight computed
    from the stored numbers as the pass computed it."""
    from compressor import binarygrids
    from compressor.pack import unpack_binary_linear

    grid = binarygrids.parse_grid(qconfig)
    tensors = read_state_dict(folder)
    for module in qconfig.get("targets", []):
        names = binarygrids.TENSORS
        stored = dict(zip(names, _pop(tensors, folder, module, *names), strict=True))
        try:
            tensors[f"{module}.weight"] = binarygrids.values(*unpack_binary_linear(stored, grid))
        except ValueError as error:
            raise CompressorError(f"{folder}: {module}: {error}") from None
    return tensors


def install_input_quantizers(model, quantizers: dict) -> None:
    """Simulated activation quantization: a forward pre-hook rounds each listed linear's input."""
    for module, (fmt, bias, shift) in quantizers.items():
        multiplier = torch.exp2(shift.float())

        def hook(linear, args, fmt=fmt, bias=bias, multiplier=multiplier):
            x = args[0]
            return (fpgrids.fp_round_fast(x * multiplier.to(x.device, x.dtype), fmt, bias),) + args[1:]

        model.get_submodule(module).register_forward_pre_hook(hook)


def load_llm_fp4(folder: Path, config, dtype):
    """A transformers model with the LLM-FP4 weights dequantized into it."""
    from transformers import AutoModelForCausalLM

    qconfig = config.quantization_config
    config.__dict__.pop("quantization_config", None)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors, quantizers = dequantized_state_dict(folder, qconfig)
    state = {k: v.to(dtype) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CompressorError(
            f"{folder}: checkpoint does not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    install_input_quantizers(model, quantizers)
    model.config.quantization_config = qconfig  # kept for reports; the weights are dense now
    return model


GUARDED_TYPE = "compressor_llm_fp4"
NOTICE_MODULE = "llm_fp4_notice"
NOTICE = f'''"""This checkpoint holds LLM-FP4 (GGUF-block, lookup-table) weights in compressor's own
layout, which transformers cannot dequantize (it would skip them and run random weights). Load it
with compressor: compressor.load_model / `compress eval` / `compress generate`."""

from transformers import PretrainedConfig, PreTrainedModel

MESSAGE = ("this is an LLM-FP4, GGUF-block or lookup-table checkpoint in compressor's own layout, which "
           "transformers cannot read: load it with compressor (compressor.load_model, `compress eval`, "
           "`compress generate`)")


class LlmFp4Config(PretrainedConfig):
    model_type = "{GUARDED_TYPE}"

    def __init__(self, **kwargs):
        raise ValueError(MESSAGE)


class LlmFp4Model(PreTrainedModel):
    config_class = LlmFp4Config

    def __init__(self, *args, **kwargs):
        raise ValueError(MESSAGE)
'''


def guard_config(folder: Path) -> None:
    """Make stock transformers refuse the written checkpoint (see the module docstring)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["compressor_model_type"] = config["model_type"]
    config["model_type"] = GUARDED_TYPE
    config["auto_map"] = {"AutoConfig": f"{NOTICE_MODULE}.LlmFp4Config",
                          "AutoModelForCausalLM": f"{NOTICE_MODULE}.LlmFp4Model"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / f"{NOTICE_MODULE}.py").write_text(NOTICE)


def read_config(folder: Path):
    """The transformers config of a guarded LLM-FP4 checkpoint, its real model type restored."""
    from transformers import AutoConfig

    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.pop("compressor_model_type", config.get("model_type"))
    for key in ("model_type", "auto_map"):
        config.pop(key, None)
    return AutoConfig.for_model(model_type, **config)
