"""`--calibration self`: calibration text the model writes itself (compressor.selfcal), checked
against the model's own full forward passes, for reproducibility, caching and bad input."""

import json

import pytest
import torch

from compressor import selfcal
from compressor.errors import CompressorError
from compressor.model import ModelSource, load_model
from tests.conftest import make_model, make_tokenizer
from tests.test_cli import run_cli

SETTINGS = selfcal.SelfTextSettings(batch=3)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_model("llama"), make_tokenizer()


def test_windows_follow_the_recipe_against_full_forwards(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    windows = selfcal.generate_windows(model, tokenizer, 5, 24, seed=7, settings=SETTINGS)
    assert windows.shape == (5, 24) and windows.dtype == torch.long
    special = set(tokenizer.all_special_ids)
    assert not special & set(windows.flatten().tolist())
    assert int(windows.max()) < len(tokenizer)
    with torch.no_grad():
        logits = model(windows).logits  # one full forward, no cache: what the cached steps must match
    for row, row_logits in zip(windows, logits, strict=True):
        for position in range(1, 24):
            scores = row_logits[position - 1].clone()
            scores[list(special)] = float("-inf")
            scores[len(tokenizer):] = float("-inf")
            top = scores.topk(SETTINGS.top_k).indices.tolist()
            assert int(row[position]) in top  # sampled from the top-k of the model's own next-token scores
            if position <= SETTINGS.greedy_min:  # the first 3 to 5 tokens after the start are greedy
                assert int(row[position]) == int(scores.argmax())
    # Sampling, not greedy decoding: later tokens are not all the argmax.
    argmax = logits[:, SETTINGS.greedy_max:-1].argmax(-1)
    assert not torch.equal(argmax, windows[:, SETTINGS.greedy_max + 1:])


def test_windows_are_reproducible_from_the_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first = selfcal.generate_windows(model, tokenizer, 4, 16, seed=1, settings=SETTINGS)
    again = selfcal.generate_windows(model, tokenizer, 4, 16, seed=1, settings=SETTINGS)
    other = selfcal.generate_windows(model, tokenizer, 4, 16, seed=2, settings=SETTINGS)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # The global torch seed plays no part.
    torch.manual_seed(123)
    assert torch.equal(first, selfcal.generate_windows(model, tokenizer, 4, 16, seed=1, settings=SETTINGS))


def test_self_windows_are_cached(llama_dir, isolated_cache, monkeypatch):
    source = ModelSource(str(llama_dir))
    model, tokenizer = load_model(source)
    made = selfcal.self_windows(source, model, tokenizer, 3, 12, seed=0)
    assert list((isolated_cache / "self-text").glob("*.pt"))

    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(selfcal, "generate_windows", fail)
    assert torch.equal(selfcal.self_windows(source, None, tokenizer, 3, 12, seed=0), made)
    with pytest.raises(AssertionError, match="generated again"):
        selfcal.self_windows(source, model, tokenizer, 3, 12, seed=1)


def test_models_that_cannot_write_are_refused(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(CompressorError, match="tokenizer"):
        selfcal.check_can_generate(model, None)

    class NoGeneration(torch.nn.Module):
        generation_config = None

        def can_generate(self):
            return True

    with pytest.raises(CompressorError, match="generation config"):
        selfcal.check_can_generate(NoGeneration(), tokenizer)
    with pytest.raises(CompressorError, match="generation config"):
        selfcal.check_can_generate(torch.nn.Linear(2, 2), tokenizer)


def test_cli_quantize_calibrates_on_self_generated_text(llama_dir, tmp_path, capsys, monkeypatch,
                                                         isolated_cache):
    from compressor.job import Calibration, calibration_windows

    out = tmp_path / "selfcal"
    code, _, stderr = run_cli(["quantize", llama_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
                               "--calibration", "self", "--samples", "4", "--seqlen", "24", "--seed", "5",
                               "-o", out, "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    manifest = json.loads((out / "compress.json").read_text())
    assert manifest["calibration"]["source"] == "self" and manifest["calibration"]["seed"] == 5
    # The run calibrated on exactly the windows the model writes from that seed (now cached).
    model, tokenizer = load_model(ModelSource(str(llama_dir)))
    fresh = selfcal.generate_windows(model, tokenizer, 4, 24, seed=5)
    cached = calibration_windows(tokenizer, Calibration(source="self", samples=4, seqlen=24, seed=5), None,
                                 source=ModelSource(str(llama_dir)))
    assert torch.equal(fresh, cached)
    # The same options on the same windows as a file of token ids give the same checkpoint.
    from compressor.job import run_compression
    from compressor.recipes import quantize_job

    monkeypatch.setattr("compressor.job.self_windows", lambda *a, **k: fresh)
    again = tmp_path / "again"
    run_compression(ModelSource(str(llama_dir)), quantize_job(4, 32).recipe, again,
                    Calibration(source="self", samples=4, seqlen=24, seed=5), "cpu")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_cli_self_calibration_without_tokenizer_writes_nothing(tmp_path, capsys, monkeypatch, isolated_cache):
    folder = tmp_path / "no-tokenizer"
    make_model("llama").save_pretrained(folder)
    out = tmp_path / "out"
    code, _, stderr = run_cli(["quantize", folder, "--calibration", "self", "--samples", "2", "--seqlen", "8",
                               "-o", out], capsys, monkeypatch)
    assert code == 2 and "tokenizer" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))
