"""Online cluster upkeep of the sharded bank (mmselfsup 0.x InterCLRMemory.deal_with_small_clusters):
after an update leaves a cluster below `min_cluster` members, dissolve the small clusters and refill
every empty one by a 2-means split of the largest, all through the shards' own sums and counts.
`MemoryBank.call` runs each step on the shards; the bank's k-means (bank/clustering.py) uses
`refill` for the clusters its final assignment leaves empty."""
from __future__ import annotations

import logging

import numpy as np

from bank.shard import BankShard, Call

log = logging.getLogger("viewbank.bank")

TWO_MEANS_ITERS = 20  # the reference splits with sklearn KMeans(n_clusters=2, max_iter=20)


def run_upkeep(bank, sizes: np.ndarray) -> None:
    """mmselfsup 0.x InterCLRMemory.deal_with_small_clusters (interclr_memory.py; ODCMemory's is
    the same), across shards: the members of every cluster with fewer than `min_cluster` move
    to the most similar remaining centroid (argmax v·c) on the shards that own them; then every
    empty cluster is refilled by splitting the largest (`refill`); one broadcast of all the
    deltas leaves every replica equal to the members' running means. Differences: the centroids
    are exact running means throughout (the reference recomputes them every 10 iterations and
    after each split), and when every cluster is small none is dissolved (the reference would
    have no centroid left to move to)."""
    trips = bank.round_trips
    bank.in_upkeep = True
    try:
        _upkeep_once(bank, np.array(sizes, dtype=np.int64))
    finally:
        bank.in_upkeep = False
    bank.upkeep["runs"] += 1
    bank.upkeep["round_trips"] += bank.round_trips - trips


def _upkeep_once(bank, sizes: np.ndarray) -> None:
    small = np.flatnonzero(sizes < bank.min_cluster)
    deltas = []
    occupied = small[sizes[small] > 0]
    if len(small) < bank.num_clusters and len(occupied):
        deltas += bank.call(bank.each(BankShard.dissolve_clusters, occupied))
        add_counts(sizes, deltas)
        bank.upkeep["dissolved"] += len(occupied)
    split_deltas, refilled = refill(bank, np.flatnonzero(sizes == 0), sizes, bank.upkeep_rng)
    deltas += split_deltas
    if deltas:
        bank.broadcast_deltas(deltas)
    bank.upkeep["refilled"] += refilled


def refill(bank, empty: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> tuple[list, int]:
    """_redirect_empty_clusters: for each empty cluster in index order, split the currently
    largest (ties: lowest index) and give it one half. Updates `sizes` in place; returns the
    deltas (not yet broadcast) and how many clusters were refilled."""
    deltas, refilled = [], 0
    for empty_cluster in empty:
        largest = int(np.argmax(sizes))
        if sizes[largest] < 2:
            log.warning("cluster upkeep: no cluster has 2 members left to split for cluster %d", empty_cluster)
            break
        split = _split(bank, largest, int(empty_cluster), rng)
        add_counts(sizes, split)
        deltas += split
        refilled += 1
    return deltas, refilled


def _split(bank, cluster: int, new_cluster: int, rng: np.random.Generator) -> list[dict]:
    """_partition_max_cluster across shards: 2-means on the members of `cluster` (k-means++
    seeds drawn near the data, Lloyd steps from per-shard per-side sums and counts, at most
    TWO_MEANS_ITERS, Euclidean as sklearn's KMeans), then side 1 moves to `new_cluster`. When
    2-means degenerates (identical members, an empty side) a random half moves, as in the
    reference; only then are the member ids of this one cluster shipped. The seeds come from
    `rng` and global ids, so the split does not depend on the shard layout. The reference runs
    sklearn with n_init restarts and greedy k-means++; this is one plain k-means++ run."""
    seeds = rng.integers(2**62, size=2)
    first = _split_seed(bank, cluster, int(seeds[0]), None)
    second = _split_seed(bank, cluster, int(seeds[1]), first)
    centers = None if second is None else np.stack([first, second])
    for iteration in range(TWO_MEANS_ITERS if centers is not None else 0):
        parts = bank.call(bank.each(BankShard.two_means_step, cluster, centers))
        counts = np.sum([p["counts"] for p in parts], axis=0)
        if (counts == 0).any():
            centers = None
            break
        means = np.sum([p["sums"] for p in parts], axis=0) / counts[:, None]
        if np.array_equal(means, centers) or iteration == TWO_MEANS_ITERS - 1:
            break  # split by the centers just stepped with: both sides have members
        centers = means
    if centers is not None:
        return bank.call(bank.each(BankShard.split_cluster, cluster, new_cluster, centers=centers))
    log.warning("cluster upkeep: 2-means split of cluster %d degenerated; moving a random half", cluster)
    bank.upkeep["random_splits"] += 1
    members = np.sort(np.concatenate(bank.call(bank.each(BankShard.cluster_member_ids, cluster))))
    half = rng.choice(members, len(members) // 2, replace=False)
    owned = [half[half % bank.num_shards == s] for s in range(bank.num_shards)]
    return bank.call([Call(s, BankShard.split_cluster, (cluster, new_cluster), {"ids": ids})
                      for s, ids in enumerate(owned)])


def _split_seed(bank, cluster: int, seed: int, center: np.ndarray | None) -> np.ndarray | None:
    """The member drawn ∝ 1 (center None) or ∝ ‖v - center‖² over the whole cluster: the
    smallest of the shards' keys (ties: lowest global id). None when every weight is 0."""
    parts = bank.call(bank.each(BankShard.split_seed, cluster, seed, center))
    best = min(parts, key=lambda p: (p["key"], p["id"] if p["id"] >= 0 else np.inf))
    return None if not np.isfinite(best["key"]) else np.asarray(best["feat"], dtype=np.float64)


def add_counts(sizes: np.ndarray, deltas: list[dict]) -> None:
    """Apply the shards' membership deltas to the global cluster `sizes` in place."""
    for delta in deltas:
        np.add.at(sizes, np.asarray(delta["clusters"], dtype=np.int64), delta["counts"])
