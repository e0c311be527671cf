"""Perplexity and KL divergence of a causal LM on a token stream.

Perplexity follows the GPTQ-paper protocol so numbers are comparable with published ones:
non-overlapping windows of `seqlen` tokens from the start of the stream, each fed alone
(batch 1, no BOS, no cache), loss = mean NLL over the seqlen-1 predicted tokens of the window,
ppl = exp(mean of the window losses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from compressor.errors import CompressorError

Progress = Callable[[int, int], None]


def _count_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> int:
    """Number of full windows evaluated; a trailing partial window is dropped, as in GPTQ."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise CompressorError(f"expected token ids of shape [1, T], got {list(ids.shape)}")
    if seqlen < 2:
        raise CompressorError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise CompressorError(f"max_windows must be at least 1, got {max_windows}")
    total = ids.shape[1]
    if total < seqlen:
        raise CompressorError(f"need at least seqlen={seqlen} tokens to evaluate, got {total}")
    windows = total // seqlen
    return windows if max_windows is None else min(windows, max_windows)


def _windows(
    ids: torch.Tensor, seqlen: int, count: int, device: str | torch.device
) -> Iterator[torch.Tensor]:
    """Yield the `count` leading non-overlapping windows, each moved to `device` only when used."""
    for k in range(count):
        yield ids[:, k * seqlen : (k + 1) * seqlen].to(device)


def _logits(model, window: torch.Tensor) -> torch.Tensor:
    # float32 so the softmax is not computed in a half-precision model's dtype.
    return model(input_ids=window, use_cache=False).logits.float()


@torch.no_grad()
def perplexity(
    model,
    ids: torch.LongTensor,
    seqlen: int = 2048,
    max_windows: int | None = 32,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict:
    """Perplexity of `model` on `ids` ([1, T]) under the GPTQ protocol (see module docstring)."""
    count = _count_windows(ids, seqlen, max_windows)
    window_nlls = []
    for done, window in enumerate(_windows(ids, seqlen, count, device), start=1):
        logits = model(input_ids=window, use_cache=False).logits
        # Slice before casting so only the predicted positions are materialised in float32.
        nll = F.cross_entropy(logits[0, :-1].float(), window[0, 1:])
        window_nlls.append(nll.item())
        if progress is not None:
            progress(done, count)
    mean_nll = sum(window_nlls) / count
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "seqlen": seqlen,
        "windows": count,
        "tokens": count * seqlen,
        "stride": seqlen,
        "predicted_tokens": count * (seqlen - 1),
    }


@torch.no_grad()
def kl_divergence(
    model,
    reference_model,
    ids: torch.LongTensor,
    seqlen: int = 512,
    max_windows: int | None = 16,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict:
    """Mean per-token KL(P_reference || Q_model) and top-1 agreement over every window position.

    One window at a time so peak memory is a few [seqlen, vocab] float32 tensors.
    """
    count = _count_windows(ids, seqlen, max_windows)
    kl_sum = 0.0
    agree = 0
    for done, window in enumerate(_windows(ids, seqlen, count, device), start=1):
        log_p = F.log_softmax(_logits(reference_model, window)[0], dim=-1)
        log_q = F.log_softmax(_logits(model, window)[0], dim=-1)
        # exp(log_p) rather than softmax again: identical and avoids a second pass over logits.
        kl_sum += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += (log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum().item()
        if progress is not None:
            progress(done, count)
    tokens = count * seqlen
    return {
        "kl": kl_sum / tokens,
        "top1_agreement": agree / tokens,
        "seqlen": seqlen,
        "windows": count,
        "tokens": tokens,
    }
