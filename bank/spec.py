"""What a memory bank is, as one value: `BankSpec` (its size, sharding, k-means and update rule).
`MemoryBank.create` starts shards from it, each `BankShard` is built from it, and a snapshot's
bank.json holds it."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("viewbank.bank")

# mmselfsup 0.x InterCLR: memory_bank min_cluster=20 (configs/selfsup/_base_/models/interclr-moco.py),
# deal_with_small_clusters_interval=1, i.e. every iteration (_base_/datasets/imagenet_interclr-moco.py).
MIN_CLUSTER = 20


@dataclass(frozen=True)
class BankSpec:
    """A bank of `num_samples` rows of `dim` features on `num_shards` shards (shard s owns the ids
    ≡ s mod num_shards) with `num_clusters` k-means clusters.

    momentum      ω of InterCLR Eq. 2: v̂ ← (1 - ω)·v̂ + ω·v (1 replaces, NPIDv2's is 0.5)
    seed          the client's negative sampling, k-means seeding and upkeep splits
    dtype         the features' storage: float32 or float16
    snapshot_root where `save()` writes by default and where a restarted shard restores from
    max_restarts  Ray restarts of a dead shard actor (-1: always)
    threads_per_shard   each shard's torch threads (None: Ray's one for a num_cpus=0 actor)
    min_cluster   after every update, clusters with fewer members are dissolved and every empty
                  one is refilled by splitting the largest (mmselfsup InterCLR's 20); 0: no upkeep
    relabel       False: offline pseudo-labels (003 Observation 1): updates write features only,
                  labels change only when k-means runs again, no upkeep
    """
    num_samples: int
    dim: int
    num_shards: int = 1
    num_clusters: int = 10_000
    momentum: float = 0.5
    seed: int = 0
    dtype: str = "float32"
    snapshot_root: str | None = None
    max_restarts: int = -1
    threads_per_shard: int | None = None
    min_cluster: int = MIN_CLUSTER
    relabel: bool = True

    def __post_init__(self):
        if self.num_samples <= 0 or self.dim <= 0 or self.num_shards <= 0 or self.num_clusters <= 0:
            raise ValueError("num_samples, dim, num_shards and num_clusters must be positive")
        if self.num_clusters > self.num_samples:
            raise ValueError(f"num_clusters ({self.num_clusters}) exceeds num_samples ({self.num_samples})")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum ω must be in (0, 1] (Eq. 2: v̂ ← (1-ω)v̂ + ωv), got {self.momentum}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if (isinstance(self.min_cluster, bool) or not isinstance(self.min_cluster, (int, np.integer))
                or self.min_cluster < 0):
            raise ValueError(f"min_cluster must be an int >= 0 (0 disables cluster upkeep), got {self.min_cluster!r}")
        object.__setattr__(self, "min_cluster", int(self.min_cluster))
        object.__setattr__(self, "relabel", bool(self.relabel))

    def warn_if_upkeep_thrashes(self) -> None:
        if self.min_cluster * self.num_clusters > self.num_samples:
            log.warning("min_cluster %d × %d clusters exceeds the %d samples: cluster upkeep will dissolve and "
                        "split clusters at every update (lower min_cluster, or 0 to disable)",
                        self.min_cluster, self.num_clusters, self.num_samples)

    def rows(self, shard: int) -> int:
        """Rows shard `shard` owns."""
        return len(range(shard, self.num_samples, self.num_shards))

    def shard_labels(self, true_labels: np.ndarray | None, shard: int) -> np.ndarray | None:
        """The entries of `true_labels` [N] (for NMI) of the rows `shard` owns."""
        if true_labels is None:
            return None
        if len(true_labels) != self.num_samples:
            raise ValueError(f"true_labels has {len(true_labels)} entries for {self.num_samples} samples")
        return np.asarray(true_labels)[shard::self.num_shards]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, meta: dict) -> "BankSpec":
        """A bank.json's spec (the keys it holds of this class; missing ones at their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in meta.items() if key in names})
