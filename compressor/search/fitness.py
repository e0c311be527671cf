"""Search fitness: KL divergence from the dense model's next-token distribution, per token.

The dense model's distributions are computed once, on a pool of calibration windows, and kept as
their top-k probabilities plus the mass of everything else (k log-probs and indices per token
instead of the whole vocabulary: 49k floats per token for SmolLM2). The KL between these coarsened
distributions is a lower bound of the full KL and equals it when k covers the vocabulary.

A candidate is applied to the model by copying only the linears whose level changed since the last
evaluation, from the level database (dequantized one linear at a time).
"""

from __future__ import annotations

import torch

from compressor.search.database import LevelDatabase


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


class DenseTargets:
    """Top-k log-probabilities of the dense model on every token of the pool."""

    def __init__(self, model, windows: torch.Tensor, top_k: int, device, on_window=None):
        self.windows = windows
        self.device = device
        values, indices, rest = [], [], []
        with torch.no_grad():
            for number, window in enumerate(windows):
                logp = torch.log_softmax(_logits(model, window[None].to(device))[0], dim=-1)
                k = min(top_k, logp.shape[-1])
                top, where = logp.topk(k, dim=-1)
                values.append(top.cpu())
                indices.append(where.to(torch.int32).cpu())
                rest.append(_log_rest(top).cpu())
                if on_window:
                    on_window(number + 1, len(windows))
        self.values, self.indices, self.rest = torch.stack(values), torch.stack(indices), torch.stack(rest)

    @property
    def pool(self) -> int:
        return self.windows.shape[0]

    @property
    def seqlen(self) -> int:
        return self.windows.shape[1]


def _log_rest(top_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the top-k probabilities), safely (the rest may be ~0)."""
    return torch.log1p(-top_logp.exp().sum(-1).clamp(max=1 - 1e-7))


def coarse_kl(dense_top: torch.Tensor, dense_rest: torch.Tensor, indices: torch.Tensor,
              logq: torch.Tensor) -> torch.Tensor:
    """Per-token KL(P || Q) over the classes {top-k of P} + {everything else}."""
    q_top = logq.gather(-1, indices.long())
    p_top = dense_top.exp()
    kl = (p_top * (dense_top - q_top)).sum(-1)
    q_rest = _log_rest(q_top)
    return kl + dense_rest.exp() * (dense_rest - q_rest)


class KLFitness:
    """fitness(levels, window indices) -> mean per-token KL, with the candidate applied to the model."""

    def __init__(self, model, database: LevelDatabase, units: list[list[str]], targets: DenseTargets):
        self.model = model
        self.database = database
        self.units = units
        self.targets = targets
        self.loaded: list[int | None] = [None] * len(units)
        self.linears = {name: model.get_submodule(name) for unit in units for name in unit}

    def apply(self, levels: list[int]) -> None:
        for unit, (names, level) in enumerate(zip(self.units, levels, strict=True)):
            if self.loaded[unit] == level:
                continue
            for name in names:
                weight = self.linears[name].weight
                weight.data.copy_(self.database.weight(name, level).to(weight.dtype))
            self.loaded[unit] = level

    @torch.no_grad()
    def __call__(self, levels: list[int], windows: list[int]) -> float:
        self.apply(levels)
        total, tokens = 0.0, 0
        t = self.targets
        for index in windows:
            logq = torch.log_softmax(_logits(self.model, t.windows[index][None].to(t.device))[0], dim=-1)
            kl = coarse_kl(t.values[index].to(logq.device), t.rest[index].to(logq.device),
                           t.indices[index].to(logq.device), logq)
            total += float(kl.sum())
            tokens += kl.numel()
        return total / max(tokens, 1)
