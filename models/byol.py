"""BYOL (Grill et al., 2020; InterCLR Sect. 5.1.2): online encoder → projector (4096, 256) →
predictor; target encoder + projector by EMA with τ from 0.99 (200-epoch recipe) to 1 on a cosine
schedule; loss 2 - 2·cos(p, sg(z')) symmetrised over the two views."""
from __future__ import annotations

import torch

from losses import byol_loss
from models.heads import byol_mlp
from models.method import Method
from models.momentum import byol_decay, momentum_copy


class BYOL(Method):
    recipe = "two_crop"
    momentum_pairs = (("backbone", "target_backbone"), ("projector", "target_projector"))

    def __init__(self, backbone: torch.nn.Module, embed_dim: int = 256, hidden_dim: int = 4096,
                 base_decay: float = 0.99):
        super().__init__()
        self.backbone = backbone
        self.projector = byol_mlp(backbone.dim, embed_dim, hidden_dim)
        self.predictor = byol_mlp(embed_dim, embed_dim, hidden_dim)
        self.target_backbone, self.target_projector = momentum_copy(backbone), momentum_copy(self.projector)
        self.base_decay = base_decay

    def decay(self, progress: float) -> float:
        return byol_decay(progress, self.base_decay)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        x1, x2 = self.views(batch)[:2]
        loss = byol_loss(self.predict(x1), self.target(x2)) + byol_loss(self.predict(x2), self.target(x1))
        return {"loss": loss, "intra": loss.detach()}
