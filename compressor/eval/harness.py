"""Zero-shot and knowledge tasks through lm-evaluation-harness, on a model object already loaded.

The tasks are lm-eval task YAMLs under configs/lm_eval/ (datasets from the project's data folder,
else Hugging Face). lm-eval runs one task at a time so each gets its own wall time, and the
per-sample records are kept: generations (for ROUGE against the dense model's and for a judge),
MMLU's per-subject scores and the standard errors.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from compressor.errors import CompressorError

CONFIG_ENV = "COMPRESSOR_TASK_CONFIGS"

SUITES = {
    "zeroshot": ["arc_easy", "arc_challenge", "piqa", "winogrande", "boolq"],
    "kick": ["kick_freebaseqa", "kick_mmlu", "kick_triviaqa", "kick_summarize", "kick_vicuna"],
}
# The metric each task's recovery (compressed / dense) is computed on.
PRIMARY = {
    "arc_easy": "acc",
    "arc_challenge": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "boolq": "acc",
    "kick_freebaseqa": "exact_match",
    "kick_mmlu": "acc",
    "kick_triviaqa": "exact_match",
    "kick_triviaqa_open": "exact_match",
    "kick_summarize": "rougeL",
    "kick_vicuna": "rougeL",
}
# Open-ended generation answers an instruction: wrapped in the model's chat template when it has one.
CHAT_TASKS = {"kick_summarize", "kick_vicuna"}
# CPU-friendly default (`--limit quick`, tens of minutes per model at 135M on 2 cores): 200
# examples per zero-shot task, 5 MMLU questions per subject, 100 short-answer questions, 5 long
# generations. `--limit full` runs everything (hours on a CPU, minutes on a GPU).
QUICK_LIMITS = {"default": 200, "kick_mmlu": 285, "kick_freebaseqa": 100, "kick_triviaqa": 100,
                "kick_triviaqa_open": 100, "kick_summarize": 5, "kick_vicuna": 5}

# Chance accuracy of the multiple-choice tasks, to tell a working harness from a guessing model.
CHANCE = {
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "piqa": 0.5,
    "winogrande": 0.5,
    "boolq": 0.5,
    "kick_mmlu": 0.25,
}


def config_dir() -> Path:
    """configs/lm_eval of the source tree (or $COMPRESSOR_TASK_CONFIGS)."""
    folder = Path(os.environ.get(CONFIG_ENV) or Path(__file__).resolve().parents[2] / "configs" / "lm_eval")
    if not folder.is_dir():
        raise CompressorError(f"task configs not found at {folder}; set {CONFIG_ENV}")
    return folder


def expand(names: list[str]) -> list[str]:
    """Task names with suites ("kick", "zeroshot") expanded, in order, without repeats."""
    tasks = []
    for name in names:
        for task in SUITES.get(name, [name]):
            if task not in PRIMARY:
                known = ", ".join(["ppl", *SUITES, *PRIMARY])
                raise CompressorError(f"unknown task {task!r}; known: {known}")
            if task not in tasks:
                tasks.append(task)
    return tasks


def _stderr(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def run_task(
    model,
    tokenizer,
    task: str,
    data_dir: Path | None,
    limit: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
) -> dict:
    """Run one task on `model`; returns metrics, their standard errors, per-sample outputs, seconds."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for noisy in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    manager = TaskManager(
        include_path=str(config_dir()),
        include_defaults=False,
        metadata={"data_dir": str(data_dir) if data_dir else None},
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    chat = task in CHAT_TASKS and bool(getattr(tokenizer, "chat_template", None))
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=manager,
            limit=limit,
            log_samples=True,
            bootstrap_iters=0,
            apply_chat_template=chat,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="ERROR",
        )
    except CompressorError:
        raise
    except Exception as error:  # a data file that does not parse, a task lm-eval rejects
        cause = error.__cause__ if isinstance(error.__cause__, CompressorError) else None
        raise CompressorError(
            str(cause) if cause else f"task {task}: {type(error).__name__}: {error}"
        ) from error
    samples = out["samples"][task]
    metric_names = [m for m in out["results"][task] if "," in m and "stderr" not in m]
    metrics, stderr = {}, {}
    for key in metric_names:
        name = key.split(",")[0]
        values = [float(s[name]) for s in samples if name in s]
        metrics[name] = sum(values) / len(values) if values else None
        stderr[name] = _stderr(values)
    result = {
        "metrics": metrics,
        "stderr": stderr,
        "primary": PRIMARY[task],
        "samples": len(samples),
        "chat_template": chat,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if task in CHANCE:
        result["chance"] = CHANCE[task]
    if out["configs"][task]["output_type"] == "generate_until":  # kept for ROUGE vs dense, the judge
        result["outputs"] = [_generation(s) for s in samples]
    if task == "kick_mmlu":
        from compressor.eval.scoring import mmlu_breakdown

        result["mmlu"] = mmlu_breakdown([(s["doc"]["subject"], float(s["acc"])) for s in samples])
    return result


def _generation(sample: dict) -> str:
    response = sample["filtered_resps"][0]
    return response[0] if isinstance(response, list) else response
