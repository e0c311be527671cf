"""Statistics of a linear layer's inputs, accumulated batch by batch during calibration.

Every linear of a sub-group ([q,k,v], [gate,up], ...) sees the same input, so one InputStats serves
the whole group. Passes ask for what they need: GPTQ and SparseGPT the Hessian X^T X, Wanda the
per-column energy (the Hessian's diagonal), DSnoT also the per-column mean and variance.
"""

from __future__ import annotations

import torch

SAMPLE_STRIDE = 8
MAX_SAMPLE_ROWS = 2048


class InputStats:
    def __init__(
        self, in_features: int, hessian: bool = True, moments: bool = False,
        device: str | torch.device = "cpu", samples: bool = False, absmax: bool = False,
    ):
        self.in_features = in_features
        self.tokens = 0
        self.samples = 0  # calibration sequences seen (a [batch, seq, features] input adds batch)
        self.xtx = torch.zeros(in_features, in_features, device=device) if hessian else None
        self.finalized = False  # xtx turned into the Hessian (hessian()); no more batches then
        # Per-column sums cost a full pass over the activations: kept only when a pass asks.
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device) if moments else None
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device) if moments else None
        # The largest |x| per column (PTQ1.61 keeps the columns of the largest inputs at 4 bits).
        self.absmax = torch.zeros(in_features, device=device) if absmax else None
        # Activation quantization needs the inputs themselves: every SAMPLE_STRIDE-th token, capped.
        self.rows: list[torch.Tensor] | None = [] if samples else None
        self.kept_rows = 0
        # Set by a pass that rescales the input channels (AWQ): the input is now x / input_scale,
        # which the pipeline folds into whatever produces it (a norm's gain, a linear's rows).
        self.input_scale: torch.Tensor | None = None
        self.foldable = False  # set by the pipeline where the input's producer can take that scale

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        if self.finalized:
            raise RuntimeError("statistics are final once the Hessian was taken")
        self.samples += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, self.in_features).float()
        self.tokens += x.shape[0]
        if self.xtx is not None:
            self._add_upper_xtx(x)
        if self.sum is not None:
            self.sum += x.sum(0, dtype=torch.float64)
            self.sum_sq += x.square().sum(0, dtype=torch.float64)
        if self.absmax is not None:
            torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        if self.rows is not None and self.kept_rows < MAX_SAMPLE_ROWS:
            kept = x[::SAMPLE_STRIDE][: MAX_SAMPLE_ROWS - self.kept_rows]
            self.rows.append(kept.clone())
            self.kept_rows += kept.shape[0]

    def all_reduce(self) -> None:
        """Sum the statistics over the processes of a distributed run (compressor.distributed):
        afterwards every rank holds the statistics of all the calibration windows."""
        from compressor import distributed

        if not distributed.active():
            return
        if self.finalized:
            raise RuntimeError("all-reduce the statistics before taking the Hessian")
        counts = torch.tensor([self.tokens, self.samples], dtype=torch.float64)
        distributed.all_reduce_sum_(counts)
        self.tokens, self.samples = int(counts[0]), int(counts[1])
        for tensor in (self.xtx, self.sum, self.sum_sq):
            if tensor is not None:
                distributed.all_reduce_sum_(tensor)
        if self.absmax is not None:
            distributed.all_reduce_max_(self.absmax)
        if self.rows is not None:
            device = self.rows[0].device if self.rows else "cpu"
            gathered = distributed.all_gather_objects(torch.cat(self.rows).cpu() if self.rows else None)
            rows = torch.cat([r for r in gathered if r is not None])[:MAX_SAMPLE_ROWS]
            self.rows, self.kept_rows = [rows.to(device)], rows.shape[0]

    def sample_rows(self) -> torch.Tensor:
        """A strided subsample of the input rows seen, [<= MAX_SAMPLE_ROWS, in_features]."""
        if not self.rows:
            raise ValueError("no input samples were kept (samples=False, or no data)")
        return torch.cat(self.rows)

    def _add_upper_xtx(self, x: torch.Tensor) -> None:
        """xtx += x^T x, computing only the tiles on and above the diagonal (a third less work)."""
        bounds = _tiles(self.in_features)
        for i, (a0, a1) in enumerate(bounds):
            for b0, b1 in bounds[i:]:
                self.xtx[a0:a1, b0:b1].addmm_(x[:, a0:a1].T, x[:, b0:b1])

    def hessian(self) -> torch.Tensor:
        """H = 2/N sum x x^T, the layer-wise reconstruction objective's Hessian (fp32).

        The first call turns the accumulated upper triangle into H in place (a 5632-wide Hessian
        is 127 MB: copies add up); later calls return the same tensor, which callers only read.
        """
        if self.xtx is None or self.tokens == 0:
            raise ValueError("no Hessian was accumulated for this layer")
        if not self.finalized:
            self.xtx.triu_()  # the diagonal tiles' lower halves are duplicates: drop them
            self.xtx.add_(self.xtx.triu(1).T)  # mirror the strict upper triangle (one temporary)
            self.xtx.mul_(2.0 / self.tokens)
            self.finalized = True
        return self.xtx

    @torch.no_grad()
    def scale_inputs_(self, scale: torch.Tensor) -> None:
        """The statistics of x / scale (per input channel) in place of those of x."""
        inverse = 1.0 / scale.to(torch.float64)
        if self.xtx is not None:
            self.xtx.mul_((inverse[:, None] * inverse[None, :]).to(self.xtx.dtype))
        if self.sum is not None:
            self.sum.mul_(inverse)
            self.sum_sq.mul_(inverse.square())
        if self.rows:
            self.rows = [rows * inverse.to(rows.dtype) for rows in self.rows]
        if self.absmax is not None:
            self.absmax.mul_(inverse.to(self.absmax.dtype))
        previous = self.input_scale if self.input_scale is not None else 1.0
        self.input_scale = (scale.float() * previous).to(scale.device)

    def column_energy(self) -> torch.Tensor:
        """Mean over tokens of x_j^2 per input column (Wanda's statistic up to a constant)."""
        if self.xtx is not None:
            if self.finalized:  # xtx holds H = 2/N X^T X now
                return self.xtx.diagonal() / 2
            return self.xtx.diagonal() / max(self.tokens, 1)  # the diagonal tiles are complete
        return self._moments()[1].float()

    def column_absmax(self) -> torch.Tensor:
        """The largest |x_j| over every token seen, per input column."""
        if self.absmax is None:
            raise ValueError("per-column maxima were not accumulated (absmax=False)")
        return self.absmax

    def column_mean(self) -> torch.Tensor:
        return self._moments()[0].float()

    def column_variance(self) -> torch.Tensor:
        mean, mean_sq = self._moments()
        return (mean_sq - mean.square()).clamp(min=0).float()

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sum is None:
            raise ValueError("per-column moments were not accumulated (moments=False)")
        return self.sum / max(self.tokens, 1), self.sum_sq / max(self.tokens, 1)


def _tiles(width: int, tile: int = 512) -> list[tuple[int, int]]:
    count = -(-width // tile)
    edges = [round(i * width / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))
