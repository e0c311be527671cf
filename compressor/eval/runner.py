"""`compress eval`: perplexity of a (compressed) checkpoint, its dense baseline and the KL between
them, plus zero-shot and knowledge tasks (through lm-eval) side by side with the dense model.

The dense baseline's results depend only on the baseline and the protocol, so they are cached
(keyed by both) and a sweep of compressed variants evaluates the dense model once. Every task
reports its recovery: compressed / dense on its primary metric (dense / compressed perplexity).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compressor import data
from compressor.eval import harness
from compressor.eval.judge import JudgeSettings, judge_task
from compressor.eval.perplexity import kl_divergence, perplexity
from compressor.eval.scoring import rouge_l
from compressor.files import cache_dir
from compressor.job import package_versions, read_manifest
from compressor.model import ModelSource, load_model, resolve_source, source_fingerprint
from compressor.pipeline import resolve_device


@dataclass
class EvalSettings:
    dataset: str = "wikitext2"
    seqlen: int = 2048
    windows: int | None = 32
    kl_seqlen: int = 512
    kl_windows: int | None = 16
    data_dir: str | None = None
    device: str = "auto"
    tasks: list[str] = field(default_factory=lambda: ["ppl"])  # "ppl", suites ("kick", "zeroshot"), tasks
    limit: int | None = None  # examples per lm-eval task (None = all)
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task overrides of `limit`
    batch_size: int = 1
    seed: int = 0
    judge: JudgeSettings | None = None


def _cached_dense(source: ModelSource, protocol: dict, compute: Callable[[], dict]) -> dict:
    """compute() for the dense model, or its result from an earlier run with the same protocol."""
    key = hashlib.sha256(
        json.dumps([source_fingerprint(source), protocol], sort_keys=True).encode()
    ).hexdigest()[:24]
    path = cache_dir("dense") / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    result = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    except OSError:
        pass  # a read-only home only costs the cache
    return result


def baseline_source(folder: str, baseline: str | None) -> ModelSource | None:
    """The dense model to compare with: the one named, else the source in compress.json."""
    if baseline:
        return resolve_source(baseline)
    target = resolve_source(folder)
    manifest = read_manifest(Path(target.path)) if not target.gguf_file else None
    return ModelSource(**manifest["source"]) if manifest is not None else None


def evaluate(
    folder: str,
    baseline: str | None = None,
    settings: EvalSettings | None = None,
    on_stage: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Evaluate the checkpoint in `folder` against its dense baseline; returns the result dict."""
    settings = settings or EvalSettings()
    stage = on_stage or (lambda _: None)
    device = resolve_device(settings.device)
    started = time.perf_counter()
    target = resolve_source(folder)
    manifest = read_manifest(Path(target.path)) if not target.gguf_file else None
    base_source = baseline_source(folder, baseline)

    tasks = harness.expand([t for t in settings.tasks if t != "ppl"])
    stage(f"loading {target.label}")
    model, tokenizer = load_model(target)
    model.to(device)
    data_dir = data.resolve_data_dir(settings.data_dir)
    dense = None
    if base_source is not None:
        stage(f"loading baseline {base_source.label}")
        dense, _ = load_model(base_source)
        dense.to(device)
    result = {
        "model": str(folder),
        "baseline": base_source.label if base_source else None,
        "compression": _compression_summary(manifest),
        "perplexity": None,
        "baseline_perplexity": None,
        "kl": None,
    }
    if "ppl" in settings.tasks:
        result.update(_perplexity_and_kl(model, dense, tokenizer, base_source, settings, data_dir,
                                         device, stage, progress))
    if tasks:
        result["tasks"] = {}
        for number, task in enumerate(tasks, 1):
            stage(f"task {task} ({number}/{len(tasks)})")
            result["tasks"][task] = _task_result(model, dense, tokenizer, base_source, task,
                                                 settings, data_dir)
    result["recovery"] = recovery(result)
    del dense
    result["settings"] = asdict(settings)
    result["environment"] = {"device": str(device), "threads": torch.get_num_threads(),
                             **package_versions()}
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _perplexity_and_kl(model, dense, tokenizer, base_source, settings, data_dir, device, stage,
                       progress) -> dict:
    test_ids = data.evaluation_ids(tokenizer, settings.dataset, data_dir)
    stage(f"perplexity on {settings.dataset}")
    found = {"perplexity": {"dataset": settings.dataset, **perplexity(
        model, test_ids, settings.seqlen, settings.windows, device, progress)}}
    if dense is not None:
        stage("baseline perplexity")
        protocol = {"dataset": settings.dataset, "seqlen": settings.seqlen, "windows": settings.windows}
        found["baseline_perplexity"] = _cached_dense(
            base_source, protocol,
            lambda: {"dataset": settings.dataset, **perplexity(
                dense, test_ids, settings.seqlen, settings.windows, device, progress)},
        )
        stage("KL divergence to the baseline")
        held = data.heldout_ids(tokenizer, settings.dataset, data_dir)
        found["kl"] = {"dataset": f"{settings.dataset}-heldout", **kl_divergence(
            model, dense, held, settings.kl_seqlen, settings.kl_windows, device, progress)}
    return found


def _task_result(model, dense, tokenizer, base_source, task, settings, data_dir) -> dict:
    """One lm-eval task on the compressed model and (cached) on the dense one, side by side."""
    limit = settings.task_limits.get(task, settings.limit)
    run = lambda m: harness.run_task(m, tokenizer, task, data_dir, limit,  # noqa: E731
                                     settings.batch_size, settings.seed)
    found = run(model)
    if dense is not None:
        protocol = {"task": task, "limit": limit, "seed": settings.seed,
                    "data_dir": str(data_dir), "configs": _config_fingerprint(task)}
        found["dense"] = _cached_dense(base_source, protocol, lambda: run(dense))
        mine, theirs = found.get("outputs"), found["dense"].get("outputs")
        if task in harness.CHAT_TASKS and mine and theirs:
            # Open-ended answers: how close the compressed model stays to what the dense one said.
            pairs = list(zip(mine, theirs, strict=False))
            found["metrics"]["rougeL_vs_dense"] = sum(rouge_l(a, b) for a, b in pairs) / len(pairs)
    if settings.judge is not None and task in harness.CHAT_TASKS:
        found["judge"] = judge_task(settings.judge, task, found, data_dir, limit)
    return found


def _config_fingerprint(task: str) -> str:
    # A changed prompt or loader invalidates cached dense results of that task.
    folder = harness.config_dir()
    text = (folder / f"{task}.yaml").read_bytes() + (folder / "compressor_tasks.py").read_bytes()
    return hashlib.sha256(text).hexdigest()[:16]


def recovery(result: dict) -> dict[str, float]:
    """compressed / dense on each task's primary metric; dense / compressed for perplexity."""
    found = {}
    ppl, base = result.get("perplexity"), result.get("baseline_perplexity")
    if ppl and base and ppl.get("ppl"):
        found["ppl"] = round(base["ppl"] / ppl["ppl"], 4)
    for task, entry in (result.get("tasks") or {}).items():
        mine = entry["metrics"].get(entry["primary"])
        dense = (entry.get("dense") or {}).get("metrics", {}).get(entry["primary"])
        if mine is not None and dense:
            found[task] = round(mine / dense, 4)
    return found


def failed_recovery(result: dict, minimum: float) -> dict[str, float]:
    """The tasks whose recovery is below `minimum`."""
    return {task: value for task, value in result.get("recovery", {}).items() if value < minimum}


def _compression_summary(manifest: dict | None) -> dict | None:
    if manifest is None:
        return None
    recipe = manifest.get("recipe", {})
    passes = recipe.get("passes", [])
    first = passes[0] if passes else {}
    widths = sorted({p["bits"] for p in passes if p.get("bits") is not None})
    summary = {
        "method": "+".join(dict.fromkeys(p.get("method", "?") for p in passes)),
        # Mixed precision (allocation or search) lists its widths: "3/4".
        "bits": "/".join(map(str, widths)) if len(widths) > 1 else first.get("bits"),
        "group_size": first.get("group_size"),
        "symmetric": first.get("symmetric"),
        "bpw": round(manifest.get("bpw", {}).get("stored", 0.0), 4),
        "code_bits": round(manifest.get("bpw", {}).get("levels", 0.0), 4),
        "size_mb": round(manifest.get("size", {}).get("weights_bytes", 0) / 2**20, 1),
    }
    if first.get("method") == "fp4":
        summary["format"] = first.get("format", "nvfp4")
        if first.get("act_bits"):
            summary["activations"] = (f"{first['act_bits']}-bit floats per tensor, SIMULATED in the "
                                      "forward pass (no kernel runs them)")
    if "allocation" in recipe:
        summary["allocation"] = f"{recipe['allocation']['score']} for {recipe['allocation']['budget']}"
    if "search" in manifest:
        found = manifest["search"]
        summary["search"] = (f"EvoPress for {found['budget']} ({found['generations']} generations, "
                             f"final KL {found['final_fitness_kl']:.4f})")
    return summary
