"""Search fitness: KL divergence from the dense model's next-token distribution, per token.

The dense model's distributions are computed once, on a pool of calibration windows, and kept as
their top-k probabilities plus the mass of everything else (k log-probs and indices per token
instead of the whole vocabulary: 49k floats per token for SmolLM2). The KL between these coarsened
distributions is a lower bound of the full KL and equals it when k covers the vocabulary.

A candidate is applied to the model by copying only the linears whose level changed since the last
evaluation, from the level database (dequantized one linear at a time).

`prefix_from(levels)` caches every block's output on each window for one candidate (the integer
programme's baseline): a later candidate that differs from it only from block b on then runs from
block b, the blocks before it replaced by the cached result (the same numbers: those blocks hold
the same weights), which halves the cost of measuring one unit at a time.
"""

from __future__ import annotations

import torch

from compressor.model import decoder_blocks
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


class _Cached(torch.nn.Module):
    """Stands in for a decoder block: returns the output the real one gave on this window."""

    def __init__(self, fitness: KLFitness, block: int):
        super().__init__()
        self.fitness, self.block = fitness, block

    def forward(self, *args, **kwargs):
        output = self.fitness.cache[self.fitness.window][self.block]
        return output.clone() if isinstance(output, torch.Tensor) else output


class KLFitness:
    """fitness(levels, window indices) -> mean per-token KL, with the candidate applied to the model."""

    def __init__(self, model, database: LevelDatabase, units: list[list[str]], targets: DenseTargets):
        self.model = model
        self.database = database
        self.units = units
        self.targets = targets
        self.loaded: list[int | None] = [None] * len(units)
        self.linears = {name: model.get_submodule(name) for unit in units for name in unit}
        prefix, self.blocks = decoder_blocks(model)
        self.unit_block = [int(unit[0].removeprefix(prefix + ".").split(".")[0]) for unit in units]
        self.cached_levels: list[int] | None = None
        self.cache: dict[int, list] = {}  # window -> each block's output under cached_levels
        self.window = 0

    @torch.no_grad()
    def prefix_from(self, levels: list[int], windows: list[int]) -> float:
        """Score `levels` and keep every block's output on `windows` for later candidates."""
        self.cache, self.cached_levels = {}, None
        handles = [block.register_forward_hook(
            lambda module, args, output, i=i: self.cache[self.window].append(
                output.clone() if isinstance(output, torch.Tensor) else output))
            for i, block in enumerate(self.blocks)]
        try:
            for window in windows:
                self.cache[window] = []
            fitness = self(levels, windows)
        finally:
            for handle in handles:
                handle.remove()
        self.cached_levels = list(levels)
        return fitness

    def _first_changed_block(self, levels: list[int], windows: list[int]) -> int:
        if self.cached_levels is None or any(w not in self.cache for w in windows):
            return 0
        changed = [self.unit_block[u] for u, (a, b) in enumerate(zip(levels, self.cached_levels, strict=True))
                   if a != b]
        return min(changed, default=len(self.blocks) - 1)

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
        skip = self._first_changed_block(levels, windows)
        real = [self.blocks[i] for i in range(skip)]
        for i in range(skip):
            self.blocks[i] = _Cached(self, skip - 1)  # each passes on block skip - 1's output
        try:
            total, tokens = 0.0, 0
            t = self.targets
            for index in windows:
                self.window = index
                logq = torch.log_softmax(_logits(self.model, t.windows[index][None].to(t.device))[0], dim=-1)
                kl = coarse_kl(t.values[index].to(logq.device), t.rest[index].to(logq.device),
                               t.indices[index].to(logq.device), logq)
                total += float(kl.sum())
                tokens += kl.numel()
        finally:
            for i, block in enumerate(real):
                self.blocks[i] = block
        return total / max(tokens, 1)
