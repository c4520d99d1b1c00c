"""NPIDv2 (InterCLR Sect. 5.1.1–5.1.2): one view, encoder + 2-layer MLP head to a 128-D unit
embedding, InfoNCE (Eq. 1) against its own memory-bank feature and K = 16,384 random bank
negatives (τ 0.1), then the Eq. 2 momentum update (ω 0.5) of the bank rows of the batch.
NPIDv2 is InterCLR with λ = 1; `InterCLR(base="npid")` adds the inter branch."""
from __future__ import annotations

import torch

from losses import info_nce_from_logits
from models.heads import ProjectionHead
from models.method import BankRequest, Method, single_ids


class NPID(Method):
    recipe = "one_crop"
    num_views = 1

    def __init__(self, backbone: torch.nn.Module, embed_dim: int = 128, hidden_dim: int = 2048,
                 temperature: float = 0.1, num_negatives: int = 16_384, bank_momentum: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dim, embed_dim, hidden_dim)
        self.embed_dim, self.temperature, self.num_negatives = embed_dim, temperature, num_negatives
        self.bank_momentum = bank_momentum

    def bank_requests(self) -> list[BankRequest]:
        return [BankRequest(self.embed_dim, self.bank_momentum, clusters=False)]

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        ids = single_ids(batch)
        q = self.embed(self.views(batch)[0])
        pos, neg = self.bank().intra(q, ids, self.num_negatives, self.temperature)
        loss = info_nce_from_logits(pos, neg, self.temperature)
        self.bank().update(ids, q.detach())
        return {"loss": loss, "intra": loss.detach()}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-D unit embedding the bank stores and the loss contrasts."""
        return self.head(self.backbone(x))

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        return [self.embed(self.views(batch)[0])]
