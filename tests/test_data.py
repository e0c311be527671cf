"""Tests for compressor.data: loading local text, the calibration protocol, evaluation ids."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from compressor import data
from compressor.data import (
    DATA_ENV,
    calibration_windows,
    evaluation_ids,
    heldout_ids,
    load_documents,
    resolve_data_dir,
)
from compressor.errors import CompressorError

REAL_DATA = Path(os.environ.get(DATA_ENV) or "/work/shared/data")


class CharTokenizer:
    """One token per character: lengths are easy to reason about and slices easy to check."""

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return types.SimpleNamespace(input_ids=[ord(c) for c in text])


TOKENIZER = CharTokenizer()

# Lengths chosen so that some documents are shorter than the sequence length used below (16).
C4_DOCS = [
    "short one",
    "a" * 5 + "the quick brown fox jumps over the lazy dog",
    "tiny",
    "0123456789" * 4,
    "",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit",
    "x" * 15,
]
WIKI_TEST = " \n = Title = \n \n First line of the test article . \n \n Second line . \n"
WIKI_VALID = " \n = Other = \n \n Validation text that is long enough for windows . \n"


def _write_jsonl_gz(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text, "url": "u"}) + "\n")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _write_jsonl_gz(root / data.C4_FILE, C4_DOCS)
    (root / "wikitext2").mkdir(parents=True)
    (root / data.WIKITEXT2_FILES["test"]).write_text(WIKI_TEST, encoding="utf-8")
    (root / data.WIKITEXT2_FILES["validation"]).write_text(WIKI_VALID, encoding="utf-8")
    return root


def _rebuilt(raw: str) -> str:
    """The GPTQ reference join, written out independently of the module under test."""
    lines = raw.split("\n")
    rows = [line + "\n" for line in lines[:-1]]
    return "\n\n".join(row if row.strip() else "" for row in rows)


def _reference_windows(docs: list[str], n_samples: int, seqlen: int, seed: int) -> list[list[int]]:
    """The calibration protocol spelled out plainly, to pin the module to it draw by draw."""
    rng = random.Random(seed)
    windows = []
    while len(windows) < n_samples:
        ids = TOKENIZER(docs[rng.randint(0, len(docs) - 1)]).input_ids
        if len(ids) < seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen)
        windows.append(ids[start : start + seqlen])
    return windows


def _is_slice(window: list[int], ids: list[int]) -> bool:
    n = len(window)
    return any(ids[i : i + n] == window for i in range(len(ids) - n + 1))


# --- resolve_data_dir ------------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    explicit, from_env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_dir() is None
    monkeypatch.setenv(DATA_ENV, str(from_env))
    assert resolve_data_dir() == from_env
    assert resolve_data_dir(explicit) == explicit
    assert resolve_data_dir(str(explicit)) == explicit


def test_resolve_data_dir_missing_raises(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(CompressorError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "also-nope"))
    with pytest.raises(CompressorError, match=DATA_ENV):
        resolve_data_dir()


# --- load_documents ----------------------------------------------------------------------------


def test_c4_documents_in_file_order(data_dir):
    assert load_documents("c4", data_dir) == C4_DOCS


def test_wikitext2_rebuilt_and_split_choice(data_dir):
    # Calibration reads the validation text; only the test split reads the test file.
    assert load_documents("wikitext2", data_dir) == [_rebuilt(WIKI_VALID)]
    assert load_documents("wikitext2", data_dir, split="test") == [_rebuilt(WIKI_TEST)]
    test_doc = load_documents("wikitext2", data_dir, split="test")[0]
    assert test_doc.startswith("\n\n = Title = \n\n\n\n\n First line")


def test_missing_file_in_data_dir_names_path(tmp_path):
    with pytest.raises(CompressorError, match=r"wikitext2[/\\]wiki\.test\.raw"):
        load_documents("wikitext2", tmp_path, split="test")
    with pytest.raises(CompressorError, match=r"c4_validation_2k\.json\.gz"):
        load_documents("c4", tmp_path)


def test_file_sources(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    assert load_documents(str(txt), None) == ["line one\nline two\n"]
    plain = tmp_path / "docs.jsonl"
    plain.write_text('{"text": "alpha"}\n\n{"text": "beta"}\n', encoding="utf-8")
    assert load_documents(str(plain), None) == ["alpha", "beta"]
    packed = tmp_path / "docs.jsonl.gz"
    _write_jsonl_gz(packed, ["gamma", "delta"])
    assert load_documents(str(packed), None, split="test") == ["gamma", "delta"]


def test_empty_sources_raise(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(CompressorError, match="no text"):
        load_documents(str(empty), None)
    blank = tmp_path / "blank.txt"
    blank.write_text("", encoding="utf-8")
    with pytest.raises(CompressorError, match="no text"):
        load_documents(str(blank), None)


def test_bad_jsonl_lines_raise(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CompressorError, match=r"broken\.jsonl:2"):
        load_documents(str(broken), None)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(CompressorError, match='"text"'):
        load_documents(str(no_text), None)


def test_missing_file_path_is_not_sent_to_hugging_face(tmp_path):
    with pytest.raises(CompressorError, match="does not exist"):
        load_documents(str(tmp_path / "typo.jsonl"), None)


def test_unknown_split_raises(data_dir):
    with pytest.raises(CompressorError, match="unknown split"):
        load_documents("c4", data_dir, split="train")


def test_hugging_face_without_datasets_package(monkeypatch):
    # A None entry in sys.modules makes `import datasets` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CompressorError, match=f"datasets.*{DATA_ENV}"):
        load_documents("someone/corpus:clean", None)
    with pytest.raises(CompressorError, match="--data-dir"):
        load_documents("c4", None)


class FakeDataset(dict):
    """Just enough of datasets.Dataset: column_names and column access."""

    @property
    def column_names(self):
        return list(self)


def test_hugging_face_fallback_with_fake_datasets(monkeypatch):
    calls = []

    def fake_load(name, config, split, data_files):
        calls.append((name, config, split, data_files))
        if name == "offline/corpus":
            raise ConnectionError("Couldn't reach the Hub\nsecond line")
        rows = [" = T = \n", "", " body \n"] if name == "wikitext" else ["d1", "d2"]
        return FakeDataset(text=rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    assert load_documents("wikitext2", None, split="test") == [" = T = \n\n\n\n\n body \n"]
    assert calls[-1][:3] == ("wikitext", "wikitext-2-raw-v1", "test")
    assert load_documents("owner/corpus:cfg", None) == ["d1", "d2"]
    assert calls[-1][:3] == ("owner/corpus", "cfg", "train")
    assert load_documents("c4", None)[0] == "d1"
    assert calls[-1][0] == "allenai/c4" and calls[-1][2] == "validation"
    with pytest.raises(CompressorError, match="Couldn't reach the Hub; pass --data-dir"):
        load_documents("offline/corpus", None)


# --- calibration_windows -------------------------------------------------------------------


def test_windows_shape_and_determinism(data_dir):
    first = calibration_windows(TOKENIZER, "c4", n_samples=12, seqlen=16, seed=3, data_dir=data_dir)
    again = calibration_windows(TOKENIZER, "c4", n_samples=12, seqlen=16, seed=3, data_dir=data_dir)
    other = calibration_windows(TOKENIZER, "c4", n_samples=12, seqlen=16, seed=4, data_dir=data_dir)
    assert first.shape == (12, 16) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_windows_follow_reference_protocol(data_dir):
    windows = calibration_windows(
        TOKENIZER, "c4", n_samples=20, seqlen=16, seed=7, data_dir=data_dir
    )
    assert windows.tolist() == _reference_windows(C4_DOCS, 20, 16, seed=7)


def test_windows_are_slices_of_long_documents_only(data_dir):
    windows = calibration_windows(
        TOKENIZER, "c4", n_samples=30, seqlen=16, seed=1, data_dir=data_dir
    )
    long_ids = [TOKENIZER(doc).input_ids for doc in C4_DOCS if len(doc) >= 16]
    for window in windows.tolist():
        assert any(_is_slice(window, ids) for ids in long_ids)


def test_single_document_windows(data_dir):
    windows = calibration_windows(TOKENIZER, "wikitext2", 5, 8, seed=0, data_dir=data_dir)
    ids = TOKENIZER(_rebuilt(WIKI_VALID)).input_ids
    rng = random.Random(0)
    expected = []
    for _ in range(5):
        start = rng.randint(0, len(ids) - 8)
        expected.append(ids[start : start + 8])
    assert windows.tolist() == expected


def test_all_documents_too_short_raises(data_dir):
    with pytest.raises(CompressorError, match="no document .* at least 1000 tokens"):
        calibration_windows(TOKENIZER, "c4", n_samples=2, seqlen=1000, data_dir=data_dir)
    with pytest.raises(CompressorError, match="fewer than the sequence length"):
        calibration_windows(TOKENIZER, "wikitext2", n_samples=2, seqlen=10_000, data_dir=data_dir)


def test_bad_window_arguments_raise(data_dir):
    with pytest.raises(CompressorError, match="samples"):
        calibration_windows(TOKENIZER, "c4", n_samples=0, seqlen=16, data_dir=data_dir)
    with pytest.raises(CompressorError, match="sequence length"):
        calibration_windows(TOKENIZER, "c4", n_samples=1, seqlen=1, data_dir=data_dir)


def test_hugging_face_tokenizer_is_accepted(data_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(" ".join(C4_DOCS + [WIKI_TEST, WIKI_VALID]).split()))
    vocab = {"[UNK]": 0} | {word: i + 1 for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A tiny model_max_length: whole documents exceed it, which must not matter.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=4)
    windows = calibration_windows(tokenizer, "wikitext2", 3, 4, seed=0, data_dir=data_dir)
    assert windows.shape == (3, 4)
    ids = evaluation_ids(tokenizer, "wikitext2", data_dir)
    assert ids[0].tolist() == tokenizer(_rebuilt(WIKI_TEST), add_special_tokens=False).input_ids


# --- evaluation_ids / heldout_ids ------------------------------------------------------------


def test_evaluation_ids_use_test_split(data_dir):
    ids = evaluation_ids(TOKENIZER, "wikitext2", data_dir)
    assert ids.shape == (1, len(_rebuilt(WIKI_TEST))) and ids.dtype == torch.long
    assert ids[0].tolist() == TOKENIZER(_rebuilt(WIKI_TEST)).input_ids


def test_heldout_ids(data_dir, tmp_path):
    wiki = heldout_ids(TOKENIZER, "wikitext2", data_dir)
    assert wiki[0].tolist() == TOKENIZER(_rebuilt(WIKI_VALID)).input_ids
    # 20 documents: the last 10% is the last two, joined by a blank line.
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"text": f"doc{i}"}) + "\n" for i in range(20)))
    held = heldout_ids(TOKENIZER, str(many))
    assert held[0].tolist() == TOKENIZER("doc18\n\ndoc19").input_ids


# --- the real data folder ------------------------------------------------------------------


@pytest.mark.skipif(not (REAL_DATA / "wikitext2").is_dir(), reason="no local data folder")
def test_real_data_folder():
    with open(REAL_DATA / data.WIKITEXT2_FILES["test"], encoding="utf-8") as f:
        assert len(f.readlines()) == 4358  # the Hugging Face wikitext-2-raw-v1 test row count
    (test_doc,) = load_documents("wikitext2", REAL_DATA, split="test")
    assert len(test_doc) == 1_294_336  # characters of the 4,358 rebuilt rows joined by "\n\n"
    assert test_doc.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an")
    assert len(load_documents("c4", REAL_DATA)) == 2000
