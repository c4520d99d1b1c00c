"""InterCLR (003_*.txt) on three bases: NPIDv2-InterCLR, MoCov2-InterCLR and BYOL-InterCLR.

Loss (Eq. 7): λ·L_intra + (1-λ)·L_inter, λ = 0.75. The intra branch is the base method's own loss;
the inter branch asks the bank (Sect. 4): positive = a random member of the anchor's online
k-means cluster (Eq. 3 labels), negatives = K from other clusters by `strategy` (semi-hard by
default, Sect. 4.2), MarginNCE with cosine margin m = -0.5 on the positive (Eq. 6).
Paper defaults (Sect. 5.1.2):
    npid  τ 0.1, K 16,384, bank ω 0.5, bank stores the query embedding; intra from the same bank
    moco  τ 0.2, queue 65,536, key momentum 0.999; a second bank stores key features with ω = 1
    byol  no negatives: inter = 2 - 2·cos(p, cluster positive) (only the positive is sampled);
          bank stores target projections with ω = 1; target τ_base 0.99
`warmup_epochs`: epochs of intra only before the inter branch starts (clusters of a young encoder
are noise). 10,000 clusters for ImageNet is the bank's setting (`MemoryBank.create(num_clusters=...)`).
"""
from __future__ import annotations

import torch

from losses import byol_loss, info_nce_from_logits, interclr_loss
from models.byol import BYOL
from models.method import BankRequest, Method, single_ids
from models.moco import MoCo
from models.npid import NPID

BASES = ("npid", "moco", "byol")
DEFAULT_TEMPERATURE = {"npid": 0.1, "moco": 0.2, "byol": 0.1}
DEFAULT_BANK_MOMENTUM = {"npid": 0.5, "moco": 1.0, "byol": 1.0}


class InterCLR(Method):
    def __init__(self, backbone: torch.nn.Module, base: str = "npid", num_negatives: int = 16_384,
                 strategy: str = "semi_hard", pool_fraction: float = 0.1, inter_margin: float = -0.5,
                 intra_margin: float = 0.0, weight: float = 0.75, temperature: float | None = None,
                 bank_momentum: float | None = None, warmup_epochs: int = 0, queue_size: int = 65_536,
                 key_momentum: float = 0.999, base_decay: float = 0.99):
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown InterCLR base {base!r} (choose from {', '.join(BASES)})")
        self.base_name = base
        self.temperature = DEFAULT_TEMPERATURE[base] if temperature is None else temperature
        self.bank_momentum = DEFAULT_BANK_MOMENTUM[base] if bank_momentum is None else bank_momentum
        self.num_negatives, self.strategy, self.pool_fraction = num_negatives, strategy, pool_fraction
        self.inter_margin, self.intra_margin, self.weight = inter_margin, intra_margin, weight
        self.warmup_epochs = warmup_epochs
        if base == "npid":
            self.base = NPID(backbone, temperature=self.temperature,
                             num_negatives=num_negatives, bank_momentum=self.bank_momentum)
            self.embed_dim = self.base.embed_dim
        elif base == "moco":
            self.base = MoCo(backbone, temperature=self.temperature, queue_size=queue_size, key_momentum=key_momentum)
            self.embed_dim = self.base.head.out_dim
        else:
            self.base = BYOL(backbone, base_decay=base_decay)
            self.embed_dim = self.base.projector.out_dim
        self.num_views, self.recipe = self.base.num_views, self.base.recipe

    @property
    def backbone(self) -> torch.nn.Module:
        return self.base.backbone

    def bank_requests(self) -> list[BankRequest]:
        return [BankRequest(self.embed_dim, self.bank_momentum, clusters=True)]

    def attach_banks(self, banks) -> "InterCLR":
        super().attach_banks(banks)
        if self.base_name == "npid":
            self.base.banks = self.banks  # the NPID intra branch reads the same bank
        return self

    @property
    def queue(self):
        return getattr(self.base, "queue", None)  # MoCo's; NPID and BYOL bases have none

    @torch.no_grad()
    def prime(self, batch: dict) -> None:
        self.base.prime(batch)

    def decay(self, progress: float) -> float:
        return self.base.decay(progress)

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        self.base.after_optimizer_step(progress)

    def inter_active(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def margin_nce(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        return info_nce_from_logits(pos, neg, self.temperature, self.inter_margin)  # Eq. 6

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        ids = single_ids(batch)
        views = self.views(batch)
        inter_on = self.inter_active(epoch)
        inter = None
        if self.base_name == "npid":
            q = self.base.embed(views[0])
            answer = self.bank().query(q, ids, intra_negatives=self.num_negatives,
                                     inter_negatives=self.num_negatives if inter_on else None,
                                     strategy=self.strategy, temperature=self.temperature,
                                     pool_fraction=self.pool_fraction)
            intra = info_nce_from_logits(answer.intra_pos, answer.intra_neg, self.temperature, self.intra_margin)
            if inter_on:
                inter = self.margin_nce(answer.inter_pos, answer.inter_neg)
            bank_update = q.detach()
        elif self.base_name == "moco":
            q, k = self.base.query(views[0]), self.base.keys(views[1])
            intra = self.base.contrast(q, k, self.intra_margin)
            if inter_on:
                inter = self.margin_nce(*self.bank().inter(q, ids, self.num_negatives, self.strategy,
                                                         self.temperature, self.pool_fraction))
            self.base.queue.push(k)
            bank_update = k
        else:
            p1, p2 = self.base.predict(views[0]), self.base.predict(views[1])
            z1, z2 = self.base.target(views[0]), self.base.target(views[1])
            intra = byol_loss(p1, z2) + byol_loss(p2, z1)
            if inter_on:  # BYOL's regression loss towards the cluster positive, both predictions
                inter = sum((2 - 2 * self.bank().inter(p, ids, 0, self.strategy, self.temperature)[0]).mean()
                            for p in (p1, p2))
            bank_update = z2
        self.bank().update(ids, bank_update)
        if inter is None:
            return {"loss": intra, "intra": intra.detach()}
        return {"loss": interclr_loss(intra, inter, self.weight), "intra": intra.detach(), "inter": inter.detach()}

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        x = self.views(batch)[0]
        if self.base_name == "npid":
            return [self.base.embed(x)]
        if self.base_name == "moco":
            return [self.base.keys(x)]
        return [self.base.target(x)]

