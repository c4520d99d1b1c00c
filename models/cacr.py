"""Contrastive Attraction and Contrastive Repulsion (004_*.txt).

- K = 1 and K ≥ 2 positives, mini-batch form (Sect. 3.2): K+1 views of each sample (recipe
  `two_crop` or `k_views(K+1)`), every view in turn the query for the attraction, every pair of
  views for the repulsion, `losses.cacr_multiview_loss`.
- MoCo-v2 form (`queue_size` set, Algorithm 3, App. C.2): query encoder and momentum key encoder;
  each view's query attracts the *keys* of the other K views (weights without gradient) and is
  repelled from the queue of N keys and, with `intra_batch`, the other queries of its batch; the
  last view's keys are enqueued. t⁺ 1.0, t⁻ 2.0, 128-D. Defaults follow the official code
  (JegZheng/CACR-SSL `large_scale_shift_experiments/imagenet/ours/builder.py`, `MoCo.forward`):
  in-batch negatives on (`unif_intra_batch=True`, `--moco-unif-no-intra-batch` unset) and the
  queue's weights detached (`detach_weights`; Algorithm 3 as printed keeps their gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from losses import cacr_loss, cacr_multiview_loss
from models.heads import ProjectionHead
from models.method import KEY_ENCODER, Method, MethodConfig, sgd
from models.momentum import BN_SPLITS, MoCoQueue, QueryKeyEncoders, momentum_copy


class CACR(QueryKeyEncoders, Method):
    def __init__(self, backbone: torch.nn.Module, num_positives: int = 1, t_pos: float = 1.0, t_neg: float = 2.0,
                 embed_dim: int = 128, hidden_dim: int = 2048, queue_size: int | None = None,
                 key_momentum: float = 0.999, intra_batch: bool = True, detach_weights: bool = True,
                 shuffle_bn: bool = True, bn_splits: int = BN_SPLITS):
        super().__init__()
        if num_positives < 1:
            raise ValueError(f"CACR needs at least one positive, got {num_positives}")
        self.num_views = num_positives + 1
        self.recipe = "two_crop" if num_positives == 1 else f"k_views({self.num_views})"
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dim, embed_dim, hidden_dim)
        self.t_pos, self.t_neg, self.key_momentum = t_pos, t_neg, key_momentum
        # MoCo-v2 form only: in-batch query negatives; the weights against the momentum keys (the
        # positives' always, the queue's when detach_weights) carry no gradient
        self.intra_batch, self.detach_weights = intra_batch, detach_weights
        self.shuffle_bn, self.bn_splits = shuffle_bn, bn_splits  # queue form: keys with shuffle BN, as MoCo's
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
            self.queue.push(self.encode_keys(self.views(batch)[self.num_views - 1]))

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        views = self.views(batch)[:self.num_views]
        if self.queue is None:
            loss = cacr_multiview_loss([self.head(self.backbone(v)) for v in views], self.t_pos, self.t_neg)
            return {"loss": loss, "cacr": loss.detach()}
        queries = [self.encode_queries(v) for v in views]
        keys = torch.stack([self.encode_keys(v) for v in views], dim=1)  # [B, K+1, D]
        negatives = self.queue.keys.clone()
        loss = queries[0].new_zeros(())
        for k, q in enumerate(queries):  # Algorithm 3: each mini-batch of views in turn is the query
            positives = torch.cat([keys[:, :k], keys[:, k + 1:]], dim=1)  # [B, K, D]
            loss = loss + cacr_loss(q, positives, negatives, self.t_pos, self.t_neg, detach_weights=True,
                                    intra_batch=self.intra_batch, detach_negative_weights=self.detach_weights)
        loss = loss / len(queries)
        self.push_after_step(self.queue, keys[:, -1])
        return {"loss": loss, "cacr": loss.detach()}


@dataclass
class CACRConfig(MethodConfig):
    """CACR's keys: K positives and the MoCo-v2 queue form (004 App. C.2; the official code's defaults)."""
    name: str = "cacr"
    positives: int = 1  # K
    queue_size: int = 65_536  # 0: the mini-batch form (Sect. 3.2)
    key_momentum: float = 0.999
    intra_batch: bool = True  # queue form: the batch's other queries as negatives too
    detach_queue_weights: bool = True  # queue form: the queue's softmax weights without gradient
    title = "CACR"
    paper = "Contrastive Attraction and Contrastive Repulsion for Representation Learning, arXiv:2105.03746"
    reads = KEY_ENCODER
    # 004 App. C.2, ImageNet-1K in the MoCo-v2 frame: SGD, lr 0.03 at batch 256, momentum 0.9, wd 1e-4
    # (App. C.1's CIFAR/STL runs use 0.12 per 256 with step decay)
    optimizer = sgd(0.03, 1e-4)

    def build(self, job, num_classes: int | None = None) -> CACR:
        return CACR(self.backbone(job), num_positives=self.positives, queue_size=self.queue_size or None,
                    key_momentum=self.key_momentum, intra_batch=self.intra_batch,
                    detach_weights=self.detach_queue_weights, shuffle_bn=job.model.shuffle_bn,
                    bn_splits=job.model.bn_splits)
