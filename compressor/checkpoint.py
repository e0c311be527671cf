"""`compress inspect`: what a checkpoint holds, read from its files without loading the model."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from compressor import budget
from compressor.errors import CompressorError
from compressor.grids import IntGrid
from compressor.pack import INDEX_NAME, WEIGHTS_NAME

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
    scheme_of = {}
    for group in (qconfig.get("config_groups") or {}).values():
        for target in group.get("targets", []):
            scheme_of[target] = group["weights"]
    layers, rows = [], []
    for key, (dtype, shape) in shapes.items():
        if key.endswith(".weight_packed"):
            name = key.removesuffix(".weight_packed")
            args = scheme_of.get(name)
            if args is None:
                raise CompressorError(f"{name} is packed but no config group targets it")
            if name not in original:
                raise CompressorError(f"{name}: weight_shape missing")
            out_features, in_features = original[name]
            group = args.get("group_size") or (args.get("block_structure") or [0, 0])[1] or 0
            group = 0 if group >= in_features else group  # one block per row = per-channel
            grid = IntGrid(bits=args["num_bits"], group_size=group, symmetric=args["symmetric"])
            expected = budget.packed_words(in_features, grid.bits)
            if shape != [out_features, expected]:
                raise CompressorError(f"{name}: packed shape {shape} does not match {args}")
            scale_bits = 8 * BYTES.get(shapes[f"{name}.weight_scale"][0], 2)
            layers.append((out_features, in_features, grid, scale_bits))
            rows.append({"module": name, "bits": grid.bits, "group_size": group,
                         "symmetric": grid.symmetric, "shape": [out_features, in_features],
                         "bpw": budget.bits_per_weight([layers[-1]])["stored"]})
        elif key.endswith(".weight") and len(shape) == 2 and ".layers." in key:
            bits = 8 * BYTES.get(dtype, 2)
            layers.append((shape[0], shape[1], None, bits))
            rows.append({"module": key.removesuffix(".weight"), "bits": bits, "group_size": None,
                         "symmetric": None, "shape": shape, "bpw": float(bits)})
    files = [f for f in folder.iterdir() if f.is_file()]
    return {
        "folder": str(folder),
        "format": qconfig.get("format", "dense"),
        "modules": sorted(rows, key=lambda r: r["module"]),
        "bpw": budget.bits_per_weight(layers),
        "size_bytes": sum(f.stat().st_size for f in files),
        "weights_bytes": sum(p.stat().st_size for p in _weight_files(folder)),
    }

