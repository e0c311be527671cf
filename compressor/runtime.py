"""Running a compressed checkpoint packed: build the model with PackedLinear modules straight from
the checkpoint's packed tensors, never holding a dense copy of the quantized weights.

    model, tokenizer = compressor.load("out/w4")     # or `compress generate` / `compress bench-infer`

The model skeleton is made on the meta device (parameters only; buffers such as rotary
frequencies are computed as usual), each quantized linear becomes a PackedLinear built from its
weight_packed / weight_scale / weight_zero_point / weight_g_idx tensors, and every other tensor
(embeddings, norms, unquantized linears) is read from the safetensors files one at a time.
Integer compressed-tensors checkpoints (pack-quantized, group / channel / block strategies) and
lookup-table checkpoints (--format lut4|lut3: LutLinear) and PTQ1.61's (--method ptq161:
BinaryLinear) are supported; 4-bit float layouts are not
packed here (load them with compressor.model.load_model).
On CUDA the packed linears run Triton's dequantize-matmul (when Triton is installed), and fp16 /
bf16 linears pruned 2:4 (an unquantized sparse checkpoint, or layers a recipe left unquantized) run
on torch's semi-structured sparse kernels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.errors import CompressorError
from compressor.files import tensor_reader
from compressor.fp4load import read_config
from compressor.grids import from_signed, sign_offset
from compressor.model import (
    BINARY_QUANT_METHOD,
    LUT_QUANT_METHOD,
    ModelSource,
    load_model,
    load_tokenizer,
    read_json,
)
from compressor.pack import unpack_zero_point
from compressor.sparse24 import accelerate_2of4
from compressor_kernels import BinaryLinear, Int8Embedding, LutLinear, PackedLinear, triton_available

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                   "weight_table", "weight_mask", "weight_salient", "weight_signs", "weight_row",
                   "weight_column")


def _targets(qconfig: dict, linear_names: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """Module name -> its weight QuantizationArgs, resolving names, 're:' regexes and class names."""
    ignore = set(qconfig.get("ignore") or [])
    chosen = {}
    for group in (qconfig.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        for target in group.get("targets") or []:
            for name, module in linear_names.items():
                if name in ignore:
                    continue
                hit = (re.match(target[3:], name) if target.startswith("re:")
                       else name == target or type(module).__name__ == target)
                if hit:
                    chosen[name] = weights
    return chosen


def _group_width(args: dict, in_features: int) -> int:
    strategy = args.get("strategy")
    if strategy == "group":
        return int(args["group_size"])
    if strategy == "channel":
        return in_features
    if strategy == "block":
        block = args.get("block_structure") or []
        if len(block) != 2 or block[0] != 1:
            raise CompressorError(f"block structure {block} is not [1, group]: not a group layout")
        return int(block[1])
    raise CompressorError(f"quantization strategy {strategy!r} cannot be run packed")


@dataclass
class StoredLinear:
    """A quantized linear as the checkpoint stores it: unsigned codes [out, in], scale and zero
    (unsigned, None when symmetric) [out, groups] as float32, group width, act-order index."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    width: int
    g_idx: torch.Tensor | None


def read_linear(name: str, args: dict, read) -> StoredLinear:
    """The integer codes and parameters of module `name` (read(key[, optional]) -> tensor)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    if args.get("type", "int") != "int":
        raise CompressorError(f"{name}: {args.get('type')} weights are not integer codes; use the dense "
                              "loader")
    bits = int(args["num_bits"])
    shape = torch.Size(read(f"{name}.weight_shape").tolist())
    codes = from_signed(unpack_from_int32(read(f"{name}.weight_packed"), bits, shape), bits)
    scale = read(f"{name}.weight_scale").float()
    if scale.dim() == 1:
        scale = scale[:, None]
    zero = None
    if not args.get("symmetric", True):
        zero = read(f"{name}.weight_zero_point")
        if args.get("strategy") != "block":  # group/channel: packed along the output rows
            zero = unpack_zero_point(zero, bits, shape[0])
        zero = zero.float().reshape(scale.shape) + sign_offset(bits)
    return StoredLinear(codes, scale, zero, bits, _group_width(args, shape[1]),
                        read(f"{name}.weight_g_idx", optional=True))


def packed_linear(name: str, args: dict, read, bias, dtype, device: str,
                  backend: str | None = None) -> PackedLinear:
    """One PackedLinear from the checkpoint tensors of module `name` (read(key) -> tensor)."""
    stored = read_linear(name, args, read)
    # The aten int4/int8 kernels are CPU ones; elsewhere Triton's dequantize-matmul when installed.
    if backend is None and device != "cpu":
        backend = "triton" if triton_available() else "dequant"
    return PackedLinear(stored.codes, stored.scale, stored.zero, stored.bits, stored.width, bias,
                        stored.g_idx, dtype, backend).to(device)


def lut_linear(name: str, qconfig: dict, read, bias, dtype, device: str, backend: str | None = None
               ) -> LutLinear:
    """One LutLinear from the checkpoint tensors of a lookup-table linear (compressor.passes.lut)."""
    from compressor.lutgrids import parse_grid
    from compressor.pack import unpack_lut_codes

    if backend not in (None, "dequant"):
        raise CompressorError(f"{name}: lookup tables run on the dequant path only, not {backend!r}")
    grid = parse_grid(qconfig)
    shape = read(f"{name}.weight_shape").tolist()
    codes = unpack_lut_codes(read(f"{name}.weight_packed"), grid.bits, shape)
    return LutLinear(codes, read(f"{name}.weight_scale"), read(f"{name}.weight_table"), grid.bits,
                     grid.group_width(shape[1]), grid.table_rows, bias, dtype).to(device)


def binary_linear(name: str, qconfig: dict, read, bias, dtype, device: str, backend: str | None = None
                  ) -> BinaryLinear:
    """One BinaryLinear from the checkpoint tensors of a PTQ1.61 linear (compressor.passes.ptq161)."""
    from compressor.binarygrids import TENSORS, parse_grid
    from compressor.pack import unpack_binary_linear

    if backend not in (None, "dequant"):
        raise CompressorError(f"{name}: PTQ1.61 layers run on their own path only, not {backend!r}")
    grid = parse_grid(qconfig)
    stored = {local: read(f"{name}.{local}") for local in TENSORS}
    try:
        mask, _, _, row, column = unpack_binary_linear(stored, grid)  # checks every shape
    except ValueError as error:
        raise CompressorError(f"{name}: {error}") from None
    return BinaryLinear(mask, stored["weight_salient"], stored["weight_signs"], row, column,
                        grid.salient_bits, row.shape[0], bias, dtype).to(device)


# Layouts of this project's own that run packed: quant_method -> the builder of one linear.
OWN_LINEARS = {LUT_QUANT_METHOD: lut_linear, BINARY_QUANT_METHOD: binary_linear}
EMBEDDINGS = ("keep", "int8")


def load(folder: str | Path, dtype: str | torch.dtype = "auto", device: str = "cpu",
         embeddings: str = "keep", backend: str | None = None):
    """(model, tokenizer) with every quantized linear packed; see the module docstring.

    backend: force one PackedLinear backend for every layer (default: the best that fits each).

    embeddings="int8": also keep the token embedding (and a tied lm_head) as int8 rows with a scale
    each, quantized here (not part of the checkpoint; a small, measured change of the logits).
    """
    if embeddings not in EMBEDDINGS:
        raise CompressorError(f"unknown embeddings {embeddings!r}; choose {' or '.join(EMBEDDINGS)}")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CompressorError(f"{folder} is not a checkpoint folder (no config.json)")
    raw = read_json(folder / "config.json")
    qconfig = raw.get("quantization_config") or {}
    own = OWN_LINEARS.get(qconfig.get("quant_method"))
    integer = qconfig.get("quant_method") == "compressed-tensors" and qconfig.get("config_groups")
    if own is None and not integer:
        if str(device).startswith("cuda"):
            return _load_2of4(folder, dtype, device)
        raise CompressorError(f"{folder} has no integer compressed-tensors quantization to run packed")
    config = read_config(folder) if own else AutoConfig.from_pretrained(folder)
    config.__dict__.pop("quantization_config", None)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    files, read = tensor_reader(folder)

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = {name: qconfig for name in qconfig.get("targets", [])} if own else _targets(qconfig, linears)
    if not targets:
        raise CompressorError(f"{folder}: the quantization config targets no linear of the model")
    for name, args in targets.items():
        bias = read(f"{name}.bias", optional=True)
        build = own or packed_linear
        model.set_submodule(name, build(name, args, read, bias, dtype, device, backend))
    tied = getattr(config, "tie_word_embeddings", False)
    stored_embedding = _stored_embedding(model, qconfig, read, dtype, tied)
    packed_keys = {f"{name}.{suffix}" for name in [*targets, *stored_embedding]
                   for suffix in PACKED_SUFFIXES + ("bias",)}
    for key in files.keys() - packed_keys:
        module_name, _, tensor_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if tensor_name not in module._parameters:
            raise CompressorError(f"{folder}: tensor {key} does not belong to the model")
        tensor = read(key).to(dtype).to(device)
        module._parameters[tensor_name] = torch.nn.Parameter(tensor, requires_grad=False)
    if tied and not stored_embedding:
        model.tie_weights()
    if embeddings == "int8" and not stored_embedding:
        _int8_embeddings(model, tied, dtype)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CompressorError(f"{folder}: no tensor for {', '.join(meta[:3])}")
    model.to(device).eval()
    if str(device).startswith("cuda") and dtype in (torch.float16, torch.bfloat16):
        accelerate_2of4(model)  # linears left dense (not quantized) that are 2:4 sparse
    model.config.quantization_config = qconfig  # for reports: what the packed modules hold
    return model, load_tokenizer(ModelSource(str(folder)))


def _load_2of4(folder: Path, dtype, device: str):
    """An unquantized (pruned) checkpoint on CUDA: its 2:4 linears on the semi-structured kernels."""
    dtype = torch.float16 if dtype in (None, "auto", torch.float32, "float32") else dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, tokenizer = load_model(ModelSource(str(folder)), dtype=dtype)
    model.to(device).eval()
    if not accelerate_2of4(model):
        raise CompressorError(f"{folder} has neither integer quantization nor 2:4 sparse linears to run")
    return model, tokenizer


def _stored_embedding(model, qconfig: dict, read, dtype, tied: bool) -> list[str]:
    """A token embedding the checkpoint stores as int8 rows (--embeddings int8) becomes an
    Int8Embedding (its head too when tied); returns its module name, or nothing."""
    embedding = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embedding)
    args = _targets(qconfig, {name: embedding}).get(name)
    if args is None:
        return []
    stored = read_linear(name, args, read)
    if stored.bits != 8 or stored.zero is not None or stored.width != stored.codes.shape[1]:
        raise CompressorError(f"{name}: only 8-bit symmetric per-row embeddings are run packed")
    packed = Int8Embedding.from_codes(stored.codes.to(torch.int16) - sign_offset(8), stored.scale, dtype)
    model.set_input_embeddings(packed)
    if tied:
        model.set_output_embeddings(packed.head())
    return [name]


def _int8_embeddings(model, tied: bool, dtype) -> None:
    embedding = model.get_input_embeddings()
    packed = Int8Embedding(embedding.weight.data, dtype)
    model.set_input_embeddings(packed)
    if tied:
        model.set_output_embeddings(packed.head())


def weight_bytes(model) -> int:
    """Bytes of every parameter and persistent tensor the model keeps (shared storage once)."""
    seen, total = set(), 0
    for tensor in _plain_tensors(list(model.parameters()) + list(model.buffers())):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        total += tensor.untyped_storage().nbytes()
    return total


def _plain_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors with storage behind `tensors`: a wrapper subclass (the semi-structured 2:4 weight:
    kept values plus metadata) has none of its own, only the inner tensors it flattens to."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    plain = []
    for tensor in tensors:
        tensor = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            plain += _plain_tensors([getattr(tensor, name) for name in names])
        else:
            plain.append(tensor)
    return plain
