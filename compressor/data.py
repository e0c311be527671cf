"""Text data for calibration and evaluation: local files first, Hugging Face datasets as fallback.

Everything returned is token ids built with `tokenizer(text, add_special_tokens=False).input_ids`,
so any tokenizer-like callable works, not only Hugging Face ones.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

import torch

from compressor.errors import CompressorError

DATA_ENV = "COMPRESSOR_DATA"

# Files of the local data folder (layout of /work/shared/data, see its PROVENANCE.md).
WIKITEXT2_FILES = {"test": "wikitext2/wiki.test.raw", "validation": "wikitext2/wiki.valid.raw"}
C4_FILE = "c4/c4_validation_2k.json.gz"

# Calibration must never read the test split: wikitext2 calibrates on its validation text.
_WIKITEXT2_SPLIT = {"calibration": "validation", "validation": "validation", "test": "test"}
# Generic Hugging Face datasets: calibrate on train, as the reference GPTQ code does.
_HF_SPLIT = {"calibration": "train", "validation": "validation", "test": "test"}

_JSONL_SUFFIXES = (".jsonl", ".json.gz", ".jsonl.gz")
_DATA_HINT = f"pass --data-dir or set {DATA_ENV} to a local data folder"

# Consecutive draws of too-short documents before checking whether any document is long enough.
_MISSES_BEFORE_CHECK = 100
# Share of a multi-document source kept aside as held-out text (the last documents).
_HELDOUT_FRACTION = 0.1


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data folder to use: the explicit option, else $COMPRESSOR_DATA, else None."""
    if explicit is not None and str(explicit) != "":
        chosen, origin = explicit, "--data-dir"
    elif os.environ.get(DATA_ENV):
        chosen, origin = os.environ[DATA_ENV], DATA_ENV
    else:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise CompressorError(f"data folder {str(path)!r} (from {origin}) does not exist")
    return path


def load_documents(source: str, data_dir: Path | None, split: str = "calibration") -> list[str]:
    """The documents of `source` for `split` ("calibration", "validation" or "test")."""
    if split not in _WIKITEXT2_SPLIT:
        raise CompressorError(
            f"unknown split {split!r}; expected one of {sorted(_WIKITEXT2_SPLIT)}"
        )
    if source == "wikitext2":
        docs = _load_wikitext2(data_dir, _WIKITEXT2_SPLIT[split])
    elif source == "c4":
        # Only a validation slice of C4 is available, so every split reads the same documents.
        docs = _load_c4(data_dir)
    elif Path(source).expanduser().is_file():
        docs = _load_file(Path(source).expanduser())
    elif source.lower().endswith((".txt", *_JSONL_SUFFIXES)):
        # Looks like a file name: a typo deserves "not found", not a Hugging Face download attempt.
        raise CompressorError(f"data file {source!r} does not exist")
    else:
        docs = _load_hf_generic(source, _HF_SPLIT[split])
    # Empty documents stay: dropping them would shift the random document draws.
    if not any(docs):
        raise CompressorError(f"data source {source!r} ({split}) contains no text")
    return docs


def calibration_windows(
    tokenizer,
    source: str,
    n_samples: int,
    seqlen: int,
    seed: int = 0,
    data_dir: Path | None = None,
) -> torch.LongTensor:
    """`n_samples` random token windows of length `seqlen`, shape [n_samples, seqlen].

    The random draws follow the reference protocol exactly, so a seed always gives the same windows.
    """
    if n_samples < 1:
        raise CompressorError(f"number of calibration samples must be at least 1, got {n_samples}")
    if seqlen < 2:
        raise CompressorError(f"calibration sequence length must be at least 2, got {seqlen}")
    if source == "self":
        raise CompressorError("--calibration self is text the model writes itself: it needs the model "
                              "(compressor.job.calibration_windows, compressor.selfcal)")
    docs = load_documents(source, data_dir, split="calibration")
    rng = random.Random(seed)
    if len(docs) == 1:
        windows = _windows_from_one_document(tokenizer, docs[0], source, n_samples, seqlen, rng)
    else:
        windows = _windows_from_documents(tokenizer, docs, source, n_samples, seqlen, rng)
    return torch.tensor(windows, dtype=torch.long)


def evaluation_ids(
    tokenizer, source: str = "wikitext2", data_dir: Path | None = None
) -> torch.LongTensor:
    """Token ids of the test split of `source`, shape [1, T] (documents joined with blank lines)."""
    docs = load_documents(source, data_dir, split="test")
    return _ids_tensor(tokenizer, "\n\n".join(docs))


def heldout_ids(
    tokenizer, source: str = "wikitext2", data_dir: Path | None = None
) -> torch.LongTensor:
    """Token ids of validation text for KL measurements, shape [1, T].

    A multi-document source (c4) keeps only its last 10% of documents, which calibration rarely
    draws from as much as from the rest; a single document (wikitext2) is used whole.
    """
    docs = load_documents(source, data_dir, split="validation")
    if len(docs) > 1:
        keep = max(1, round(len(docs) * _HELDOUT_FRACTION))
        docs = docs[-keep:]
    return _ids_tensor(tokenizer, "\n\n".join(docs))


def training_windows(
    tokenizer, source: str, n_samples: int, seqlen: int, seed: int = 0, data_dir: Path | None = None,
    heldout: int = 8,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Windows to train on and `heldout` windows to watch training with, from disjoint text.

    A multi-document source keeps its last 10% of documents for the held-out windows (the part
    heldout_ids measures KL on); a single document (wikitext2: its *validation* split) its last 10%
    of tokens. Training draws `n_samples` random windows from the rest, seeded as
    calibration_windows draws. The test split (the perplexity text) is never read.
    """
    if n_samples < 1 or seqlen < 2:
        raise CompressorError(f"training needs at least one window of 2 tokens, got {n_samples} x {seqlen}")
    docs = load_documents(source, data_dir, split="validation" if source == "wikitext2" else "calibration")
    rng = random.Random(seed)
    if len(docs) == 1:
        ids = _encode(tokenizer, docs[0])
        cut = len(ids) - max(seqlen, round(len(ids) * _HELDOUT_FRACTION))
        if cut < seqlen:
            raise CompressorError(f"data source {source!r} has {len(ids)} tokens: too few for training "
                                  f"windows of {seqlen} and held-out text beside them")
        train = [ids[s: s + seqlen] for s in (rng.randint(0, cut - seqlen) for _ in range(n_samples))]
        tail = ids[cut:]
        held = [tail[i: i + seqlen] for i in range(0, len(tail) - seqlen + 1, seqlen)][:heldout]
    else:
        keep = max(1, round(len(docs) * _HELDOUT_FRACTION))
        if len(docs) - keep < 1:
            raise CompressorError(f"data source {source!r} has too few documents to hold some out")
        train = _windows_from_documents(tokenizer, docs[:-keep], source, n_samples, seqlen, rng)
        tail = _encode(tokenizer, "\n\n".join(docs[-keep:]))
        held = [tail[i: i + seqlen] for i in range(0, len(tail) - seqlen + 1, seqlen)][:heldout]
    if not held:
        raise CompressorError(f"data source {source!r}: its held-out part is shorter than {seqlen} tokens")
    return torch.tensor(train, dtype=torch.long), torch.tensor(held, dtype=torch.long)


# --- loading -----------------------------------------------------------------------------------


def _load_wikitext2(data_dir: Path | None, split: str) -> list[str]:
    if data_dir is None:
        rows = _hf_texts("wikitext", "wikitext-2-raw-v1", split, data_files=None)
        return ["\n\n".join(rows)]
    path = _require_file(data_dir, WIKITEXT2_FILES[split])
    with open(path, encoding="utf-8") as f:
        return ["\n\n".join(_wikitext_rows(f))]


def _wikitext_rows(lines: Iterable[str]) -> list[str]:
    """Rows as the Hugging Face wikitext builder yields them (what the GPTQ code joins).

    A line keeps its trailing newline; a whitespace-only line becomes the empty row.
    """
    return [line if line.strip() else "" for line in lines]


def _load_c4(data_dir: Path | None) -> list[str]:
    if data_dir is None:
        # The validation shard the reference GPTQ code reads, not the whole (large) split.
        shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        return _hf_texts("allenai/c4", None, "validation", data_files=shard)
    return _read_jsonl(_require_file(data_dir, C4_FILE))


def _load_file(path: Path) -> list[str]:
    name = path.name.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return _read_jsonl(path)
    if name.endswith(".txt"):
        return [path.read_text(encoding="utf-8")]
    raise CompressorError(f"unsupported data file {str(path)!r}; use .txt, .jsonl or .json(l).gz")


def _read_jsonl(path: Path) -> list[str]:
    """The "text" field of each JSON line (gzip-compressed when the name ends in .gz)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompressorError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CompressorError(f'{path}:{number}: expected an object with a "text" string')
            texts.append(record["text"])
    return texts


def _require_file(data_dir: Path, relative: str) -> Path:
    path = Path(data_dir) / relative
    if not path.is_file():
        raise CompressorError(f"data file not found: expected {path}")
    return path


def _load_hf_generic(source: str, split: str) -> list[str]:
    name, _, config = source.partition(":")
    return _hf_texts(name, config or None, split, data_files=None)


def _hf_texts(name: str, config: str | None, split: str, data_files) -> list[str]:
    """The "text" column of a Hugging Face dataset split; every failure is a one-line error."""
    label = f"{name}:{config}" if config else name
    try:
        import datasets  # optional dependency, only needed without a local data folder
    except ImportError:
        raise CompressorError(
            f"data source {label!r} needs the optional 'datasets' package, which is not "
            f"installed; {_DATA_HINT}"
        ) from None
    try:
        dataset = datasets.load_dataset(name, config, split=split, data_files=data_files)
    except Exception as exc:  # offline, unknown id, missing split: all mean "cannot get this data"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressorError(
            f"could not load Hugging Face dataset {label!r} ({split}): {reason}; {_DATA_HINT}"
        ) from None
    if "text" not in dataset.column_names:
        raise CompressorError(f"Hugging Face dataset {label!r} has no 'text' column")
    return list(dataset["text"])


# --- tokenizing and windows --------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens, for Hugging Face tokenizers and look-alikes."""
    from transformers import PreTrainedTokenizerBase  # imported late: importing it is slow

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # A whole document is longer than the model context; windows are cut afterwards,
        # so the "sequence length is longer than the maximum" warning is noise here.
        return list(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _ids_tensor(tokenizer, text: str) -> torch.LongTensor:
    ids = _encode(tokenizer, text)
    if not ids:
        raise CompressorError("the text produced no tokens")
    return torch.tensor([ids], dtype=torch.long)


def _windows_from_one_document(
    tokenizer, doc: str, source: str, n_samples: int, seqlen: int, rng: random.Random
) -> list[list[int]]:
    ids = _encode(tokenizer, doc)
    if len(ids) < seqlen:
        raise CompressorError(
            f"data source {source!r} has {len(ids)} tokens, fewer than the sequence length {seqlen}"
        )
    windows = []
    for _ in range(n_samples):
        start = rng.randint(0, len(ids) - seqlen)
        windows.append(ids[start : start + seqlen])
    return windows


def _windows_from_documents(
    tokenizer, docs: list[str], source: str, n_samples: int, seqlen: int, rng: random.Random
) -> list[list[int]]:
    # Tokenize lazily (a draw only touches one document) and at most once per document.
    cache: dict[int, list[int]] = {}

    def ids_of(index: int) -> list[int]:
        if index not in cache:
            cache[index] = _encode(tokenizer, docs[index])
        return cache[index]

    windows = []
    misses = 0
    checked = False
    while len(windows) < n_samples:
        ids = ids_of(rng.randint(0, len(docs) - 1))
        if len(ids) < seqlen:
            misses += 1
            # Only after many misses pay for tokenizing everything, to rule out an endless loop.
            if not checked and misses >= _MISSES_BEFORE_CHECK:
                if not any(len(ids_of(i)) >= seqlen for i in range(len(docs))):
                    raise CompressorError(
                        f"no document of data source {source!r} has at least {seqlen} tokens; "
                        "use a shorter sequence length or longer documents"
                    )
                checked = True
            continue
        misses = 0
        start = rng.randint(0, len(ids) - seqlen)
        windows.append(ids[start : start + seqlen])
    return windows
