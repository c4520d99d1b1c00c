"""InterCLR (003_*.txt) on three bases: NPIDv2-InterCLR, MoCov2-InterCLR and BYOL-InterCLR.

Loss (Eq. 7): λ·L_intra + (1-λ)·L_inter, λ = 0.75. The intra branch is the base method's own step
(`Method.intra_step`: its loss, the anchors of the inter branch, what the bank stores); InterCLR adds
only the inter branch: the bank's positive = a random member of the anchor's online k-means cluster
(Eq. 3 labels) and K negatives from other clusters by `strategy` (semi-hard by default, Sect. 4.2),
MarginNCE with cosine margin m = -0.5 on the positive (Eq. 6). A base without negatives (BYOL)
regresses its anchors to the positive instead: 2 - 2·cos(p, positive).
Paper defaults (Sect. 5.1.2):
    npid  τ 0.1, K 16,384, bank ω 0.5, bank stores the query embedding; intra from the same bank
    moco  τ 0.2, queue 65,536, key momentum 0.999; a second bank stores key features with ω = 1
    byol  no negatives; bank stores target projections with ω = 1; target τ_base 0.99
Multi-crop (`local_crops`, bases moco and byol): the local views enter the base's intra loss only;
the inter branch's anchors and the bank's features come from the global views.
`warmup_epochs`: epochs of intra only before the inter branch starts (clusters of a young encoder
are noise). 10,000 clusters for ImageNet is the bank's setting (`MemoryBank.create(num_clusters=...)`).
"""
from __future__ import annotations

import torch

from losses import info_nce_from_logits, interclr_loss
from models.byol import BYOL
from models.method import BankRequest, InterQuery, Method, single_ids
from models.moco import MoCo
from models.momentum import BN_SPLITS
from models.npid import NPID

DEFAULT_TEMPERATURE = {"npid": 0.1, "moco": 0.2, "byol": 0.1}
DEFAULT_BANK_MOMENTUM = {"npid": 0.5, "moco": 1.0, "byol": 1.0}
# name → the base method, built from InterCLR's arguments (one table: a new base is one line here)
BASE_BUILDERS = {
    "npid": lambda backbone, a: NPID(backbone, temperature=a["temperature"], num_negatives=a["num_negatives"],
                                     bank_momentum=a["bank_momentum"]),
    "moco": lambda backbone, a: MoCo(backbone, temperature=a["temperature"], queue_size=a["queue_size"],
                                     key_momentum=a["key_momentum"], symmetric=a["symmetric"],
                                     shuffle_bn=a["shuffle_bn"], bn_splits=a["bn_splits"], local_crops=a["local_crops"]),
    "byol": lambda backbone, a: BYOL(backbone, base_decay=a["base_decay"], local_crops=a["local_crops"]),
}
BASES = tuple(BASE_BUILDERS)


class InterCLR(Method):
    def __init__(self, backbone: torch.nn.Module, base: str = "npid", num_negatives: int = 16_384,
                 strategy: str = "semi_hard", pool_fraction: float = 0.1, inter_margin: float = -0.5,
                 intra_margin: float = 0.0, weight: float = 0.75, temperature: float | None = None,
                 bank_momentum: float | None = None, warmup_epochs: int = 0, queue_size: int = 65_536,
                 key_momentum: float = 0.999, base_decay: float = 0.99, shuffle_bn: bool = True,
                 bn_splits: int = BN_SPLITS, symmetric: bool = False, local_crops: int = 0):
        super().__init__()
        if base not in BASE_BUILDERS:
            raise ValueError(f"unknown InterCLR base {base!r} (choose from {', '.join(BASES)})")
        if local_crops and base == "npid":
            raise ValueError("NPID-InterCLR has one view per sample: local views (multi-crop) need base moco or byol")
        self.base_name = base
        self.temperature = DEFAULT_TEMPERATURE[base] if temperature is None else temperature
        self.bank_momentum = DEFAULT_BANK_MOMENTUM[base] if bank_momentum is None else bank_momentum
        self.num_negatives, self.strategy, self.pool_fraction = num_negatives, strategy, pool_fraction
        self.inter_margin, self.intra_margin, self.weight = inter_margin, intra_margin, weight
        self.warmup_epochs = warmup_epochs
        self.base = BASE_BUILDERS[base](backbone, {
            "temperature": self.temperature, "num_negatives": num_negatives, "bank_momentum": self.bank_momentum,
            "queue_size": queue_size, "key_momentum": key_momentum, "base_decay": base_decay,
            "shuffle_bn": shuffle_bn, "bn_splits": bn_splits, "symmetric": symmetric, "local_crops": local_crops})
        self.embed_dim = self.base.embed_dim
        self.num_views, self.recipe, self.local_crops = self.base.num_views, self.base.recipe, local_crops

    @property
    def backbone(self) -> torch.nn.Module:
        return self.base.backbone

    def bank_requests(self) -> list[BankRequest]:
        """One clustered bank; a base with a bank of its own (NPID) reads and writes the same one."""
        return [BankRequest(self.embed_dim, self.bank_momentum, clusters=True)]

    def attach_banks(self, banks) -> "InterCLR":
        super().attach_banks(banks)
        if self.base.bank_requests():
            self.base.banks = self.banks
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
        self.apply_step_effects()

    def inter_active(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def inter_query(self) -> InterQuery:
        return InterQuery(self.num_negatives if self.base.contrastive else 0, self.strategy, self.temperature,
                          self.pool_fraction)

    def inter_loss(self, pos: torch.Tensor, neg: torch.Tensor | None) -> torch.Tensor:
        """MarginNCE (Eq. 6) against the cluster positive and the sampled negatives; without negatives
        (BYOL), BYOL's regression 2 - 2·cos towards the positive."""
        if neg is None:
            return (2 - 2 * pos).mean()
        return info_nce_from_logits(pos, neg, self.temperature, self.inter_margin)

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        ids = single_ids(batch)
        query = self.inter_query() if self.inter_active(epoch) else None
        step = self.base.intra_step(batch, self.bank(), query, self.intra_margin)
        inter = None
        if query is not None:
            pairs = step.inter or [self.bank().inter(anchor, ids, query.num_negatives, query.strategy,
                                                     query.temperature, query.pool_fraction)
                                   for anchor in step.anchors]
            inter = sum(self.inter_loss(pos, neg) for pos, neg in pairs)
        self.write_bank_after_step(self.bank(), ids, step.bank_update)
        if inter is None:
            return {"loss": step.loss, "intra": step.loss.detach()}
        return {"loss": interclr_loss(step.loss, inter, self.weight), "intra": step.loss.detach(),
                "inter": inter.detach()}

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        return self.base.bank_features(batch)
