"""Exact InfoNCE gradients from per-shard sufficient statistics.

For InfoNCE / MarginNCE (InterCLR Eq. 1, 6) the negatives enter only through
    log Σ_k exp(q·v_k / τ)  (call it lse),
whose gradient with respect to q is (1/τ)·Σ_k softmax_k(q·v/τ)·v_k. Each shard returns, per query,
the lse of its negatives and that softmax-weighted mean; shards combine by log-sum-exp. The folded
value τ·lse behaves as a single negative cosine: info_nce_from_logits(pos, τ·lse[:, None], τ, m)
equals InfoNCE over all K negatives, value and gradient — with B·(D+1) numbers per shard on the
wire instead of B·K·D features or B·K logits.
"""
from __future__ import annotations

import numpy as np
import torch


class _FoldedNegatives(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, folded, weighted_mean):
        ctx.save_for_backward(weighted_mean)
        return folded.clone()

    @staticmethod
    def backward(ctx, grad):
        (weighted_mean,) = ctx.saved_tensors
        return grad[:, None] * weighted_mean, None, None


def combine_shards(lses: list[np.ndarray], means: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (lse [B], mean [B, D]) into the statistics of the union of negatives."""
    lse = np.stack(lses)  # [S, B]
    total = np.logaddexp.reduce(lse, axis=0)  # [B]
    with np.errstate(invalid="ignore"):
        weight = np.nan_to_num(np.exp(lse - total[None, :]))  # [S, B]
    mean = np.einsum("sb,sbd->bd", weight, np.stack(means))
    return total, mean


def folded_negative_similarity(query: torch.Tensor, lse: np.ndarray, weighted_mean: np.ndarray,
                               temperature: float) -> torch.Tensor:
    """[B, 1] 'negative cosine' τ·lse with d/dq = weighted_mean; `query` must be the normalised
    embedding the shards scored (gradients flow on through the normalisation)."""
    folded = torch.as_tensor(temperature * lse, dtype=query.dtype, device=query.device)
    mean = torch.as_tensor(weighted_mean, dtype=query.dtype, device=query.device)
    return _FoldedNegatives.apply(query, folded, mean).unsqueeze(1)
