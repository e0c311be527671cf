"""`compress inspect`: what a checkpoint holds, read from its files without loading the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from compressor import budget, engines, fpgrids
from compressor.errors import CompressorError
from compressor.files import INDEX_NAME, WEIGHTS_NAME, tensor_files, tensor_reader
from compressor.fpgrids import FloatGrid
from compressor.gguf_quants import GgufGrid, GgufType
from compressor.grids import IntGrid
from compressor.model import BINARY_QUANT_METHOD, LUT_QUANT_METHOD, OWN_QUANT_METHOD
from compressor.pack import unpack_zero_point
from compressor.sparsity import Pattern, parse_nm

BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "F64": 8, "BOOL": 1}


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise CompressorError(f"no safetensors weights in {folder}")


def read_tensor_shapes(folder: Path) -> tuple[dict[str, tuple[str, list[int]]], dict[str, list[int]]]:
    """(name -> (dtype, shape) for every tensor, module -> original [out, in] of packed weights).

    Reading the headers checks every file; the tiny weight_shape tensors are read in full.
    """
    shapes, original = {}, {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise CompressorError(f"missing weight shard: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    sliced = handle.get_slice(key)
                    shapes[key] = (sliced.get_dtype(), list(sliced.get_shape()))
                    if key.endswith(".weight_shape"):
                        original[key.removesuffix(".weight_shape")] = handle.get_tensor(key).tolist()
        except Exception as error:  # noqa: BLE001 - safetensors raises several types
            raise CompressorError(f"corrupt safetensors file {path}: {str(error).splitlines()[0]}")
    return shapes, original


def inspect_checkpoint(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CompressorError(f"not a checkpoint folder (no config.json): {folder}")
    config = json.loads((folder / "config.json").read_text())
    shapes, original = read_tensor_shapes(folder)
    qconfig = config.get("quantization_config") or {}
    scheme_of, format_of = {}, {}
    for group in (qconfig.get("config_groups") or {}).values():
        for target in group.get("targets", []):
            scheme_of[target] = group["weights"]
            format_of[target] = group.get("format") or qconfig.get("format")
    if qconfig.get("quant_method") == OWN_QUANT_METHOD:
        scheme_of = {target: {"type": "float", "num_bits": 4} for target in qconfig.get("targets", [])}
        format_of = {target: qconfig.get("format") for target in scheme_of}
    layers, rows, layouts = [], [], {}
    lut = qconfig.get("quant_method") == LUT_QUANT_METHOD
    binary = qconfig.get("quant_method") == BINARY_QUANT_METHOD
    for key, (dtype, shape) in shapes.items():
        if lut and key.endswith(".weight_table"):  # learned lookup tables (--format lut4 | lut3)
            name = key.removesuffix(".weight_table")
            out_features, in_features, grid = _lut_layout(name, shapes, original, qconfig)
            row = (out_features, in_features, grid, 16)
            if ".layers." in name:
                layers.append(row)
            layouts[name] = ({"type": "lut", "num_bits": grid.bits}, grid.format, (out_features, in_features))
            rows.append({"module": name, "bits": grid.bits, "group_size": grid.group_size,
                         "symmetric": grid.symmetric, "shape": [out_features, in_features],
                         "format": grid.format, "table_rows": grid.table_rows,
                         "bpw": budget.bits_per_weight([row])["stored"]})
        elif binary and key.endswith(".weight_row"):  # PTQ1.61 (--method ptq161)
            name = key.removesuffix(".weight_row")
            out_features, in_features, grid = _binary_layout(name, folder, original, qconfig)
            row = (out_features, in_features, grid, 16)
            if ".layers." in name:
                layers.append(row)
            layouts[name] = ({"type": "binary", "num_bits": grid.bits}, grid.format,
                             (out_features, in_features))
            rows.append({"module": name, "bits": grid.bits, "group_size": grid.group_size,
                         "symmetric": grid.symmetric, "shape": [out_features, in_features],
                         "format": grid.format, "salient_channels": grid.salient_count(in_features),
                         "bpw": budget.bits_per_weight([row])["stored"]})
        elif key.endswith(".weight_packed") and not lut:
            name = key.removesuffix(".weight_packed")
            out_features, in_features, grid = _packed_layout(name, shape, scheme_of, original, qconfig)
            scale_bits = 8 * BYTES.get(shapes[f"{name}.weight_scale"][0], 2)
            packed_zero = (scheme_of.get(name) or {}).get("strategy") != "block"
            row = (out_features, in_features, grid, scale_bits, packed_zero)
            if ".layers." in name:  # the figure is over the decoder-block linears (not the embeddings)
                layers.append(row)
            layouts[name] = (scheme_of[name], format_of[name], (out_features, in_features))
            rows.append({"module": name, "bits": grid.bits, "group_size": grid.group_size,
                         "symmetric": grid.symmetric, "shape": [out_features, in_features],
                         "format": grid.format if isinstance(grid, FloatGrid) else "int",
                         "bpw": budget.bits_per_weight([row])["stored"]})
        elif key.endswith(".weight_gguf"):  # GGUF blocks (--format gguf:TYPE before export)
            name = key.removesuffix(".weight_gguf")
            qtype = (qconfig.get("types") or {}).get(name)
            if qtype is None or name not in original:
                raise CompressorError(f"{name} holds GGUF blocks but no type (or weight_shape) for them")
            grid = GgufGrid(GgufType.parse(qtype))
            out_features, in_features = original[name]
            row = (out_features, in_features, grid, 16)
            if ".layers." in name:
                layers.append(row)
            layouts[name] = ({"type": "gguf", "num_bits": grid.bits}, "gguf", (out_features, in_features))
            rows.append({"module": name, "bits": grid.bits, "group_size": grid.group_size,
                         "symmetric": grid.symmetric, "shape": [out_features, in_features],
                         "format": qtype, "bpw": budget.bits_per_weight([row])["stored"]})
        elif key.endswith(".weight") and len(shape) == 2 and ".layers." in key:
            bits = 8 * BYTES.get(dtype, 2)
            layers.append((shape[0], shape[1], None, bits))
            layouts[key.removesuffix(".weight")] = (None, "dense", tuple(shape))
            rows.append({"module": key.removesuffix(".weight"), "bits": bits, "group_size": None,
                         "symmetric": None, "shape": shape, "bpw": float(bits)})
    served = engines.layer_engines(layouts, one_scheme=len(qconfig.get("config_groups") or {}) <= 1,
                                   dequantize=bool(qconfig.get("dequantize")))
    for row in rows:
        row["engines"] = served[row["module"]]
    sparsity = qconfig.get("sparsity_config")
    if sparsity:
        sparsity = verify_sparsity(folder, sparsity, scheme_of, original, rows)
    files = [f for f in folder.iterdir() if f.is_file()]
    return {
        "folder": str(folder),
        "format": qconfig.get("format", "dense"),
        "sparsity": sparsity,
        "modules": sorted(rows, key=lambda r: r["module"]),
        "bpw": budget.bits_per_weight(layers),
        # The engines that serve every layer, and for each of the others its first reason.
        "engines": {engine: next((f"{row['module']}: {row['engines'][engine]}" for row in rows
                                  if row["engines"][engine]), None) for engine in engines.ENGINES},
        "size_bytes": sum(f.stat().st_size for f in files),
        "weights_bytes": sum(p.stat().st_size for p in _weight_files(folder)),
    }



def _lut_layout(name: str, shapes: dict, original: dict, qconfig: dict):
    """(out, in, grid) of a lookup-table linear, its tensors' shapes checked against the grid."""
    from compressor.lutgrids import parse_grid

    if name not in qconfig.get("targets", []) or name not in original:
        raise CompressorError(f"{name} holds a lookup table but is not listed (or weight_shape missing)")
    grid = parse_grid(qconfig)
    out_features, in_features = original[name]
    expected = {"weight_packed": [out_features, budget.packed_words(in_features, grid.bits)],
                "weight_scale": [out_features, grid.num_groups(in_features)],
                "weight_table": [grid.num_tables(out_features), grid.levels]}
    for local, shape in expected.items():
        if shapes.get(f"{name}.{local}", (None, None))[1] != shape:
            raise CompressorError(f"{name}.{local} does not match its {grid.format} layout {shape}")
    return out_features, in_features, grid


def _binary_layout(name: str, folder: Path, original: dict, qconfig: dict):
    """(out, in, grid) of a PTQ1.61 linear, its tensors read and checked against the grid (the
    salient count is in the mask itself)."""
    from compressor.binarygrids import TENSORS, parse_grid
    from compressor.pack import unpack_binary_linear

    if name not in qconfig.get("targets", []) or name not in original:
        raise CompressorError(f"{name} holds a ptq161 layout but is not listed (or weight_shape missing)")
    grid = parse_grid(qconfig)
    _, read = tensor_reader(folder)
    tensors = {local: read(f"{name}.{local}", optional=True) for local in TENSORS}
    try:
        unpack_binary_linear(tensors, grid)
    except (AttributeError, ValueError) as error:  # a missing tensor (None), a wrong shape
        raise CompressorError(f"{name}: does not match its ptq161 layout: {error}") from None
    out_features, in_features = original[name]
    return out_features, in_features, grid


def _packed_layout(name: str, shape: list[int], scheme_of: dict, original: dict, qconfig: dict):
    """(out, in, grid) of a packed linear, checked against the shape of its packed codes."""
    if qconfig.get("quant_method") == OWN_QUANT_METHOD:  # LLM-FP4: [out, in/2] bytes
        if name not in qconfig.get("targets", []) or name not in original:
            raise CompressorError(f"{name} is packed but not listed (or weight_shape missing)")
        out_features, in_features = original[name]
        grid = FloatGrid(qconfig.get("format", "fp4"), block=int(qconfig.get("group_size", 0)))
        expected = [out_features, in_features // 2]
    else:
        args = scheme_of.get(name)
        if args is None:
            raise CompressorError(f"{name} is packed but no config group targets it")
        if args.get("type") == "float":  # NVFP4 / MXFP4: uint8 [out, in/2], no weight_shape
            grid = FloatGrid("nvfp4" if args.get("group_size") == 16 else "mxfp4")
            out_features, in_features = shape[0], shape[1] * 2
            expected = shape
        else:
            if name not in original:
                raise CompressorError(f"{name}: weight_shape missing")
            out_features, in_features = original[name]
            group = args.get("group_size") or (args.get("block_structure") or [0, 0])[1] or 0
            group = 0 if group >= in_features else group  # one block per row = per-channel
            grid = IntGrid(bits=args["num_bits"], group_size=group, symmetric=args["symmetric"])
            expected = [out_features, budget.packed_words(in_features, grid.bits)]
    if shape != expected:
        raise CompressorError(f"{name}: packed shape {shape} does not match its format")
    return out_features, in_features, grid


def _read(files: dict[str, Path], key: str) -> torch.Tensor:
    with safe_open(str(files[key]), framework="pt") as handle:
        return handle.get_tensor(key)


def _zero_mask(files, name: str, args: dict | None, shape: list[int] | None) -> torch.Tensor:
    """True where the stored weight is exactly zero (for packed weights: code == zero point)."""
    if args is None:
        return _read(files, f"{name}.weight") == 0
    if args.get("type") == "float":  # 4-bit float codes: +0 is 0, -0 is 8
        codes = fpgrids.unpack_nibbles(_read(files, f"{name}.weight_packed"))
        return (codes == 0) | (codes == 8)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    codes = unpack_from_int32(_read(files, f"{name}.weight_packed"), args["num_bits"], shape)
    if args["symmetric"]:
        return codes == 0
    zero = _read(files, f"{name}.weight_zero_point")
    if args.get("strategy") != "block":  # group/channel: packed along the output rows
        zero = unpack_zero_point(zero, args["num_bits"], shape[0])
    width = -(-shape[1] // zero.shape[1])
    return codes == zero[:, torch.arange(shape[1]) // width]


def verify_sparsity(folder: Path, config: dict, scheme_of: dict, original: dict, rows: list) -> dict:
    """Check that every pruned tensor really has the recorded structure; annotate the rows."""
    structure = config.get("sparsity_structure", "unstructured")
    pattern = None if structure == "unstructured" else Pattern(0.0, *parse_nm(structure))
    files = tensor_files(folder)
    by_module = {row["module"]: row for row in rows}
    zeros = total = 0
    for name in config.get("targets", []):
        mask = ~_zero_mask(files, name, scheme_of.get(name), original.get(name))
        if pattern is not None:
            m, drop = pattern.block, pattern.block - pattern.kept
            full = mask.shape[1] // m * m
            # Natural zeros may add to the pruned ones, so each block needs *at least* M - N.
            if not bool(((~mask[:, :full]).reshape(mask.shape[0], -1, m).sum(2) >= drop).all()):
                raise CompressorError(f"{name}: the {structure} sparsity pattern does not hold")
        zeros += int((~mask).sum())
        total += mask.numel()
        if name in by_module:
            by_module[name]["sparsity"] = round(float((~mask).float().mean()), 4)
    return {"structure": structure, "verified": True, "sparsity": zeros / max(total, 1),
            "modules": len(config.get("targets", []))}
