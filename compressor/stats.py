"""Statistics of a linear layer's inputs, accumulated batch by batch during calibration.

Every linear of a sub-group ([q,k,v], [gate,up], ...) sees the same input, so one InputStats serves
the whole group. Passes ask for what they need: GPTQ and SparseGPT the Hessian X^T X, Wanda the
per-column energy (the Hessian's diagonal), DSnoT also the per-column mean and variance.
"""

from __future__ import annotations

import torch


class InputStats:
    def __init__(self, in_features: int, hessian: bool = True, device: str | torch.device = "cpu"):
        self.in_features = in_features
        self.tokens = 0
        self.xtx = torch.zeros(in_features, in_features, device=device) if hessian else None
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).float()
        self.tokens += x.shape[0]
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        self.sum += x.sum(0, dtype=torch.float64)
        self.sum_sq += x.square().sum(0, dtype=torch.float64)

    def hessian(self) -> torch.Tensor:
        """H = 2/N sum x x^T, the layer-wise reconstruction objective's Hessian (fp32)."""
        if self.xtx is None or self.tokens == 0:
            raise ValueError("no Hessian was accumulated for this layer")
        return self.xtx * (2.0 / self.tokens)

    def column_energy(self) -> torch.Tensor:
        """Mean over tokens of x_j^2 per input column (Wanda's statistic up to a constant)."""
        return (self.sum_sq / max(self.tokens, 1)).float()

    def column_mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    def column_variance(self) -> torch.Tensor:
        mean = self.sum / max(self.tokens, 1)
        return (self.sum_sq / max(self.tokens, 1) - mean.square()).clamp(min=0).float()

    def merge_(self, other: InputStats) -> None:
        """Add another accumulator's sums (used when statistics come from several workers)."""
        self.tokens += other.tokens
        if self.xtx is not None:
            self.xtx += other.xtx
        self.sum += other.sum
        self.sum_sq += other.sum_sq
