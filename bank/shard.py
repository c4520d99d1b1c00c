"""One shard of the memory bank: a Ray actor that owns the rows of ids ≡ shard (mod num_shards).

State (torch tensors on the actor's device):
- `feats` [n, D] fp32 or fp16, L2-normalised; `labels` [n] int64 pseudo-labels (-1 before k-means).
- A replica of the global cluster state, identical on every shard: `sums` [C, D] float64 (sum of
  member features), `counts` [S, C] int64 (members of each cluster on each shard), `centroids`
  [C, D] = sums / counts (an emptied cluster keeps its last centroid until upkeep refills it).
  Every update's change is broadcast to all shards by the client, so relabelling (Eq. 3) happens
  near the data; so is every change made by cluster upkeep (dissolve small clusters, split the
  largest with a 2-means whose Lloyd steps are per-shard partial sums).
- `members[c]`: this shard's rows in cluster c, with `slot[row]` its position there — "random member
  of c" is O(1) and a relabel is an O(1) swap-remove. "Not in c" is rejection sampling, which
  rejects about |c|/n of the draws.

Queries never ship B×K×D features: for InfoNCE-type losses a shard returns, per query, the
log-sum-exp of its negative logits and the softmax-weighted mean of those negatives' features —
the loss and its exact gradient with respect to the query follow from these (see bank.autograd).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bank.kmeans import hashed_uniform, nearest_centroid, two_means_sides
from bank.spec import BankSpec

STRATEGIES = ("hard", "semi_hard", "random", "semi_easy")
GATHER_BYTES = 64 << 20  # cap on gathered [b, k, D] features per chunk
SCORE_BYTES = 256 << 20  # cap on a [b, n] similarity chunk


class BankStateError(RuntimeError):
    """The bank cannot answer this request truthfully."""


class ShardRestartedError(BankStateError):
    """The shard was restarted: it has no state (no snapshot) or awaits a resync of its replicas."""


@dataclass(frozen=True)
class Call:
    """A remote call of `method` (a `BankShard` method itself, e.g. `BankShard.assign_partial`: named,
    not spelled as a string) on the bank's shard `shard` with these arguments; `MemoryBank.call` runs
    a list of them in one round trip."""
    shard: int
    method: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if getattr(BankShard, getattr(self.method, "__name__", ""), None) is not self.method:
            raise TypeError(f"Call takes a BankShard method (e.g. BankShard.get), got {self.method!r}")


class BankShard:
    def __init__(self, spec: BankSpec, shard_index: int, true_labels: np.ndarray | None = None,
                 device: str = "auto"):
        """Shard `shard_index` of the bank `spec`; `true_labels`: the true classes of its own rows
        (`spec.shard_labels`), for NMI; `device` "auto": CUDA where the actor sees a GPU."""
        if spec.threads_per_shard:
            torch.set_num_threads(spec.threads_per_shard)
        self.shard_index, self.num_shards = shard_index, spec.num_shards
        self.num_samples, self.dim, self.num_clusters = spec.num_samples, spec.dim, spec.num_clusters
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.storage = {"float32": torch.float32, "float16": torch.float16}[spec.dtype]
        self.rows = spec.rows(shard_index)
        self.snapshot_root = spec.snapshot_root
        self.true_labels = None if true_labels is None else torch.tensor(np.asarray(true_labels), dtype=torch.int64)
        self.generation = 0
        self.clusterings = 0  # completed MemoryBank.init_clusters runs (other ranks wait on it)
        self.state_error: str | None = None
        self._empty_state()
        if _reconstructed():
            self.generation = 1
            latest = _latest_snapshot(self.snapshot_root)
            if latest is None:
                self.state_error = (f"bank shard {shard_index} was restarted and has no snapshot to restore "
                                    "from; its features are lost (save() the bank to enable restore)")
            else:
                self.restore(str(latest))
                self.state_error = f"bank shard {shard_index} restored from {latest}; replicas need a resync"

    # --- state -------------------------------------------------------------------------------

    def _empty_state(self) -> None:
        g = torch.Generator().manual_seed(1_000_003 * self.shard_index + 17)
        init = torch.randn(self.rows, self.dim, generator=g)
        self.feats = torch.nn.functional.normalize(init, dim=1).to(self.device, self.storage)
        self.labels = torch.full((self.rows,), -1, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(self.num_clusters, self.dim, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(self.num_shards, self.num_clusters, dtype=torch.int64, device=self.device)
        self.centroids = torch.zeros(self.num_clusters, self.dim, dtype=torch.float32, device=self.device)
        self.step = 0
        self.updated_rows = self.changed_rows = 0
        self._rebuild_members()

    def _check(self) -> None:
        if self.state_error is not None:
            raise ShardRestartedError(self.state_error)

    def _rebuild_members(self) -> None:
        labels = self.labels.cpu().numpy()
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.num_clusters + 1))
        self.members = [order[bounds[c]:bounds[c + 1]].tolist() for c in range(self.num_clusters)]
        self.slot = np.empty(self.rows, dtype=np.int64)
        for rows in self.members:
            self.slot[rows] = np.arange(len(rows))

    def _move(self, row: int, old: int, new: int) -> None:
        if old >= 0:
            members = self.members[old]
            last = members.pop()
            if last != row:
                members[self.slot[row]] = last
                self.slot[last] = self.slot[row]
        if new >= 0:
            self.slot[row] = len(self.members[new])
            self.members[new].append(row)

    def _tensor(self, array, dtype=None) -> torch.Tensor:
        """Arrays from ray.get are read-only (zero-copy); copy only those before torch sees them."""
        return torch.as_tensor(np.require(array, requirements="W"), dtype=dtype, device=self.device)

    def _local(self, ids: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ids) // self.num_shards, dtype=torch.int64, device=self.device)

    def ping(self) -> dict:
        return {"shard": self.shard_index, "generation": self.generation, "rows": self.rows,
                "step": self.step, "device": str(self.device), "error": self.state_error,
                "clusterings": self.clusterings}

    def count_clustering(self) -> int:
        """A k-means run completed (its final assignment and replicas are in place)."""
        self.clusterings += 1
        return self.clusterings

    # --- reads and writes ----------------------------------------------------------------------

    def get(self, ids: np.ndarray) -> np.ndarray:
        self._check()
        return self.feats[self._local(ids)].float().cpu().numpy()

    def get_labels(self, ids: np.ndarray) -> np.ndarray:
        self._check()
        return self.labels[self._local(ids)].cpu().numpy()

    def set_features(self, ids: np.ndarray, feats: np.ndarray) -> None:
        """Bulk write without momentum (initial features before k-means)."""
        self._check()
        values = torch.nn.functional.normalize(self._tensor(feats).float(), dim=1)
        self.feats[self._local(ids)] = values.to(self.storage)

    def update(self, ids: np.ndarray, feats: np.ndarray, momentum: float, relabel: bool = True) -> dict | None:
        """Eq. 2 (v̂ ← (1-ω)v̂ + ωv, re-normalised, ω = `momentum`), then Eq. 3 (relabel to the
        nearest centroid). Returns this shard's change to the cluster sums/counts; the client
        broadcasts it to every shard (`apply_deltas`), this one included. `relabel=False` (offline
        labels, 003 Observation 1): the features only; labels, members and centroids stay as the
        last k-means left them, and there is no delta (None)."""
        self._check()
        rows = self._local(ids)
        new = self._tensor(feats).float()
        old = self.feats[rows].float()
        blended = torch.nn.functional.normalize((1 - momentum) * old + momentum * new, dim=1)
        stored = blended.to(self.storage)
        self.feats[rows] = stored
        if not relabel:
            self.step += 1
            return None
        old_labels = self.labels[rows].clone()
        clustered = old_labels >= 0
        new_labels = old_labels.clone()
        if bool(clustered.any()):
            # argmax v·c, as the reference implementation (mmselfsup InterCLRMemory) relabels; Eq. 3's
            # ‖v - c‖² with running-mean centroids (norm < 1) favours the most diffuse cluster.
            new_labels[clustered] = nearest_centroid(stored[clustered], self.centroids, metric="dot")[0]
        changed = self._set_labels(rows, old_labels, new_labels)
        self.step += 1
        self.updated_rows += int(clustered.sum())
        self.changed_rows += changed
        return self._delta(old_labels[clustered], new_labels[clustered], old[clustered], stored[clustered])

    def _set_labels(self, rows: torch.Tensor, old_labels: torch.Tensor, new_labels: torch.Tensor) -> int:
        """Write the labels of `rows` (distinct) and keep the member lists; returns how many changed."""
        self.labels[rows] = new_labels
        changed = torch.nonzero(new_labels != old_labels).flatten().cpu().numpy()
        rows_np, old_np, new_np = rows.cpu().numpy(), old_labels.cpu().numpy(), new_labels.cpu().numpy()
        for i in changed:
            self._move(int(rows_np[i]), int(old_np[i]), int(new_np[i]))
        return len(changed)

    def _delta(self, old_labels: torch.Tensor, new_labels: torch.Tensor, old_feats: torch.Tensor,
               new_feats: torch.Tensor) -> dict:
        """This shard's change to the float64 cluster sums and its counts when clustered rows go from
        (old label, old stored value) to (new label, new stored value)."""
        touched = torch.unique(torch.cat([old_labels, new_labels]))
        position = torch.full((self.num_clusters,), -1, dtype=torch.int64, device=self.device)
        position[touched] = torch.arange(len(touched), device=self.device)
        delta = torch.zeros(len(touched), self.dim, dtype=torch.float64, device=self.device)
        delta.index_add_(0, position[new_labels], new_feats.double())
        delta.index_add_(0, position[old_labels], -old_feats.double())
        delta_counts = (torch.bincount(position[new_labels], minlength=len(touched))
                        - torch.bincount(position[old_labels], minlength=len(touched)))
        return {"shard": self.shard_index, "clusters": touched.cpu().numpy(), "sums": delta.cpu().numpy(),
                "counts": delta_counts.cpu().numpy()}

    def _relabel(self, rows: torch.Tensor, new_labels: torch.Tensor) -> dict:
        """Move clustered `rows` (distinct) to `new_labels`, features unchanged; returns the delta."""
        old_labels = self.labels[rows].clone()
        self._set_labels(rows, old_labels, new_labels)
        feats = self.feats[rows]
        return self._delta(old_labels, new_labels, feats, feats)

    def apply_deltas_of(self, *deltas: dict, report_below: int = 0) -> np.ndarray | None:
        """`apply_deltas` with each shard's delta as its own argument: given the shards' `update`
        object refs, Ray hands the results over shard to shard (the client never holds them)."""
        return self.apply_deltas(list(deltas), report_below)

    def apply_deltas(self, deltas: list[dict], report_below: int = 0) -> np.ndarray | None:
        """Add every shard's deltas to this replica. With report_below > 0, return the global cluster
        sizes [C] when some cluster has fewer members (None otherwise, and before k-means): the
        client's cue for upkeep, so the steady state costs no extra call."""
        for delta in deltas:
            clusters = torch.as_tensor(np.array(delta["clusters"]), dtype=torch.int64, device=self.device)
            if len(clusters) == 0:
                continue
            self.sums[clusters] += self._tensor(delta["sums"])
            self.counts[delta["shard"], clusters] += self._tensor(delta["counts"])
            self._refresh_centroids(clusters)
        if report_below > 0:
            sizes = self.counts.sum(dim=0)
            if int(sizes.sum()) > 0 and bool((sizes < report_below).any()):
                return sizes.cpu().numpy()
        return None

    def _refresh_centroids(self, clusters: torch.Tensor) -> None:
        total = self.counts[:, clusters].sum(dim=0)
        alive = total > 0
        self.centroids[clusters[alive]] = (self.sums[clusters[alive]] / total[alive, None]).float()

    # --- k-means -------------------------------------------------------------------------------

    def assign_partial(self, centroids: np.ndarray, keep: bool = False) -> dict:
        """One Lloyd step near the data: assign rows, return per-cluster sums, counts, inertia.
        keep=True also makes the assignment this shard's pseudo-labels (the final k-means pass)."""
        self._check()
        labels, distances = nearest_centroid(self.feats, self._tensor(centroids))
        sums, counts = self._cluster_sums(labels)
        if keep:
            self.labels = labels
            self._rebuild_members()
            self.updated_rows = self.changed_rows = 0
        return {"sums": sums.cpu().numpy(), "counts": counts.cpu().numpy(), "inertia": float(distances.sum())}

    def set_clusters(self, centroids: np.ndarray) -> dict:
        """Final k-means assignment: set labels and membership; return local sums and counts."""
        return self.assign_partial(centroids, keep=True)

    def _cluster_sums(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cluster float64 sums and counts of this shard's rows under `labels` (-1 = none)."""
        feats = self.feats
        clustered = labels >= 0
        if not bool(clustered.all()):  # mask only when needed: a mask copies the whole bank
            labels, feats = labels[clustered], feats[clustered]
        sums = torch.zeros(self.num_clusters, self.dim, dtype=torch.float64, device=self.device)
        sums.index_add_(0, labels, feats.double())
        return sums, torch.bincount(labels, minlength=self.num_clusters)

    def local_cluster_sums(self) -> dict:
        sums, counts = self._cluster_sums(self.labels)
        return {"sums": sums.cpu().numpy(), "counts": counts.cpu().numpy()}

    def set_replicas(self, sums: np.ndarray, counts: np.ndarray, centroids: np.ndarray) -> None:
        self.sums = self._tensor(sums, torch.float64).clone()
        self.counts = self._tensor(counts, torch.int64).clone()
        self.centroids = self._tensor(centroids, torch.float32).clone()
        if self.state_error is not None and self.state_error.endswith("need a resync"):
            self.state_error = None

    def cluster_state(self) -> dict:
        return {"counts": self.counts.cpu().numpy(), "centroids": self.centroids.cpu().numpy()}

    # --- cluster upkeep (mmselfsup 0.x InterCLRMemory / ODCMemory.deal_with_small_clusters) ------------
    # The client decides; each shard acts on the rows it owns and returns partial sums or a delta.
    # Replicas change only when the client broadcasts the deltas (apply_deltas) at the end.

    def _member_rows(self, cluster: int) -> torch.Tensor:
        return torch.as_tensor(self.members[cluster], dtype=torch.int64, device=self.device)

    def dissolve_clusters(self, clusters: np.ndarray) -> dict:
        """Reassign this shard's members of `clusters` to the most similar other centroid, argmax v·c
        as in `update` (deal_with_small_clusters: `inclusion` = the clusters not dissolved). Returns
        the delta of the sums and counts."""
        self._check()
        allowed = torch.ones(self.num_clusters, dtype=torch.bool, device=self.device)
        allowed[self._tensor(clusters, torch.int64)] = False
        targets = torch.nonzero(allowed).flatten()
        rows = torch.cat([self._member_rows(int(c)) for c in clusters] +
                         [torch.empty(0, dtype=torch.int64, device=self.device)])
        if len(rows) == 0 or len(targets) == 0:
            return self._relabel(rows[:0], rows[:0])
        nearest = nearest_centroid(self.feats[rows], self.centroids[targets], metric="dot")[0]
        return self._relabel(rows, targets[nearest])

    def split_seed(self, cluster: int, seed: int, center: np.ndarray | None = None) -> dict:
        """One k-means++ seed of a 2-means split, drawn near the data: this shard's member of `cluster`
        with the smallest key -log(u)/w, u = hashed_uniform(global id, seed), w = 1 (first seed) or
        ‖v - center‖² (second). The smallest key over all shards is a draw ∝ w (Efraimidis–Spirakis)
        that does not depend on the shard layout. Returns key (inf: no member with w > 0), id, feat."""
        self._check()
        rows = self._member_rows(cluster)
        if len(rows) == 0:
            return {"key": math.inf, "id": -1, "feat": None}
        ids = rows.cpu().numpy() * self.num_shards + self.shard_index
        feats = self.feats[rows].double()
        weights = np.ones(len(rows))
        if center is not None:
            weights = (feats - self._tensor(center, torch.float64)).pow(2).sum(dim=1).cpu().numpy()
        with np.errstate(divide="ignore"):
            keys = np.where(weights > 0, -np.log(hashed_uniform(ids, seed)) / weights, math.inf)
        best = int(np.lexsort((ids, keys))[0])  # ties by global id
        return {"key": float(keys[best]), "id": int(ids[best]), "feat": feats[best].cpu().numpy()}

    def two_means_step(self, cluster: int, centers: np.ndarray) -> dict:
        """One Lloyd step of a 2-means split of `cluster` on this shard's members: per side (nearer
        of the two `centers`, Euclidean) the float64 sum [2, D] and count [2]."""
        self._check()
        rows = self._member_rows(cluster)
        sides = two_means_sides(self.feats[rows], self._tensor(centers, torch.float64))
        sums = torch.zeros(2, self.dim, dtype=torch.float64, device=self.device)
        sums.index_add_(0, sides, self.feats[rows].double())
        return {"sums": sums.cpu().numpy(), "counts": torch.bincount(sides, minlength=2).cpu().numpy()}

    def split_cluster(self, cluster: int, new_cluster: int, centers: np.ndarray | None = None,
                      ids: np.ndarray | None = None) -> dict:
        """Move this shard's members of `cluster` on side 1 of `centers` (or those among global `ids`:
        the random fallback) to `new_cluster` (_redirect_empty_clusters). Returns the delta."""
        self._check()
        rows = self._member_rows(cluster)
        if centers is not None:
            moving = two_means_sides(self.feats[rows], self._tensor(centers, torch.float64)) == 1
        else:
            own = np.asarray(ids, dtype=np.int64)
            own = own[own % self.num_shards == self.shard_index] // self.num_shards
            moving = torch.as_tensor(np.isin(rows.cpu().numpy(), own), device=self.device)
        rows = rows[moving]
        return self._relabel(rows, torch.full_like(rows, new_cluster))

    def cluster_member_ids(self, cluster: int) -> np.ndarray:
        """Global ids of this shard's members of `cluster` (only for the random-half fallback)."""
        self._check()
        return np.asarray(self.members[cluster], dtype=np.int64) * self.num_shards + self.shard_index

    # --- queries -------------------------------------------------------------------------------

    def anchor_info(self, ids: np.ndarray) -> dict:
        """For anchors owned here: bank feature (the NPID positive), pseudo-label, and each shard's
        member count of that cluster (to split draws across shards exactly)."""
        self._check()
        rows = self._local(ids)
        labels = self.labels[rows]
        counts = self.counts[:, labels.clamp_min(0)].T  # [B, S]
        return {"feats": self.feats[rows].float().cpu().numpy(), "labels": labels.cpu().numpy(),
                "cluster_counts": counts.cpu().numpy()}

    def score(self, query: np.ndarray, anchor_ids: np.ndarray, requests: list[dict], temperature: float,
              seed: int, return_ids: bool = False) -> list[dict]:
        """Draw negatives for each query from this shard and reduce them for InfoNCE.

        Each request is {"anchor_labels": [B], "shares": [B], "strategy", "pool_fraction",
        "want_positive"}: query i draws shares[i] negatives. anchor_labels[i] = -1 means intra
        (NPID): any row but the anchor itself is a negative. Otherwise negatives are rows of other
        clusters, chosen among this shard's candidates: hard = the k nearest; semi_hard = k drawn
        without replacement from the `pool_fraction` nearest; semi_easy = likewise from the
        farthest; random = iid uniform. Requests share one similarity matrix per query chunk.

        Returns per request and query: lse = log Σ_k exp(q·v_k/τ) (-inf when k = 0) and
        mean = Σ_k softmax_k·v_k — gathered from the similarity matrix and reduced with
        embedding_bag, so no [B, K, D] tensor is built when similarities exist; with
        want_positive, a random member of the anchor's cluster (not the anchor) and the number of
        such members here.
        """
        self._check()
        for request in requests:
            if request["strategy"] not in STRATEGIES:
                raise ValueError(f"unknown strategy {request['strategy']!r} (choose from {', '.join(STRATEGIES)})")
        g = torch.Generator(device=self.device).manual_seed(int(seed) * 1_000_003 + self.shard_index)
        q = self._tensor(query).float()
        batch = q.shape[0]
        owner = torch.as_tensor(np.asarray(anchor_ids) % self.num_shards == self.shard_index, device=self.device)
        anchor_rows = torch.where(owner, self._local(anchor_ids), torch.full((batch,), -1, device=self.device))
        prepared = []
        for request in requests:
            labels = self._tensor(request["anchor_labels"], torch.int64)
            shares = self._tensor(request["shares"], torch.int64)
            by_similarity = request["strategy"] != "random" and bool((labels >= 0).any())
            prepared.append((request, labels, shares, by_similarity, {
                "lse": torch.full((batch,), -math.inf, dtype=torch.float32, device=self.device),
                "mean": torch.zeros(batch, self.dim, dtype=torch.float32, device=self.device),
                "ids": [np.empty(0, dtype=np.int64)] * batch}))
        k_max = max([int(p[2].max()) for p in prepared if batch] or [0])
        need_similarity = any(p[3] for p in prepared)
        if need_similarity:
            step = max(1, SCORE_BYTES // max(1, self.rows * 4))
        else:
            step = max(1, GATHER_BYTES // max(1, k_max * self.dim * 4))
        similarities = self._similarity_fn() if need_similarity else None
        for start in range(0, batch if k_max else 0, step):
            sl = slice(start, start + step)
            sims = similarities(q[sl]) if need_similarity else None  # [b, n], shared by requests
            for request, labels, shares, by_similarity, out in prepared:
                if int(shares[sl].max()) == 0:
                    continue
                if by_similarity:
                    rows, valid = self._sample_by_similarity(sims, labels[sl], anchor_rows[sl], shares[sl],
                                                             request["strategy"], request["pool_fraction"], g)
                else:
                    rows, valid = self._sample_random(labels[sl], anchor_rows[sl], shares[sl], g)
                if sims is not None:
                    cosines = torch.gather(sims, 1, rows)  # [b, k]
                else:
                    cosines = torch.einsum("bd,bkd->bk", q[sl], self.feats[rows].float())
                logits = (cosines / temperature).masked_fill(~valid, -math.inf)
                out["lse"][sl] = torch.logsumexp(logits, dim=1)
                weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # rows with k = 0 give zeros
                out["mean"][sl] = torch.nn.functional.embedding_bag(
                    rows, self.feats, per_sample_weights=weights.to(self.feats.dtype), mode="sum").float()
                if return_ids:
                    global_ids = (rows * self.num_shards + self.shard_index).cpu().numpy()
                    valid_np = valid.cpu().numpy()
                    for i in range(rows.shape[0]):
                        out["ids"][start + i] = global_ids[i][valid_np[i]]
        results = []
        for request, labels, _, _, out in prepared:
            result = {"lse": out["lse"].cpu().numpy(), "mean": out["mean"].cpu().numpy()}
            if request.get("want_positive"):
                result.update(self._positives(labels, anchor_rows, g))
            if return_ids:
                result["ids"] = out["ids"]
            results.append(result)
        return results

    def _similarity_fn(self):
        """q [b, D] -> [b, n] float32 cosines with this shard's rows. float32 storage is multiplied as
        it is; fp16 / bf16 storage on CUDA from the stored values with float32 accumulation and output
        (`torch.mm(..., out_dtype=)`, the query rounded to the storage dtype), never a float32 copy of
        the shard (0.9 GB at 1.78M × 128); on the CPU, where no such matmul exists, the shard is widened
        once per call, not per query chunk (docs/benchmarks.md)."""
        feats = self.feats
        if feats.dtype == torch.float32:
            return lambda q: q @ feats.T
        if feats.is_cuda:
            def from_stored(q):
                try:
                    return torch.mm(q.to(feats.dtype), feats.T, out_dtype=torch.float32)
                except TypeError:  # a torch without mm's out_dtype: widen, as on the CPU
                    return q @ feats.float().T
            return from_stored
        widened = feats.float().T
        return lambda q: q @ widened

    def _excluded(self, labels: torch.Tensor, anchor_rows: torch.Tensor,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
        """True where a row may not be a negative of query i: the anchor itself or, for inter
        queries (label >= 0), a member of the anchor's cluster. rows: [b, k] candidates, or None
        for every row of this shard (broadcast, [b, n])."""
        if rows is None:
            rows = torch.arange(self.rows, device=self.device)[None, :]
        same_cluster = (labels[:, None] >= 0) & (self.labels[rows] == labels[:, None])
        return (rows == anchor_rows[:, None]) | same_cluster

    def _sample_random(self, labels, anchor_rows, shares, g):
        """iid uniform draws among allowed rows, by rejection (rejects ≈ |cluster|/n of draws)."""
        b, k_max = labels.shape[0], int(shares.max())
        rows = torch.zeros(b, k_max, dtype=torch.int64, device=self.device)
        filled = torch.zeros(b, dtype=torch.int64, device=self.device)
        for _ in range(64):
            need = shares - filled
            if bool((need <= 0).all()):
                break
            draws = int(need.max() * 1.25) + 8
            candidate = torch.randint(self.rows, (b, draws), generator=g, device=self.device)
            ok = ~self._excluded(labels, anchor_rows, candidate)
            rank = ok.cumsum(dim=1) - 1 + filled[:, None]
            keep = ok & (rank < shares[:, None])
            rows[keep.nonzero(as_tuple=True)[0], rank[keep]] = candidate[keep]
            filled = torch.minimum(shares, filled + ok.sum(dim=1))
        if bool((filled < shares).any()):
            raise BankStateError(f"bank shard {self.shard_index}: no allowed negatives left for some "
                                 "queries (every row is in the anchor's cluster)")
        valid = torch.arange(k_max, device=self.device)[None, :] < shares[:, None]
        return rows, valid

    def _sample_by_similarity(self, sims, labels, anchor_rows, shares, strategy, pool_fraction, g):
        """hard / semi_hard / semi_easy: rank this shard's allowed rows by cosine to the query.

        The pool of row i is its pool[i] best allowed rows (hard: pool = its share). One unsorted
        top-k of the largest pool finds every row's candidates; a small top-k over their values
        trims each row to its own pool; random keys draw the share without replacement."""
        b, k_max = sims.shape[0], int(shares.max())
        excluded = self._excluded(labels, anchor_rows)
        key = (-sims if strategy == "semi_easy" else sims).masked_fill(excluded, -math.inf)
        allowed = (~excluded).sum(dim=1)
        if strategy == "hard":
            pool = torch.minimum(shares, allowed)
        else:
            pool = torch.ceil(pool_fraction * allowed.double()).long().clamp(max=allowed)
        pool_max = max(1, int(pool.max()))
        values, candidates = torch.topk(key, pool_max, dim=1, sorted=False)  # [b, pool_max]
        surplus = pool_max - pool  # candidates of row i beyond its own pool: its smallest values
        in_pool = values > -math.inf
        if int(surplus.max()) > 0:
            smallest = torch.topk(values, int(surplus.max()), dim=1, largest=False).values  # ascending
            cutoff = torch.gather(smallest, 1, (surplus - 1).clamp_min(0)[:, None])[:, 0]
            in_pool &= (values > cutoff[:, None]) | (surplus == 0)[:, None]
        if strategy == "hard":
            return candidates, in_pool
        noise = torch.rand(b, pool_max, generator=g, device=self.device).masked_fill(~in_pool, 2.0)
        # ascending random keys: row i's first pool[i] picks are its pool in random order
        picks = torch.topk(noise, min(k_max, pool_max), dim=1, largest=False).indices
        if picks.shape[1] < k_max:
            picks = torch.cat([picks, picks[:, :1].expand(b, k_max - picks.shape[1])], dim=1)
        positions = torch.arange(k_max, device=self.device)[None, :]
        short = shares > pool  # a share larger than the pool: the rest is drawn again, with replacement
        if bool(short.any()):
            again = (torch.rand(b, k_max, generator=g, device=self.device) * pool.clamp_min(1)[:, None]).long()
            again = again.clamp_max(picks.shape[1] - 1)  # rows that are not short may have pool > k_max
            beyond = (positions >= pool[:, None]) & short[:, None]
            picks = torch.where(beyond, torch.gather(picks, 1, again), picks)
        valid = (positions < shares[:, None]) & (pool[:, None] > 0) & torch.gather(in_pool, 1, picks)
        return torch.gather(candidates, 1, picks), valid

    def _positives(self, labels: torch.Tensor, anchor_rows: torch.Tensor, g: torch.Generator) -> dict:
        """Per query, a uniform member of the anchor's cluster on this shard other than the anchor,
        and how many such members there are (the client weighs shards by that count)."""
        batch = labels.shape[0]
        counts = np.zeros(batch, dtype=np.int64)
        rows = np.full(batch, -1, dtype=np.int64)
        uniforms = torch.rand(batch, generator=g, device=self.device).cpu().numpy()
        anchors = anchor_rows.cpu().numpy()
        anchor_labels = self.labels[anchor_rows.clamp_min(0)].cpu().numpy()
        for i, label in enumerate(labels.cpu().numpy()):
            if label < 0:
                continue
            members = self.members[label]
            own = anchors[i] >= 0 and anchor_labels[i] == label
            counts[i] = len(members) - int(own)
            if counts[i] == 0:
                continue
            pick = int(uniforms[i] * counts[i])
            if own and pick >= self.slot[anchors[i]]:
                pick += 1  # skip the anchor itself
            rows[i] = members[pick]
        found = rows >= 0
        feats = np.zeros((batch, self.dim), dtype=np.float32)
        if found.any():
            feats[found] = self.feats[torch.as_tensor(rows[found], device=self.device)].float().cpu().numpy()
        ids = np.where(found, rows * self.num_shards + self.shard_index, -1)
        return {"positive": feats, "positive_count": counts, "positive_id": ids}

    # --- stats and snapshots -------------------------------------------------------------------

    def local_stats(self) -> dict:
        self._check()
        result = {"updated": self.updated_rows, "changed": self.changed_rows, "step": self.step}
        self.updated_rows = self.changed_rows = 0
        if self.true_labels is not None:
            pairs = torch.stack([self.labels.cpu(), self.true_labels], dim=1)
            unique, counts = torch.unique(pairs, dim=0, return_counts=True)
            result["pairs"], result["pair_counts"] = unique.numpy(), counts.numpy()
        return result

    def save(self, directory: str) -> str:
        self._check()
        path = Path(directory) / f"shard-{self.shard_index:04d}.pt"
        tmp = path.with_suffix(".partial")
        torch.save({"feats": self.feats.cpu(), "labels": self.labels.cpu(), "centroids": self.centroids.cpu(),
                    "step": self.step, "shard_index": self.shard_index, "num_shards": self.num_shards}, tmp)
        os.replace(tmp, path)
        return str(path)

    def restore(self, directory: str) -> dict:
        state = torch.load(Path(directory) / f"shard-{self.shard_index:04d}.pt", map_location=self.device)
        if state["num_shards"] != self.num_shards or state["feats"].shape != (self.rows, self.dim):
            raise BankStateError(f"snapshot {directory} does not match this bank's layout")
        self.feats = state["feats"].to(self.device, self.storage)
        self.labels = state["labels"].to(self.device)
        self.centroids = state["centroids"].to(self.device)
        self.step = state["step"]
        self.updated_rows = self.changed_rows = 0
        self._rebuild_members()
        self.state_error = f"bank shard {self.shard_index} restored from {directory}; replicas need a resync"
        return self.local_cluster_sums()


def _reconstructed() -> bool:
    import warnings
    try:
        import ray
        if not ray.is_initialized():  # used outside Ray (benchmarks, GPU timing): never start one
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside a Ray actor (direct use in tests)
        return False


def _latest_snapshot(root: str | None) -> Path | None:
    if root is None:
        return None
    pointer = Path(root) / "LATEST"
    if not pointer.exists():
        return None
    return Path(root) / pointer.read_text().strip()
