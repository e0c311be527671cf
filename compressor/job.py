"""One compression run, end to end: load (or stream), calibrate, run the pipeline, write the
checkpoint and its manifest (compress.json) atomically and resumably. The CLI's `quantize` and
`run` commands are thin wrappers.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import yaml

from compressor import __version__, budget, data, distributed
from compressor.engines import Engine, check_plan, plan_layouts
from compressor.errors import CompressorError
from compressor.gguf_export import check_gguf_architecture
from compressor.model import ModelSource, decoder_blocks, load_model
from compressor.pack import Target, block_layers, check_output, module_tensors, quantize_embeddings
from compressor.passes import Scope
from compressor.pipeline import BlockHooks, compress_model, needs_data, resolve_device
from compressor.plan import build_plan, compressible_linears, recipe_scopes, validate_recipe
from compressor.selfcal import SELF, self_windows
from compressor.stream import NamesDiffer, StreamedModel, can_stream, keep_heap_small, return_freed_memory
from compressor.writer import CheckpointWriter, lighten, peak_rss_mb

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
    resume: bool = False,
    low_memory: bool = False,
) -> JobResult:
    """Compress `source` as `recipe` says and write the checkpoint to `output`.

    A local safetensors model is streamed (compressor.stream): one decoder block in memory at a
    time, input and output alike; `low_memory` also keeps one calibration chunk's activations
    instead of all of them (compressor.pipeline). Other sources (GGUF, hub ids), importance
    allocations, which score the whole model first, and recipes with a model pass, which changes
    the embeddings, norms and head too, are loaded whole. Either way the output is
    written block by block (compressor.writer), and `resume` continues an interrupted run of the
    same settings.

    `allocation` ({"score": "lim" | "zd", "budget": Budget}) spreads the recipe's first step, a
    quantization, over two bit widths, block by block, by layer importance; with {"score", "spread"}
    instead it spreads an unstructured pruning step over sparsity +- spread
    (compressor.search.importance).
    """
    stage = on_stage or (lambda _: None)
    # Everything that can be checked without the model is checked before loading it.
    check_output(output, overwrite)
    validate_recipe(recipe["passes"])
    Target.parse(recipe.get("target"))
    torch_device = resolve_device(device)
    distributed.init_from_environment(torch_device)
    data_dir = data.resolve_data_dir(calibration.data_dir)
    identity = {"source": asdict(source), "recipe": recipe, "allocation": allocation,
                "calibration": asdict(calibration), "device": torch_device.type,
                "world_size": distributed.world_size(), "compressor": __version__}
    writer = CheckpointWriter(output, identity, overwrite, resume)
    if low_memory:
        keep_heap_small()
    try:
        return _compress(source, recipe, writer, calibration, torch_device, data_dir, stage, on_block,
                         allocation, low_memory)
    except KeyboardInterrupt:
        raise  # the staging folder stays: --resume continues from the last finished block
    except BaseException:
        writer.discard()
        raise


def _compress(source, recipe, writer, calibration, torch_device, data_dir, stage, on_block, allocation,
              low_memory):
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    stage(f"loading {source.label}")
    streamed = None
    # A model pass (rotate) changes the embeddings, norms and head as well as the blocks: the model
    # is loaded whole, so those are written from the transformed model, not copied from the source.
    whole = allocation is not None or Scope.MODEL in recipe_scopes(recipe["passes"])
    if not whole and can_stream(source):
        try:
            streamed = StreamedModel(source)
        except NamesDiffer:
            stage(f"loading {source.label} whole (its tensor names need transformers' renaming)")
    model, tokenizer = (streamed.model, streamed.tokenizer()) if streamed else load_model(source)
    seconds["load"] = time.perf_counter() - start

    def calibration_ids():
        start = time.perf_counter()
        stage(f"calibration: {calibration.samples} x {calibration.seqlen} tokens of {calibration.source}")
        ids = calibration_windows(tokenizer, calibration, data_dir, source=source,
                                  model=None if streamed else model, device=torch_device, on_stage=stage)
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
    target = Target.parse(recipe.get("target"))
    if target is Target.VLLM:
        check_plan(plan_layouts(model, plan), Engine.VLLM)
    elif target is Target.GGUF:
        check_gguf_architecture(model.config)
        check_plan(plan_layouts(model, plan), Engine.LLAMA_CPP)
    if ids is None and needs_data(plan):
        ids = calibration_ids()

    start = time.perf_counter()
    first_block = writer.blocks_done
    linear_count = len(set(plan) & set(compressible_linears(model)))
    stage(f"compressing {linear_count} linears on {torch_device}"
          + (f", resuming at block {first_block}" if first_block else ""))
    prefix, _ = decoder_blocks(model)
    hooks = WriteEachBlock(writer, prefix, streamed)
    records = compress_model(
        model, plan, None if ids is None else distributed.shard_windows(ids), device=torch_device,
        batch_size=calibration.batch_size, on_block=on_block, hooks=hooks,
        first_block=first_block, resume_hidden=writer.resumed_hidden(), low_memory=low_memory,
    )
    records = {**writer.resumed_records(), **records}
    seconds["compress"] = time.perf_counter() - start

    start = time.perf_counter()
    stage(f"writing {writer.output}")

    def outside_tensors() -> dict:
        if streamed:
            return streamed.outside_tensors()
        return module_tensors(model, "", {}, exclude=prefix + ".")

    extra = {"transforms": hooks.transforms} if hooks.transforms else {}
    extra.update(device=str(torch_device), world_size=distributed.world_size(), streamed=streamed is not None,
                 low_memory=low_memory, resumed_at_block=first_block)
    return finish_checkpoint(writer, model, tokenizer, source, recipe, records,
                             calibration if ids is not None else None, outside_tensors, seconds, start, extra)


def calibration_windows(tokenizer, calibration: Calibration, data_dir: Path, count: int | None = None,
                        seqlen: int | None = None, seed_offset: int = 0, *, source: ModelSource | None = None,
                        model=None, device=None, on_stage=None) -> torch.Tensor:
    """The calibration windows a job asked for (or `count` x `seqlen` of the same source, another seed).

    `--calibration self` has the dense model write them (compressor.selfcal): `model` when it is
    loaded whole and still dense, else it is loaded from `source`."""
    count, seqlen = count or calibration.samples, seqlen or calibration.seqlen
    if calibration.source == SELF:
        return self_windows(source, model, tokenizer, count, seqlen, calibration.seed + seed_offset, device,
                            on_stage=on_stage)
    return data.calibration_windows(tokenizer, calibration.source, count, seqlen,
                                    seed=calibration.seed + seed_offset, data_dir=data_dir)


def finish_checkpoint(writer: CheckpointWriter, model, tokenizer, source: ModelSource, recipe: dict,
                      records: dict, calibration: Calibration | None, outside_tensors, seconds: dict,
                      write_started: float, extra: dict, files: dict | None = None) -> JobResult:
    """The end of every compressing command (quantize, sparsify, run, search): the manifest (the
    records' figures, `extra`, timings, peak memory), the linears left dense listed as ignored,
    the recipe and any other `files` beside the weights, then the staging folder renamed."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    embeddings = embedding_modules(model) if recipe.get("embeddings") == "int8" else []
    ignore = sorted(linears - set(records) - set(embeddings))
    manifest = build_manifest(model, source, recipe, records, calibration)
    if embeddings:
        plain_outside = outside_tensors

        def outside_tensors() -> dict:
            """The tensors outside the blocks, with the embeddings (and an untied head) as int8 rows;
            their records join the others for the config."""
            tensors = plain_outside()
            quantized = quantize_embeddings(tensors, embeddings)
            records.update(quantized)
            manifest["embeddings"] = {name: {"bits": 8, "group_size": 0, "symmetric": True,
                                             "shape": list(state.quant.codes.shape)}
                                      for name, state in quantized.items()}
            return tensors

    manifest.update(extra)
    manifest["threads"] = torch.get_num_threads()
    # Timings and peak memory are the manifest's only run-dependent entries (not hashed).
    seconds["write"] = time.perf_counter() - write_started
    manifest["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    manifest["peak_rss_mb"] = round(peak_rss_mb(), 1)
    writer.finish(model, tokenizer, records, ignore, outside_tensors, manifest,
                  {RECIPE_FILE: yaml.safe_dump(recipe, sort_keys=False), **(files or {})},
                  recipe.get("target", "any"))
    return JobResult(output=str(writer.output), manifest=manifest)


class WriteEachBlock(BlockHooks):
    """Around each block: read it from disk (streamed), then write it, record progress, drop it."""

    def __init__(self, writer: CheckpointWriter, prefix: str, streamed: StreamedModel | None):
        self.writer, self.prefix, self.streamed = writer, prefix, streamed
        self.outside_dropped = False
        self.transforms: list[dict] = []  # what each model pass reported, for the manifest

    def transformed(self, method: str, figures: dict) -> None:
        self.transforms.append({"method": method, **figures})

    def load(self, index: int, block) -> None:
        if self.streamed is None:
            return
        if not self.outside_dropped:  # calibration inputs are captured: embeddings not needed now
            self.streamed.release_outside()
            self.outside_dropped = True
        self.streamed.load_block(index, block)

    def done(self, index: int, block, records: dict, hidden: list | None) -> None:
        tensors = module_tensors(block, f"{self.prefix}.{index}.", records) if self.writer.writes else {}
        self.writer.write_block(index, tensors, {n: lighten(s) for n, s in records.items()}, hidden)
        block.to("meta")  # written: its memory goes back
        return_freed_memory()


def embedding_modules(model) -> list[str]:
    """The token embedding's module name, and the head's when it is not tied to it."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if module is embedding]
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if head is not None and not tied:
        names += [name for name, module in model.named_modules() if module is head]
    return names


def build_manifest(model, source: ModelSource, recipe: dict, records: dict, calibration) -> dict:
    modules = {}
    layers = []
    blocks = block_layers(records, recipe.get("target"))
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
            if getattr(grid, "full_range", False):
                entry["full_range"] = True
            if grid.format != "int":
                entry["format"] = grid.format
        row = (out_features, in_features, grid, scale_bits, name not in blocks)
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
