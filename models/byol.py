"""BYOL (Grill et al., 2020; InterCLR Sect. 5.1.2): online encoder → projector (4096, 256) →
predictor; target encoder + projector by EMA with τ from 0.99 (200-epoch recipe) to 1 on a cosine
schedule; loss 2 - 2·cos(p, sg(z')) symmetrised over the two views.
Multi-crop (`local_crops`, SwAV's views applied to BYOL): each local view's prediction regresses to
both global views' targets; only the global views go through the target network."""
from __future__ import annotations

import torch

from losses import byol_loss
from models.heads import byol_mlp
from models.method import InterQuery, IntraStep, Method
from models.momentum import byol_decay, momentum_copy


class BYOL(Method):
    recipe = "two_crop"
    contrastive = False  # no negatives: as an InterCLR base, the inter branch regresses to the positive
    momentum_pairs = (("backbone", "target_backbone"), ("projector", "target_projector"))

    def __init__(self, backbone: torch.nn.Module, embed_dim: int = 256, hidden_dim: int = 4096,
                 base_decay: float = 0.99, local_crops: int = 0):
        super().__init__()
        self.local_crops = local_crops
        self.backbone = backbone
        self.projector = byol_mlp(backbone.dim, embed_dim, hidden_dim)
        self.predictor = byol_mlp(embed_dim, embed_dim, hidden_dim)
        self.target_backbone, self.target_projector = momentum_copy(backbone), momentum_copy(self.projector)
        self.base_decay = base_decay
        self.embed_dim = embed_dim

    def decay(self, progress: float) -> float:
        return byol_decay(progress, self.base_decay)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def intra_step(self, batch: dict, bank=None, inter: InterQuery | None = None, margin: float = 0.0) -> IntraStep:
        """The symmetrised BYOL loss, byol_loss(p1, z2) + byol_loss(p2, z1); with local views, twice
        the mean over every (prediction, other global view's target) pair, each local paired with
        both targets (the same loss when there are none). Both global predictions are anchors of the
        inter branch and the bank stores the second view's target projection (BYOL-InterCLR, 003
        Sect. 5.1.2)."""
        if margin:
            raise ValueError("BYOL has no negatives: an intra margin does not apply")
        x1, x2 = self.views(batch)[:2]
        p1, p2 = self.predict(x1), self.predict(x2)
        z1, z2 = self.target(x1), self.target(x2)
        pairs = [(p1, z2), (p2, z1)]
        for local in self.local_views(batch):
            p = self.predict(local)
            pairs += [(p, z1), (p, z2)]
        loss = 2 * sum(byol_loss(p, z) for p, z in pairs) / len(pairs)
        return IntraStep(loss, [p1, p2], z2)

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        return [self.target(self.views(batch)[0])]

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        loss = self.intra_step(batch).loss
        return {"loss": loss, "intra": loss.detach()}
