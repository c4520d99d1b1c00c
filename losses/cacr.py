"""Contrastive Attraction and Contrastive Repulsion (004_*.txt, Sect. 3.2 and Algorithm 3)."""
from __future__ import annotations

import torch

from losses._common import check_negatives, check_temperature, normalize


def _squared_distances(query: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """c(q, x) = ‖q - x‖² for query [B, D] and others [B, N, D] or [N, D] → [B, N]."""
    if others.dim() == 2:  # shared (a queue of N keys): ‖q‖² + ‖x‖² - 2q·x, no [B, N, D] temporary
        cross = query @ others.T  # [B, N]
        return (query.pow(2).sum(1, keepdim=True) + others.pow(2).sum(1) - 2 * cross).clamp_min(0)
    return (query.unsqueeze(1) - others).pow(2).sum(dim=-1)  # [B, 1, D] - [B, N, D] -> [B, N]


def cacr_loss(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
              t_pos: float = 1.0, t_neg: float = 2.0, detach_weights: bool = False) -> torch.Tensor:
    """Mini-batch CACR loss L̂_CA + L̂_CR (Sect. 3.2).

    query [B, D]; positives [B, P, D] (P positives of each query); negatives [B, M, D] or [M, D].
    Embeddings are L2-normalised, c = squared Euclidean distance, and
        CA = mean_i Σ_k softmax_k(t⁺·c_ik)·c_ik      (farther positives weigh more, Eq. 3)
        CR = -mean_i Σ_j softmax_j(-t⁻·c_ij)·c_ij    (closer negatives weigh more, Eq. 4).
    detach_weights=True is Algorithm 3's MoCo-v2 form: the positive conditional weights are
    computed without gradient (they involve the momentum encoder); the negative weights keep theirs.
    """
    check_temperature("t_pos", t_pos)
    check_temperature("t_neg", t_neg)
    if query.dim() != 2 or positives.dim() != 3 or positives.shape[0] != query.shape[0] \
            or positives.shape[2] != query.shape[1]:
        raise ValueError(f"query must be [B, D] and positives [B, P, D], got {tuple(query.shape)} "
                         f"and {tuple(positives.shape)}")
    check_negatives(query, negatives)
    query, positives, negatives = normalize(query), normalize(positives), normalize(negatives)
    cost_pos = _squared_distances(query, positives)  # [B, P]
    weights_pos = torch.softmax(t_pos * cost_pos, dim=1)
    if detach_weights:
        weights_pos = weights_pos.detach()
    cost_neg = _squared_distances(query, negatives)  # [B, M]
    weights_neg = torch.softmax(-t_neg * cost_neg, dim=1)
    attraction = (weights_pos * cost_pos).sum(dim=1).mean()
    repulsion = -(weights_neg * cost_neg).sum(dim=1).mean()
    return attraction + repulsion


def cacr_multiview_loss(views: list[torch.Tensor], t_pos: float = 1.0, t_neg: float = 2.0) -> torch.Tensor:
    """Small-scale CACR with K+1 views of B samples, each [B, D]: every view in turn is the query;
    its positives are the other K views of the same sample and its negatives the other B-1 samples
    of every view ((K+1)(B-1) of them). Averaged over the K+1 queries, as Algorithm 3 does."""
    if len(views) < 2:
        raise ValueError(f"cacr_multiview_loss needs at least 2 views, got {len(views)}")
    shape = views[0].shape
    if views[0].dim() != 2 or any(v.shape != shape for v in views):
        raise ValueError(f"every view must be [B, D] of one shape, got {[tuple(v.shape) for v in views]}")
    batch = shape[0]
    stacked = torch.stack(views, dim=1)  # [B, K+1, D]
    others = ~torch.eye(batch, dtype=torch.bool, device=stacked.device)  # [B, B], False on the diagonal
    # negatives of sample i: every view of every sample j != i → [B, (B-1)(K+1), D]
    negatives = stacked.unsqueeze(0).expand(batch, -1, -1, -1)[others].reshape(batch, -1, shape[1])
    total = stacked.new_zeros(())
    for v in range(len(views)):
        positives = torch.cat([stacked[:, :v], stacked[:, v + 1:]], dim=1)  # [B, K, D]
        total = total + cacr_loss(views[v], positives, negatives, t_pos, t_neg)
    return total / len(views)
