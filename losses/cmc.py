"""Contrastive Multiview Coding (002_*.txt): two-view loss Eq. 2-4, core view Eq. 7, full graph Eq. 8."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses._common import check_negatives, check_temperature, float32, normalize, similarities_to_negatives


def _contrast(anchor: torch.Tensor, other: torch.Tensor, other_negatives: torch.Tensor | None,
              temperature: float) -> torch.Tensor:
    """L_contrast^{V_i, V_j} (Eq. 2 with the critic of Eq. 3): anchor view i, enumerate view j.
    Without bank negatives the other samples of view j in the batch are the negatives."""
    if other_negatives is None:
        logits = anchor @ other.T / temperature  # [B, B]: positives on the diagonal
        return F.cross_entropy(logits, torch.arange(anchor.shape[0], device=anchor.device))
    pos = (anchor * other).sum(dim=1, keepdim=True)  # [B, 1]
    logits = torch.cat([pos, similarities_to_negatives(anchor, other_negatives)], dim=1) / temperature
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


@float32
def cmc_loss(views: list[torch.Tensor], temperature: float = 0.07, paradigm: str = "core",
             negatives: list[torch.Tensor] | None = None) -> torch.Tensor:
    """CMC loss over M ≥ 2 views, each [B, D] (cosine critic, Eq. 3).

    L(V_i, V_j) = L^{V_i,V_j} + L^{V_j,V_i} (Eq. 4, both anchors, each averaged over the batch);
    paradigm "core": Σ_{j≥2} L(V_1, V_j) with view 0 as the core (Eq. 7);
    paradigm "full": Σ_{i<j} L(V_i, V_j) (Eq. 8). With two views both equal Eq. 4.
    negatives: None (in-batch negatives) or a list with one [B, K, D] (or [K, D]) tensor per view —
    the memory-bank negatives of that view; anchor view i is contrasted against view j's negatives.
    """
    if len(views) < 2:
        raise ValueError(f"cmc_loss needs at least 2 views, got {len(views)}")
    if paradigm not in ("core", "full"):
        raise ValueError(f"paradigm must be 'core' or 'full', got {paradigm!r}")
    check_temperature("temperature", temperature)
    shape = views[0].shape
    if views[0].dim() != 2 or any(v.shape != shape for v in views):
        raise ValueError(f"every view must be [B, D] of one shape, got {[tuple(v.shape) for v in views]}")
    if negatives is not None:
        if len(negatives) != len(views):
            raise ValueError(f"negatives needs one tensor per view ({len(views)}), got {len(negatives)}")
        for n in negatives:
            check_negatives(views[0], n)
        negatives = [normalize(n) for n in negatives]
    z = [normalize(v) for v in views]
    if paradigm == "core":
        pairs = [(0, j) for j in range(1, len(z))]
    else:
        pairs = [(i, j) for i in range(len(z)) for j in range(i + 1, len(z))]
    total = z[0].new_zeros(())
    for i, j in pairs:
        neg_i = negatives[i] if negatives is not None else None
        neg_j = negatives[j] if negatives is not None else None
        total = total + _contrast(z[i], z[j], neg_j, temperature) + _contrast(z[j], z[i], neg_i, temperature)
    return total
