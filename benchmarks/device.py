"""The one prepared device check: what the GPU path costs and whether it runs, with torch alone (the GPU
machines have no Ray, DALI or lmdb). Prints one JSON object (and writes it with --out):

    step    ResNet-50 at 224 px, MoCo-v2 (SGD) and SimCLR (LARS) steps on synthetic device-resident
            batches: img/s for 32 / bf16-mixed / 16-mixed × channels_last off / on, peak GPU memory
    bank    one bank shard's query (semi-hard, 16,384 negatives) + update at N = 1.28M, D = 128,
            10k clusters: ms per step on the GPU and on the host's CPU
    kmeans  k-means seeding and one Lloyd iteration 1.28M → 10k on the GPU
    knn     weighted kNN of 50k queries against a 1.28M × 128 memory (seconds)
    ddp     a world-size-1 NCCL group: SyncBN conversion, DDP, all_gather_with_grad's collective and
            shuffle BN run, and the step matches the non-distributed one

    python benchmarks/device.py --out benchmarks/results/device.json      # ≤ 5 min on one H100
    python benchmarks/device.py --smoke                                  # CPU, tiny sizes, bf16-mixed

Every number is measured in this run on this machine; `targets` compares them with the figures the
GPU path is meant to reach.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import MoCo, SimCLR, resnet  # noqa: E402
from models.momentum import all_gather_with_grad, shuffled_forward  # noqa: E402
from runtime.knn import nearest, vote_top1  # noqa: E402
from runtime.optim import build_optimizer  # noqa: E402
from runtime.step import Precision, prepare_model, to_device, train_step  # noqa: E402

FULL = {"depth": 50, "width": 1.0, "size": 224, "batch": 256, "small_images": False, "queue": 65_536,
        "warmup": 3, "steps": 8, "bank_rows": 1_281_167, "bank_batch": 256, "negatives": 16_384,
        "clusters": 10_000, "bank_steps": 10, "cpu_bank_steps": 3, "knn_queries": 50_000,
        "knn_memory": 1_281_167, "dim": 128}
SMOKE = {"depth": 18, "width": 0.125, "size": 32, "batch": 16, "small_images": True, "queue": 256,
         "warmup": 1, "steps": 2, "bank_rows": 4096, "bank_batch": 32, "negatives": 64, "clusters": 32,
         "bank_steps": 2, "cpu_bank_steps": 1, "knn_queries": 256, "knn_memory": 4096, "dim": 128}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 0) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def build(method: str, sizes: dict) -> torch.nn.Module:
    backbone = resnet(sizes["depth"], width=sizes["width"], small_images=sizes["small_images"])
    if method == "moco":
        return MoCo(backbone, queue_size=sizes["queue"])
    return SimCLR(backbone)


def step_benchmark(device: torch.device, sizes: dict, precisions: list[str]) -> dict:
    """img/s of whole training steps (runtime.step.train_step: forward under autocast, backward, the
    optimiser, EMA and queue) from device-resident batches."""
    results = {}
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(sizes["batch"], 3, sizes["size"], sizes["size"], generator=g) for _ in range(2)]
    host_batch = {"views": views, "index": torch.arange(sizes["batch"]),
                  "label": torch.zeros(sizes["batch"], dtype=torch.long)}
    for method, optimizer_name in (("moco", "sgd"), ("simclr", "lars")):
        for precision_name in precisions:
            for channels_last in (False, True):
                name = f"{method}/{precision_name}/{'channels_last' if channels_last else 'contiguous'}"
                torch.manual_seed(0)
                model = prepare_model(build(method, sizes), device, channels_last)
                optimizer = build_optimizer(model, optimizer_name, lr=0.03, weight_decay=1e-4, momentum=0.9)
                schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
                precision = Precision.create(precision_name, device)
                batch = to_device(host_batch, device, channels_last)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                losses = []

                def step():
                    losses.append(train_step(model, model, optimizer, schedule, precision, batch, 0.0, 0).out["loss"])
                times = timed(step, device, sizes["steps"], sizes["warmup"])
                seconds = statistics.median(times)
                results[name] = {"img_per_s": sizes["batch"] / seconds, "step_ms": 1000 * seconds,
                                 "loss_finite": bool(torch.isfinite(torch.stack(losses)).all())}
                if device.type == "cuda":
                    results[name]["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                print(f"step {name}: {results[name]['img_per_s']:.0f} img/s", file=sys.stderr, flush=True)
                del model, optimizer, batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return results


def make_shard(device: torch.device, sizes: dict, dtype: str = "float32"):
    """A bank shard holding every row (one shard of the bank), random unit features, clustered by
    assigning them to `clusters` random rows as centroids."""
    from bank.shard import BankShard
    from bank.spec import BankSpec
    shard = BankShard(BankSpec(sizes["bank_rows"], sizes["dim"], num_clusters=sizes["clusters"], dtype=dtype), 0,
                      device=device.type)
    g = torch.Generator().manual_seed(0)
    for start in range(0, sizes["bank_rows"], 262_144):
        ids = np.arange(start, min(sizes["bank_rows"], start + 262_144))
        feats = torch.nn.functional.normalize(torch.randn(len(ids), sizes["dim"], generator=g), dim=1)
        shard.set_features(ids, feats.numpy())
    centroids = shard.get(np.random.default_rng(0).choice(sizes["bank_rows"], sizes["clusters"], replace=False))
    shard.set_clusters(centroids)
    return shard


def bank_step(shard, sizes: dict, rng: np.random.Generator, seed: int) -> None:
    """What MemoryBank.query + update ask of a shard in one InterCLR step: anchors' labels, one
    semi-hard inter request of `negatives` per query, the momentum update, its delta applied."""
    batch = sizes["bank_batch"]
    ids = rng.choice(sizes["bank_rows"], batch, replace=False)
    query = torch.nn.functional.normalize(torch.randn(batch, sizes["dim"]), dim=1).numpy()
    anchors = shard.anchor_info(ids)
    shard.score(query, ids, [{"anchor_labels": anchors["labels"], "shares": np.full(batch, sizes["negatives"]),
                              "strategy": "semi_hard", "pool_fraction": 0.1, "want_positive": True}], 0.2, seed)
    delta = shard.update(ids, query, 1.0)
    shard.apply_deltas([delta])


def bank_benchmark(device: torch.device, sizes: dict) -> dict:
    results = {}
    devices = [device] + ([torch.device("cpu")] if device.type == "cuda" else [])
    for where in devices:
        shard = make_shard(where, sizes)
        rng = np.random.default_rng(0)
        repeats = sizes["bank_steps"] if where.type == "cuda" else sizes["cpu_bank_steps"]
        times = timed(lambda: bank_step(shard, sizes, rng, int(rng.integers(1 << 30))), where, repeats, warmup=1)
        results[f"{where.type}_ms_per_step"] = 1000 * statistics.median(times)
        print(f"bank {where.type}: {results[f'{where.type}_ms_per_step']:.1f} ms", file=sys.stderr, flush=True)
        del shard
    if "cpu_ms_per_step" in results and device.type == "cuda":
        results["cpu_over_gpu"] = results["cpu_ms_per_step"] / results["cuda_ms_per_step"]
    results.update(rows=sizes["bank_rows"], dim=sizes["dim"], negatives=sizes["negatives"],
                   clusters=sizes["clusters"], batch=sizes["bank_batch"])
    return results


def kmeans_benchmark(device: torch.device, sizes: dict) -> dict:
    """Seeding and one Lloyd iteration of the bank's k-means on the device (bank.kmeans)."""
    from bank.kmeans import nearest_centroid
    from bank.kmeans import seed_centroids
    g = torch.Generator().manual_seed(0)
    points = torch.nn.functional.normalize(torch.randn(sizes["bank_rows"], sizes["dim"], generator=g), dim=1)
    points = points.to(device)
    synchronize(device)
    start = time.perf_counter()
    centroids = seed_centroids(points, sizes["clusters"], seed=0)
    synchronize(device)
    seed_s = time.perf_counter() - start
    start = time.perf_counter()
    labels, distances = nearest_centroid(points, centroids)
    sums = torch.zeros_like(centroids).index_add_(0, labels, points)
    counts = torch.bincount(labels, minlength=sizes["clusters"])
    centroids = sums / counts.clamp_min(1)[:, None]
    synchronize(device)
    iteration_s = time.perf_counter() - start
    return {"seed_s": seed_s, "s_per_iter": iteration_s, "points": sizes["bank_rows"], "clusters": sizes["clusters"],
            "mean_sq_distance": float(distances.mean()), "empty_clusters": int((counts == 0).sum())}


def knn_benchmark(device: torch.device, sizes: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(sizes["knn_memory"], sizes["dim"], generator=g), dim=1)
    labels = torch.randint(0, 1000, (sizes["knn_memory"],), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(sizes["knn_queries"], sizes["dim"], generator=g), dim=1)
    memory, queries = memory.to(device), queries.to(device)
    synchronize(device)
    start = time.perf_counter()
    found = nearest(memory, labels.to(device), torch.arange(len(labels), device=device), queries, k=20)
    top1 = vote_top1(found, np.zeros(sizes["knn_queries"], dtype=np.int64))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "queries": sizes["knn_queries"], "memory": sizes["knn_memory"], "top1_random": top1}


def ddp_check(device: torch.device, sizes: dict) -> dict:
    """A world-size-1 process group (NCCL on a GPU, gloo on CPU): SyncBN conversion and DDP around
    SimCLR, the all_gather collective all_gather_with_grad uses, and shuffle BN's encode; each against
    the same computation without the group."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29_500 + os.getpid() % 1000))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        small = dict(sizes, batch=min(sizes["batch"], 32))
        torch.manual_seed(0)
        plain = build("simclr", small).to(device)
        synced = copy.deepcopy(plain)
        if device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only
            synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(synced)
        sync_bn_layers = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        wrapped = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
        g = torch.Generator().manual_seed(1)
        views = [torch.randn(small["batch"], 3, small["size"], small["size"], generator=g) for _ in range(2)]
        batch = to_device({"views": views, "index": torch.arange(small["batch"]),
                           "label": torch.zeros(small["batch"], dtype=torch.long)}, device)
        results = {"backend": backend, "sync_bn_layers": sync_bn_layers}
        losses = {}
        for name, model, method in (("plain", plain, plain), ("ddp", wrapped, synced)):
            optimizer = build_optimizer(method, "lars", lr=0.3, weight_decay=1e-6, momentum=0.9)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            losses[name] = float(train_step(method, model, optimizer, schedule, Precision.create("32", device), batch,
                                            0.0, 0).out["loss"].detach())
        results["loss_plain"], results["loss_ddp"] = losses["plain"], losses["ddp"]
        results["step_matches"] = abs(losses["plain"] - losses["ddp"]) <= 1e-4 * max(1.0, abs(losses["plain"]))
        x = torch.randn(8, 4, device=device, requires_grad=True)
        gathered = torch.cat(dist_nn.all_gather(x), dim=0)  # the collective behind all_gather_with_grad
        gathered.sum().backward()
        results["all_gather_matches"] = bool(torch.equal(gathered.detach(), x.detach())
                                             and torch.equal(x.grad, torch.ones_like(x)))
        results["all_gather_with_grad_rows"] = int(all_gather_with_grad(x)[0].shape[0])
        encoder = plain.backbone.train()
        rows = batch["views"][0]
        torch.manual_seed(3)
        shuffled = shuffled_forward(encoder, rows, splits=2)
        torch.manual_seed(3)
        order = torch.randperm(rows.shape[0]).to(device)
        reference = torch.cat([encoder(part) for part in rows[order].chunk(2)])[torch.argsort(order)]
        results["shuffle_bn_matches"] = bool(torch.allclose(shuffled, reference, rtol=1e-4, atol=1e-5))
        return results
    finally:
        dist.destroy_process_group()


def targets(results: dict, device: torch.device) -> dict:
    """The GPU path's targets, read off this run: bf16 step ≥ 1.8× fp32, channels_last ≥ +10 %,
    bank step ≤ 10 % of the bf16 model step, kNN 50k × 1.28M ≤ 30 s."""
    step = results.get("step", {})
    out = {}
    fp32, bf16 = step.get("moco/32/contiguous"), step.get("moco/bf16-mixed/channels_last")
    if fp32 and bf16:
        out["bf16_channels_last_over_fp32"] = bf16["img_per_s"] / fp32["img_per_s"]
    plain = step.get("moco/bf16-mixed/contiguous")
    if plain and bf16:
        out["channels_last_gain"] = bf16["img_per_s"] / plain["img_per_s"] - 1
    bank = results.get("bank", {}).get(f"{device.type}_ms_per_step")
    if bank and bf16:
        out["bank_fraction_of_bf16_step"] = bank / bf16["step_ms"]
    if "knn" in results:
        out["knn_seconds"] = results["knn"]["seconds"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, bf16-mixed only (the test suite's)")
    parser.add_argument("--only", nargs="+", choices=("step", "bank", "kmeans", "knn", "ddp"),
                        help="run these parts only")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    # CPU steps of a freshly initialised SimCLR hit denormal floats (measured: 5 s instead of 0.05 s per
    # tiny step); flushing them to zero changes no result and times the arithmetic, not the trap
    torch.set_flush_denormal(True)
    if args.smoke:
        device, sizes, precisions = torch.device("cpu"), SMOKE, ["bf16-mixed"]
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", 0), FULL
        precisions = ["32", "bf16-mixed", "16-mixed"] if torch.cuda.is_bf16_supported() else ["32", "16-mixed"]
    else:
        print("error: no CUDA device here; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "torch": torch.__version__, "smoke": args.smoke, "sizes": sizes}
    parts = {"step": lambda: step_benchmark(device, sizes, precisions), "bank": lambda: bank_benchmark(device, sizes),
             "kmeans": lambda: kmeans_benchmark(device, sizes), "knn": lambda: knn_benchmark(device, sizes),
             "ddp": lambda: ddp_check(device, sizes)}
    started = time.perf_counter()
    for name in args.only or parts:
        part_start = time.perf_counter()
        try:
            results[name] = parts[name]()
        except Exception as exc:  # one failing part must not hide the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
        results.setdefault("part_seconds", {})[name] = time.perf_counter() - part_start
    results["targets"] = targets(results, device)
    results["wall_seconds"] = time.perf_counter() - started
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    failed = [name for name in parts if isinstance(results.get(name), dict) and "error" in results[name]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
