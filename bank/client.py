"""Driver-side client of the sharded memory bank. Picklable: pass it into Ray Train workers.

    bank = MemoryBank.create(BankSpec(num_samples=N, dim=128, num_shards=2, num_clusters=10_000, momentum=0.5))
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

The bank is a `BankSpec` (bank/spec.py); every remote call names its `BankShard` method (`Call`);
global k-means is bank/clustering.py, the online cluster upkeep bank/upkeep.py.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from bank import clustering
from bank.autograd import combine_shards, folded_negative_similarity
from bank.kmeans import normalized_mutual_info
from bank.shard import STRATEGIES, BankShard, BankStateError, Call, ShardRestartedError
from bank.spec import BankSpec
from bank.upkeep import run_upkeep

log = logging.getLogger("viewbank.bank")


class BankShardLostError(BankStateError):
    """A shard died or restarted and this client does not restore in place (`restore_on_failure`)."""


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
    def __init__(self, shards: list, spec: BankSpec):
        self.shards = shards
        self.spec = spec
        self.num_samples, self.dim = spec.num_samples, spec.dim
        self.num_shards, self.num_clusters = spec.num_shards, spec.num_clusters
        self.momentum, self.min_cluster, self.relabel = spec.momentum, spec.min_cluster, spec.relabel
        self.rows = np.array([spec.rows(s) for s in range(self.num_shards)])
        self._rng = np.random.default_rng(spec.seed)
        self.upkeep_rng = np.random.default_rng([spec.seed, 1])  # 2-means seeds of online splits
        self.traffic_bytes = 0  # numpy payload sent to and received from the shards
        self.wait_seconds = 0.0  # time the caller spent blocked on the shards
        self.round_trips = 0  # blocking fan-outs (one ray.get each)
        # an update issued with block=False: its shards' apply_deltas results (shard 0's is the upkeep
        # cue), collected by the next blocking call in the same ray.get
        self._pending: list = []
        self.in_upkeep = False
        # a shard lost: restore every shard from the last snapshot and retry (True), or raise
        # BankShardLostError (a Train worker: its group restarts from the checkpoint naming a snapshot)
        self.restore_on_failure = True
        self.recoveries = 0  # shard losses this client restored from
        self.upkeep = {"dissolved": 0, "refilled": 0, "random_splits": 0, "round_trips": 0, "runs": 0}  # this client's

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def create(cls, spec: BankSpec, true_labels: np.ndarray | None = None,
               actor_options: dict | list[dict] | None = None) -> "MemoryBank":
        """Start the `spec.num_shards` bank actors (num_cpus=0 by default; `actor_options` per shard
        or for all, e.g. {"num_gpus": 1} or a placement-group scheduling strategy). `true_labels` [N]
        (e.g. `Manifest.labels()`) enables NMI in `stats()`."""
        spec.warn_if_upkeep_thrashes()
        labels = [spec.shard_labels(true_labels, s) for s in range(spec.num_shards)]
        options = actor_options if isinstance(actor_options, list) else [actor_options or {}] * spec.num_shards
        remote = ray.remote(BankShard)
        shards = [remote.options(**{"num_cpus": 0, "max_restarts": spec.max_restarts, "max_task_retries": 0,
                                    **options[s]}).remote(spec, s, labels[s]) for s in range(spec.num_shards)]
        return cls.connect(shards, spec)

    @classmethod
    def connect(cls, shards: list, spec: BankSpec) -> "MemoryBank":
        """The client of `shards` (BankShard actors built from `spec`), once each answers."""
        bank = cls(shards, spec)
        ray.get([shard.ping.remote() for shard in shards])
        return bank

    @classmethod
    def load(cls, directory: str, snapshot_root: str | None = None, true_labels: np.ndarray | None = None,
             actor_options: dict | list[dict] | None = None) -> "MemoryBank":
        """Recreate a bank from `save(directory)`: features, labels, centroids and step."""
        meta_path = Path(directory) / "bank.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: not a bank snapshot")
        spec = BankSpec.from_json(json.loads(meta_path.read_text()))
        if snapshot_root is not None:
            spec = dataclasses.replace(spec, snapshot_root=snapshot_root)
        bank = cls.create(spec, true_labels, actor_options)
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

    def each(self, method, *args, **kwargs) -> list[Call]:
        """The same call of `method` (a BankShard method) on every shard."""
        return [Call(s, method, args, kwargs) for s in range(self.num_shards)]

    def call(self, calls: list[Call], retry: bool = True) -> list:
        """The answers of `calls`, in order. One ray.get for the fan-out, which also
        completes a pending asynchronous update (`update(block=False)`); when that update left a
        cluster below `min_cluster`, upkeep runs after this call's answers are in. If a shard died
        or restarted, restore every shard from the last snapshot and retry once (a pending update is
        then lost with the rest of the state since the snapshot). With `retry=False` (a snapshot being
        written) the shards are restored the same way, then BankStateError: a retry would write the
        restored, older state under the new snapshot's name."""
        for attempt in (0, 1):
            start = time.perf_counter()
            refs = [getattr(self.shards[c.shard], c.method.__name__).remote(*c.args, **c.kwargs) for c in calls]
            pending, self._pending = self._pending, []
            try:
                answers = ray.get(pending + refs)
            except (ray.exceptions.RayActorError, ShardRestartedError) as exc:
                if attempt == 1:
                    raise
                if not self.restore_on_failure:
                    raise BankShardLostError(f"a bank shard failed ({str(exc).splitlines()[0]}); restart from the "
                                             "last checkpoint, which names its bank snapshot") from None
                self.recoveries += 1
                log.warning("bank shard failure (%s); restoring all shards from the last snapshot",
                            str(exc).splitlines()[0])
                self._recover()
                if not retry:
                    during = calls[0].method.__name__ if calls else "a call"
                    raise BankStateError(f"a bank shard failed during {during} "
                                         f"({str(exc).splitlines()[0]}); every shard was restored from the "
                                         "last snapshot, which is intact") from None
                continue
            cue, results = (answers[0] if pending else None), answers[len(pending):]
            self.round_trips += 1
            self.wait_seconds += time.perf_counter() - start
            self.traffic_bytes += _nbytes([c.args for c in calls]) + _nbytes(results) + _nbytes(cue)
            if cue is not None and not self.in_upkeep:
                run_upkeep(self, cue)
            return results

    def settle(self) -> None:
        """Wait for a pending asynchronous update (and its upkeep); a no-op without one."""
        if self._pending:
            self.call([])

    def _wait_alive(self, timeout: float = 120) -> None:
        """Until every shard answers (a restarting one comes back within Ray's restart)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ray.get([s.ping.remote() for s in self.shards], timeout=30)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _recover(self) -> None:
        root = self.spec.snapshot_root
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
        self._wait_alive()  # e.g. a Train worker group resuming after a shard was killed
        partials = ray.get([s.restore.remote(directory) for s in self.shards])
        centroids = torch.load(Path(directory) / "shard-0000.pt")["centroids"].numpy()
        self.broadcast_replicas(partials, centroids)

    def broadcast_replicas(self, partials: list[dict], centroids: np.ndarray) -> None:
        """Every shard's cluster replica from the shards' own sums and counts (`partials`), empty
        clusters keeping `centroids`."""
        sums = np.sum([p["sums"] for p in partials], axis=0)
        counts = np.stack([p["counts"] for p in partials])
        total = counts.sum(axis=0)
        alive = total > 0
        centroids = centroids.copy()
        centroids[alive] = (sums[alive] / total[alive, None]).astype(np.float32)
        ray.get([s.set_replicas.remote(sums, counts, centroids) for s in self.shards])

    # --- reads and writes ------------------------------------------------------------------------

    def _from_owners(self, ids: np.ndarray, method) -> list[tuple[np.ndarray, object]]:
        """Call `method` on each shard with the ids it owns: [(positions in ids, its answer)]."""
        owners = self._owners(ids)
        calls = [Call(s, method, (ids[pos],)) for s, pos in enumerate(owners) if len(pos)]
        return [(owners[c.shard], part) for c, part in zip(calls, self.call(calls))]

    def _gather(self, ids: np.ndarray, method, width: int | None, dtype) -> np.ndarray:
        out = np.zeros((len(ids), width) if width else len(ids), dtype=dtype)
        for positions, part in self._from_owners(ids, method):
            out[positions] = part
        return out

    def get(self, ids) -> torch.Tensor:
        """Stored (normalised) features [B, D] float32."""
        return torch.from_numpy(self._gather(self._ids(ids), BankShard.get, self.dim, np.float32))

    def labels(self, ids) -> torch.Tensor:
        """Pseudo-labels [B] int64 (-1 before `init_clusters`)."""
        return torch.from_numpy(self._gather(self._ids(ids), BankShard.get_labels, None, np.int64))

    def set_features(self, ids, feats) -> None:
        """Write features as they are (normalised, no momentum, no relabel): initial features."""
        ids = self._ids(ids, allow_duplicates=False)
        feats = self._feats(feats, len(ids))
        owners = self._owners(ids)
        self.call([Call(s, BankShard.set_features, (ids[pos], feats[pos])) for s, pos in enumerate(owners) if len(pos)])

    def update(self, ids, feats, block: bool = True) -> None:
        """Eq. 2 momentum update and re-normalisation, relabel of each updated row to its most
        similar centroid (Sect. 4.1), and the running means of the centroids updated with every
        member change; then cluster upkeep (bank/upkeep.py) when some cluster has fewer than
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

    def broadcast_deltas(self, deltas: list[dict], report_below: int = 0) -> np.ndarray | None:
        """Apply every shard's deltas on every shard (one fan-out); shard 0 reports the global cluster
        sizes when one is below `report_below` (see BankShard.apply_deltas)."""
        return self.call([Call(s, BankShard.apply_deltas, (deltas,), {"report_below": report_below if s == 0 else 0})
                          for s in range(self.num_shards)])[0]

    # --- queries ---------------------------------------------------------------------------------

    def _anchors(self, ids: np.ndarray) -> dict:
        info = {"feats": np.zeros((len(ids), self.dim), np.float32), "labels": np.zeros(len(ids), np.int64),
                "cluster_counts": np.zeros((len(ids), self.num_shards), np.int64)}
        for positions, part in self._from_owners(ids, BankShard.anchor_info):
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
        calls = [Call(s, BankShard.score, (q_np, ids, [
            {"anchor_labels": labels, "shares": shares[s], "strategy": strat, "pool_fraction": pool_fraction,
             "want_positive": positive} for _, shares, labels, strat, positive in requests], temperature, seed),
            {"return_ids": return_ids}) for s in range(self.num_shards)]
        answers = self.call(calls) if requests else []
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
        """Global k-means across the shards: `bank.clustering.init_clusters`."""
        return clustering.init_clusters(self, iters, init, seed, init_sample, initial_centroids, progress)

    def clusterings(self) -> int:
        """How many `init_clusters` runs have completed on this bank's shards (since they started)."""
        return int(self.call([Call(0, BankShard.ping)])[0]["clusterings"])

    def wait_clustered(self, after: int, poll_seconds: float = 1.0) -> None:
        """Block until a k-means started elsewhere (another Ray Train rank's client) has completed,
        i.e. `clusterings()` differs from `after` (the count read before it began; a restarted
        shard 0 counts afresh, which also ends the wait rather than hanging it). It waits through
        Ray, not in a process-group collective, so a long k-means never runs into
        torch.distributed's timeout on the waiting ranks (rank 0 prints the k-means' progress)."""
        while self.clusterings() == after:
            time.sleep(poll_seconds)

    def sample_rows(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """The stored features of `count` distinct rows drawn uniformly."""
        ids = rng.choice(self.num_samples, size=count, replace=False)
        return self.get(ids).numpy()

    def centroids(self) -> np.ndarray:
        return self.call([Call(0, BankShard.cluster_state)])[0]["centroids"]

    # --- stats and snapshots ---------------------------------------------------------------------

    def stats(self) -> dict:
        """Cluster sizes, label change ratio since the last call, bank step, clusters this client
        dissolved / refilled by upkeep so far, and NMI of the pseudo-labels against the true labels
        when the bank was given them."""
        state = self.call([Call(0, BankShard.cluster_state)])[0]
        local = self.call(self.each(BankShard.local_stats))
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
        root = self.spec.snapshot_root
        if directory is None:
            if root is None:
                raise ValueError("save() needs a directory, or create the bank with snapshot_root")
            step = self.stats()["step"]
            directory = str(Path(root) / f"step-{step:09d}")
        Path(directory).mkdir(parents=True, exist_ok=True)
        # a shard lost while the snapshot is written: BankStateError, with no bank.json in `directory`
        # (not a snapshot: `load` refuses it) and LATEST still naming the previous one
        self.call(self.each(BankShard.save, directory), retry=False)
        (Path(directory) / "bank.json").write_text(json.dumps(self.spec.to_json(), indent=1))
        if root is not None and Path(directory).resolve().parent == Path(root).resolve():
            tmp = Path(root) / "LATEST.partial"
            tmp.write_text(Path(directory).name)
            tmp.replace(Path(root) / "LATEST")
        return directory


def _nbytes(obj) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 8 if isinstance(obj, (int, float)) else 0
