"""NPIDv2 (InterCLR Sect. 5.1.1–5.1.2): one view, encoder + 2-layer MLP head to a 128-D unit
embedding, InfoNCE (Eq. 1) against its own memory-bank feature and K = 16,384 random bank
negatives (τ 0.1), then the Eq. 2 momentum update (ω 0.5) of the bank rows of the batch.
NPIDv2 is InterCLR with λ = 1; `InterCLR(base="npid")` adds the inter branch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from losses import info_nce_from_logits
from models.heads import ProjectionHead
from models.method import BANK, BankRequest, InterQuery, IntraStep, Method, MethodConfig, sgd, single_ids


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

    def intra_step(self, batch: dict, bank=None, inter: InterQuery | None = None, margin: float = 0.0) -> IntraStep:
        """Eq. 1 against the bank; with `inter`, the inter branch's positive and negatives come from
        the same bank query (one round trip per shard: both branches share one similarity pass)."""
        ids = single_ids(batch)
        bank = self.bank() if bank is None else bank
        q = self.embed(self.views(batch)[0])
        answer = bank.query(q, ids, intra_negatives=self.num_negatives,
                            inter_negatives=None if inter is None else inter.num_negatives,
                            strategy=inter.strategy if inter else "random", temperature=self.temperature,
                            pool_fraction=inter.pool_fraction if inter else 0.1)
        loss = info_nce_from_logits(answer.intra_pos, answer.intra_neg, self.temperature, margin)
        pairs = None if inter is None else [(answer.inter_pos, answer.inter_neg)]
        return IntraStep(loss, [q], q.detach(), pairs)

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        step = self.intra_step(batch)
        self.write_bank_after_step(self.bank(), single_ids(batch), step.bank_update)
        return {"loss": step.loss, "intra": step.loss.detach()}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-D unit embedding the bank stores and the loss contrasts."""
        return self.head(self.backbone(x))

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        return [self.embed(self.views(batch)[0])]


@dataclass
class NPIDConfig(MethodConfig):
    """NPIDv2's keys (003 Sect. 5.1.1–5.1.2: τ 0.1, K 16,384)."""
    name: str = "npid"
    temperature: float = 0.1
    num_negatives: int = 16_384  # random bank rows per query
    title = "NPID"
    paper = "Unsupervised Feature Learning via Non-Parametric Instance Discrimination, arXiv:1805.01978"
    reads = BANK
    optimizer = sgd(0.03, 1e-4)  # 003 Sect. 5.1.2: SGD, momentum 0.9, wd 1e-4, lr 0.03 at batch 256, cosine

    def build(self, job, num_classes: int | None = None) -> NPID:
        return NPID(self.backbone(job), temperature=self.temperature, num_negatives=self.num_negatives)
