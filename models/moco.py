"""MoCo-v2 (Chen et al., 2020b; InterCLR Sect. 5.1.2): query encoder + MLP head, a momentum key
encoder (m 0.999), a queue of K = 65,536 keys, InfoNCE with τ 0.2 (Eq. 1 with the queue as
negatives), symmetric over the two views as in mmselfsup's MoCo-v2 configs when `symmetric`.
Multi-crop (`local_crops`, SwAV's views applied to MoCo): each local view is one more query against
its sample's global key(s) — view 2's, and view 1's too when symmetric; only global views make keys,
enter the queue and (InterCLR-MoCo) write the bank.
Keys are computed with shuffle BN (facebookresearch/moco `builder.py`; `models.momentum.shuffled_forward`):
across DDP workers, or on one worker in `bn_splits` sub-batches (queries too), so a query's BN batch
never is its key's."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from losses import info_nce
from models.heads import ProjectionHead
from models.method import KEY_ENCODER, LOCAL_CROPS, InterQuery, IntraStep, Method, MethodConfig, sgd
from models.momentum import BN_SPLITS, MoCoQueue, QueryKeyEncoders, momentum_copy


class MoCo(QueryKeyEncoders, Method):
    recipe = "two_crop"
    momentum_pairs = (("backbone", "key_backbone"), ("head", "key_head"))

    def __init__(self, backbone: torch.nn.Module, embed_dim: int = 128, hidden_dim: int = 2048,
                 temperature: float = 0.2, queue_size: int = 65_536, key_momentum: float = 0.999,
                 symmetric: bool = False, shuffle_bn: bool = True, bn_splits: int = BN_SPLITS,
                 local_crops: int = 0):
        super().__init__()
        self.local_crops = local_crops
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dim, embed_dim, hidden_dim)
        self.key_backbone, self.key_head = momentum_copy(self.backbone), momentum_copy(self.head)
        self.queue = MoCoQueue(queue_size, embed_dim)
        self.embed_dim = embed_dim
        self.temperature, self.key_momentum, self.symmetric = temperature, key_momentum, symmetric
        self.shuffle_bn, self.bn_splits = shuffle_bn, bn_splits

    def decay(self, progress: float) -> float:
        return self.key_momentum

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_queries(x)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_keys(x)

    @torch.no_grad()
    def prime(self, batch: dict) -> None:
        """Queue keys of real images before the first step, instead of starting from random unit
        vectors: against a random queue (negatives ~orthogonal to everything) a step lowers the loss
        by aligning every query with its key, which can collapse every query to one direction with
        the loss pinned at log(K+1) (seen at the demo's settings: docs/methods.md). Real keys keep
        the queries apart."""
        self.queue.push(self.keys(self.views(batch)[1]))

    def contrast(self, q: torch.Tensor, k: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
        """InfoNCE of q against its key and the queue (a copy: the queue is updated in place later)."""
        return info_nce(q, k, self.queue.keys.clone(), self.temperature, margin)

    def intra_step(self, batch: dict, bank=None, inter: InterQuery | None = None, margin: float = 0.0) -> IntraStep:
        """MoCo's loss for view 1's queries against view 2's keys (and view 2's against view 1's when
        symmetric), each local view's queries against those keys too, averaged over the (query, key)
        pairs; the bank stores view 2's keys (ω = 1, as mmselfsup's InterCLR-MoCo writes key
        features) and the inter branch's anchors are view 1's queries."""
        x1, x2 = self.views(batch)[:2]
        q1, k2 = self.query(x1), self.keys(x2)
        pairs, keys = [(q1, k2)], [k2]
        if self.symmetric:
            k1 = self.keys(x1)
            pairs.append((self.query(x2), k1))
            keys.append(k1)
            self.push_after_step(self.queue, k1)
        for local in self.local_views(batch):
            q = self.query(local)
            pairs += [(q, k) for k in keys]
        loss = sum(self.contrast(q, k, margin) for q, k in pairs) / len(pairs)
        self.push_after_step(self.queue, k2)
        return IntraStep(loss, [q1], k2)

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        return [self.keys(self.views(batch)[0])]

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        loss = self.intra_step(batch).loss
        return {"loss": loss, "intra": loss.detach()}


@dataclass
class MoCoConfig(MethodConfig):
    """MoCo-v2's keys (Chen et al., 2020b: τ 0.2, K 65,536, m 0.999; followed by 003 Sect. 5.1.2)."""
    name: str = "moco"
    temperature: float = 0.2
    queue_size: int = 65_536
    key_momentum: float = 0.999  # the key encoder's m
    symmetric: bool = False  # both views in turn are the query (mmselfsup's symmetric MoCo-v2)
    title = "MoCo"
    paper = "Improved Baselines with Momentum Contrastive Learning, arXiv:2003.04297"
    reads = (*KEY_ENCODER, *LOCAL_CROPS)
    # SGD lr 0.03 at batch 256, wd 1e-4, cosine; mmselfsup configs/selfsup/interclr/
    # interclr-moco_resnet50_8xb32-coslr-200e_in1k.py → sgd_coslr-200e_in1k.py
    optimizer = sgd(0.03, 1e-4)

    def build(self, job, num_classes: int | None = None) -> MoCo:
        return MoCo(self.backbone(job), temperature=self.temperature, queue_size=self.queue_size,
                    key_momentum=self.key_momentum, symmetric=self.symmetric, shuffle_bn=job.model.shuffle_bn,
                    bn_splits=job.model.bn_splits, local_crops=job.data.local_crops)
