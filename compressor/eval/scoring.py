"""Scoring of the knowledge tasks, as pure functions over strings (LLM-KICK's rules, counted right).

Every function takes model text and gold text and returns a number; nothing here runs a model.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation) | {"‘", "’", "´", "`", "“", "”"}


def squad_normalize(text: str) -> str:
    """SQuAD / TriviaQA answer normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def freebase_match(continuation: str, answers: list[str]) -> float:
    """LLM-KICK's FreebaseQA rule: lowercase, delete every space, and look for any gold answer as a
    substring. Only the model's continuation is searched; the reference code also searched the prompt,
    which can contain the answer."""
    squeezed = "".join(continuation.lower().split())
    golds = ["".join(answer.lower().split()) for answer in answers]
    return float(any(gold and gold in squeezed for gold in golds))


def first_line(text: str) -> str:
    """The prediction of a short-answer task: the continuation's first non-empty line."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def lenient_exact_match(prediction: str, aliases: list[str]) -> float:
    """LLM-KICK's TriviaQA "exact match": a normalised alias inside the normalised prediction, or
    the prediction inside an alias; the best over aliases. An empty prediction matches nothing."""
    guess = squad_normalize(prediction)
    if not guess:
        return 0.0
    for alias in aliases:
        gold = squad_normalize(alias)
        if gold and (gold in guess or guess in gold):
            return 1.0
    return 0.0


def token_f1(prediction: str, aliases: list[str]) -> float:
    """SQuAD token-overlap F1 between the normalised prediction and the best alias."""
    guess = squad_normalize(prediction).split()
    best = 0.0
    for alias in aliases:
        gold = squad_normalize(alias).split()
        common = sum((Counter(guess) & Counter(gold)).values())
        if common == 0:
            continue
        precision, recall = common / len(guess), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_tokens(text: str) -> list[str]:
    # rouge-score's default tokenizer: lowercase, runs of [a-z0-9] only.
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of tokens), as rouge-score computes it without stemming."""
    cand, ref = _rouge_tokens(candidate), _rouge_tokens(reference)
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_judge_scores(text: str, pairs: int = 1) -> list[tuple[float, float]] | None:
    """The first `pairs` lines of a pairwise judge's reply that hold exactly two numbers ("8 6.5"
    or "8, 6.5"); None when the reply does not follow the format."""
    found = []
    for line in text.strip().splitlines():
        numbers = re.findall(r"-?\d+(?:\.\d+)?", line)
        if len(numbers) == 2 and re.fullmatch(r"[\s\d.,:/-]*", line):
            found.append((float(numbers[0]), float(numbers[1])))
            if len(found) == pairs:
                return found
    return None


# MMLU subject -> category, as in hendrycks/test categories.py (subcategory -> category there).
MMLU_CATEGORIES = {
    "STEM": [
        "abstract_algebra",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ],
    "humanities": [
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ],
    "social sciences": [
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ],
    "other (business, health, misc.)": [
        "anatomy",
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ],
}
MMLU_SUBJECT_CATEGORY = {s: cat for cat, subjects in MMLU_CATEGORIES.items() for s in subjects}


def mmlu_breakdown(rows: list[tuple[str, float]]) -> dict:
    """Accuracy overall (over questions, as LLM-KICK reports it), per category and per subject,
    from (subject, correct) rows."""
    by_subject: dict[str, list[float]] = {}
    for subject, correct in rows:
        by_subject.setdefault(subject, []).append(correct)
    by_category: dict[str, list[float]] = {}
    for subject, scores in by_subject.items():
        by_category.setdefault(MMLU_SUBJECT_CATEGORY.get(subject, "unknown"), []).extend(scores)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "acc": mean([c for _, c in rows]) if rows else None,
        "questions": len(rows),
        "categories": {cat: round(mean(v), 4) for cat, v in sorted(by_category.items())},
        "subjects": {s: round(mean(v), 4) for s, v in sorted(by_subject.items())},
    }
