"""BYOL (Grill et al., 2020; InterCLR Sect. 5.1.2): online encoder → projector (4096, 256) →
predictor; target encoder + projector by EMA with τ from 0.99 (200-epoch recipe) to 1 on a cosine
schedule; loss 2 - 2·cos(p, sg(z')) symmetrised over the two views.
Multi-crop (`local_crops`, SwAV's views applied to BYOL): each local view's prediction regresses to
both global views' targets; only the global views go through the target network."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from losses import byol_loss
from models.heads import byol_mlp
from models.method import LOCAL_CROPS, InterQuery, IntraStep, Method, MethodConfig, lars
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


@dataclass
class BYOLConfig(MethodConfig):
    """BYOL has no key of its own (the target's τ schedule starts at the 200-epoch recipe's 0.99)."""
    name: str = "byol"
    title = "BYOL"
    paper = "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning, arXiv:2006.07733"
    reads = LOCAL_CROPS
    # 200 epochs: 003 Sect. 5.1.2 (Grill et al.'s 300-epoch recipe: LARS lr 0.3, wd 1e-6; the 1000-epoch
    # one is lr 0.2, wd 1.5e-6); mmselfsup configs/selfsup/byol/byol_resnet50_16xb256-coslr-200e_in1k.py
    # (LARS lr 4.8 at 4096 = 0.3 per 256) with lars_coslr-200e_in1k.py (10 warm-up epochs)
    optimizer = lars(0.3, 1e-6)
    sync_bn = True  # BN statistics over the whole batch, as BYOL trains

    def build(self, job, num_classes: int | None = None) -> BYOL:
        return BYOL(self.backbone(job), local_crops=job.data.local_crops)
