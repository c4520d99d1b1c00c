"""Global k-means of the sharded bank (InterCLR's initial clustering, and offline labels' per-epoch
rerun): Lloyd iterations whose assignment runs on each shard near its rows (`BankShard.assign_partial`);
the client only reduces per-cluster sums and counts. `MemoryBank.init_clusters` runs it."""
from __future__ import annotations

import time

import numpy as np

from bank.kmeans import kmeans_plus_plus, split_empty_clusters
from bank.shard import BankShard
from bank.upkeep import refill


def init_clusters(bank, iters: int = 10, init: str = "random", seed: int | None = None,
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
    seed = bank.spec.seed if seed is None else seed
    rng = np.random.default_rng(seed)
    c = bank.num_clusters
    report = progress or (lambda message: None)
    started = time.perf_counter()
    if initial_centroids is not None:
        centroids = np.asarray(initial_centroids, dtype=np.float32).copy()
        if centroids.shape != (c, bank.dim):
            raise ValueError(f"initial_centroids must be [{c}, {bank.dim}], got {list(centroids.shape)}")
    elif init in ("kmeans++", "random"):
        sample_size = c if init == "random" else min(bank.num_samples, init_sample or 40 * c)
        sample = bank.sample_rows(sample_size, rng)
        centroids = sample[:c].copy() if init == "random" else kmeans_plus_plus(sample, c, rng)
    else:
        raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
    seed_seconds = time.perf_counter() - started
    report(f"k-means {bank.num_samples} rows -> {c} clusters: seeded ({init}) in {seed_seconds:.1f} s")
    seeds = centroids.copy()
    history, splits, iteration_seconds = [], 0, []
    for iteration in range(iters):
        started = time.perf_counter()
        partials = bank.call(bank.each(BankShard.assign_partial, centroids))
        sums = np.sum([p["sums"] for p in partials], axis=0)
        counts = np.sum([p["counts"] for p in partials], axis=0)
        history.append(float(sum(p["inertia"] for p in partials)))
        alive = counts > 0
        centroids[alive] = (sums[alive] / counts[alive, None]).astype(np.float32)
        splits += split_empty_clusters(centroids, counts, rng)
        iteration_seconds.append(time.perf_counter() - started)
        report(f"k-means iteration {iteration + 1}/{iters}: inertia {history[-1]:.6g} "
               f"({iteration_seconds[-1]:.1f} s)")
    partials = bank.call(bank.each(BankShard.set_clusters, centroids))
    final_inertia = float(sum(p["inertia"] for p in partials))
    bank.broadcast_replicas(partials, centroids)
    # The final assignment can still leave a cluster empty (e.g. duplicate centroids); InterCLR
    # starts from none (mmselfsup InterCLRMemory.init_memory asserts it): split the largest.
    sizes = np.sum([p["counts"] for p in partials], axis=0)
    deltas, refilled = refill(bank, np.flatnonzero(sizes == 0), sizes, rng)
    if deltas:
        bank.broadcast_deltas(deltas)
    bank.call(bank.each(BankShard.count_clustering))
    return {"inertia": history + [final_inertia], "initial_centroids": seeds, "empty_splits": splits,
            "final_refills": refilled, "seed_seconds": seed_seconds, "iteration_seconds": iteration_seconds}
