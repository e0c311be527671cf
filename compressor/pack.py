"""Writing a compressed model as a checkpoint that transformers (and vLLM) load: compressed-tensors'
pack-quantized format, one config group per distinct scheme so layers may carry different bits.

Per quantized linear: weight_packed int32 [out, ceil(in*bits/32)], weight_scale [out, groups],
weight_zero_point (asymmetric only), weight_shape. The strategy is "group" (or "channel"), as
llm-compressor writes it and vLLM serves it; asymmetric zero points are then packed along the
output rows, int32 [ceil(out*bits/32), groups]. "block" with blocks of [1, g] is used only where
nothing else expresses the layout:
- a group size that does not divide the input width (576 columns in groups of 128): the "group"
  strategy refuses ragged groups, "block" pads them on load (no engine but transformers runs it);
- asymmetric layers of a checkpoint with more than one scheme (mixed bits, ragged layers beside
  others), unless `--target vllm`: transformers 5 reads packed zero points only through its
  dequantize route, which applies one scheme to every layer (compressor.upstream has the cause);
  block zero points stay int8 [out, groups] and load.

Zero points are packed when a block is written; the final decision (quantization_config) is made
once every layer's scheme is known, and compressor.writer unpacks the few it turns into blocks.
compressor.writer assembles the folder (block by block, atomically, resumably).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

from compressor import binarygrids, fpgrids, gguf_quants, grids
from compressor.errors import CompressorError
from compressor.fpgrids import FloatGrid
from compressor.grids import IntGrid
from compressor.lutgrids import LUT_FORMATS, LutGrid
from compressor.model import BINARY_QUANT_METHOD, GGUF_QUANT_METHOD, LUT_QUANT_METHOD, OWN_QUANT_METHOD
from compressor.passes import BinaryWeight, FloatWeight, GgufWeight, LinearState, LutWeight, QuantizedWeight

CT_FLOAT_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
OWN_FORMATS = ("fp4", "e2m1")  # LLM-FP4 layout: read back by compressor.model.load_model


class Target(str, Enum):
    """Which engine the written layout must suit (`--target`)."""

    ANY = "any"  # the standard layout (group/channel, packed zero points)
    VLLM = "vllm"  # refuse, before any work, what vLLM cannot serve (compressor.engines)
    TRANSFORMERS = "transformers"  # stock transformers must load it: blocks where it cannot
    GGUF = "gguf"  # refuse what `compress export --to gguf` could not write code for code (llama.cpp)

    @classmethod
    def parse(cls, value: str | Target | None) -> Target:
        try:
            return cls(value or "any")
        except ValueError:
            raise CompressorError(f"unknown target {value!r}; choose {', '.join(t.value for t in cls)}")


def packs_zero_points(grid: IntGrid, in_features: int) -> bool:
    """An asymmetric layout compressed-tensors' group/channel strategy holds (groups divide the
    input width): its zero points are written packed."""
    return not grid.symmetric and not grid.is_ragged(in_features)


def pack_linear(q: QuantizedWeight | FloatWeight | GgufWeight) -> dict[str, torch.Tensor]:
    """A linear's packed tensors (local names), in compressed-tensors' signed convention."""
    if isinstance(q, FloatWeight):
        return pack_float_linear(q)
    if isinstance(q, LutWeight):
        return pack_lut_linear(q)
    if isinstance(q, BinaryWeight):
        return pack_binary_linear(q)
    if isinstance(q, GgufWeight):  # the GGUF bytes themselves, rows of blocks (compressor.gguf_quants)
        return {"weight_gguf": torch.from_numpy(gguf_quants.encode(q.codes, q.header)),
                "weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64)}
    out_features, in_features = q.codes.shape
    signed = grids.to_signed(q.codes, q.grid.bits)
    tensors = {
        "weight_packed": pack_to_int32(signed, q.grid.bits),
        "weight_scale": q.scale.contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not q.grid.symmetric:
        zero = grids.to_signed(q.zero, q.grid.bits)
        packed = packs_zero_points(q.grid, in_features)
        tensors["weight_zero_point"] = pack_to_int32(zero, q.grid.bits, packed_dim=0) if packed else zero
    return tensors


def unpack_zero_point(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Signed int8 zero points [out, groups] from their packed int32 form."""
    shape = torch.Size([out_features, packed.shape[1]])
    return unpack_from_int32(packed, bits, shape, packed_dim=0).contiguous()


def pack_float_linear(q: FloatWeight) -> dict[str, torch.Tensor]:
    """NVFP4 / MXFP4 in compressed-tensors' layouts (two E2M1 codes per byte, the even column in
    the low nibble); LLM-FP4 in this project's layout: the same codes, each row's format index
    (E3M0, E2M1, E1M2) and its scale 2^-bias."""
    tensors = {"weight_packed": fpgrids.pack_nibbles(q.codes)}
    if q.grid.format == "nvfp4":
        tensors["weight_scale"] = q.scale.to(torch.float8_e4m3fn)
        tensors["weight_global_scale"] = q.global_scale.float().reshape(1)
    elif q.grid.format == "mxfp4":
        tensors["weight_scale"] = q.scale.to(torch.uint8)
    else:
        tensors["weight_scale"] = q.scale.float().contiguous()
        tensors["weight_format"] = q.row_format.to(torch.uint8)
        tensors["weight_shape"] = torch.tensor(list(q.codes.shape), dtype=torch.int64)
        if q.act_bits is not None:  # simulated input quantizer (compressor.fp4load installs it)
            tensors["input_shift"] = q.act_shift.to(torch.int8).clone()  # shared within a group
            tensors["input_bias"] = torch.tensor([q.act_bias], dtype=torch.float32)
            tensors["input_format"] = torch.tensor([q.act_format], dtype=torch.uint8)
    return tensors


def pack_lut_linear(q: LutWeight) -> dict[str, torch.Tensor]:
    """Learned lookup tables in this project's layout (compressor.fp4load.lut_state_dict reads it):
    weight_packed int32 [out, ceil(in * bits / 32)] (codes packed as compressed-tensors packs
    integers), weight_scale float16 [out, groups], weight_table float16 [tables, 2^bits],
    weight_shape int64 [2]."""
    return {"weight_packed": pack_to_int32(grids.to_signed(q.codes, q.grid.bits), q.grid.bits),
            "weight_scale": q.scale.to(torch.float16).contiguous(),
            "weight_table": q.table.to(torch.float16).contiguous(),
            "weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64)}


def unpack_lut_codes(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    """The uint8 codes [out, in] of pack_lut_linear."""
    return grids.from_signed(unpack_from_int32(packed, bits, torch.Size(shape)), bits)


def pack_binary_linear(q: BinaryWeight) -> dict[str, torch.Tensor]:
    """PTQ1.61's layout (compressor.binarygrids has the tensors; fp4load.binary_state_dict reads it)."""
    out_features = q.codes.shape[0]
    return {"weight_mask": binarygrids.pack_bits(q.mask, 1),
            "weight_salient": binarygrids.pack_bits(q.codes, q.grid.salient_bits),
            "weight_signs": binarygrids.pack_bits(q.signs, 1),
            "weight_row": q.row.to(torch.float16).contiguous(),
            "weight_column": q.column.to(torch.float16).contiguous(),
            "weight_shape": torch.tensor([out_features, len(q.mask)], dtype=torch.int64)}


def unpack_binary_linear(tensors: dict[str, torch.Tensor], grid) -> tuple[torch.Tensor, ...]:
    """(mask, salient codes, signs, row, column) of pack_binary_linear's tensors (local names),
    their shapes checked against weight_shape; raises ValueError on a mismatch."""
    out_features, in_features = tensors["weight_shape"].tolist()
    mask = binarygrids.unpack_bits(tensors["weight_mask"], 1, in_features).bool()
    k = int(mask.sum())
    if k != grid.salient_count(in_features):
        raise ValueError(f"{k} salient channels where the grid has {grid.salient_count(in_features)}")
    expected = {"weight_mask": [binarygrids.words(in_features, 1)],
                "weight_salient": [binarygrids.words(out_features * k, grid.salient_bits)],
                "weight_signs": [binarygrids.words(out_features * (in_features - k), 1)],
                "weight_row": [out_features, 4], "weight_column": [in_features - k]}
    for key, shape in expected.items():
        if list(tensors[key].shape) != shape:
            raise ValueError(f"{key} has shape {list(tensors[key].shape)}, expected {shape}")
    codes = binarygrids.unpack_bits(tensors["weight_salient"], grid.salient_bits, out_features * k)
    signs = binarygrids.unpack_bits(tensors["weight_signs"], 1, out_features * (in_features - k)).bool()
    return (mask, codes.view(out_features, k), signs.view(out_features, in_features - k),
            tensors["weight_row"], tensors["weight_column"])


def weight_args(grid: IntGrid | FloatGrid, in_features: int, act_order: bool, block: bool = False) -> dict:
    """compressed-tensors QuantizationArgs for a grid on a given input width (`block`: written as
    blocks of [1, g] although groups could hold it, see block_layers)."""
    if isinstance(grid, FloatGrid):
        if grid.format not in CT_FLOAT_FORMATS:
            raise CompressorError(f"{grid.format} has no compressed-tensors layout")
        # The presets NVFP4A16 / MXFP4A16: E2M1 with FP8 scales per 16 (and a global scale,
        # "tensor_group") or E8M0 scales per 32.
        nvfp4 = grid.format == "nvfp4"
        return {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False,
                "strategy": "tensor_group" if nvfp4 else "group", "group_size": grid.group_size,
                "scale_dtype": "torch.float8_e4m3fn" if nvfp4 else "torch.uint8",
                "zp_dtype": "torch.float8_e4m3fn" if nvfp4 else "torch.uint8"}
    args = {"num_bits": grid.bits, "type": "int", "symmetric": grid.symmetric, "dynamic": False}
    if block or grid.is_ragged(in_features):
        args.update(strategy="block", block_structure=[1, grid.group_width(in_features)])
    elif grid.group_size <= 0:
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=grid.group_size)
    if act_order:
        args["actorder"] = "static"  # static groups: no g_idx, the stored layout is unchanged
    return args


def sparsity_config(records: dict[str, LinearState], ignore: list[str]) -> dict | None:
    """compressed-tensors' sparsity metadata. Engines dropped the 2:4 storage formats, so pruned
    weights are stored densely (zeros included) and this only records the structure."""
    pruned = {name: state for name, state in records.items() if state.mask is not None}
    if not pruned:
        return None
    patterns = {state.metrics.get("pattern", "unstructured") for state in pruned.values()}
    # A record already written (compressor.writer.lighten) keeps its count, not its mask.
    zeros = sum(state.metrics["pruned_weights"] if state.mask.is_meta else int((~state.mask).sum())
                for state in pruned.values())
    total = sum(state.mask.numel() for state in pruned.values())
    return {
        "format": "dense",
        "sparsity_structure": patterns.pop() if len(patterns) == 1 else "unstructured",
        "global_sparsity": zeros / total,
        "targets": sorted(pruned),
        "ignore": ignore,
    }


def _schemes(quantized: dict, blocks: set[str]) -> dict[str, tuple[dict, str, list[str]]]:
    """Distinct (QuantizationArgs, format) -> the layers that have it."""
    schemes: dict[str, tuple[dict, str, list[str]]] = {}
    for name, quant in quantized.items():
        args = weight_args(quant.grid, quant.codes.shape[1], quant.act_order, block=name in blocks)
        layout = CT_FLOAT_FORMATS.get(quant.grid.format, "pack-quantized")
        key = json.dumps([args, layout], sort_keys=True)
        schemes.setdefault(key, (args, layout, []))[2].append(name)
    return schemes


def block_layers(records: dict[str, LinearState], target: Target | str = Target.ANY) -> set[str]:
    """The asymmetric layers written as blocks though groups could hold them: all of them in a
    checkpoint of several schemes (mixed bits, ragged layers beside others), unless --target vllm.
    Stock transformers reads packed zero points only through its one-scheme dequantize route
    (compressor.upstream); mixed-precision budgets count these zero points as int8 accordingly
    (compressor.budget.MIXED_PACKED_ZERO)."""
    if Target.parse(target) is Target.VLLM:
        return set()
    quantized = {name: state.quant for name, state in records.items() if state.quant is not None}
    if any(q.grid.format in (*OWN_FORMATS, "gguf", *LUT_FORMATS, binarygrids.FORMAT)
           for q in quantized.values()):
        return set()
    if len(_schemes(quantized, set())) <= 1:
        return set()
    return {name for name, q in quantized.items()
            if isinstance(q.grid, IntGrid) and packs_zero_points(q.grid, q.codes.shape[1])}


def quantization_config(records: dict[str, LinearState], ignore: list[str],
                        target: Target | str = Target.ANY) -> dict | None:
    """config.json's quantization_config: one config group per distinct weight scheme, plus the
    sparsity metadata when some linears were pruned."""
    sparsity = sparsity_config(records, ignore)
    quantized = {name: state.quant for name, state in records.items() if state.quant is not None}
    if any(q.grid.format == "gguf" for q in quantized.values()):
        return gguf_config(quantized, sparsity)
    if any(isinstance(q.grid, LutGrid) for q in quantized.values()):
        return lut_config(quantized, sparsity)
    if any(isinstance(q, BinaryWeight) for q in quantized.values()):
        return binary_config(quantized, sparsity)
    own = [name for name, q in quantized.items() if q.grid.format in OWN_FORMATS]
    if own:
        return own_format_config(quantized, own, sparsity)
    schemes = _schemes(quantized, block_layers(records, target))
    if not schemes:
        # Pruned only: transformers loads the dense weights; the config just describes them.
        return {"quant_method": "compressed-tensors", "sparsity_config": sparsity} if sparsity else None
    groups = {
        f"group_{i}": QuantizationScheme(
            targets=names, weights=QuantizationArgs(**args), format=layout
        )
        for i, (args, layout, names) in enumerate(schemes.values())
    }
    layouts = {layout for _, layout, _ in schemes.values()}
    config = QuantizationConfig(
        config_groups=groups,
        format=layouts.pop() if len(layouts) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    ).model_dump(exclude_none=True)
    only = next(iter(schemes.values()))[0] if len(schemes) == 1 else None
    packed_zero = only is not None and not only["symmetric"] and only["strategy"] != "block"
    embedding = any(state.metrics.get("embedding") for state in records.values())
    if only is not None and (only["type"] == "float" or packed_zero or embedding):
        # Stock transformers reads these only through its dequantize route (right for one scheme;
        # vLLM ignores the key): packed zero points have no room in its loading skeleton
        # (compressor.upstream), 4-bit floats decompress in bfloat16 at the first forward, which a
        # float32 model cannot multiply, and a quantized embedding leaves its tied head no weight.
        config["dequantize"] = True
    if sparsity:
        config["sparsity_config"] = sparsity
    return config


# Token embeddings (and an untied head) in the file (--embeddings int8): 8-bit, one scale per row.
EMBEDDING_GRID = {"bits": 8, "group_size": 0, "symmetric": True}


def quantize_embeddings(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, LinearState]:
    """Replace the `names` modules' weights in `tensors` by their packed int8 rows (round to
    nearest, per-row scale); their records, marked as embeddings, for the config."""
    from compressor.passes import rtn

    records = {}
    for name in names:
        key = f"{name}.weight"
        if key not in tensors:
            continue
        weight = tensors.pop(key)
        state = LinearState(name, weight.float(), weight.dtype)
        rtn.compress(state, None, EMBEDDING_GRID)
        state.metrics["embedding"] = True
        tensors.update({f"{name}.{local}": packed for local, packed in pack_linear(state.quant).items()})
        records[name] = state
    return records


def unpack_block_zero_points(tensors: dict[str, torch.Tensor], records: dict[str, LinearState],
                             blocks: set[str]) -> dict[str, torch.Tensor]:
    """`tensors` with the zero points of `blocks` (block_layers) unpacked to int8 [out, groups]."""
    for name in blocks:
        key = f"{name}.weight_zero_point"
        if key in tensors:
            quant = records[name].quant
            tensors[key] = unpack_zero_point(tensors[key], quant.grid.bits, quant.codes.shape[0])
    return tensors


def own_format_config(quantized: dict, own: list[str], sparsity: dict | None) -> dict:
    """LLM-FP4's per-row formats have no compressed-tensors layout: the checkpoint says so with its
    own quant_method, and compressor.model.load_model reconstructs the weights."""
    if len(own) != len(quantized):
        raise CompressorError("LLM-FP4 (fp4 / e2m1) layers cannot share a checkpoint with other formats")
    schemes = {(quantized[name].grid, quantized[name].act_bits) for name in own}
    if len(schemes) > 1:
        raise CompressorError("an LLM-FP4 checkpoint holds one format, group size and act_bits")
    grid, act_bits = schemes.pop()
    config = {"quant_method": OWN_QUANT_METHOD, "format": grid.format, "group_size": grid.block,
              "targets": sorted(own), "row_formats": [f.name for f in fpgrids.ROW_FORMATS]}
    if act_bits is not None:
        config["input_activations"] = {
            "num_bits": act_bits, "formats": [f.name for f in fpgrids.ACT_FORMATS[act_bits]],
            "strategy": "tensor, with a per-channel power-of-two pre-shift folded into the weight",
            "simulated": True,
        }
    if sparsity:
        config["sparsity_config"] = sparsity
    return config


def gguf_config(quantized: dict, sparsity: dict | None) -> dict:
    """GGUF blocks have no compressed-tensors layout: the checkpoint names its own method and each
    linear's type (`compress export --to gguf` copies the blocks; compressor.load_model decodes them)."""
    if sparsity or any(q.grid.format != "gguf" for q in quantized.values()):
        raise CompressorError("GGUF blocks cannot share a checkpoint with other formats or pruning")
    return {"quant_method": GGUF_QUANT_METHOD, "format": "gguf",
            "types": {name: q.grid.qtype.value for name, q in sorted(quantized.items())}}


def lut_config(quantized: dict, sparsity: dict | None) -> dict:
    """Learned tables have no compressed-tensors layout: the checkpoint names its own method, the
    grid and the linears that hold tables (compressor.model.load_model reconstructs the weights)."""
    grids_used = {q.grid for q in quantized.values()}
    if sparsity or len(grids_used) > 1 or not isinstance(next(iter(grids_used)), LutGrid):
        raise CompressorError("a lookup-table checkpoint holds one lut format, group size and table_rows, "
                              "without other formats or pruning")
    grid = grids_used.pop()
    return {"quant_method": LUT_QUANT_METHOD, "format": grid.format, "group_size": grid.group_size,
            "table_rows": grid.table_rows, "targets": sorted(quantized)}


def binary_config(quantized: dict, sparsity: dict | None) -> dict:
    """PTQ1.61's layout has no compressed-tensors equivalent: the checkpoint names its own method, the
    grid and the linears that hold it (compressor.model.load_model reconstructs the weights)."""
    grids_used = {q.grid for q in quantized.values()}
    if sparsity or len(grids_used) > 1 or not all(isinstance(q, BinaryWeight) for q in quantized.values()):
        raise CompressorError("a ptq161 checkpoint holds one salient fraction and salient_bits, without "
                              "other formats or pruning")
    grid = grids_used.pop()
    return {"quant_method": BINARY_QUANT_METHOD, "format": grid.format, "salient": grid.salient,
            "salient_bits": grid.salient_bits, "targets": sorted(quantized)}


def module_tensors(module, prefix: str, records: dict[str, LinearState],
                   exclude: str | None = None) -> dict[str, torch.Tensor]:
    """The module's state dict (keys prefixed, those starting with `exclude` left out) with each
    quantized linear's weight replaced by its packed tensors. Tied weights (lm_head =
    embed_tokens) are stored once; transformers re-ties them on load."""
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for local_key, tensor in module.state_dict().items():
        key = prefix + local_key
        if exclude is not None and key.startswith(exclude):
            continue
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storage and tensor.numel() > 0:
            continue
        seen_storage.add(pointer)
        name = key.rsplit(".", 1)[0]
        state = records.get(name)
        if key.endswith(".weight") and state is not None and state.quant is not None:
            for local, packed in pack_linear(state.quant).items():
                tensors[f"{name}.{local}"] = packed
        else:
            tensors[key] = tensor.detach().cpu().contiguous()
    return tensors


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing folder before any work is done."""
    if output.exists() and not overwrite:
        raise CompressorError(f"output folder exists: {output} (pass --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise CompressorError(f"output path exists and is not a folder: {output}")
