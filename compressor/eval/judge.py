"""Optional pairwise judge through any OpenAI-compatible chat endpoint (off unless configured).

LLM-KICK asks GPT-4 to score two assistants 1-10 with FastChat's review prompts. Here the judge is
whatever `--judge-url` serves (vLLM, llama.cpp server, a hosted API), the prompts are the ones the
data folder carries, and the reference answer is Assistant 1: GPT-3.5's answer for Vicuna-80, the
dense model's summary (else the story highlights) for summarization.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import CompressorError
from compressor.eval import taskdata
from compressor.eval.scoring import parse_judge_scores

# Scores per reply: one overall pair for answers, four (coherence, consistency, fluency,
# relevance) for summaries.
PAIRS = {"kick_vicuna": 1, "kick_summarize": 4}
_PROMPT_FILES = {
    "kick_vicuna": "instruction_following_vicuna80/table/prompt.jsonl",
    "kick_summarize": "cnndm_summarization/json_utils/prompt.jsonl",
}


@dataclass
class JudgeSettings:
    url: str  # base URL of an OpenAI-compatible API, e.g. http://localhost:8000/v1
    model: str = "gpt-4"
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout: float = 120.0


def ask(settings: JudgeSettings, system: str, user: str) -> str:
    """One chat completion; the reply's text."""
    body = json.dumps(
        {
            "model": settings.model,
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(settings.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[settings.api_key_env]}"
    request = urllib.request.Request(settings.url.rstrip("/") + "/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, KeyError, IndexError, json.JSONDecodeError) as error:
        raise CompressorError(f"judge at {settings.url} failed: {error}") from error


def _prompts(task: str, data_dir: Path | None) -> dict[str, dict]:
    path = Path(data_dir or "") / taskdata.KICK / _PROMPT_FILES[task]
    if not path.is_file():
        raise CompressorError(f"judge prompts not found: {path}")
    return {row["category"]: row for row in taskdata.read_jsonl(path)}


def _vicuna_prompt(prompts: dict, category: str) -> dict:
    return prompts.get(category if category in ("coding", "math") else "general", prompts["general"])


def judge_task(
    settings: JudgeSettings, task: str, found: dict, data_dir: Path | None, limit: int | None
) -> dict:
    """Score the compressed model's answers (and the dense model's, when present) against the
    reference answer; returns the mean scores, their ratio and how many replies parsed."""
    prompts = _prompts(task, data_dir)
    if task == "kick_vicuna":
        docs = taskdata.vicuna80(data_dir)
        cases = [(d["question"], d["reference"], _vicuna_prompt(prompts, d["category"])) for d in docs]
    else:
        docs = taskdata.cnn_stories(data_dir)
        references = (found.get("dense") or {}).get("outputs") or [d["highlights"] for d in docs]
        cases = [
            (d["prompt"], ref, prompts.get(d["size"], next(iter(prompts.values()))))
            for d, ref in zip(docs, references, strict=False)
        ]
    cases = cases[:limit] if limit else cases
    result = {"model": settings.model, "reference": "Assistant 1"}
    for who, outputs in (
        ("compressed", found.get("outputs")),
        ("dense", (found.get("dense") or {}).get("outputs")),
    ):
        if not outputs:
            continue
        mine, theirs, parsed = [], [], 0
        for (question, reference, prompt), answer in zip(cases, outputs, strict=False):
            reply = ask(
                settings,
                prompt["system_prompt"],
                prompt["prompt_template"].format(
                    question=question,
                    answer_1=reference,
                    answer_2=answer,
                    prompt=prompt["defaults"]["prompt"],
                ),
            )
            scores = parse_judge_scores(reply, PAIRS[task])
            if scores is None:
                continue
            parsed += 1
            theirs.append(sum(a for a, _ in scores) / len(scores))
            mine.append(sum(b for _, b in scores) / len(scores))
        result[who] = {
            "score": sum(mine) / len(mine) if mine else None,
            "reference_score": sum(theirs) / len(theirs) if theirs else None,
            "parsed": parsed,
            "asked": min(len(cases), len(outputs)),
        }
    dense_score = (result.get("dense") or {}).get("score")
    if dense_score and result["compressed"]["score"] is not None:
        result["recovery"] = round(result["compressed"]["score"] / dense_score, 4)
    return result
