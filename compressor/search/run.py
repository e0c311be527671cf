"""`compress search`, end to end: level database, dense targets, EvoPress generations, checkpoint.

Work that outlives one process sits in a work folder beside the output (OUT.search/ by default):

    search.json        the job's settings (so --resume needs nothing else) and the search state
    database/          the level database (reusable by searches of the same model, levels and reference)
    targets.pt         the dense model's top-k log-probabilities on the fitness windows

The state is written after every generation; `--resume` continues from the last one and, with the
same seed, ends where an uninterrupted search would have. The final checkpoint is assembled from
the database into the same packed format as `compress quantize` writes, via a staging folder.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compressor import budget, data
from compressor.budget import Budget
from compressor.errors import CompressorError
from compressor.files import atomic_write
from compressor.job import Calibration, JobResult, WriteEachBlock, calibration_windows, finish_checkpoint
from compressor.model import ModelSource, block_linears, decoder_blocks, load_model
from compressor.pack import check_output, module_tensors
from compressor.pipeline import compress_model, native_bf16, resolve_device
from compressor.plan import build_plan
from compressor.search import evopress, importance, ip
from compressor.search.database import (
    LevelDatabase,
    build_database,
    gguf_levels,
    quant_levels,
    sparsity_levels,
)
from compressor.search.fitness import DenseTargets, KLFitness
from compressor.writer import CheckpointWriter

STATE_FILE = "search.json"
GRANULARITIES = ("fused", "module")
FITNESS_DTYPES = ("auto", "bfloat16", "float32")
ALGORITHMS = ("evopress", "ip")


@dataclass
class SearchJob:
    """What to search: plain data, saved with the state so a resume needs no arguments."""

    budget: str  # "3.5bpw", "0.5sparsity", ...
    levels: str = "quant"  # quant (GPTQ bit widths), gguf (GPTQ onto GGUF types) or sparsity (SparseGPT)
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    gguf_types: list[str] = field(default_factory=lambda: list(importance.GGUF_LADDER))
    group_size: int = 128
    symmetric: bool = False
    sparsity_step: float = 0.1
    granularity: str = "fused"  # one level per vLLM fused group ({q,k,v}, {o}, {gate,up}, {down})
    top_k: int = 128  # dense probabilities kept per token for the KL
    fitness_windows: int = 64  # pool of calibration windows the stages draw from
    fitness_seqlen: int = 512
    # The fitness only ranks candidates: bfloat16 forwards are several times faster where they are
    # native (AMX / AVX512-BF16 on CPUs, GPUs) and several times slower elsewhere, hence "auto"
    # (bfloat16 where native, else float32). The written checkpoint is unaffected.
    fitness_dtype: str = "auto"
    # Importance allocations the search may start from (each scored against random starts): the
    # search then refines the best heuristic instead of walking to it from a random point.
    warm_starts: list[str] = field(default_factory=lambda: ["lim", "zd"])
    # The activations the database's levels are calibrated on: those of the model compressed by an
    # importance allocation at the budget (lim, zd), or the dense model's (dense, EvoPress's own
    # choice). At 2-3 bits a compressed model's activations drift far from the dense ones, and
    # levels calibrated on the dense activations assemble into a much worse model than the plan's
    # sequential quantization would give.
    database_reference: str = "lim"
    # The winner is assembled from the database's levels; "requantize" re-runs the winning plan
    # through the sequential pipeline instead, so every layer is calibrated on the layers before it
    # as they were compressed.
    assemble: str = "database"
    # evopress (evolutionary search on the KL) or ip (AdaQuant's integer programme over per-unit KL
    # growths measured on `ip_windows` of the fitness pool, solved exactly).
    algorithm: str = "evopress"
    ip_windows: int = 2
    settings: evopress.SearchSettings = field(default_factory=evopress.SearchSettings)

    def validate(self) -> Budget:
        target = budget.parse_budget(self.budget)
        if self.levels not in ("quant", "gguf", "sparsity"):
            raise CompressorError(f"unknown --levels {self.levels!r}; choose quant, gguf or sparsity")
        if self.granularity not in GRANULARITIES:
            raise CompressorError(f"unknown granularity {self.granularity!r}; choose fused or module")
        if (target.kind == "sparsity") != (self.levels == "sparsity"):
            raise CompressorError(f"a {target.kind} budget needs --levels "
                                  f"{'sparsity' if target.kind == 'sparsity' else 'quant or gguf'}")
        if self.database_reference not in ("dense", *importance.SCORES):
            raise CompressorError(f"unknown --database-reference {self.database_reference!r}; choose "
                                  f"{', '.join(importance.SCORES)} or dense")
        if self.assemble not in ("requantize", "database"):
            raise CompressorError(f"unknown --assemble {self.assemble!r}; choose requantize or database")
        if self.fitness_dtype not in FITNESS_DTYPES:
            raise CompressorError(f"unknown --fitness-dtype {self.fitness_dtype!r}; "
                                  f"choose {' or '.join(FITNESS_DTYPES)}")
        if unknown := set(self.warm_starts) - set(importance.SCORES):
            raise CompressorError(f"unknown warm start {', '.join(sorted(unknown))}; choose from "
                                  f"{', '.join(importance.SCORES)}")
        if self.algorithm not in ALGORITHMS:
            raise CompressorError(f"unknown --algorithm {self.algorithm!r}; choose {' or '.join(ALGORITHMS)}")
        if not 1 <= self.ip_windows <= self.fitness_windows:
            raise CompressorError(f"--ip-windows must be from 1 to --fitness-windows "
                                  f"({self.fitness_windows})")
        if self.top_k < 1 or self.fitness_windows < 1 or self.fitness_seqlen < 2:
            raise CompressorError("--top-k, --fitness-windows must be positive and --fitness-seqlen >= 2")
        self.level_list()
        return target

    def level_list(self, widths: list[int] | None = None):
        if self.levels == "gguf":
            if unknown := set(self.gguf_types) - set(importance.GGUF_LADDER):
                raise CompressorError(f"unknown GGUF level(s) {', '.join(sorted(unknown))}; choose from "
                                      f"{', '.join(importance.GGUF_LADDER)}")
            return gguf_levels(sorted(self.gguf_types, key=importance.GGUF_LADDER.index))
        if self.levels == "quant":
            if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
                raise CompressorError(f"--bits-levels must be integers from 2 to 8, got {self.bits}")
            return quant_levels(self.bits, self.group_size, self.symmetric)
        if not 0 < self.sparsity_step < 1:
            raise CompressorError(f"--sparsity-step must be in (0, 1), got {self.sparsity_step}")
        return sparsity_levels(self.sparsity_step, highest=0.9, widths=widths)

    def as_data(self) -> dict:
        return {**asdict(self), "settings": self.settings.as_data()}

    @classmethod
    def from_data(cls, raw: dict) -> SearchJob:
        settings = dict(raw["settings"])
        settings["stages"] = tuple(evopress.Stage(**s) for s in settings["stages"])
        return cls(**{**raw, "settings": evopress.SearchSettings(**settings)})


def work_folder(output: Path) -> Path:
    return output.with_name(output.name + ".search")


def _save_json(path: Path, content: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(content, indent=1)))


def load_resume(output: Path) -> dict:
    path = work_folder(output) / STATE_FILE
    if not path.is_file():
        raise CompressorError(f"nothing to resume: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CompressorError(f"{path} is not valid JSON: {error}")


def units_of(database: LevelDatabase, granularity: str) -> list[list[str]]:
    if granularity == "fused":
        return database.groups
    return [[name] for group in database.groups for name in group]


def search_space(database: LevelDatabase, units: list[list[str]], target: Budget):
    """Integer costs per (unit, level) and the budget's limit; refuses a budget no level meets."""
    levels = range(len(database.levels))
    costs = [[sum(database.cost(name, lv, target.kind) for name in unit) for lv in levels] for unit in units]
    weights = sum(database.modules[name]["shape"][0] * database.modules[name]["shape"][1]
                  for unit in units for name in unit)
    space = evopress.Space(costs=costs, limit=budget.budget_limit(target, weights))
    if space.uniform_total(0) > space.limit:
        cheapest = budget.achieved(target.kind, space.uniform_total(0), weights)
        raise CompressorError(
            f"budget {target} cannot be met: the cheapest level ({database.levels[0]}) everywhere "
            f"gives {cheapest:.4f}{target.kind}"
        )
    return space, weights


def run_search(
    source: ModelSource | None,
    job: SearchJob,
    output: Path,
    calibration: Calibration,
    device: str = "auto",
    overwrite: bool = False,
    database_folder: Path | None = None,
    resume: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> JobResult:
    stage = on_stage or (lambda _: None)
    progress = on_progress or (lambda done, total: None)
    output = Path(output)
    work = work_folder(output)
    if resume:
        saved = load_resume(output)
        source = ModelSource(**saved["source"])
        job = SearchJob.from_data(saved["job"])
        calibration = Calibration(**saved["calibration"])
        database_folder = Path(saved["database"])
        state = evopress.SearchState.from_data(saved["state"]) if saved.get("state") else None
    else:
        state = None
    target = job.validate()
    gguf_file = None
    if output.suffix == ".gguf":  # the checkpoint is written beside it, exported, then removed
        if job.levels != "gguf":
            raise CompressorError("a .gguf output holds GGUF types: search them with --format gguf")
        if output.exists() and not overwrite:
            raise CompressorError(f"output file exists: {output} (pass --overwrite to replace it)")
        gguf_file, output = output, output.with_name(f".{output.name}.checkpoint")
        overwrite = True
    check_output(output, overwrite)
    torch_device = resolve_device(device)
    data_dir = data.resolve_data_dir(calibration.data_dir)
    database_folder = Path(database_folder or work / "database")
    seconds: dict[str, float] = {}

    def save(current: evopress.SearchState | None) -> None:
        _save_json(work / STATE_FILE, {
            "source": asdict(source), "job": job.as_data(), "calibration": asdict(calibration),
            "database": str(database_folder), "state": current.as_data() if current else None,
        })

    start = time.perf_counter()
    stage(f"loading {source.label}")
    model, tokenizer = load_model(source)
    work.mkdir(parents=True, exist_ok=True)
    save(state)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    _, blocks = decoder_blocks(model)
    levels = job.level_list(sorted({m.in_features for b in blocks for m in block_linears(b).values()}))
    database = LevelDatabase(database_folder) if (database_folder / "index.json").is_file() else None
    if database is None or not database.complete(len(blocks)):
        stage(f"level database: {len(levels)} levels x {len(blocks)} blocks")
        ids = calibration_windows(tokenizer, calibration, data_dir, source=source, model=model,
                                  device=torch_device, on_stage=stage)
        identity = {"source": asdict(source), "calibration": asdict(calibration)}
        reference = None
        if job.database_reference != "dense":
            stage(f"reference plan for the database: {job.database_reference} allocation at {target}")
            reference = reference_plan(model, job, target, ids)
        database = build_database(model, ids, levels, database_folder, torch_device,
                                  calibration.batch_size, identity, progress, reference)
    seconds["database"] = time.perf_counter() - start

    units = units_of(database, job.granularity)
    space, weights = search_space(database, units, target)

    start = time.perf_counter()
    # A copy in the fitness dtype scores candidates; the model itself stays as loaded for writing.
    dtype = getattr(torch, job.fitness_dtype) if job.fitness_dtype != "auto" else (
        torch.bfloat16 if native_bf16(torch_device) else torch.float32)
    scorer = model if dtype == model.dtype else copy.deepcopy(model).to(dtype)
    scorer.to(torch_device)
    targets = _dense_targets(scorer, tokenizer, source, job, calibration, data_dir, work, torch_device,
                             stage, progress)
    fitness = KLFitness(scorer, database, units, targets)
    seconds["dense_targets"] = time.perf_counter() - start

    start = time.perf_counter()
    if job.algorithm == "ip":
        state = _integer_programme(job, space, fitness, state, save, stage, progress)
    else:
        state = _evolve(job, model, scorer, targets, database, units, space, fitness, state, save, stage,
                        progress)
    seconds["search"] = time.perf_counter() - start

    start = time.perf_counter()
    stage(f"writing {output}")
    model.to("cpu")
    chosen = {name: level for unit, level in zip(units, state.parent, strict=True) for name in unit}
    recipe = plan_recipe(database, chosen)
    if job.assemble == "requantize":
        stage("re-quantizing the chosen levels through the sequential pipeline")
        # Reloaded: the fitness may have scored candidates on this very model's weights.
        del fitness, scorer
        model, tokenizer = load_model(source)
        ids = calibration_windows(tokenizer, calibration, data_dir, source=source, model=model,
                                  device=torch_device, on_stage=stage)
        records = compress_model(model, build_plan(model, recipe["passes"]), ids, torch_device,
                                 calibration.batch_size, progress)
        seconds["requantize"] = time.perf_counter() - start
        start = time.perf_counter()
    else:
        records = {name: database.state(name, level) for name, level in chosen.items()}
    total = space.total(state.parent)
    summary = {
        "budget": str(target), "achieved": budget.achieved(target.kind, total, weights),
        "levels": database.levels, "granularity": job.granularity, "units": len(units),
        "algorithm": job.algorithm, "generations": state.generation, "evaluations": state.evaluations,
        "final_fitness_kl": state.parent_fitness, "history": state.history,
        "per_module_level": {name: database.levels[level] for name, level in chosen.items()},
        "assembled": job.assemble,
        "job": job.as_data(), "work_folder": str(work),
    }
    # Comparable with the other commands' "compress": everything but loading and writing.
    seconds["compress"] = (seconds["database"] + seconds["dense_targets"] + seconds["search"]
                           + seconds.get("requantize", 0.0))
    writer = CheckpointWriter(output, {"search": str(work)}, overwrite)
    prefix, blocks = decoder_blocks(model)
    write_block = WriteEachBlock(writer, prefix, None)
    try:
        for index, block in enumerate(blocks):
            block_prefix = f"{prefix}.{index}."
            block_records = {n: s for n, s in records.items() if n.startswith(block_prefix)}
            if job.assemble == "database":
                # The search leaves the model dense, and the writer takes float (sparse-only) linears
                # from the module (quantized ones it packs from their codes): each gets its level's weight.
                for name, record in block_records.items():
                    linear = model.get_submodule(name)
                    linear.weight.data = record.weight.to(linear.weight.dtype)
            write_block.done(index, block, block_records, None)
        result = finish_checkpoint(
            writer, model, tokenizer, source, recipe, records, calibration,
            lambda: module_tensors(model, "", {}, exclude=prefix + "."), seconds, start,
            {"search": summary, "device": str(torch_device)},
            {"levels.svg": levels_svg(units, state.parent, database)})
    except BaseException:
        writer.discard()
        raise
    if gguf_file is None:
        return result
    from compressor.gguf_export import export_gguf
    from compressor.gguf_export import summary as export_summary

    stage(f"exporting {gguf_file}")
    exported = export_summary(export_gguf(output, gguf_file, overwrite=True))
    shutil.rmtree(output)
    return JobResult(output=str(gguf_file), manifest={**result.manifest, "gguf": exported})


def _evolve(job, model, scorer, targets, database, units, space, fitness, state, save, stage, progress):
    """EvoPress generations from the best of the warm and random starts, saved after each."""
    settings = job.settings
    if state is None:
        warm = warm_starts(job.warm_starts, model, scorer, targets, units, space)
        if (planned := reference_start(database, units, space)) is not None:
            warm[f"{job.database_reference}-reference"] = planned
        stage("choosing a start within the budget")
        state = evopress.start(space, fitness, targets.pool, targets.seqlen, settings, warm)
        save(state)
    while state.generation < settings.generations:
        stage(f"EvoPress generation {state.generation + 1}/{settings.generations}"
              + (f", best KL {state.parent_fitness:.4f}" if state.parent_fitness is not None else ""))
        progress(state.generation, settings.generations)
        state = evopress.generation(state, space, fitness, targets.pool, targets.seqlen, settings)
        save(state)
    progress(settings.generations, settings.generations)
    return state


def _integer_programme(job, space, fitness, state, save, stage, progress):
    """AdaQuant's allocation: per-unit KL growths (saved unit by unit, so a resume measures only the
    rest), then the exact knapsack; the result is a SearchState with one history entry."""
    windows = list(range(job.ip_windows))
    done = state.history[0]["deltas"] if state is not None and state.history else []
    if state is not None and state.generation == 1:
        return state
    units = len(space.costs)

    def keep(rows):
        progress(len(rows), units)
        save(evopress.SearchState(generation=0, parent=[], parent_fitness=None, evaluations=0,
                                  history=[{"deltas": rows}], rng_state=[]))

    stage(f"integer programme: KL growth of {units} units x {space.levels - 1} levels "
          f"on {len(windows)} windows")
    progress(len(done), units)
    deltas = ip.measure_deltas(fitness, space, windows, done, keep)
    levels = ip.solve(space.costs, deltas, space.limit)
    predicted = sum(row[level] for row, level in zip(deltas, levels, strict=True))
    kl = fitness(levels, windows)
    state = evopress.SearchState(
        generation=1, parent=levels, parent_fitness=kl,
        evaluations=1 + units * (space.levels - 1) + 1,
        history=[{"deltas": deltas, "predicted_kl_growth": predicted, "measured_kl": kl}], rng_state=[])
    save(state)
    return state


def reference_plan(model, job: SearchJob, target: Budget, ids: torch.Tensor):
    """The importance heuristic's plan at the budget (what `compress quantize --allocate` or
    `compress sparsify --allocate` would apply), run while building the database."""
    try:
        if job.levels in ("quant", "gguf"):
            step = ({"method": "gguf", "type": "q4_k"} if job.levels == "gguf" else
                    {"method": "gptq", "bits": 4, "group_size": job.group_size, "symmetric": job.symmetric})
            passes, _ = importance.allocate_recipe(model, step, target, job.database_reference, ids)
        else:
            step = {"method": "sparsegpt", "sparsity": target.value}
            spread = min(0.1, target.value, 0.99 - target.value)
            passes, _ = importance.allocate_sparsity_recipe(model, step, job.database_reference, ids, spread)
    except CompressorError as error:
        raise CompressorError(f"{error} (while planning the level database's reference; "
                              "--database-reference dense needs none)") from None
    return build_plan(model, passes)


def reference_start(database: LevelDatabase, units: list[list[str]], space: evopress.Space
                    ) -> list[int] | None:
    """The database's reference plan as a start, where each unit's steps are one of the levels and
    it fits the budget: the search then begins at exactly the heuristic's own checkpoint."""
    reference = database.index["identity"].get("reference")
    if not reference:
        return None
    steps_of_level = [level["steps"] for level in database.index["identity"]["levels"]]
    start = []
    for unit in units:
        levels = {steps_of_level.index(reference[n]) if reference.get(n) in steps_of_level else None
                  for n in unit}
        if len(levels) != 1 or None in levels:
            return None
        start.append(levels.pop())
    return start if space.total(start) <= space.limit else None


def warm_starts(scores: list[str], model, scorer, targets: DenseTargets, units: list[list[str]],
                space: evopress.Space) -> dict[str, list[int]]:
    """Each importance score's allocation as a start: a unit inherits its decoder block's score.

    LIM runs on the fitness windows through the scoring copy (the dense model, nothing applied yet).
    """
    prefix, _ = decoder_blocks(model)
    block_of = [int(unit[0].removeprefix(prefix + ".").split(".")[0]) for unit in units]
    starts = {}
    for score in scores:
        per_block = (importance.lim_scores(scorer, targets.windows) if score == "lim"
                     else importance.zd_scores(model))
        starts[score] = evopress.ranked_start(space, [per_block[b] for b in block_of])
    return starts


def _dense_targets(model, tokenizer, source, job, calibration, data_dir, work, device, stage, progress):
    """The fitness pool (a different seed from the database's calibration) and its dense targets."""
    path = work / "targets.pt"
    count = job.ip_windows if job.algorithm == "ip" else job.fitness_windows  # ip scores on these only
    key = {"job": [job.top_k, count, job.fitness_seqlen, job.fitness_dtype],
           "calibration": asdict(calibration)}
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == json.dumps(key):
            targets = DenseTargets.__new__(DenseTargets)
            targets.windows, targets.values = saved["windows"], saved["values"]
            targets.indices, targets.rest, targets.device = saved["indices"], saved["rest"], device
            return targets
    # Self-generated text comes from the dense model as loaded (not this scoring copy): the cache holds
    # the same windows whatever the fitness dtype.
    windows = calibration_windows(tokenizer, calibration, data_dir, count, job.fitness_seqlen, seed_offset=1,
                                  source=source, device=device, on_stage=stage)
    stage(f"dense model targets: {count} x {job.fitness_seqlen} tokens, top-{job.top_k}")
    targets = DenseTargets(model, windows, job.top_k, device, progress)
    torch.save({"key": json.dumps(key), "windows": targets.windows, "values": targets.values,
                "indices": targets.indices, "rest": targets.rest}, path)
    return targets


def plan_recipe(database: LevelDatabase, chosen: dict[str, int]) -> dict:
    """The result as a recipe: one pass per level used, targeting its modules by name."""
    passes = []
    for level in range(len(database.levels)):
        names = [name for name, lv in chosen.items() if lv == level]
        steps = database.index["identity"]["levels"][level]["steps"]
        for step in steps:
            if names:
                passes.append({**step, "targets": names})
    return {"passes": passes, "levels": {name: database.levels[lv] for name, lv in chosen.items()}}


def levels_svg(units: list[list[str]], levels: list[int], database: LevelDatabase) -> str:
    """A bar per unit, height = its level, in model order: the plan at a glance."""
    width, height, bar = 12 * len(units) + 60, 220, 10
    top = len(database.levels) - 1 or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
             '<style>text{font:11px sans-serif}</style>']
    for number, (unit, level) in enumerate(zip(units, levels, strict=True)):
        h = 20 + 160 * level / top
        x = 50 + 12 * number
        parts.append(f'<rect x="{x}" y="{190 - h:.1f}" width="{bar}" height="{h:.1f}" fill="#4878a8">'
                     f'<title>{"+".join(unit)}: {database.levels[level]}</title></rect>')
    for level, name in enumerate(database.levels):
        parts.append(f'<text x="2" y="{190 - 20 - 160 * level / top + 4:.1f}">{name}</text>')
    parts.append('<text x="50" y="210">units in model order (hover for names)</text></svg>')
    return "\n".join(parts) + "\n"
