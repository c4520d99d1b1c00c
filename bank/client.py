"""Driver-side client of the sharded memory bank. Picklable: pass it into Ray Train workers.

    bank = MemoryBank.create(num_samples=N, dim=128, num_shards=2, num_clusters=10_000, momentum=0.5)
    bank.set_features(ids, feats)                 # initial features (e.g. one pass of the encoder)
    bank.init_clusters(iters=10)                  # global k-means across the shards
    pos, neg = bank.intra(q, ids, 16384, 0.1)     # NPID branch: bank feature + K random negatives
    pos, neg = bank.inter(q, ids, 16384, "semi_hard", 0.1)   # InterCLR branch
    loss = interclr_loss(info_nce_from_logits(pos, neg, 0.1),
                         info_nce_from_logits(pos2, neg2, 0.1, margin=-0.5))
    bank.update(ids, feats)                       # Eq. 2, relabel (argmax v·c), running-mean centroids,
                                                  # then cluster upkeep when some cluster is small

`pos` [B] is the cosine of each (normalised) query with its positive; `neg` [B, 1] folds all K
negatives into one value whose gradient is exact (bank.autograd). Ids are global sample ids
0..N-1; shard s owns ids ≡ s (mod S).

Momentum convention (InterCLR Eq. 2): v̂ ← (1 - ω)·v̂ + ω·v with ω = `momentum`; ω = 1 replaces
the stored feature (MoCo-InterCLR), ω = 0.5 is NPIDv2's.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from bank.autograd import combine_shards, folded_negative_similarity
from bank.kmeans import kmeans_plus_plus, normalized_mutual_info, split_empty_clusters
from bank.shard import STRATEGIES, BankShard, BankStateError, ShardRestartedError

log = logging.getLogger("viewbank.bank")

# mmselfsup 0.x InterCLR: memory_bank min_cluster=20 (configs/selfsup/_base_/models/interclr-moco.py),
# deal_with_small_clusters_interval=1, i.e. every iteration (_base_/datasets/imagenet_interclr-moco.py).
MIN_CLUSTER = 20
TWO_MEANS_ITERS = 20  # the reference splits with sklearn KMeans(n_clusters=2, max_iter=20)


@dataclass
class BankAnswer:
    """What `MemoryBank.query` returns; a branch not asked for stays None."""
    intra_pos: torch.Tensor | None = None
    intra_neg: torch.Tensor | None = None
    inter_pos: torch.Tensor | None = None
    inter_neg: torch.Tensor | None = None
    intra_positive_ids: np.ndarray | None = None
    inter_positive_ids: np.ndarray | None = None
    intra_negative_ids: list | None = None
    inter_negative_ids: list | None = None


class MemoryBank:
    def __init__(self, shards: list, config: dict):
        self.shards = shards
        self.config = config
        self.num_samples, self.dim = config["num_samples"], config["dim"]
        self.num_shards, self.num_clusters = config["num_shards"], config["num_clusters"]
        self.momentum = config["momentum"]
        self.rows = np.array([len(range(s, self.num_samples, self.num_shards)) for s in range(self.num_shards)])
        self.min_cluster = config.get("min_cluster", MIN_CLUSTER)
        self.relabel = config.get("relabel", True)  # False: offline labels, fixed between init_clusters runs
        self._rng = np.random.default_rng(config["seed"])
        self._upkeep_rng = np.random.default_rng([config["seed"], 1])  # 2-means seeds of online splits
        self.traffic_bytes = 0  # numpy payload sent to and received from the shards
        self.wait_seconds = 0.0  # time the caller spent blocked on the shards
        self.round_trips = 0  # blocking fan-outs (one ray.get each)
        # an update issued with block=False: its shards' apply_deltas results (shard 0's is the upkeep
        # cue), collected by the next blocking call in the same ray.get
        self._pending: list = []
        self._in_upkeep = False
        self.upkeep = {"dissolved": 0, "refilled": 0, "random_splits": 0, "round_trips": 0, "runs": 0}  # this client's

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def create(cls, num_samples: int, dim: int, num_shards: int = 1, num_clusters: int = 10_000,
               momentum: float = 0.5, seed: int = 0, dtype: str = "float32", snapshot_root: str | None = None,
               true_labels: np.ndarray | None = None, actor_options: dict | list[dict] | None = None,
               max_restarts: int = -1, threads_per_shard: int | None = None,
               min_cluster: int = MIN_CLUSTER, relabel: bool = True) -> "MemoryBank":
        """Start `num_shards` bank actors (num_cpus=0 by default; `actor_options` per shard or for
        all, e.g. {"num_gpus": 1} or a placement-group scheduling strategy); `threads_per_shard` sets
        each shard's torch threads (Ray gives num_cpus=0 actors one). `snapshot_root` is where
        `save()` writes by default and where a restarted shard restores from. `true_labels` [N]
        (e.g. `Manifest.labels()`) enables NMI in `stats()`. `min_cluster`: after every `update`,
        clusters with fewer members are dissolved and every empty cluster is refilled by splitting
        the largest (mmselfsup InterCLR's default, 20); 0 disables this upkeep. `relabel=False`: offline
        pseudo-labels (003 Observation 1): `update` writes features only, labels change only when
        `init_clusters` runs again (the trainer reruns it every epoch), and there is no upkeep."""
        config, shard_args = cls.plan(num_samples, dim, num_shards, num_clusters, momentum, seed, dtype,
                                      snapshot_root, true_labels, max_restarts, threads_per_shard, min_cluster, relabel)
        options = actor_options if isinstance(actor_options, list) else [actor_options or {}] * num_shards
        remote = ray.remote(BankShard)
        shards = [remote.options(**{"num_cpus": 0, "max_restarts": max_restarts, "max_task_retries": 0,
                                    **options[s]}).remote(*shard_args[s]) for s in range(num_shards)]
        return cls.connect(shards, config)

    @classmethod
    def plan(cls, num_samples: int, dim: int, num_shards: int = 1, num_clusters: int = 10_000,
             momentum: float = 0.5, seed: int = 0, dtype: str = "float32", snapshot_root: str | None = None,
             true_labels: np.ndarray | None = None, max_restarts: int = -1, threads_per_shard: int | None = None,
             min_cluster: int = MIN_CLUSTER, relabel: bool = True) -> tuple[dict, list[tuple]]:
        """The checked request of `create`: the bank's config and each shard's `BankShard` arguments."""
        if num_samples <= 0 or dim <= 0 or num_shards <= 0 or num_clusters <= 0:
            raise ValueError("num_samples, dim, num_shards and num_clusters must be positive")
        if num_clusters > num_samples:
            raise ValueError(f"num_clusters ({num_clusters}) exceeds num_samples ({num_samples})")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum ω must be in (0, 1] (Eq. 2: v̂ ← (1-ω)v̂ + ωv), got {momentum}")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        if isinstance(min_cluster, bool) or not isinstance(min_cluster, (int, np.integer)) or min_cluster < 0:
            raise ValueError(f"min_cluster must be an int >= 0 (0 disables cluster upkeep), got {min_cluster!r}")
        if true_labels is not None and len(true_labels) != num_samples:
            raise ValueError(f"true_labels has {len(true_labels)} entries for {num_samples} samples")
        if min_cluster * num_clusters > num_samples:
            log.warning("min_cluster %d × %d clusters exceeds the %d samples: cluster upkeep will dissolve and "
                        "split clusters at every update (lower min_cluster, or 0 to disable)",
                        min_cluster, num_clusters, num_samples)
        config = {"num_samples": num_samples, "dim": dim, "num_shards": num_shards, "num_clusters": num_clusters,
                  "momentum": momentum, "seed": seed, "dtype": dtype, "snapshot_root": snapshot_root,
                  "max_restarts": max_restarts, "threads_per_shard": threads_per_shard,
                  "min_cluster": int(min_cluster), "relabel": bool(relabel)}
        labels = [None if true_labels is None else np.asarray(true_labels)[s::num_shards] for s in range(num_shards)]
        return config, [(s, num_shards, num_samples, dim, num_clusters, dtype, "auto", snapshot_root, labels[s],
                         threads_per_shard) for s in range(num_shards)]

    @classmethod
    def connect(cls, shards: list, config: dict) -> "MemoryBank":
        """The client of `shards` (BankShard actors built from `plan`'s arguments), once each answers."""
        bank = cls(shards, config)
        ray.get([shard.ping.remote() for shard in shards])
        return bank

    @classmethod
    def load(cls, directory: str, snapshot_root: str | None = None, true_labels: np.ndarray | None = None,
             actor_options: dict | list[dict] | None = None) -> "MemoryBank":
        """Recreate a bank from `save(directory)`: features, labels, centroids and step."""
        meta_path = Path(directory) / "bank.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: not a bank snapshot")
        meta = json.loads(meta_path.read_text())
        bank = cls.create(meta["num_samples"], meta["dim"], meta["num_shards"], meta["num_clusters"],
                          meta["momentum"], meta["seed"], meta["dtype"],
                          snapshot_root or meta.get("snapshot_root"), true_labels, actor_options,
                          meta.get("max_restarts", -1), meta.get("threads_per_shard"),
                          min_cluster=meta.get("min_cluster", MIN_CLUSTER), relabel=meta.get("relabel", True))
        bank.restore(str(directory))
        return bank

    def shutdown(self) -> None:
        for shard in self.shards:
            ray.kill(shard, no_restart=True)

    # --- input checks ----------------------------------------------------------------------------

    def _ids(self, ids, allow_duplicates: bool = True) -> np.ndarray:
        ids = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            bad = ids[(ids < 0) | (ids >= self.num_samples)][0]
            raise ValueError(f"id {bad} out of range for a bank of {self.num_samples} samples (0..{self.num_samples - 1})")
        if not allow_duplicates and len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one update: each sample may be updated once per call")
        return ids

    def _feats(self, feats, count: int) -> np.ndarray:
        feats = torch.as_tensor(feats).detach().float().cpu().numpy()
        if feats.ndim != 2 or feats.shape != (count, self.dim):
            raise ValueError(f"features must be [{count}, {self.dim}], got {list(feats.shape)}")
        if not np.isfinite(feats).all():
            raise ValueError("features contain NaN or inf; the bank was left unchanged")
        return feats

    # --- remote calls with recovery --------------------------------------------------------------

    def _owners(self, ids: np.ndarray) -> list[np.ndarray]:
        """Positions in `ids` owned by each shard."""
        shard_of = ids % self.num_shards
        return [np.flatnonzero(shard_of == s) for s in range(self.num_shards)]

    def _call(self, calls, retry: bool = True):
        """calls: list of (shard_index, method, args, kwargs). One ray.get for the fan-out, which also
        completes a pending asynchronous update (`update(block=False)`); when that update left a
        cluster below `min_cluster`, upkeep runs after this call's answers are in. If a shard died
        or restarted, restore every shard from the last snapshot and retry once (a pending update is
        then lost with the rest of the state since the snapshot). With `retry=False` (a snapshot being
        written) the shards are restored the same way, then BankStateError: a retry would write the
        restored, older state under the new snapshot's name."""
        for attempt in (0, 1):
            start = time.perf_counter()
            refs = [getattr(self.shards[s], m).remote(*a, **k) for s, m, a, k in calls]
            pending, self._pending = self._pending, []
            try:
                answers = ray.get(pending + refs)
            except (ray.exceptions.RayActorError, ShardRestartedError) as exc:
                if attempt == 1:
                    raise
                log.warning("bank shard failure (%s); restoring all shards from the last snapshot",
                            str(exc).splitlines()[0])
                self._recover()
                if not retry:
                    raise BankStateError(f"a bank shard failed during {calls[0][1] if calls else 'a call'} "
                                         f"({str(exc).splitlines()[0]}); every shard was restored from the "
                                         "last snapshot, which is intact") from None
                continue
            cue, results = (answers[0] if pending else None), answers[len(pending):]
            self.round_trips += 1
            self.wait_seconds += time.perf_counter() - start
            self.traffic_bytes += _nbytes([a for _, _, a, _ in calls]) + _nbytes(results) + _nbytes(cue)
            if cue is not None and not self._in_upkeep:
                self._upkeep(cue)
            return results

    def settle(self) -> None:
        """Wait for a pending asynchronous update (and its upkeep); a no-op without one."""
        if self._pending:
            self._call([])

    def _recover(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.get([s.ping.remote() for s in self.shards], timeout=30)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        root = self.config.get("snapshot_root")
        pointer = Path(root) / "LATEST" if root else None
        if pointer is None or not pointer.exists():
            raise BankStateError("a bank shard was restarted and no snapshot exists to restore it from "
                                 "(create the bank with snapshot_root and call save() periodically)")
        self.restore(str(Path(root) / pointer.read_text().strip()))

    def restore(self, directory: str) -> None:
        """Load every shard from a `save()` snapshot (same number of shards and samples)."""
        if not (Path(directory) / "bank.json").exists():  # written after every shard's file
            raise BankStateError(f"{directory} is not a complete bank snapshot (no bank.json)")
        meta = json.loads((Path(directory) / "bank.json").read_text())
        if (meta["num_samples"], meta["dim"], meta["num_shards"]) != (self.num_samples, self.dim, self.num_shards):
            raise BankStateError(f"snapshot {directory} holds {meta['num_samples']}×{meta['dim']} on "
                                 f"{meta['num_shards']} shards; this bank is {self.num_samples}×{self.dim} on "
                                 f"{self.num_shards}")
        partials = ray.get([s.restore.remote(directory) for s in self.shards])
        centroids = torch.load(Path(directory) / "shard-0000.pt")["centroids"].numpy()
        self._broadcast_replicas(partials, centroids)

    def _broadcast_replicas(self, partials: list[dict], centroids: np.ndarray) -> None:
        sums = np.sum([p["sums"] for p in partials], axis=0)
        counts = np.stack([p["counts"] for p in partials])
        total = counts.sum(axis=0)
        alive = total > 0
        centroids = centroids.copy()
        centroids[alive] = (sums[alive] / total[alive, None]).astype(np.float32)
        ray.get([s.set_replicas.remote(sums, counts, centroids) for s in self.shards])

    # --- reads and writes ------------------------------------------------------------------------

    def _from_owners(self, ids: np.ndarray, method: str) -> list[tuple[np.ndarray, object]]:
        """Call `method` on each shard with the ids it owns: [(positions in ids, its answer)]."""
        owners = self._owners(ids)
        calls = [(s, method, (ids[pos],), {}) for s, pos in enumerate(owners) if len(pos)]
        return [(owners[s], part) for (s, _, _, _), part in zip(calls, self._call(calls))]

    def _gather(self, ids: np.ndarray, method: str, width: int | None, dtype) -> np.ndarray:
        out = np.zeros((len(ids), width) if width else len(ids), dtype=dtype)
        for positions, part in self._from_owners(ids, method):
            out[positions] = part
        return out

    def get(self, ids) -> torch.Tensor:
        """Stored (normalised) features [B, D] float32."""
        return torch.from_numpy(self._gather(self._ids(ids), "get", self.dim, np.float32))

    def labels(self, ids) -> torch.Tensor:
        """Pseudo-labels [B] int64 (-1 before `init_clusters`)."""
        return torch.from_numpy(self._gather(self._ids(ids), "get_labels", None, np.int64))

    def set_features(self, ids, feats) -> None:
        """Write features as they are (normalised, no momentum, no relabel): initial features."""
        ids = self._ids(ids, allow_duplicates=False)
        feats = self._feats(feats, len(ids))
        owners = self._owners(ids)
        self._call([(s, "set_features", (ids[pos], feats[pos]), {}) for s, pos in enumerate(owners) if len(pos)])

    def update(self, ids, feats, block: bool = True) -> None:
        """Eq. 2 momentum update and re-normalisation, relabel of each updated row to its most
        similar centroid (Sect. 4.1), and the running means of the centroids updated with every
        member change; then cluster upkeep (`_upkeep`) when some cluster has fewer than
        `min_cluster` members. With offline labels (`relabel=False`): features only, no deltas, no
        upkeep.

        The shards exchange the deltas themselves: each shard's `apply_deltas` takes every shard's
        `update` result as an argument, so Ray passes them shard to shard and the client waits once.
        `block=False` (the trainer, after the optimiser step) does not wait at all: the next call
        of this client completes the update in its own ray.get. Ray runs a caller's tasks on an
        actor in submission order, so every later read through this client sees the update; another
        Ray Train rank's client may read a row up to one of its steps before the update lands."""
        ids = self._ids(ids, allow_duplicates=False)
        feats = self._feats(feats, len(ids))
        owners = self._owners(ids)
        self.settle()  # an earlier asynchronous update and its upkeep come first
        deltas = [self.shards[s].update.remote(ids[pos], feats[pos], self.momentum, self.relabel)
                  for s, pos in enumerate(owners)]
        self.traffic_bytes += _nbytes([ids, feats])
        if self.relabel:
            # Shard 0's replica tells whether upkeep is due. Not a client-side tally of the deltas: every
            # Ray Train rank holds its own copy of this client, and only rank 0 ran init_clusters.
            self._pending = [self.shards[s].apply_deltas_of.remote(*deltas, report_below=self.min_cluster * (s == 0))
                             for s in range(self.num_shards)]
        else:
            self._pending = deltas  # None from each shard: no cue
        if block:
            self.settle()

    def _broadcast_deltas(self, deltas: list[dict], report_below: int = 0) -> np.ndarray | None:
        """Apply every shard's deltas on every shard (one fan-out); shard 0 reports the global cluster
        sizes when one is below `report_below` (see BankShard.apply_deltas)."""
        return self._call([(s, "apply_deltas", (deltas,), {"report_below": report_below if s == 0 else 0})
                           for s in range(self.num_shards)])[0]

    # --- cluster upkeep --------------------------------------------------------------------------

    def _upkeep(self, sizes: np.ndarray) -> None:
        """mmselfsup 0.x InterCLRMemory.deal_with_small_clusters (interclr_memory.py; ODCMemory's is
        the same), across shards: the members of every cluster with fewer than `min_cluster` move
        to the most similar remaining centroid (argmax v·c) on the shards that own them; then every
        empty cluster is refilled by splitting the largest (`_refill`); one broadcast of all the
        deltas leaves every replica equal to the members' running means. Differences: the centroids
        are exact running means throughout (the reference recomputes them every 10 iterations and
        after each split), and when every cluster is small none is dissolved (the reference would
        have no centroid left to move to)."""
        trips = self.round_trips
        self._in_upkeep = True
        try:
            self._upkeep_once(np.array(sizes, dtype=np.int64))
        finally:
            self._in_upkeep = False
        self.upkeep["runs"] += 1
        self.upkeep["round_trips"] += self.round_trips - trips

    def _upkeep_once(self, sizes: np.ndarray) -> None:
        small = np.flatnonzero(sizes < self.min_cluster)
        deltas = []
        occupied = small[sizes[small] > 0]
        if len(small) < self.num_clusters and len(occupied):
            deltas += self._call([(s, "dissolve_clusters", (occupied,), {}) for s in range(self.num_shards)])
            _add_counts(sizes, deltas)
            self.upkeep["dissolved"] += len(occupied)
        split_deltas, refilled = self._refill(np.flatnonzero(sizes == 0), sizes, self._upkeep_rng)
        deltas += split_deltas
        if deltas:
            self._broadcast_deltas(deltas)
        self.upkeep["refilled"] += refilled

    def _refill(self, empty: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> tuple[list, int]:
        """_redirect_empty_clusters: for each empty cluster in index order, split the currently
        largest (ties: lowest index) and give it one half. Updates `sizes` in place; returns the
        deltas (not yet broadcast) and how many clusters were refilled."""
        deltas, refilled = [], 0
        for empty_cluster in empty:
            largest = int(np.argmax(sizes))
            if sizes[largest] < 2:
                log.warning("cluster upkeep: no cluster has 2 members left to split for cluster %d", empty_cluster)
                break
            split = self._split(largest, int(empty_cluster), rng)
            _add_counts(sizes, split)
            deltas += split
            refilled += 1
        return deltas, refilled

    def _split(self, cluster: int, new_cluster: int, rng: np.random.Generator) -> list[dict]:
        """_partition_max_cluster across shards: 2-means on the members of `cluster` (k-means++
        seeds drawn near the data, Lloyd steps from per-shard per-side sums and counts, at most
        TWO_MEANS_ITERS, Euclidean as sklearn's KMeans), then side 1 moves to `new_cluster`. When
        2-means degenerates (identical members, an empty side) a random half moves, as in the
        reference; only then are the member ids of this one cluster shipped. The seeds come from
        `rng` and global ids, so the split does not depend on the shard layout. The reference runs
        sklearn with n_init restarts and greedy k-means++; this is one plain k-means++ run."""
        everyone = range(self.num_shards)
        seeds = rng.integers(2**62, size=2)
        first = self._split_seed(cluster, int(seeds[0]), None)
        second = self._split_seed(cluster, int(seeds[1]), first)
        centers = None if second is None else np.stack([first, second])
        for iteration in range(TWO_MEANS_ITERS if centers is not None else 0):
            parts = self._call([(s, "two_means_step", (cluster, centers), {}) for s in everyone])
            counts = np.sum([p["counts"] for p in parts], axis=0)
            if (counts == 0).any():
                centers = None
                break
            means = np.sum([p["sums"] for p in parts], axis=0) / counts[:, None]
            if np.array_equal(means, centers) or iteration == TWO_MEANS_ITERS - 1:
                break  # split by the centers just stepped with: both sides have members
            centers = means
        if centers is not None:
            return self._call([(s, "split_cluster", (cluster, new_cluster), {"centers": centers}) for s in everyone])
        log.warning("cluster upkeep: 2-means split of cluster %d degenerated; moving a random half", cluster)
        self.upkeep["random_splits"] += 1
        members = np.sort(np.concatenate(self._call([(s, "cluster_member_ids", (cluster,), {}) for s in everyone])))
        half = rng.choice(members, len(members) // 2, replace=False)
        return self._call([(s, "split_cluster", (cluster, new_cluster), {"ids": half[half % self.num_shards == s]})
                           for s in everyone])

    def _split_seed(self, cluster: int, seed: int, center: np.ndarray | None) -> np.ndarray | None:
        """The member drawn ∝ 1 (center None) or ∝ ‖v - center‖² over the whole cluster: the
        smallest of the shards' keys (ties: lowest global id). None when every weight is 0."""
        parts = self._call([(s, "split_seed", (cluster, seed, center), {}) for s in range(self.num_shards)])
        best = min(parts, key=lambda p: (p["key"], p["id"] if p["id"] >= 0 else np.inf))
        return None if not np.isfinite(best["key"]) else np.asarray(best["feat"], dtype=np.float64)

    # --- queries ---------------------------------------------------------------------------------

    def _anchors(self, ids: np.ndarray) -> dict:
        info = {"feats": np.zeros((len(ids), self.dim), np.float32), "labels": np.zeros(len(ids), np.int64),
                "cluster_counts": np.zeros((len(ids), self.num_shards), np.int64)}
        for positions, part in self._from_owners(ids, "anchor_info"):
            for key in info:
                info[key][positions] = part[key]
        return info

    def _shares(self, ids: np.ndarray, labels: np.ndarray | None, cluster_counts: np.ndarray, k: int,
                strategy: str, pool_fraction: float, rng: np.random.Generator) -> np.ndarray:
        """[S, B] negatives each shard draws for each query. Random and pool strategies draw from the
        union of the shards' candidate sets uniformly (multinomial ∝ candidates); `hard` splits K
        ∝ candidates, each shard returning its nearest."""
        allowed = np.broadcast_to(self.rows, (len(ids), self.num_shards)).astype(np.float64).copy()
        if labels is not None:
            allowed -= cluster_counts
        else:
            allowed[np.arange(len(ids)), ids % self.num_shards] -= 1  # the anchor itself
        if strategy in ("semi_hard", "semi_easy") and labels is not None:
            candidates = np.minimum(np.ceil(pool_fraction * allowed), allowed)
        else:
            candidates = allowed
        totals = candidates.sum(axis=1, keepdims=True)
        if (totals == 0).any():
            raise BankStateError("a query has no allowed negatives (its cluster holds every sample)")
        p = candidates / totals
        if strategy == "hard" and labels is not None:
            exact = p * k
            shares = np.floor(exact).astype(np.int64)
            remainder = k - shares.sum(axis=1)
            order = np.argsort(-(exact - shares), axis=1)
            for i, r in enumerate(remainder):
                shares[i, order[i, :r]] += 1
        else:
            shares = rng.multinomial(k, p)
        return shares.T

    def query(self, query: torch.Tensor, ids, intra_negatives: int = 0, inter_negatives: int | None = None,
              strategy: str = "semi_hard", temperature: float = 0.1, pool_fraction: float = 0.1,
              seed: int | None = None, return_ids: bool = False) -> "BankAnswer":
        """Both InterCLR branches in one round trip per shard (they share one similarity pass).

        intra (NPID, Eq. 1): positive = the bank feature of each anchor, `intra_negatives` rows
        drawn uniformly from the rest of the bank. inter (Sect. 4.2; skipped when
        `inter_negatives` is None): positive = a random other member of the anchor's cluster (its
        own bank feature when it is alone), `inter_negatives` from other clusters by `strategy`;
        0 gives only the positive (BYOL-InterCLR). Positives are cosines [B] with the normalised
        query; negatives come folded into [B, 1] with exact gradients (bank.autograd), ready for
        `losses.info_nce_from_logits`.
        """
        ids = self._ids(ids)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
        if not 0.0 < pool_fraction <= 1.0:
            raise ValueError(f"pool_fraction must be in (0, 1], got {pool_fraction}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if query.dim() != 2 or query.shape != (len(ids), self.dim):
            raise ValueError(f"query must be [{len(ids)}, {self.dim}], got {list(query.shape)}")
        seed = int(self._rng.integers(2**31)) if seed is None else seed
        rng = np.random.default_rng(seed)
        runs = self.upkeep["runs"]
        anchors = self._anchors(ids)  # also completes a pending update
        if self.upkeep["runs"] != runs:  # that update's upkeep ran after these answers: read them again
            anchors = self._anchors(ids)
        inter = inter_negatives is not None
        if inter and (anchors["labels"] < 0).any():
            raise BankStateError("inter queries need pseudo-labels: call init_clusters() first")
        requests = []
        if intra_negatives:
            shares = self._shares(ids, None, anchors["cluster_counts"], intra_negatives, "random", pool_fraction, rng)
            requests.append(("intra", shares, np.full(len(ids), -1), "random", False))
        if inter:
            shares = self._shares(ids, anchors["labels"], anchors["cluster_counts"], inter_negatives, strategy,
                                  pool_fraction, rng)
            requests.append(("inter", shares, anchors["labels"], strategy, True))
        # float32 at the bank's boundary: under autocast the query arrives in bf16 / fp16, and the folded
        # negative (τ·logsumexp) must not round to half precision
        q = torch.nn.functional.normalize(query.float(), dim=1)
        q_np = q.detach().cpu().numpy()
        calls = [(s, "score", (q_np, ids, [
            {"anchor_labels": labels, "shares": shares[s], "strategy": strat, "pool_fraction": pool_fraction,
             "want_positive": positive} for _, shares, labels, strat, positive in requests], temperature, seed),
            {"return_ids": return_ids}) for s in range(self.num_shards)]
        answers = self._call(calls) if requests else []
        answer = BankAnswer()
        for index, (name, shares, _, _, _) in enumerate(requests):
            parts = [shard_answer[index] for shard_answer in answers]
            if name == "intra":
                positive, answer.intra_positive_ids = anchors["feats"], ids
            else:
                positive, answer.inter_positive_ids = self._pick_positive(ids, anchors, parts, rng)
            pos = (q * torch.as_tensor(positive, dtype=q.dtype, device=q.device)).sum(dim=1)
            neg = None
            if int(shares.sum()) > 0:
                lse, mean = combine_shards([p["lse"] for p in parts], [p["mean"] for p in parts])
                neg = folded_negative_similarity(q, lse, mean, temperature)
            setattr(answer, f"{name}_pos", pos)
            setattr(answer, f"{name}_neg", neg)
            if return_ids:
                setattr(answer, f"{name}_negative_ids",
                        [np.concatenate([p["ids"][i] for p in parts]) for i in range(len(ids))])
        return answer

    def intra(self, query: torch.Tensor, ids, num_negatives: int, temperature: float,
              seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """NPID branch alone: (pos [B], neg [B, 1]); see `query`."""
        answer = self.query(query, ids, intra_negatives=num_negatives, temperature=temperature, seed=seed)
        return answer.intra_pos, answer.intra_neg

    def inter(self, query: torch.Tensor, ids, num_negatives: int, strategy: str = "semi_hard",
              temperature: float = 0.1, pool_fraction: float = 0.1,
              seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """InterCLR branch alone: (pos [B], neg [B, 1] or None when num_negatives = 0); see `query`."""
        answer = self.query(query, ids, inter_negatives=num_negatives, strategy=strategy, temperature=temperature,
                            pool_fraction=pool_fraction, seed=seed)
        return answer.inter_pos, answer.inter_neg

    def sample_inter(self, query: torch.Tensor, ids, num_negatives: int, strategy: str,
                     pool_fraction: float = 0.1, seed: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """The global ids an `inter` query with the same seed draws: positive ids [B] and the
        negative ids of each query (for tests and the negatives figure, InterCLR Fig. 11)."""
        answer = self.query(query.detach(), ids, inter_negatives=num_negatives, strategy=strategy,
                            pool_fraction=pool_fraction, seed=seed, return_ids=True)
        return answer.inter_positive_ids, answer.inter_negative_ids

    def _pick_positive(self, ids: np.ndarray, anchors: dict, answers: list[dict],
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Each shard proposed a uniform member of the anchor's cluster; choosing shard s with
        probability ∝ its member count makes the pick uniform over the whole cluster."""
        counts = np.stack([a["positive_count"] for a in answers], axis=1).astype(np.float64)  # [B, S]
        candidates = np.stack([a["positive"] for a in answers], axis=1)  # [B, S, D]
        candidate_ids = np.stack([a["positive_id"] for a in answers], axis=1)  # [B, S]
        positive, positive_ids = anchors["feats"].copy(), ids.copy()  # alone in its cluster: itself
        for i in np.flatnonzero(counts.sum(axis=1) > 0):
            shard = rng.choice(self.num_shards, p=counts[i] / counts[i].sum())
            positive[i], positive_ids[i] = candidates[i, shard], candidate_ids[i, shard]
        return positive, positive_ids

    # --- clustering ------------------------------------------------------------------------------

    def init_clusters(self, iters: int = 10, init: str = "random", seed: int | None = None,
                      init_sample: int | None = None, initial_centroids: np.ndarray | None = None,
                      progress=None) -> dict:
        """Global k-means across the shards (Lloyd): every iteration each shard assigns its rows to
        the broadcast centroids on its own device (bank.kmeans.nearest_centroid, chunked) and
        returns per-cluster sums and counts; this client only reduces them, O(S·C·D) per iteration.
        Seeding: "random" = C distinct rows drawn uniformly, as faiss does (faiss/Clustering.cpp
        `Clustering::train_encoded` permutes the training points; mmselfsup 0.x InterCLR clusters
        with faiss, mmselfsup/utils/clustering.py `Kmeans`) — O(C·D), the scalable default;
        "kmeans++" on a uniform sample of `init_sample` rows (default 40·C) costs C sequential
        passes over that sample in this process, for small banks only; or `initial_centroids`.
        Empty clusters are split from large ones (faiss's rule); a cluster the final assignment
        leaves empty is refilled by a 2-means split of the largest (as online upkeep).
        `progress(message)` is called after the seeding and every iteration. Returns the inertia
        per iteration (the last: of the final assignment, before such refills), the seeds, the split
        counts and the seconds spent seeding and per iteration."""
        seed = self.config["seed"] if seed is None else seed
        rng = np.random.default_rng(seed)
        c = self.num_clusters
        report = progress or (lambda message: None)
        started = time.perf_counter()
        if initial_centroids is not None:
            centroids = np.asarray(initial_centroids, dtype=np.float32).copy()
            if centroids.shape != (c, self.dim):
                raise ValueError(f"initial_centroids must be [{c}, {self.dim}], got {list(centroids.shape)}")
        elif init in ("kmeans++", "random"):
            sample_size = c if init == "random" else min(self.num_samples, init_sample or 40 * c)
            sample = self._sample_rows(sample_size, rng)
            centroids = sample[:c].copy() if init == "random" else kmeans_plus_plus(sample, c, rng)
        else:
            raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
        seed_seconds = time.perf_counter() - started
        report(f"k-means {self.num_samples} rows -> {c} clusters: seeded ({init}) in {seed_seconds:.1f} s")
        seeds = centroids.copy()
        history, splits, iteration_seconds = [], 0, []
        for iteration in range(iters):
            started = time.perf_counter()
            partials = self._call([(s, "assign_partial", (centroids,), {}) for s in range(self.num_shards)])
            sums = np.sum([p["sums"] for p in partials], axis=0)
            counts = np.sum([p["counts"] for p in partials], axis=0)
            history.append(float(sum(p["inertia"] for p in partials)))
            alive = counts > 0
            centroids[alive] = (sums[alive] / counts[alive, None]).astype(np.float32)
            splits += split_empty_clusters(centroids, counts, rng)
            iteration_seconds.append(time.perf_counter() - started)
            report(f"k-means iteration {iteration + 1}/{iters}: inertia {history[-1]:.6g} "
                   f"({iteration_seconds[-1]:.1f} s)")
        partials = self._call([(s, "set_clusters", (centroids,), {}) for s in range(self.num_shards)])
        final_inertia = float(sum(p["inertia"] for p in partials))
        self._broadcast_replicas(partials, centroids)
        # The final assignment can still leave a cluster empty (e.g. duplicate centroids); InterCLR
        # starts from none (mmselfsup InterCLRMemory.init_memory asserts it): split the largest.
        sizes = np.sum([p["counts"] for p in partials], axis=0)
        deltas, refilled = self._refill(np.flatnonzero(sizes == 0), sizes, rng)
        if deltas:
            self._broadcast_deltas(deltas)
        self._call([(s, "count_clustering", (), {}) for s in range(self.num_shards)])
        return {"inertia": history + [final_inertia], "initial_centroids": seeds, "empty_splits": splits,
                "final_refills": refilled, "seed_seconds": seed_seconds, "iteration_seconds": iteration_seconds}

    def clusterings(self) -> int:
        """How many `init_clusters` runs have completed on this bank's shards (since they started)."""
        return int(self._call([(0, "ping", (), {})])[0]["clusterings"])

    def wait_clustered(self, after: int, poll_seconds: float = 1.0) -> None:
        """Block until a k-means started elsewhere (another Ray Train rank's client) has completed,
        i.e. `clusterings()` differs from `after` (the count read before it began; a restarted
        shard 0 counts afresh, which also ends the wait rather than hanging it). It waits through
        Ray, not in a process-group collective, so a long k-means never runs into
        torch.distributed's timeout on the waiting ranks (rank 0 prints the k-means' progress)."""
        while self.clusterings() == after:
            time.sleep(poll_seconds)

    def _sample_rows(self, count: int, rng: np.random.Generator) -> np.ndarray:
        ids = rng.choice(self.num_samples, size=count, replace=False)
        return self.get(ids).numpy()

    def centroids(self) -> np.ndarray:
        return self._call([(0, "cluster_state", (), {})])[0]["centroids"]

    # --- stats and snapshots ---------------------------------------------------------------------

    def stats(self) -> dict:
        """Cluster sizes, label change ratio since the last call, bank step, clusters this client
        dissolved / refilled by upkeep so far, and NMI of the pseudo-labels against the true labels
        when the bank was given them."""
        state = self._call([(0, "cluster_state", (), {})])[0]
        local = self._call([(s, "local_stats", (), {}) for s in range(self.num_shards)])
        sizes = state["counts"].sum(axis=0)
        updated = sum(p["updated"] for p in local)
        result = {
            "step": max(p["step"] for p in local),
            "cluster_size_min": int(sizes.min()), "cluster_size_median": float(np.median(sizes)),
            "cluster_size_max": int(sizes.max()), "empty_clusters": int((sizes == 0).sum()),
            "label_change_ratio": (sum(p["changed"] for p in local) / updated) if updated else 0.0,
            "upkeep_dissolved": self.upkeep["dissolved"], "upkeep_refilled": self.upkeep["refilled"],
        }
        if "pairs" in local[0]:
            pairs = np.concatenate([p["pairs"] for p in local])
            counts = np.concatenate([p["pair_counts"] for p in local])
            unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
            result["nmi"] = normalized_mutual_info(unique, np.bincount(inverse.reshape(-1), weights=counts))
        return result

    def save(self, directory: str | None = None) -> str:
        """Write every shard's features, labels, centroids and step, plus bank.json; with no
        directory, a new step folder under `snapshot_root`, which becomes LATEST (the snapshot a
        restarted shard restores from)."""
        root = self.config.get("snapshot_root")
        if directory is None:
            if root is None:
                raise ValueError("save() needs a directory, or create the bank with snapshot_root")
            step = self.stats()["step"]
            directory = str(Path(root) / f"step-{step:09d}")
        Path(directory).mkdir(parents=True, exist_ok=True)
        # a shard lost while the snapshot is written: BankStateError, with no bank.json in `directory`
        # (not a snapshot: `load` refuses it) and LATEST still naming the previous one
        self._call([(s, "save", (directory,), {}) for s in range(self.num_shards)], retry=False)
        (Path(directory) / "bank.json").write_text(json.dumps(self.config, indent=1))
        if root is not None and Path(directory).resolve().parent == Path(root).resolve():
            tmp = Path(root) / "LATEST.partial"
            tmp.write_text(Path(directory).name)
            tmp.replace(Path(root) / "LATEST")
        return directory


def _add_counts(sizes: np.ndarray, deltas: list[dict]) -> None:
    for delta in deltas:
        np.add.at(sizes, np.asarray(delta["clusters"], dtype=np.int64), delta["counts"])


def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 8 if isinstance(obj, (int, float)) else 0
