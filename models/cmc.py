"""Contrastive Multiview Coding (002_*.txt). One image in Lab (or YDbDr) is split into channel
groups, L | ab by default, each with its own encoder (`SplitEncoder`) and a linear head to a
128-D unit embedding. Views are contrasted

- against memory banks (Sect. 3.2 / E.2: one bank per view, τ 0.07, ω 0.5, 16,384 negatives):
  anchor view i's positive is bank_j[id], its negatives K random rows of bank_j (Eq. 2–4), then
  bank_i takes view i's embedding (Eq. 2 of InterCLR is the same momentum rule); or
- in the batch (`memory_bank=False`) with `losses.cmc_loss`.
With more than two groups (e.g. L | a | b) the pairs follow `paradigm`: "core" (Eq. 7, view 0 is
the core) or "full" (Eq. 8, every pair).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from losses import cmc_loss, info_nce_from_logits
from models.encoders import SplitEncoder
from models.heads import ProjectionHead
from models.method import BANK, BankRequest, Method, MethodConfig, sgd, single_ids


class CMC(Method):
    num_views = 1  # one image; the views are its channel groups

    def __init__(self, backbone: SplitEncoder, memory_bank: bool = True, embed_dim: int = 128, temperature: float = 0.07,
                 num_negatives: int = 16_384, bank_momentum: float = 0.5, paradigm: str = "core",
                 colorspace: str = "lab"):
        super().__init__()
        if not isinstance(backbone, SplitEncoder):
            raise ValueError("CMC needs a SplitEncoder backbone (one encoder per channel group)")
        if paradigm not in ("core", "full"):
            raise ValueError(f"paradigm must be 'core' or 'full', got {paradigm!r}")
        self.recipe = colorspace
        self.backbone = backbone
        self.heads = torch.nn.ModuleList(ProjectionHead(d, embed_dim, hidden_dim=None) for d in backbone.view_dims)
        self.embed_dim, self.temperature, self.num_negatives = embed_dim, temperature, num_negatives
        self.bank_momentum, self.paradigm = bank_momentum, paradigm
        self.memory_bank = memory_bank

    def bank_requests(self) -> list[BankRequest]:
        if not self.memory_bank:
            return []
        return [BankRequest(self.embed_dim, self.bank_momentum, clusters=False) for _ in self.backbone.groups]

    def pairs(self) -> list[tuple[int, int]]:
        n = len(self.backbone.groups)
        return [(0, j) for j in range(1, n)] if self.paradigm == "core" else list(itertools.combinations(range(n), 2))

    def embed_views(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(h) for head, h in zip(self.heads, self.backbone.views(x))]

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        z = self.embed_views(self.views(batch)[0])
        if not self.memory_bank:
            loss = cmc_loss(z, self.temperature, self.paradigm)
            return {"loss": loss, "cmc": loss.detach()}
        ids = single_ids(batch)
        loss = z[0].new_zeros(())
        for i, j in self.pairs():  # L(V_i, V_j) = L^{V_i,V_j} + L^{V_j,V_i} (Eq. 4)
            for anchor, other in ((i, j), (j, i)):
                pos, neg = self.bank(other).intra(z[anchor], ids, self.num_negatives, self.temperature)
                loss = loss + info_nce_from_logits(pos, neg, self.temperature)
        for bank, view in zip(self.banks, z):
            self.write_bank_after_step(bank, ids, view)
        return {"loss": loss, "cmc": loss.detach()}

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        return self.embed_views(self.views(batch)[0])


@dataclass
class CMCConfig(MethodConfig):
    """CMC's keys (002 Sect. 3.2 / App. E.2: τ 0.07, 16,384 bank negatives)."""
    name: str = "cmc"
    temperature: float = 0.07
    num_negatives: int = 16_384
    paradigm: str = "core"  # more than two channel groups: core (Eq. 7) or full (Eq. 8)
    colorspace: str = "lab"  # lab | ydbdr
    title = "CMC"
    paper = "Contrastive Multiview Coding, arXiv:1906.05849"
    reads = BANK
    optimizer = sgd(0.03, 1e-4)  # 002 App. E.2: SGD, lr 0.03, momentum 0.9, wd 1e-4, cosine for ResNets

    def build(self, job, num_classes: int | None = None) -> CMC:
        backbone = SplitEncoder(lambda channels: self.backbone(job, channels), (1, 2))
        return CMC(backbone, temperature=self.temperature, num_negatives=self.num_negatives, paradigm=self.paradigm,
                   colorspace=self.colorspace)
