"""One compression run, end to end: load, calibrate, run the pipeline, write the checkpoint and its
manifest (compress.json) atomically. The CLI's `quantize` and `run` commands are thin wrappers.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml

from compressor import __version__, budget, data
from compressor.errors import CompressorError
from compressor.fpgrids import FloatGrid
from compressor.model import ModelSource, load_model
from compressor.pack import check_output, save_checkpoint, staged_output
from compressor.pipeline import compress_model, needs_data, resolve_device
from compressor.plan import build_plan, validate_recipe

MANIFEST = "compress.json"
RECIPE_FILE = "recipe.yaml"


@dataclass
class Calibration:
    source: str = "c4"
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    data_dir: str | None = None
    batch_size: int | None = None  # samples per forward chunk; None = all at once


@dataclass
class JobResult:
    output: str
    manifest: dict = field(default_factory=dict)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def package_versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "compressed-tensors", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run_compression(
    source: ModelSource,
    recipe: dict,
    output: Path,
    calibration: Calibration,
    device: str = "auto",
    overwrite: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_block: Callable[[int, int], None] | None = None,
    allocation: dict | None = None,
) -> JobResult:
    """Compress `source` as `recipe` says and write the checkpoint to `output`.

    `allocation` ({"score": "lim" | "zd", "budget": Budget}) spreads the recipe's first step, a
    quantization, over two bit widths, block by block, by layer importance; with {"score", "spread"}
    instead it spreads an unstructured pruning step over sparsity +- spread
    (compressor.search.importance).
    """
    stage = on_stage or (lambda _: None)
    # Everything that can be checked without the model is checked before loading it.
    check_output(output, overwrite)
    validate_recipe(recipe["passes"])
    torch_device = resolve_device(device)
    data_dir = data.resolve_data_dir(calibration.data_dir)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    stage(f"loading {source.label}")
    model, tokenizer = load_model(source)
    seconds["load"] = time.perf_counter() - start

    def calibration_ids():
        start = time.perf_counter()
        stage(f"calibration: {calibration.samples} x {calibration.seqlen} tokens of {calibration.source}")
        ids = data.calibration_windows(
            tokenizer, calibration.source, calibration.samples, calibration.seqlen,
            seed=calibration.seed, data_dir=data_dir,
        )
        seconds["calibration_data"] = time.perf_counter() - start
        return ids

    ids = None
    if allocation is not None:
        from compressor.search.importance import allocate_recipe, allocate_sparsity_recipe

        needs_ids = allocation["score"] == "lim" or needs_data(build_plan(model, recipe["passes"]))
        ids = calibration_ids() if needs_ids else None
        stage(f"scoring layer importance ({allocation['score']})")
        first, rest = recipe["passes"][0], recipe["passes"][1:]
        if "spread" in allocation:
            passes, decided = allocate_sparsity_recipe(model, first, allocation["score"], ids,
                                                       allocation["spread"])
        else:
            passes, decided = allocate_recipe(model, first, allocation["budget"], allocation["score"], ids)
        recipe = {**recipe, "passes": passes + rest, "allocation": decided}
    plan = build_plan(model, recipe["passes"])
    if ids is None and needs_data(plan):
        ids = calibration_ids()

    start = time.perf_counter()
    stage(f"compressing {len(plan)} linears on {torch_device}")
    records = compress_model(
        model, plan, ids, device=torch_device, batch_size=calibration.batch_size, on_block=on_block
    )
    seconds["compress"] = time.perf_counter() - start

    start = time.perf_counter()
    stage(f"writing {output}")
    ignore = sorted({n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - set(records))
    with staged_output(output, overwrite) as folder:
        weight_bytes = save_checkpoint(model, tokenizer, records, folder, ignore)
        manifest = build_manifest(model, source, recipe, records, calibration if ids is not None else None)
        manifest["device"] = str(torch_device)
        manifest["threads"] = torch.get_num_threads()
        manifest["size"] = {
            "weights_bytes": weight_bytes,
            "folder_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
        }
        seconds["write"] = time.perf_counter() - start
        manifest["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        manifest["peak_rss_mb"] = round(peak_rss_mb(), 1)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return JobResult(output=str(output), manifest=manifest)


def build_manifest(model, source: ModelSource, recipe: dict, records: dict, calibration) -> dict:
    modules = {}
    layers = []
    for name, state in records.items():
        linear = model.get_submodule(name)
        out_features, in_features = linear.weight.shape
        scale_bits = budget.DTYPE_BITS.get(str(linear.weight.dtype).removeprefix("torch."), 16)
        entry = {"methods": state.methods, "shape": [out_features, in_features], **state.metrics}
        grid = None
        if state.quant is not None:
            grid = state.quant.grid
            entry.update(bits=grid.bits, group_size=grid.group_size, symmetric=grid.symmetric,
                         act_order=state.quant.act_order)
            if isinstance(grid, FloatGrid):
                entry["format"] = grid.format
        row = (out_features, in_features, grid, scale_bits)
        entry["bpw"] = round(budget.bits_per_weight([row])["stored"], 4)
        layers.append(row)
        modules[name] = entry
    return {
        "compressor_version": __version__,
        "source": asdict(source),
        "recipe": recipe,
        "calibration": asdict(calibration) if calibration is not None else None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "bpw": budget.bits_per_weight(layers),
        "modules": modules,
        "versions": package_versions(),
    }


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CompressorError(f"{path} is not valid JSON: {error}")
