"""Calibration without data (`--calibration self`): text the model writes itself.

ZeroQ calibrates a CNN on inputs optimised to match its BatchNorm statistics; a language model keeps
no such statistics, so the transferable form is LLM-QAT's: let the dense model generate its own
calibration text (../shared/docs/ALGORITHMS-2.md, section E). Per window, as LLM-QAT's recipe:

    a first token drawn uniformly from the vocabulary (special tokens excluded),
    the next 3 to 5 tokens greedy (how many: drawn per window),
    the rest sampled from the model's whole next-token distribution (temperature 1, no top-k),
    up to the window length.

LLM-QAT's generate_data.py samples through Hugging Face's `generate`, which keeps the 50 most likely
tokens. On SmolLM2-135M (GPTQ W4 g64 symmetric, WikiText-2 test; C4 windows: 28.74) the whole
distribution measured better: 29.25 at temperature 1 against 29.80 for the best top-50 setting
(temperature 1.2; 30.87 at 0.8, 30.10 at 1, 30.18 at 1.5). Our reading (not separately measured):
real text is full of the rarer tokens a top-k cut never writes, and the layers' calibration
statistics need them too.

Special tokens (end of text, chat markers) are never sampled, so every window is `seqlen` tokens of
running text. Everything is drawn from one seeded torch.Generator per batch of windows: the same
seed, model and settings give the same windows, on any machine of the same torch build. Generated
windows are cached under the compressor cache ($COMPRESSOR_CACHE, else ~/.cache/compressor) keyed by
the model's files, the counts, the seed and the settings, so every calibrated pass, the importance
allocation and `compress search` read the same text without generating it twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from compressor.errors import CompressorError
from compressor.files import atomic_write, cache_dir

SELF = "self"
VERSION = 2  # bump when the generation changes: cached windows of older versions are not reused


@dataclass(frozen=True)
class SelfTextSettings:
    temperature: float = 1.0
    top_k: int | None = None  # None: the whole vocabulary; k: the k most likely tokens only
    greedy_min: int = 3  # tokens after the first that are greedy, drawn in [greedy_min, greedy_max]
    greedy_max: int = 5
    batch: int = 32  # windows generated together (part of the seeding, so part of the cache key)


def check_can_generate(model, tokenizer) -> None:
    """One clear line when the model cannot write its own calibration text."""
    if tokenizer is None:
        raise CompressorError("--calibration self needs the model's tokenizer (to know its special "
                              "tokens); this model has none")
    can_generate = getattr(model, "can_generate", lambda: False)()
    if not can_generate or getattr(model, "generation_config", None) is None:
        raise CompressorError("--calibration self needs a model that generates text (a causal LM with a "
                              "generation config); this one has none: calibrate on data (--calibration)")


def generate_windows(model, tokenizer, count: int, seqlen: int, seed: int = 0,
                     settings: SelfTextSettings = SelfTextSettings(), device: torch.device | None = None,
                     on_batch=None) -> torch.LongTensor:
    """`count` windows of `seqlen` tokens the model writes itself, shape [count, seqlen]."""
    check_can_generate(model, tokenizer)
    if count < 1 or seqlen < 2:
        raise CompressorError(f"self-generated calibration needs at least 1 window of 2 tokens, got "
                              f"{count} x {seqlen}")
    device = device or next(model.parameters()).device
    allowed = _allowed_tokens(model, tokenizer)
    windows = []
    for first in range(0, count, settings.batch):
        rows = min(settings.batch, count - first)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + first)
        windows.append(_generate_batch(model, allowed, rows, seqlen, settings, generator, device).cpu())
        if on_batch is not None:
            on_batch(first + rows, count)
    return torch.cat(windows)


def _allowed_tokens(model, tokenizer) -> torch.Tensor:
    """bool [vocab]: ids the tokenizer knows and that are not special tokens."""
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[: min(vocab, len(tokenizer))] = True
    special = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < vocab]
    allowed[special] = False
    if not allowed.any():
        raise CompressorError("--calibration self: the tokenizer has no ordinary tokens to write with")
    return allowed


@torch.inference_mode()
def _generate_batch(model, allowed: torch.Tensor, rows: int, seqlen: int, settings: SelfTextSettings,
                    generator: torch.Generator, device) -> torch.LongTensor:
    choices, banned = allowed.nonzero().squeeze(1), ~allowed
    first = choices[torch.randint(len(choices), (rows,), generator=generator)]
    greedy = torch.randint(settings.greedy_min, settings.greedy_max + 1, (rows,), generator=generator)
    tokens = torch.empty(rows, seqlen, dtype=torch.long)
    tokens[:, 0] = first
    step_input, cache = first.unsqueeze(1).to(device), None
    for position in range(1, seqlen):
        out = model(input_ids=step_input, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float().cpu()
        logits[:, banned] = float("-inf")
        picked = _sample(logits, settings, generator)
        picked = torch.where(position <= greedy, logits.argmax(dim=1), picked)
        tokens[:, position] = picked
        step_input = picked.unsqueeze(1).to(device)
    return tokens


def _sample(logits: torch.Tensor, settings: SelfTextSettings, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), over the top-k when settings.top_k is
    set, sampled with the generator (on the CPU, so the draws do not depend on the device)."""
    scaled = logits / settings.temperature
    if settings.top_k is None or settings.top_k >= logits.shape[1]:
        return torch.multinomial(scaled.softmax(dim=1), 1, generator=generator).squeeze(1)
    values, indices = scaled.topk(settings.top_k, dim=1)
    chosen = torch.multinomial(values.softmax(dim=1), 1, generator=generator)
    return indices.gather(1, chosen).squeeze(1)


def self_windows(source, model, tokenizer, count: int, seqlen: int, seed: int, device=None,
                 settings: SelfTextSettings = SelfTextSettings(), on_stage=None) -> torch.LongTensor:
    """generate_windows for `source`, from the cache when an earlier run made the same windows.

    `model` is the dense model, loaded whole; None loads it from `source` just for this (a streamed
    run holds one block at a time)."""
    from compressor.model import load_model, source_fingerprint

    identity = [VERSION, source_fingerprint(source), count, seqlen, seed, asdict(settings)]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    path = cache_dir("self-text") / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache entry is regenerated
            pass
    if model is None:
        model, tokenizer = load_model(source)
    if on_stage is not None:
        on_stage(f"calibration: the model writes {count} x {seqlen} tokens itself (seed {seed})")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    try:
        model.to(device)  # on an accelerator when the run has one: generation is the slow part
        windows = generate_windows(model, tokenizer, count, seqlen, seed, settings, device)
    finally:
        model.to(home)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda partial: torch.save(windows, partial))
    except (OSError, CompressorError):
        pass  # a read-only cache only costs the next run the generation
    return windows
