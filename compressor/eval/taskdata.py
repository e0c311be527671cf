"""Documents of the zero-shot and knowledge tasks: the local data folder first, else Hugging Face.

Each loader returns a list of plain dicts in the schema of the Hugging Face dataset that lm-eval's
own task uses (ARC, PIQA, WinoGrande, BoolQ), or a small schema of ours for the LLM-KICK tasks, so
the task YAMLs under configs/lm_eval/ read the same fields whichever source was found. Files are
read from the layout of the project's data folder (see its PROVENANCE.md).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from compressor.data import resolve_data_dir
from compressor.errors import CompressorError
from compressor.eval.scoring import MMLU_SUBJECT_CATEGORY

# Local files (relative to the data folder).
ZEROSHOT = {
    "arc_easy": "zeroshot/arc_easy/arc_easy.jsonl",
    "arc_challenge": "zeroshot/arc_challenge/arc_challenge.jsonl",
    "piqa": "zeroshot/piqa/valid.jsonl",
    "winogrande": "zeroshot/winogrande/winogrande.jsonl",
    "boolq": "zeroshot/boolq/boolq.jsonl",
}
KICK = "llm-kick"


def _local(data_dir, relative: str) -> Path | None:
    """The file or folder of the data folder (the option, else $COMPRESSOR_DATA), if it is there."""
    root = resolve_data_dir(data_dir)
    path = root / relative if root else None
    return path if path is not None and path.exists() else None


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hf(name: str, config: str | None, split: str) -> list[dict]:
    try:
        import datasets

        return [dict(row) for row in datasets.load_dataset(name, config, split=split)]
    except Exception as error:  # offline, missing package, gated dataset: one clear line
        raise CompressorError(
            f"no local copy and the Hugging Face dataset {name!r} could not be "
            f"loaded ({type(error).__name__}); set COMPRESSOR_DATA or --data-dir"
        ) from error


# -- zero-shot (lm-eval's schemas) -------------------------------------------------------------


def arc(subset: str, data_dir=None) -> list[dict]:
    """ARC test questions: {question, choices: {text, label}, answerKey} (allenai/ai2_arc)."""
    path = _local(data_dir, ZEROSHOT[f"arc_{subset}"])
    if path is None:
        return _hf("allenai/ai2_arc", {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}[subset], "test")
    docs = []
    for row in read_jsonl(path):  # MosaicML's conversion: {query: "Question: ...", choices, gold}
        labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
        docs.append(
            {
                "question": row["query"].removeprefix("Question: "),
                "choices": {"text": row["choices"], "label": labels},
                "answerKey": labels[row["gold"]],
            }
        )
    return docs


def piqa(data_dir=None) -> list[dict]:
    """PIQA validation: {goal, sol1, sol2, label}; the labels file is aligned line by line."""
    path = _local(data_dir, ZEROSHOT["piqa"])
    if path is None:
        return _hf("baber/piqa", None, "validation")
    labels = path.with_name("valid-labels.lst").read_text().split()
    rows = read_jsonl(path)
    if len(labels) != len(rows):
        raise CompressorError(f"{path}: {len(rows)} questions but {len(labels)} labels")
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
        for r, label in zip(rows, labels, strict=True)
    ]


def _split_options(first: str, second: str) -> tuple[str, str, str]:
    """(shared prefix, option 1, option 2) of two contexts that differ only in their last words."""
    common = os.path.commonprefix([first, second])
    cut = common.rfind(" ") + 1 if not common.endswith(" ") else len(common)
    return first[:cut], first[cut:], second[cut:]


def winogrande(data_dir=None) -> list[dict]:
    """WinoGrande dev: {sentence with "_", option1, option2, answer "1"/"2"} (allenai/winogrande)."""
    path = _local(data_dir, ZEROSHOT["winogrande"])
    if path is None:
        return _hf("allenai/winogrande", "winogrande_xl", "validation")
    docs = []
    for row in read_jsonl(path):  # MosaicML's conversion: {context_options, continuation, gold}
        prefix, one, two = _split_options(*row["context_options"])
        docs.append(
            {
                "sentence": f"{prefix}_ {row['continuation']}",
                "option1": one,
                "option2": two,
                "answer": str(row["gold"] + 1),
            }
        )
    return docs


def boolq(data_dir=None) -> list[dict]:
    """BoolQ dev: {passage, question, label} (super_glue boolq)."""
    path = _local(data_dir, ZEROSHOT["boolq"])
    if path is None:
        return _hf("aps/super_glue", "boolq", "validation")
    docs = []
    for row in read_jsonl(path):  # {query: "Passage: ...\nQuestion: ...?", choices [no, yes], gold}
        passage, _, question = row["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
        docs.append({"passage": passage, "question": question.rstrip("?"), "label": row["gold"]})
    return docs


# -- LLM-KICK ---------------------------------------------------------------------------------

MMLU_LETTERS = "ABCD"


def _mmlu_block(question: str, choices: list[str], answer: str | None) -> str:
    lines = [question] + [f"{letter}. {text}" for letter, text in zip(MMLU_LETTERS, choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def mmlu_prompt(
    subject: str, shots: list[tuple[str, list[str], str]], question: str, choices: list[str]
) -> str:
    """The hendrycks MMLU prompt that LLM-KICK uses, "about  subject" with its two spaces included."""
    topic = " " + subject.replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {topic}.\n\n"
    return head + "".join(_mmlu_block(*shot) for shot in shots) + _mmlu_block(question, choices, None)


def mmlu(data_dir=None, shots: int = 5) -> list[dict]:
    """MMLU test questions of all 57 subjects with `shots` dev examples of the same subject in the
    prompt: {subject, category, prompt, answer (index)}."""
    folder = _local(data_dir, f"{KICK}/mmlu")
    if folder is None:
        rows = {split: _hf("cais/mmlu", "all", split) for split in ("dev", "test")}
        dev: dict[str, list] = {}
        for r in rows["dev"]:
            dev.setdefault(r["subject"], []).append((r["question"], r["choices"], MMLU_LETTERS[r["answer"]]))
        tests = [(r["subject"], r["question"], r["choices"], r["answer"]) for r in rows["test"]]
    else:
        dev, tests = {}, []
        for path in sorted((folder / "test").glob("*_test.csv")):
            subject = path.name.removesuffix("_test.csv")
            with (folder / "dev" / f"{subject}_dev.csv").open(encoding="utf-8") as f:
                dev[subject] = [(r[0], r[1:5], r[5]) for r in csv.reader(f)]
            with path.open(encoding="utf-8") as f:
                tests += [(subject, r[0], r[1:5], MMLU_LETTERS.index(r[5])) for r in csv.reader(f)]
    docs: dict[str, list[dict]] = {}
    for subject, question, choices, answer in tests:
        docs.setdefault(subject, []).append(
            {
                "subject": subject,
                "category": MMLU_SUBJECT_CATEGORY.get(subject, "unknown"),
                "prompt": mmlu_prompt(subject, dev.get(subject, [])[:shots], question, choices),
                "answer": answer,
            }
        )
    # Subjects interleaved (the first question of each, then the second...) so that any --limit
    # samples every subject alike instead of the alphabetically first ones.
    rounds = max(map(len, docs.values()), default=0)
    return [rows[i] for i in range(rounds) for rows in docs.values() if i < len(rows)]


def freebaseqa(data_dir=None) -> list[dict]:
    """FreebaseQA questions with every gold answer name: {question, answers}.

    Locally the 2017 evaluation set (question | answer lines; a question listed with several
    answers keeps them all as aliases); online the v1.0 eval split, all names of all parses."""
    path = _local(data_dir, f"{KICK}/freebaseqa/FreebaseQA-eval.txt")
    if path is None:
        docs = []
        for row in _hf("freebase_qa", None, "test"):
            names = [n for parse in row["Parses"]["Answers"] for ans in parse for n in ans["AnswersName"]]
            docs.append({"question": row["RawQuestion"], "answers": list(dict.fromkeys(names))})
        return docs
    answers: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        question, sep, answer = line.rpartition("|")
        if sep and question.strip() and answer.strip():
            answers.setdefault(question.strip(), []).append(answer.strip())
    return [{"question": q, "answers": list(dict.fromkeys(a))} for q, a in answers.items()]


def triviaqa(data_dir=None, with_context: bool = False) -> list[dict]:
    """TriviaQA (rc) validation: {question, aliases, context}. Locally the verified Wikipedia dev
    questions, which carry no evidence text, so only the closed-book task can run on them; online
    the first Wikipedia page then the first search result, as LLM-KICK builds its context."""
    path = _local(data_dir, f"{KICK}/triviaqa/verified-wikipedia-dev.json")
    if path is not None:
        rows = json.loads(path.read_text(encoding="utf-8"))["Data"]
        docs = [
            {
                "question": r["Question"],
                "aliases": r["Answer"]["NormalizedAliases"],
                "context": r.get("Context", ""),
            }
            for r in rows
        ]
    else:
        docs = []
        for r in _hf("mandarjoshi/trivia_qa", "rc", "validation"):
            wiki = r["entity_pages"]["wiki_context"]
            search = r["search_results"]["search_context"]
            docs.append(
                {
                    "question": r["question"],
                    "aliases": r["answer"]["normalized_aliases"],
                    "context": (wiki[0] if wiki else "") + (search[0] if search else ""),
                }
            )
    if with_context:
        docs = [d for d in docs if d["context"]]
        if not docs:
            raise CompressorError(
                "the TriviaQA data has no context passages, so open-book QA cannot "
                "run (the local verified dev file has none; online it is trivia_qa rc)"
            )
    return docs


SUMMARY_INSTRUCTION = (
    "Summarize the given {kind} in less than 150 words while preserving high coherence, "
    "consistency, fluency, and relevance.\n\n"
)


def read_story(path: Path) -> tuple[str, list[str]]:
    """(article, highlights) of a CNN .story file: paragraphs, then "@highlight" + one line each."""
    article, highlights, take_next = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line == "@highlight":
            take_next = True
        elif take_next:
            highlights.append(line)
            take_next = False
        else:
            article.append(line)
    return "\n\n".join(article), highlights


def cnn_stories(data_dir=None) -> list[dict]:
    """LLM-KICK's 90 CNN stories (small, mid, large): {id, size, prompt, highlights}.

    The highlights are the ROUGE reference, so unlike LLM-KICK's prompt (which pasted them in) the
    prompt holds only the article."""
    folder = _local(data_dir, f"{KICK}/cnndm_summarization/selected_stories")
    if folder is None:
        rows = _hf("abisee/cnn_dailymail", "3.0.0", "test")[:90]
        return [
            {
                "id": r["id"],
                "size": "test",
                "prompt": SUMMARY_INSTRUCTION.format(kind="news") + r["article"],
                "highlights": r["highlights"],
            }
            for r in rows
        ]
    docs = []
    for size in ("small", "mid", "large"):
        for path in sorted((folder / size).glob("*.story")):
            article, highlights = read_story(path)
            kind = "story" if size == "small" else "news"
            docs.append(
                {
                    "id": path.stem,
                    "size": size,
                    "prompt": SUMMARY_INSTRUCTION.format(kind=kind) + article,
                    "highlights": "\n".join(highlights),
                }
            )
    return docs


def vicuna80(data_dir=None) -> list[dict]:
    """The 80 Vicuna-bench questions with GPT-3.5's reference answers:
    {question_id, category, question, reference}."""
    folder = _local(data_dir, f"{KICK}/instruction_following_vicuna80")
    if folder is None:
        raise CompressorError(
            "Vicuna-80 needs the local data folder (llm-kick/instruction_following_vicuna80); "
            "set COMPRESSOR_DATA or --data-dir"
        )
    references = {r["question_id"]: r["text"] for r in read_jsonl(folder / "answer.jsonl")}
    return [
        {
            "question_id": q["question_id"],
            "category": q["category"],
            "question": q["text"],
            "reference": references.get(q["question_id"], ""),
        }
        for q in read_jsonl(folder / "table" / "question.jsonl")
    ]
