"""InfoNCE and its relatives: InterCLR Eq. 1, 6, 7 (003_*.txt), SimCLR NT-Xent and CUT PatchNCE
(001_*.txt)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses._common import (check_negatives, check_pair, check_temperature, float32,
                            normalize, similarities_to_negatives)


@float32
def info_nce_from_logits(pos_logit: torch.Tensor, neg_logits: torch.Tensor, temperature: float = 0.07,
                         margin: float = 0.0) -> torch.Tensor:
    """InfoNCE (InterCLR Eq. 1) / MarginNCE (Eq. 6) from precomputed cosine similarities.

    pos_logit: [B] cosine of each query with its positive; neg_logits: [B, K] cosines with its
    negatives — both *before* temperature, as a bank computing similarities near its data returns
    them. The margin m is subtracted from the positive cosine, which appears in the numerator and
    as the first term of the denominator; negatives are untouched:
        -log exp((cos⁺ - m)/τ) / (exp((cos⁺ - m)/τ) + Σ_k exp(cos⁻_k/τ)),
    averaged over the batch (the paper sums; the mean keeps the scale independent of B).
    """
    check_temperature("temperature", temperature)
    if pos_logit.dim() != 1 or neg_logits.dim() != 2 or neg_logits.shape[0] != pos_logit.shape[0]:
        raise ValueError(f"pos_logit must be [B] and neg_logits [B, K], got {tuple(pos_logit.shape)} "
                         f"and {tuple(neg_logits.shape)}")
    logits = torch.cat([(pos_logit - margin).unsqueeze(1), neg_logits], dim=1) / temperature  # [B, 1+K]
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


@float32
def info_nce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float = 0.07, margin: float = 0.0) -> torch.Tensor:
    """InfoNCE (InterCLR Eq. 1) and, with `margin`, MarginNCE (Eq. 6) on embeddings.

    query, positive: [B, D]; negatives: [B, K, D] per sample (memory bank) or [K, D] shared (MoCo
    queue). All are L2-normalised, so dot products are the cosines of the paper.
    """
    check_pair("query", query, "positive", positive)
    check_negatives(query, negatives)
    query, positive, negatives = normalize(query), normalize(positive), normalize(negatives)
    pos = (query * positive).sum(dim=1)  # [B]
    return info_nce_from_logits(pos, similarities_to_negatives(query, negatives), temperature, margin)


@float32
def interclr_loss(intra: torch.Tensor, inter: torch.Tensor, weight: float = 0.75) -> torch.Tensor:
    """InterCLR Eq. 7: λ·L_intra + (1-λ)·L_inter (λ = 0.75 in the paper; λ = 1 is NPID)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight λ must be in [0, 1], got {weight}")
    return weight * intra + (1.0 - weight) * inter


@float32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent. z1, z2: [N, D], two views of N samples. Each of the 2N embeddings has its
    other view as positive and the remaining 2N-2 as negatives; the loss is averaged over all 2N
    anchors (symmetric in z1, z2). Cosine similarity."""
    return nt_xent_global(z1, z2, z1, z2, offset=0, temperature=temperature)


@float32
def nt_xent_global(z1: torch.Tensor, z2: torch.Tensor, all_z1: torch.Tensor, all_z2: torch.Tensor,
                   offset: int, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of one worker's anchors against the global batch (SimCLR's `add_contrastive_loss`
    with `tpu_cross_replica_concat`; solo-learn `simclr_loss_func` with `gather`).

    z1, z2: [n, D], this worker's two views; all_z1, all_z2: [N, D], every worker's, in which this
    worker's rows are offset..offset+n-1 (the same values, reached through a differentiable gather).
    Each of the 2n local anchors has its other view as positive and the other 2N-2 embeddings of
    the global batch as negatives; the loss is averaged over the 2n local anchors. With W equal
    shards, the mean over workers of this loss is `nt_xent(all_z1, all_z2)`, and DDP's mean of the
    workers' gradients is its gradient provided the gather's backward sums the workers' gradients
    for each shard (a reduce-scatter).
    """
    check_pair("z1", z1, "z2", z2)
    check_pair("all_z1", all_z1, "all_z2", all_z2)
    check_temperature("temperature", temperature)
    n, total = z1.shape[0], all_z1.shape[0]
    if all_z1.shape[1] != z1.shape[1] or not 0 <= offset <= total - n:
        raise ValueError(f"local views {tuple(z1.shape)} at offset {offset} must be rows of the global "
                         f"views {tuple(all_z1.shape)}")
    anchors = normalize(torch.cat([z1, z2], dim=0))  # [2n, D]
    keys = normalize(torch.cat([all_z1, all_z2], dim=0))  # [2N, D]
    logits = anchors @ keys.T / temperature  # [2n, 2N]
    rows = torch.arange(n, device=z1.device) + offset  # this worker's rows of all_z1 (and all_z2)
    itself = torch.cat([rows, rows + total])  # [2n]: each anchor's own column
    partner = torch.cat([rows + total, rows])  # [2n]: its other view's column
    is_itself = torch.zeros_like(logits, dtype=torch.bool)
    is_itself[torch.arange(2 * n, device=z1.device), itself] = True
    return F.cross_entropy(logits.masked_fill(is_itself, float("-inf")), partner)


@float32
def multi_positive_nt_xent(z: torch.Tensor, all_z: torch.Tensor, offset: int, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with every view of a sample as positives: SimCLR's loss for V ≥ 2 views per sample
    (multi-crop: 2 global and V-2 local views), the multi-positive form of SupCon's L_out (Khosla et
    al., 2020, Eq. 2) with "same sample" as the class.

    z: [n, V, D], this worker's V views of n samples; all_z: [N, V, D], every worker's, this worker's
    rows at offset..offset+n-1. Each of the n·V anchors i is contrasted with the N·V - 1 other
    embeddings A(i) of the global batch; its positives P(i) are its sample's other V - 1 views:
        L = mean_i  -1/|P(i)| Σ_{p ∈ P(i)} log( exp(s_ip/τ) / Σ_{a ∈ A(i)} exp(s_ia/τ) ),
    s the cosine similarity. V = 2 is `nt_xent_global` (and `nt_xent` with N = n).
    """
    check_temperature("temperature", temperature)
    if z.dim() != 3 or all_z.dim() != 3 or z.shape[1:] != all_z.shape[1:] or z.shape[1] < 2:
        raise ValueError(f"z must be [n, V, D] and all_z [N, V, D] with V >= 2, got {tuple(z.shape)} and "
                         f"{tuple(all_z.shape)}")
    n, views, _ = z.shape
    total = all_z.shape[0]
    if not 0 <= offset <= total - n:
        raise ValueError(f"local views {tuple(z.shape)} at offset {offset} must be rows of {tuple(all_z.shape)}")
    anchors = normalize(z.flatten(0, 1))  # [n·V, D], sample-major: row i·V + v
    keys = normalize(all_z.flatten(0, 1))  # [N·V, D]
    logits = anchors @ keys.T / temperature
    own = (torch.arange(n, device=z.device) + offset).repeat_interleave(views)  # each anchor's sample
    column_sample = torch.arange(total, device=z.device).repeat_interleave(views)
    itself = own * views + torch.arange(views, device=z.device).repeat(n)
    rows = torch.arange(n * views, device=z.device)
    is_itself = torch.zeros_like(logits, dtype=torch.bool)
    is_itself[rows, itself] = True
    log_prob = F.log_softmax(logits.masked_fill(is_itself, float("-inf")), dim=1)
    positive = (column_sample.unsqueeze(0) == own.unsqueeze(1)) & ~is_itself  # [n·V, N·V]
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (views - 1)).mean()


@float32
def patch_nce(feat_q: torch.Tensor, feat_k: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """CUT's PatchNCE (001_*.txt): feat_q, feat_k [B, P, D] features of P patch locations in the
    output and input images. Each query patch's positive is the key patch at the same location;
    its negatives are the other P-1 key patches of the same image. Cosine similarity; averaged over
    B·P. CUT detaches feat_k; that is the caller's choice."""
    if feat_q.dim() != 3 or feat_q.shape != feat_k.shape:
        raise ValueError(f"feat_q and feat_k must both be [B, P, D], got {tuple(feat_q.shape)} and "
                         f"{tuple(feat_k.shape)}")
    check_temperature("temperature", temperature)
    q, k = normalize(feat_q), normalize(feat_k)
    logits = torch.einsum("bpd,bqd->bpq", q, k) / temperature  # [B, P, P]: patch p vs key patch q
    batch, patches, _ = logits.shape
    target = torch.arange(patches, device=q.device).repeat(batch)
    return F.cross_entropy(logits.reshape(batch * patches, patches), target)
