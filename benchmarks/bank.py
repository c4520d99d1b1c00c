"""Memory-bank step cost: viewbank's sharded bank vs an in-process bank that does the same work the
way mmselfsup 0.x's InterCLR memory does it. Prints JSON.

One "InterCLR bank step" = intra query (bank positive + K random negatives) + inter query
(cluster positive + K semi-hard negatives) + the loss backward + update (Eq. 2, Eq. 3, centroids).

    python benchmarks/bank.py                            # Ray shards (1 and 2) vs in-process, CPU
    python benchmarks/bank.py --n 1280000 --steps 3
    python benchmarks/bank.py --mode shard --n 1780000   # one shard's cost alone (no Ray), e.g. on a GPU
    python benchmarks/bank.py --kmeans-only --n 400000 --clusters 10000   # k-means seeding + Lloyd step

The in-process baseline (`MmselfsupStyleBank`) keeps the whole bank in the trainer, gathers B×K×D
negative features for the intra branch, scans labels with `torch.where` per sample, and recomputes
each touched centroid with a Python loop over clusters — as mmselfsup's ODC/InterCLR memories do.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bank.shard import BankShard  # noqa: E402
from bank.spec import BankSpec  # noqa: E402
from losses import info_nce_from_logits, interclr_loss  # noqa: E402


class MmselfsupStyleBank:
    """The reference design: full replica in the trainer process, labels scanned per sample."""

    def __init__(self, feats: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, momentum: float):
        self.feats, self.centroids, self.labels, self.momentum = feats, centroids, labels, momentum

    def step(self, q: torch.Tensor, ids: torch.Tensor, k: int, temperature: float, pool_fraction: float) -> float:
        n = self.feats.shape[0]
        qn = torch.nn.functional.normalize(q, dim=1)
        # intra: bank positive, B×K×D random negatives gathered
        neg_idx = torch.randint(n, (q.shape[0] * k,), device=q.device)
        negatives = self.feats[neg_idx].view(q.shape[0], k, -1)
        intra = info_nce_from_logits((qn * self.feats[ids]).sum(1), torch.einsum("bd,bkd->bk", qn, negatives),
                                     temperature)
        # inter: per-sample label scans, full similarity, 10 % pool, K drawn
        with torch.no_grad():
            sims = qn @ self.feats.T
        positives, negatives = [], []
        for i in range(q.shape[0]):
            same = torch.where(self.labels == self.labels[ids[i]])[0]
            positives.append(same[torch.randint(len(same), (1,), device=q.device)])
            row = sims[i].clone()
            row[same] = -math.inf
            pool = torch.topk(row, int(pool_fraction * (n - len(same)))).indices
            if len(pool) >= k:
                negatives.append(pool[torch.randperm(len(pool), device=q.device)[:k]])
            else:  # tiny banks: draw with replacement
                negatives.append(pool[torch.randint(len(pool), (k,), device=q.device)])
        pos_feats = self.feats[torch.cat(positives)]
        neg_feats = self.feats[torch.stack(negatives)]
        inter = info_nce_from_logits((qn * pos_feats).sum(1), torch.einsum("bd,bkd->bk", qn, neg_feats),
                                     temperature, margin=-0.5)
        loss = interclr_loss(intra, inter)
        loss.backward()
        # update: Eq. 2, relabel, then recompute changed centroids with a loop over clusters
        with torch.no_grad():
            new = torch.nn.functional.normalize(
                (1 - self.momentum) * self.feats[ids] + self.momentum * q.detach(), dim=1)
            self.feats[ids] = new
            new_labels = (new @ self.centroids.T).argmax(dim=1)
            touched = torch.unique(torch.cat([self.labels[ids], new_labels]))
            self.labels[ids] = new_labels
            for c in touched.tolist():
                members = torch.where(self.labels == c)[0]
                if len(members):
                    self.centroids[c] = self.feats[members].mean(0)
        return float(loss)


def random_bank(n: int, d: int, clusters: int, seed: int, device: str):
    g = torch.Generator(device="cpu").manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    centroids = feats[torch.randperm(n, generator=g)[:clusters].to(device)].clone()
    return feats, centroids


def time_baseline(args, device: str) -> dict:
    feats, centroids = random_bank(args.n, args.dim, args.clusters, 0, device)
    labels = torch.empty(args.n, dtype=torch.int64, device=device)
    for start in range(0, args.n, 65536):
        labels[start:start + 65536] = (feats[start:start + 65536] @ centroids.T).argmax(1)
    bank = MmselfsupStyleBank(feats, centroids, labels, args.momentum)
    times = []
    for step in range(args.steps + 1):
        ids = torch.randperm(args.n, device=device)[:args.batch]
        q = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
        synchronize(device)
        start = time.perf_counter()
        bank.step(q, ids, args.negatives, 0.1, 0.1)
        synchronize(device)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    replica = args.n * args.dim * 4
    return {"ms_per_step": round(1000 * float(np.median(times)), 1),
            "bytes_per_step_multi_gpu_broadcast": replica,
            "note": "in-process; with several GPUs mmselfsup all-gathers the whole bank every iteration"}


def progress(message: str) -> None:
    """What the benchmark is doing, to stderr (stdout is the JSON), with the time since it started."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ray(args, shards: int) -> dict:
    progress(f"{shards} Ray shard(s): filling {args.n} rows, then k-means ({args.kmeans_iters} iterations)")
    bank, _, threads = filled_bank(args, shards, momentum=args.momentum, min_cluster=args.min_cluster)
    start = time.perf_counter()
    result = bank.init_clusters(iters=args.kmeans_iters, init="random", seed=0)
    kmeans_s = (time.perf_counter() - start) / (args.kmeans_iters + 1)  # + the final assignment pass
    out = {"threads_per_shard": threads, "kmeans_s_per_iter": round(kmeans_s, 2),
           "kmeans_inertia": result["inertia"][-1], "initial_centroids": result["initial_centroids"]}
    # "blocking": the update waited for inside the step; "async": the trainer's path —
    # update(block=False) after the optimiser step, completed by the next query. Between
    # steps the trainer sleeps --model-ms, a stand-in for forward + backward on a GPU (a sleep leaves the
    # CPU to the shards, as a GPU trainer would).
    for mode in ("blocking", "async"):
        progress(f"{shards} Ray shard(s): {args.steps} {mode} steps (+1 warm-up)")
        times, waits, trips, traffic = [], [], [], []
        for step in range(args.steps + 1):
            ids = np.random.default_rng(step).choice(args.n, args.batch, replace=False)
            q = torch.randn(args.batch, args.dim, requires_grad=True)
            before = (bank.traffic_bytes, bank.wait_seconds, bank.round_trips)
            start = time.perf_counter()
            answer = bank.query(q, ids, intra_negatives=args.negatives, inter_negatives=args.negatives,
                                strategy="semi_hard", temperature=0.1)
            loss = interclr_loss(info_nce_from_logits(answer.intra_pos, answer.intra_neg, 0.1),
                                 info_nce_from_logits(answer.inter_pos, answer.inter_neg, 0.1, margin=-0.5))
            loss.backward()
            bank.update(ids, q.detach(), block=mode == "blocking")
            if step:
                times.append(time.perf_counter() - start)
                traffic.append(bank.traffic_bytes - before[0])
                waits.append(bank.wait_seconds - before[1])
                trips.append(bank.round_trips - before[2])
            time.sleep(args.model_ms / 1000)
        bank.settle()
        out[mode] = {"ms_per_step": round(1000 * float(np.median(times)), 1),
                     "bank_wait_ms_per_step": round(1000 * float(np.median(waits)), 1),
                     "round_trips_per_step": float(np.mean(trips)), "bytes_per_step": int(np.median(traffic))}
    out["ms_per_step"] = out["async"]["ms_per_step"]
    out["bank_wait_saved"] = round(1 - out["async"]["bank_wait_ms_per_step"] /
                                   max(out["blocking"]["bank_wait_ms_per_step"], 1e-9), 2)
    bank.shutdown()
    return out


def filled_bank(args, shards: int, **spec):
    """(a bank of `shards` Ray shards holding random_bank's rows, those rows, threads per shard);
    `spec`: more BankSpec fields."""
    from bank import BankSpec, MemoryBank
    threads = max(1, (os.cpu_count() or 1) // shards)
    bank = MemoryBank.create(BankSpec(args.n, args.dim, num_shards=shards, num_clusters=args.clusters, seed=0,
                                      threads_per_shard=threads, **spec))
    feats, _ = random_bank(args.n, args.dim, args.clusters, 0, "cpu")
    for start in range(0, args.n, 262144):
        bank.set_features(np.arange(start, min(args.n, start + 262144)), feats[start:start + 262144])
    return bank, feats, threads


def faiss_kmeans(args, init: np.ndarray, feats: torch.Tensor | None = None) -> dict:
    """faiss-cpu's k-means from the same seeds on random_bank's rows (`feats` when already made)."""
    import faiss
    if feats is None:
        feats, _ = random_bank(args.n, args.dim, args.clusters, 0, "cpu")
    x = feats.numpy()
    km = faiss.Kmeans(args.dim, args.clusters, niter=args.kmeans_iters, seed=0,
                      max_points_per_centroid=args.n // args.clusters + 1)
    start = time.perf_counter()
    km.train(x, init_centroids=init)
    seconds = (time.perf_counter() - start) / max(1, args.kmeans_iters)
    # the inertia of the assignment to faiss's final centroids, computed like ours
    _, assign = km.index.search(x, 1)
    inertia = float(((x - km.centroids[assign[:, 0]]) ** 2).sum())
    return {"kmeans_s_per_iter": round(seconds, 2), "kmeans_inertia": inertia}


def time_kmeans(args) -> dict:
    """The job's k-means (MemoryBank.init_clusters, seeded from a random subset, Lloyd steps on the
    shards) against faiss-cpu's on the same data and seeds, and the k-means++ seeding it replaced,
    timed at 1/8 of the sample and of the clusters and scaled by 64 (its cost ∝ sample · C)."""
    import ray

    from bank.kmeans import kmeans_plus_plus
    shards = max(int(s) for s in args.shards.split(","))
    bank, feats, threads = filled_bank(args, shards, min_cluster=0)
    result = bank.init_clusters(iters=args.kmeans_iters, init="random", seed=0)
    out = {"shards": shards, "threads_per_shard": threads, "kmeans_seed_s": round(result["seed_seconds"], 3),
           "kmeans_s_per_iter": round(float(np.mean(result["iteration_seconds"])), 2),
           "kmeans_inertia": result["inertia"][-1]}
    bank.shutdown()
    ray.shutdown()
    sample, centres = min(args.n, 40 * args.clusters) // 8, max(1, args.clusters // 8)
    start = time.perf_counter()
    kmeans_plus_plus(feats[:sample].numpy(), centres, np.random.default_rng(0))
    measured = time.perf_counter() - start
    out["kmeans_pp_seed"] = {"measured_s": round(measured, 2), "sample": sample, "clusters": centres,
                             "extrapolated_s": round(64 * measured, 1),
                             "for": {"sample": 8 * sample, "clusters": args.clusters}}
    try:
        import faiss
    except ImportError:
        return out
    out["faiss_cpu"] = {**faiss_kmeans(args, result["initial_centroids"], feats), "threads": faiss.omp_get_max_threads()}
    out["ratio_s_per_iter_vs_faiss"] = round(out["kmeans_s_per_iter"] / max(out["faiss_cpu"]["kmeans_s_per_iter"], 1e-9), 2)
    return out


def time_shard(args) -> dict:
    """One shard's cost without Ray: its share of a step when the bank has `args.total_shards`."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shard = BankShard(BankSpec(args.n, args.dim, num_clusters=args.clusters, dtype=args.dtype), 0, device=device)
    feats, centroids = random_bank(args.n, args.dim, args.clusters, 0, device)
    shard.feats = feats.to(shard.storage)
    partial = shard.set_clusters(centroids.cpu().numpy())
    shard.set_replicas(partial["sums"], partial["counts"][None], centroids.cpu().numpy())
    share = math.ceil(args.negatives / args.total_shards)
    times = []
    for step in range(args.steps + 1):
        ids = np.random.default_rng(step).choice(args.n, args.batch, replace=False)
        q = torch.nn.functional.normalize(torch.randn(args.batch, args.dim), dim=1).numpy()
        labels = shard.get_labels(ids)
        shares = np.full(args.batch, share)
        synchronize(device)
        start = time.perf_counter()
        shard.anchor_info(ids)
        shard.score(q, ids, [
            {"anchor_labels": np.full(args.batch, -1), "shares": shares, "strategy": "random",
             "pool_fraction": 0.1, "want_positive": False},
            {"anchor_labels": labels, "shares": shares, "strategy": "semi_hard", "pool_fraction": 0.1,
             "want_positive": True}], 0.1, step)
        delta = shard.update(ids, q, args.momentum)
        shard.apply_deltas([delta])
        synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "rows": args.n, "negatives_share": share, "ms_per_step": round(1000 * float(np.median(times)), 2)}
    out.update(time_selection(args, shard, share, device))
    return out


def time_selection(args, shard, share: int, device: str) -> dict:
    """The semi-hard draw alone on one similarity chunk, against mmselfsup 0.x's (interclr_moco.py
    `contrast_inter`: `topk(similarity, pool)` then `multinomial` over the pool, without its
    same-cluster redraw loop, so the reference is timed cheaper than it is); and, for a half-precision
    shard, the similarities against widening the whole shard to float32 first (the previous code)."""
    from bank.shard import SCORE_BYTES
    rows = max(1, min(args.batch, SCORE_BYTES // (4 * args.n)))
    ids = np.random.default_rng(99).choice(args.n, rows, replace=False)
    q = torch.nn.functional.normalize(torch.randn(rows, args.dim, device=device), dim=1)
    labels = torch.as_tensor(shard.get_labels(ids), device=device)
    anchors = torch.as_tensor(ids, device=device)
    shares = torch.full((rows,), share, device=device)
    pool = math.ceil(0.1 * args.n)
    g = torch.Generator(device=device).manual_seed(0)

    def timed(fn, repeats=3):
        fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        return 1000 * (time.perf_counter() - start) / repeats

    sims = shard._similarity_fn()(q)
    ours = timed(lambda: shard._sample_by_similarity(sims.clone(), labels, anchors, shares, "semi_hard", 0.1, g))

    def reference():
        _, pool_ids = torch.topk(sims, pool, dim=1, sorted=False)
        picks = torch.multinomial(torch.ones(rows, pool, device=device), share)
        return torch.gather(pool_ids, 1, picks)
    theirs = timed(reference)
    out = {"selection": {"queries": rows, "pool": pool, "share": share, "ms": round(ours, 2),
                         "mmselfsup_topk_multinomial_ms": round(theirs, 2), "ratio": round(ours / theirs, 3)}}
    if shard.feats.dtype != torch.float32:
        widened = timed(lambda: q @ shard.feats.float().T)
        direct = timed(lambda: shard._similarity_fn()(q))
        out["similarities"] = {"ms": round(direct, 2), "widen_whole_shard_ms": round(widened, 2),
                               "ratio": round(direct / widened, 3)}
    return out


STARTED = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ray", "shard", "baseline"], default="ray")
    parser.add_argument("--kmeans-only", action="store_true",
                        help="time the bank's k-means (seeding, s per Lloyd iteration) against faiss-cpu")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1_000,
                        help="default 1,000: 200 rows per cluster at the default --n (ImageNet-1K at 10k: 128); "
                             "at 20 per cluster upkeep (--min-cluster) refills half the clusters every step")
    parser.add_argument("--min-cluster", type=int, default=20, help="the bank's upkeep floor (0: off)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--negatives", type=int, default=16_384)
    parser.add_argument("--momentum", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kmeans-iters", type=int, default=2)
    parser.add_argument("--shards", default="1,2")
    parser.add_argument("--total-shards", type=int, default=8, help="--mode shard: shards sharing K")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model-ms", type=float, default=200.0,
                        help="the trainer's forward + backward between steps (a sleep: the GPU's share)")
    args = parser.parse_args()
    out = {"benchmark": "bank_step", "n": args.n, "dim": args.dim, "clusters": args.clusters,
           "batch": args.batch, "negatives": args.negatives, "cores": os.cpu_count()}
    if args.kmeans_only:
        import ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        out = {"benchmark": "bank_kmeans", "n": args.n, "dim": args.dim, "clusters": args.clusters,
               "iters": args.kmeans_iters, "cores": os.cpu_count(), **time_kmeans(args)}
        print(json.dumps(out, indent=1))
        return
    if args.mode == "shard":
        out["shard"] = time_shard(args)
        print(json.dumps(out, indent=1))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress(f"in-process mmselfsup-style bank: {args.steps} steps (+1 warm-up) at N = {args.n}")
    out["in_process_mmselfsup_style"] = time_baseline(args, device)
    if args.mode == "baseline":
        print(json.dumps(out, indent=1))
        return
    import ray
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init = None
    for shards in [int(s) for s in args.shards.split(",")]:
        result = time_ray(args, shards)
        init = result.pop("initial_centroids")
        result["ratio_vs_in_process"] = round(result["ms_per_step"] / out["in_process_mmselfsup_style"]["ms_per_step"], 2)
        out[f"viewbank_{shards}_shards"] = result
    progress(f"faiss-cpu k-means on the same seeds ({args.kmeans_iters} iterations)")
    out["faiss_cpu"] = faiss_kmeans(args, init)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
