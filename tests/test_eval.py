"""Perplexity / KL protocol checks on a tiny random Llama, plus the markdown report."""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from compressor.errors import CompressorError
from compressor.eval.perplexity import kl_divergence, perplexity
from compressor.eval.report import render_markdown

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=gen)


def _reference_ppl(model, ids, seqlen, windows):
    """The GPTQ protocol written out the obvious way."""
    nlls = []
    with torch.no_grad():
        for k in range(windows):
            window = ids[:, k * seqlen : (k + 1) * seqlen]
            logits = model(input_ids=window, use_cache=False).logits
            nlls.append(F.cross_entropy(logits[0, :-1].float(), window[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls))


class UniformLM(torch.nn.Module):
    """Predicts the uniform distribution everywhere, so ppl must equal the vocab size."""

    def forward(self, input_ids, use_cache=False):
        return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_perplexity_matches_reference_with_partial_tail(model):
    ids = _ids(3 * 16 + 7)  # the trailing 7 tokens must be ignored
    result = perplexity(model, ids, seqlen=16, max_windows=None)
    assert result["ppl"] == pytest.approx(_reference_ppl(model, ids, 16, 3), rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(result["ppl"]), rel=1e-6)
    assert result["windows"] == 3
    assert result["tokens"] == 48
    assert result["stride"] == result["seqlen"] == 16
    assert result["predicted_tokens"] == 3 * 15


def test_perplexity_max_windows_caps_and_reports_progress(model):
    ids = _ids(5 * 16)
    calls = []
    result = perplexity(
        model,
        ids,
        seqlen=16,
        max_windows=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result["windows"] == 2
    assert result["tokens"] == 32
    assert result["ppl"] == pytest.approx(_reference_ppl(model, ids, 16, 2), rel=1e-5)
    assert calls == [(1, 2), (2, 2)]


def test_uniform_model_has_ppl_equal_to_vocab():
    result = perplexity(UniformLM(), _ids(40), seqlen=8, max_windows=None)
    assert result["ppl"] == pytest.approx(VOCAB, rel=1e-6)


def test_too_short_input_raises(model):
    with pytest.raises(CompressorError):
        perplexity(model, _ids(10), seqlen=16)
    with pytest.raises(CompressorError):
        kl_divergence(model, model, _ids(10), seqlen=16)


def test_kl_against_itself_is_zero(model):
    result = kl_divergence(model, model, _ids(48), seqlen=16, max_windows=None)
    assert abs(result["kl"]) < 1e-6
    assert result["top1_agreement"] == 1.0
    assert (result["windows"], result["tokens"], result["seqlen"]) == (3, 48, 16)


def _perturbed(model):
    other = copy.deepcopy(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return other


def test_kl_against_perturbed_copy_matches_kl_div(model):
    other = _perturbed(model)
    ids = _ids(2 * 16 + 5)
    result = kl_divergence(other, model, ids, seqlen=16, max_windows=None)
    assert result["kl"] > 0

    with torch.no_grad():
        window_ids = ids[:, :32].view(2, 16)  # the same two windows, batched
        log_p = F.log_softmax(model(input_ids=window_ids).logits.float(), dim=-1)
        log_q = F.log_softmax(other(input_ids=window_ids).logits.float(), dim=-1)
    expected = F.kl_div(
        log_q.reshape(-1, VOCAB), log_p.reshape(-1, VOCAB), reduction="batchmean", log_target=True
    ).item()
    agreement = (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item()
    assert result["kl"] == pytest.approx(expected, rel=1e-4)
    assert result["top1_agreement"] == pytest.approx(agreement)


PPL = {
    "dataset": "wikitext2",
    "ppl": 28.5,
    "nll": 3.35,
    "seqlen": 2048,
    "windows": 32,
    "tokens": 65536,
    "stride": 2048,
    "predicted_tokens": 65504,
}


def _full_result():
    return {
        "model": "out/w4",
        "baseline": "path/to/dense",
        "compression": {
            "method": "gptq",
            "bits": 4,
            "group_size": 64,
            "symmetric": True,
            "bpw": 4.5,
            "size_mb": 170.1,
        },
        "perplexity": PPL,
        "baseline_perplexity": {**PPL, "ppl": 20.0, "nll": 3.0},
        "kl": {
            "dataset": "wikitext2-valid",
            "kl": 0.05,
            "top1_agreement": 0.9,
            "seqlen": 512,
            "windows": 16,
            "tokens": 8192,
        },
        "environment": {"device": "cpu", "threads": 2, "torch": "2.13.0", "transformers": "5.24.0"},
        "seconds": 123.4,
    }


def test_render_markdown_full():
    text = render_markdown(_full_result())
    assert text.startswith("# ")
    assert "| metric | compressed | dense | ratio |" in text
    assert "28.500" in text and "20.000" in text and "1.425x" in text
    assert "seqlen 2048, windows 32, tokens 65536, stride 2048" in text
    assert text.count("stride 2048") == 2  # one protocol line per perplexity
    assert "0.0500" in text and "90.0%" in text
    assert "gptq" in text


def test_render_markdown_without_kl_or_baseline():
    result = _full_result()
    result["kl"] = None
    result["baseline_perplexity"] = None
    del result["environment"]
    del result["compression"]
    text = render_markdown(result)
    assert "28.500" in text
    assert "seqlen 2048, windows 32, tokens 65536, stride 2048" in text
    assert "KL" not in text and "agreement" not in text
    assert "| perplexity | 28.500 | n/a | n/a |" in text
