"""SimCLR (001_*.txt): two views, encoder + 2-layer MLP head, NT-Xent over the 2N embeddings of the
global batch (every worker's), as SimCLR's `tpu_cross_replica_concat` and solo-learn's `gather` do."""
from __future__ import annotations

import torch

from losses import nt_xent, nt_xent_global
from models.heads import ProjectionHead
from models.method import Method
from models.momentum import all_gather_with_grad


class SimCLR(Method):
    recipe = "two_crop"

    def __init__(self, backbone: torch.nn.Module, embed_dim: int = 128, hidden_dim: int = 2048,
                 temperature: float = 0.5, gather: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dim, embed_dim, hidden_dim, batch_norm=True)
        self.temperature = temperature
        self.gather = gather  # False: each worker contrasts only its own batch (2n-2 negatives)

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        x1, x2 = self.views(batch)[:2]
        z1, z2 = self.head(self.backbone(x1)), self.head(self.backbone(x2))
        if self.gather:
            both, offset = all_gather_with_grad(torch.stack([z1, z2], dim=1))  # [N, 2, D], one collective
            loss = nt_xent_global(z1, z2, both[:, 0], both[:, 1], offset, self.temperature)
        else:
            loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "nt_xent": loss.detach()}
