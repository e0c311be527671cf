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

SETTINGS = selfcal.SelfTextSettings(batch=3, top_k=50)  # a top-k cut, checked token by token below


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


@pytest.mark.parametrize("settings", [SETTINGS, selfcal.SelfTextSettings(batch=3)])  # top-50, the default
def test_windows_are_reproducible_from_the_seed(model_and_tokenizer, settings):
    model, tokenizer = model_and_tokenizer
    first = selfcal.generate_windows(model, tokenizer, 4, 16, seed=1, settings=settings)
    again = selfcal.generate_windows(model, tokenizer, 4, 16, seed=1, settings=settings)
    other = selfcal.generate_windows(model, tokenizer, 4, 16, seed=2, settings=settings)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # The global torch seed plays no part.
    torch.manual_seed(123)
    assert torch.equal(first, selfcal.generate_windows(model, tokenizer, 4, 16, seed=1, settings=settings))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_default_samples_the_whole_distribution(temperature):
    """No top-k by default: each token is drawn with probability softmax(logits / T), the unlikely
    ones included (frequencies over 40,000 draws against the exact probabilities)."""
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    logits = probabilities.log().expand(40_000, -1)
    settings = selfcal.SelfTextSettings(temperature=temperature)
    drawn = selfcal._sample(logits, settings, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    expected = probabilities ** (1 / temperature) / (probabilities ** (1 / temperature)).sum()
    assert torch.allclose(frequencies, expected, atol=0.01)
    assert frequencies[4] > 0  # the least likely token is written too
    top2 = selfcal._sample(logits, selfcal.SelfTextSettings(temperature=temperature, top_k=2),
                           torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {0, 1}


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
