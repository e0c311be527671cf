"""Shared fixtures: tiny random models of two families saved as real HF folders with a tokenizer.

The tokenizer is a small byte-level BPE trained here on a few sentences, so every test runs offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels' tests run under Triton's CPU interpreter; Triton reads this when it is
    # first imported (which other libraries may do while the tests are collected), so set it here.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TEXT = (
    "The quick brown fox jumps over the lazy dog. A compressed model should say the same things "
    "as the dense model it came from. Quantization rounds weights to a grid; pruning removes them. "
    "Calibration data shows which weights matter. Perplexity measures how surprised the model is. "
) * 20


def data_dir() -> Path | None:
    env = os.environ.get("COMPRESSOR_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def tiny_config(family: str):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)


def make_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    # Random init gives near-uniform outputs; larger weights make quantization error visible.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(3.0)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory, tokenizer) -> Path:
    """A saved tiny model folder (config, safetensors, tokenizer) of each family."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = make_model(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory) -> Path:
    """A local calibration text, so CLI tests need no data folder."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT * 3)
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
