"""SimCLR (001_*.txt): two views, encoder + 2-layer MLP head, NT-Xent over the 2N embeddings."""
from __future__ import annotations

import torch

from losses import nt_xent
from models.heads import ProjectionHead
from models.method import Method


class SimCLR(Method):
    recipe = "two_crop"

    def __init__(self, backbone: torch.nn.Module, embed_dim: int = 128, hidden_dim: int = 2048,
                 temperature: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dim, embed_dim, hidden_dim, batch_norm=True)
        self.temperature = temperature

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        x1, x2 = self.views(batch)[:2]
        z1, z2 = self.head(self.backbone(x1)), self.head(self.backbone(x2))
        loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "nt_xent": loss.detach()}
