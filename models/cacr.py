"""Contrastive Attraction and Contrastive Repulsion (004_*.txt).

- K = 1 and K ≥ 2 positives, mini-batch form (Sect. 3.2): K+1 views of each sample (recipe
  `two_crop` or `k_views(K+1)`), every view in turn the query, `losses.cacr_multiview_loss`.
- MoCo-v2 form (`queue_size` set, Algorithm 3): query encoder and momentum key encoder; each
  view's query attracts the *keys* of the other K views (weights without gradient) and is repelled
  from the queue of N keys; the last view's keys are enqueued. t⁺ 1.0, t⁻ 2.0, 128-D.
"""
from __future__ import annotations

import torch

from losses import cacr_loss, cacr_multiview_loss
from models.heads import ProjectionHead
from models.method import Method
from models.momentum import MoCoQueue, momentum_copy


class CACR(Method):
    def __init__(self, backbone: torch.nn.Module, num_positives: int = 1, t_pos: float = 1.0, t_neg: float = 2.0,
                 embed_dim: int = 128, hidden_dim: int = 2048, queue_size: int | None = None,
                 key_momentum: float = 0.999):
        super().__init__()
        if num_positives < 1:
            raise ValueError(f"CACR needs at least one positive, got {num_positives}")
        self.num_views = num_positives + 1
        self.recipe = "two_crop" if num_positives == 1 else f"k_views({self.num_views})"
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dim, embed_dim, hidden_dim)
        self.t_pos, self.t_neg, self.key_momentum = t_pos, t_neg, key_momentum
        self.queue = None
        if queue_size is not None:
            self.key_backbone, self.key_head = momentum_copy(backbone), momentum_copy(self.head)
            self.queue = MoCoQueue(queue_size, embed_dim)
            self.momentum_pairs = (("backbone", "key_backbone"), ("head", "key_head"))

    def decay(self, progress: float) -> float:
        return self.key_momentum

    @torch.no_grad()
    def prime(self, batch: dict) -> None:
        """Queue keys of real images before the first step (as MoCo.prime; the last view's keys)."""
        if self.queue is not None:
            self.queue.push(self.key_head(self.key_backbone(self.views(batch)[self.num_views - 1])))

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        views = self.views(batch)[:self.num_views]
        queries = [self.head(self.backbone(v)) for v in views]
        if self.queue is None:
            loss = cacr_multiview_loss(queries, self.t_pos, self.t_neg)
            return {"loss": loss, "cacr": loss.detach()}
        with torch.no_grad():
            keys = torch.stack([self.key_head(self.key_backbone(v)) for v in views], dim=1)  # [B, K+1, D]
        negatives = self.queue.keys.clone()
        loss = queries[0].new_zeros(())
        for k, q in enumerate(queries):  # Algorithm 3: each mini-batch of views in turn is the query
            positives = torch.cat([keys[:, :k], keys[:, k + 1:]], dim=1)  # [B, K, D]
            loss = loss + cacr_loss(q, positives, negatives, self.t_pos, self.t_neg, detach_weights=True)
        loss = loss / len(queries)
        self.queue.push(keys[:, -1])
        return {"loss": loss, "cacr": loss.detach()}
