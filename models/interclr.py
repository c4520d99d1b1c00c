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
Multi-crop (the base's `local_crops`, bases moco and byol): the local views enter the base's intra
loss only; the inter branch's anchors and the bank's features come from the global views.
`warmup_epochs`: epochs of intra only before the inter branch starts (clusters of a young encoder
are noise). 10,000 clusters for ImageNet is the bank's setting (`BankSpec.num_clusters`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from losses import info_nce_from_logits, interclr_loss
from models.byol import BYOLConfig
from models.method import (BANK, CLUSTERS, KEY_ENCODER, LOCAL_CROPS, BankRequest, InterQuery, Method, MethodConfig,
                           single_ids)
from models.moco import MoCoConfig
from models.npid import NPIDConfig

BASE_CONFIGS = {"npid": NPIDConfig, "moco": MoCoConfig, "byol": BYOLConfig}  # a new base is one line here
BASES = tuple(BASE_CONFIGS)
NO_BASE_TEMPERATURE = 0.1  # the inter branch's τ over a base without one (BYOL), Sect. 5.1.2


class InterCLR(Method):
    """InterCLR on a built base method (`Method.intra_step`): `temperature` None takes the base's τ,
    `bank_momentum` None the base's own bank ω (NPID's 0.5), else 1."""

    def __init__(self, base: Method, num_negatives: int = 16_384, strategy: str = "semi_hard",
                 pool_fraction: float = 0.1, inter_margin: float = -0.5, intra_margin: float = 0.0,
                 weight: float = 0.75, temperature: float | None = None, bank_momentum: float | None = None,
                 warmup_epochs: int = 0):
        super().__init__()
        if type(base).intra_step is Method.intra_step:
            raise ValueError(f"{type(base).__name__} is not an InterCLR base (it has no intra_step)")
        self.base = base
        self.temperature = getattr(base, "temperature", NO_BASE_TEMPERATURE) if temperature is None else temperature
        if bank_momentum is None:
            bank_momentum = base.bank_momentum if base.bank_requests() else 1.0
        self.bank_momentum = bank_momentum
        self.num_negatives, self.strategy, self.pool_fraction = num_negatives, strategy, pool_fraction
        self.inter_margin, self.intra_margin, self.weight = inter_margin, intra_margin, weight
        self.warmup_epochs = warmup_epochs
        self.embed_dim = base.embed_dim
        self.num_views, self.recipe, self.local_crops = base.num_views, base.recipe, base.local_crops

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


@dataclass
class InterCLRConfig(MethodConfig):
    """InterCLR's keys (003 Sect. 4–5.1.2); the base's own keys (τ, K, queue, m, symmetric) reach the
    base method, built by its own config."""
    name: str = "interclr"
    base: str = "npid"  # npid | moco | byol
    num_negatives: int = 16_384  # K of the inter branch (and NPID's intra branch)
    strategy: str = "semi_hard"  # the inter negatives: hard | semi_hard | random | semi_easy (Sect. 4.2)
    weight: float = 0.75  # λ of Eq. 7
    inter_margin: float = -0.5  # MarginNCE m of Eq. 6
    warmup_epochs: int = 0  # intra only for these epochs, then k-means on the bank and both branches
    temperature: float | None = None  # None: the base's (NPIDv2 0.1, MoCo-v2 0.2; 0.1 over BYOL)
    queue_size: int = 65_536  # base moco
    key_momentum: float = 0.999  # base moco
    symmetric: bool = False  # base moco
    title = "InterCLR"
    paper = "Delving into Inter-Image Invariance for Unsupervised Visual Representations, arXiv:2008.11702"
    reads = (*KEY_ENCODER, *BANK, *CLUSTERS, *LOCAL_CROPS)

    def base_config(self) -> MethodConfig:
        """The base's config with the keys it shares with this one (τ None: the base's default)."""
        cls = BASE_CONFIGS[self.base]
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(cls)
                  if f.name != "name" and hasattr(self, f.name) and getattr(self, f.name) is not None}
        return cls(**shared)

    def optimizer_defaults(self) -> dict:
        return self.base_config().optimizer_defaults()  # Sect. 5.1.2: each base keeps its own recipe

    def uses_sync_bn(self) -> bool:
        return self.base_config().uses_sync_bn()

    def checks(self, job) -> list[tuple[bool, str]]:
        # `strategy` is the bank's vocabulary (bank.shard.STRATEGIES): runtime.config.validate checks it
        return [
            (self.base in BASES, f"--base must be {', '.join(BASES[:-1])} or {BASES[-1]}, got {self.base!r}"),
            (job.data.local_crops == 0 or self.base != "npid",
             f"data.local_crops={job.data.local_crops}: NPID-InterCLR has one view per sample and no place for "
             f"local views (multi-crop is MoCo-v2's, SimCLR's, BYOL's and their InterCLR forms')"),
        ]

    def build(self, job, num_classes: int | None = None) -> InterCLR:
        return InterCLR(self.base_config().build(job), num_negatives=self.num_negatives, strategy=self.strategy,
                        weight=self.weight, inter_margin=self.inter_margin, temperature=self.temperature,
                        warmup_epochs=self.warmup_epochs)
