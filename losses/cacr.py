"""Contrastive Attraction and Contrastive Repulsion (004_*.txt, Sect. 3.2, App. C.2, Algorithm 3).

Checked against the official code, JegZheng/CACR-SSL: `small_scale_experiments/losses/__init__.py`
(`our_loss1`, `our_loss2`, `forward_negative_loss`: the mini-batch form) and
`large_scale_shift_experiments/imagenet/ours/builder.py` (`MoCo.forward`: the MoCo-v2 form).
"""
from __future__ import annotations

import torch

from losses._common import check_negatives, check_temperature, float32, normalize


def _squared_distances(query: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """c(q, x) = ‖q - x‖² for query [B, D] and others [B, N, D] or [N, D] → [B, N]."""
    if others.dim() == 2:  # shared (a queue of N keys): ‖q‖² + ‖x‖² - 2q·x, no [B, N, D] temporary
        cross = query @ others.T  # [B, N]
        return (query.pow(2).sum(1, keepdim=True) + others.pow(2).sum(1) - 2 * cross).clamp_min(0)
    return (query.unsqueeze(1) - others).pow(2).sum(dim=-1)  # [B, 1, D] - [B, N, D] -> [B, N]


def _other_samples(costs: torch.Tensor) -> torch.Tensor:
    """[B, B] costs between sample i and sample j → [B, B-1], the j ≠ i entries of each row."""
    batch = costs.shape[0]
    others = ~torch.eye(batch, dtype=torch.bool, device=costs.device)
    return costs[others].reshape(batch, batch - 1)


def _attraction(cost_pos: torch.Tensor, t_pos: float, detach_weights: bool = False) -> torch.Tensor:
    """L̂_CA (Eq. 3, 5) from costs [B, K]: mean_i Σ_k softmax_k(t⁺·c_ik)·c_ik."""
    weights = torch.softmax(t_pos * cost_pos, dim=1)
    if detach_weights:
        weights = weights.detach()
    return (weights * cost_pos).sum(dim=1).mean()


def _repulsion(cost_neg: torch.Tensor, t_neg: float, cost_for_weights: torch.Tensor | None = None) -> torch.Tensor:
    """L̂_CR (Eq. 4, 5) from costs [B, M]: -mean_i Σ_j softmax_j(-t⁻·c_ij)·c_ij; the weights come from
    `cost_for_weights` when given (the same values, part of them detached)."""
    weights = torch.softmax(-t_neg * (cost_neg if cost_for_weights is None else cost_for_weights), dim=1)
    return -(weights * cost_neg).sum(dim=1).mean()


@float32
def cacr_loss(query: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
              t_pos: float = 1.0, t_neg: float = 2.0, detach_weights: bool = False, intra_batch: bool = False,
              detach_negative_weights: bool = False) -> torch.Tensor:
    """CACR loss L̂_CA + L̂_CR of one batch of queries (Sect. 3.2; App. C.2 and Algorithm 3).

    query [B, D]; positives [B, P, D] (P positives of each query); negatives [B, M, D] or [M, D]
    (a MoCo queue). Embeddings are L2-normalised, c = squared Euclidean distance, and
        CA = mean_i Σ_k softmax_k(t⁺·c_ik)·c_ik      (farther positives weigh more, Eq. 3)
        CR = -mean_i Σ_j softmax_j(-t⁻·c_ij)·c_ij    (closer negatives weigh more, Eq. 4).
    intra_batch: the other B-1 queries join each query's negatives in the same softmax, whose
    normaliser then has M + B - 1 terms (App. C.2's π̂⁻; the official code's `unif_intra_batch`,
    Algorithm 3's `with_intra_batch`).
    detach_weights: the positive weights carry no gradient (Algorithm 3: they involve the
    momentum encoder's keys). detach_negative_weights: the weights of `negatives` carry no gradient
    (the official `MoCo.forward` detaches the queue's, `sq_dists_for_cost.detach()`; Algorithm 3 as
    printed does not); the in-batch queries' weights keep theirs either way.
    """
    check_temperature("t_pos", t_pos)
    check_temperature("t_neg", t_neg)
    if query.dim() != 2 or positives.dim() != 3 or positives.shape[0] != query.shape[0] \
            or positives.shape[2] != query.shape[1]:
        raise ValueError(f"query must be [B, D] and positives [B, P, D], got {tuple(query.shape)} "
                         f"and {tuple(positives.shape)}")
    check_negatives(query, negatives)
    query, positives, negatives = normalize(query), normalize(positives), normalize(negatives)
    cost_neg = _squared_distances(query, negatives)  # [B, M]
    cost_for_weights = cost_neg.detach() if detach_negative_weights else cost_neg
    if intra_batch:
        in_batch = _other_samples(_squared_distances(query, query))  # [B, B-1]
        cost_neg = torch.cat([cost_neg, in_batch], dim=1)  # [B, M + B - 1]
        cost_for_weights = torch.cat([cost_for_weights, in_batch], dim=1)
    attraction = _attraction(_squared_distances(query, positives), t_pos, detach_weights)  # positives: [B, P]
    return attraction + _repulsion(cost_neg, t_neg, cost_for_weights)


@float32
def cacr_multiview_loss(views: list[torch.Tensor], t_pos: float = 1.0, t_neg: float = 2.0) -> torch.Tensor:
    """Mini-batch CACR (Sect. 3.2, Eq. 5) with K+1 views of M samples, each [M, D].

    Attraction: every view in turn is the query; its positives are the other K views of the same
    sample; averaged over the K+1 views (official `our_loss1`). Repulsion: for every pair of views
    x < y, query i of view x has as negatives the other M-1 samples j ≠ i of view y, one softmax
    over those M-1 (Eq. 5's p̂(x_i⁻) = 1/(M-1) Σ_{j≠i} δ_{x_j}); averaged over the (K+1)K/2 pairs
    (official `our_loss2` / `forward_negative_loss`). With two views: query view 0, negatives view 1.
    """
    if len(views) < 2:
        raise ValueError(f"cacr_multiview_loss needs at least 2 views, got {len(views)}")
    shape = views[0].shape
    if views[0].dim() != 2 or any(v.shape != shape for v in views):
        raise ValueError(f"every view must be [M, D] of one shape, got {[tuple(v.shape) for v in views]}")
    if shape[0] < 2:
        raise ValueError(f"cacr_multiview_loss needs at least 2 samples for negatives, got {shape[0]}")
    check_temperature("t_pos", t_pos)
    check_temperature("t_neg", t_neg)
    views = [normalize(v) for v in views]
    stacked = torch.stack(views, dim=1)  # [M, K+1, D]
    attraction = stacked.new_zeros(())
    for v in range(len(views)):
        positives = torch.cat([stacked[:, :v], stacked[:, v + 1:]], dim=1)  # [M, K, D]
        attraction = attraction + _attraction(_squared_distances(views[v], positives), t_pos)
    repulsion, pairs = stacked.new_zeros(()), 0
    for x in range(len(views)):
        for y in range(x + 1, len(views)):
            cost = _other_samples(_squared_distances(views[x], views[y]))  # [M, M-1]: query i of x, sample j≠i of y
            repulsion, pairs = repulsion + _repulsion(cost, t_neg), pairs + 1
    return attraction / len(views) + repulsion / pairs
