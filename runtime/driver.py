"""The Ray driver every job runs: config → banks (driver-owned actors) → loader actors → a Ray
Train `TorchTrainer` → evaluation (kNN trained vs random init, pictures) → summary.json.

    python jobs/interclr_imagenet.py --preset demo           # starts a local Ray if none is given
    ray job submit --working-dir . -- python jobs/interclr_imagenet.py --preset imagenet

Submitting the same `--name` again resumes the run from its last checkpoint (Ray Train restores
from RunConfig(storage_path, name)), also after `ray job stop` (the driver's SIGTERM ends it, and
Ray ends every actor the driver created with it); a killed Train worker restarts from it
(FailureConfig); a killed bank shard restores from the bank snapshot the checkpoint wrote.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from runtime.config import ConfigError, JobConfig, parse_args, print_config, resolve_optimizer


class RunLock:
    """Held by the driver of a run folder (a named actor it owns, so it goes when that driver ends,
    killed or not): who holds it."""

    def __init__(self, owner: dict):
        self.owner = owner

    def who(self) -> dict:
        return self.owner


def hold_run(run_dir: Path, wait_seconds: float = 15.0):
    """The cluster-wide lock of `run_dir`: a second driver of the same run (the same --name and
    storage submitted again while it runs) is refused with a ConfigError naming the holder. A lock
    whose driver just ended may take a moment to go; it is waited for, not reported."""
    import hashlib
    import socket

    import ray
    name = "viewbank-run-" + hashlib.sha256(str(run_dir).encode()).hexdigest()[:20]
    owner = {"run": str(run_dir), "pid": os.getpid(), "host": socket.gethostname(),
             "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    remote = ray.remote(num_cpus=0, max_restarts=0)(RunLock)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            lock = remote.options(name=name, namespace="viewbank").remote(owner)
            ray.get(lock.who.remote(), timeout=60)
            return lock
        except ValueError:  # the name is taken
            try:
                holder = ray.get(ray.get_actor(name, namespace="viewbank").who.remote(), timeout=10)
            except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                holder = None  # its driver has ended: the name is on its way out
            if holder is not None:
                raise ConfigError(f"run {run_dir} is already running (driver pid {holder['pid']} on "
                                  f"{holder['host']} since {holder['since']}): wait for it, stop it "
                                  "(ray job stop), or pass another --name") from None
            if time.monotonic() > deadline:
                raise ConfigError(f"run {run_dir}: the lock of an ended driver did not go within "
                                  f"{wait_seconds:.0f} s; resubmit") from None
            time.sleep(0.5)


def worker_resources(config: JobConfig) -> dict:
    """One Train worker's Ray resources (ScalingConfig.resources_per_worker)."""
    t = config.train
    return {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}


def reserve_gpus(config: JobConfig, nodes: list[dict], num_banks: int):
    """The GPUs the Train workers share with the bank shards and GPU loader actors, each shard on a GPU
    of its own beside a worker (pipeline.placement `GpuReservation`: why placement groups), planned by
    pre-flight's per-GPU check; release() when the job ends."""
    from pipeline.placement import GpuReservation, PlacementError
    from runtime.preflight import check_gpu_packing
    try:
        return GpuReservation.create(check_gpu_packing(config, nodes, num_banks))
    except PlacementError as exc:
        raise ConfigError(str(exc)) from None


def bank_actor_options(config: JobConfig, nodes: list[dict], gpus, bank: int, num_banks: int) -> list[dict]:
    """Ray actor options of each shard of bank `bank`: its slot of `gpus` (a GpuReservation) for GPU
    shards; CPU shards dealt over the nodes and pinned there (pipeline.placement: why hard)."""
    from pipeline.placement import deal, node_capacity, pinned
    shards = range(bank * config.bank.shards, (bank + 1) * config.bank.shards)
    if config.bank.gpus_per_shard:
        return [gpus.shard_options(shard) for shard in shards]
    homes = deal({node: 1 for node in node_capacity(nodes, "CPU")}, num_banks * config.bank.shards)
    return [{"scheduling_strategy": pinned(homes[shard], soft=False)} for shard in shards]


def loader_actor_options(config: JobConfig, gpus, rank: int) -> dict:
    """Ray actor options of Train worker `rank`'s loader actors: beside its GPU with data.device=gpu
    (data.loader_gpus each), else CPUs only, anywhere."""
    if config.data.device == "gpu":
        return gpus.loader_options(rank)
    return {"num_cpus": config.data.loader_cpus}


def scaling_config(config: JobConfig, gpus):
    """Ray Train's ScalingConfig: each worker on the node of its GPU slot where `gpus` placed companions
    (label_selector; Ray Train v2 places the workers' bundles with it, worker_group.py)."""
    from ray.train import ScalingConfig
    return ScalingConfig(num_workers=config.train.num_workers, use_gpu=config.train.use_gpu,
                         resources_per_worker=worker_resources(config), label_selector=gpus.worker_labels())


def job_env_vars(address: str | None) -> dict:
    """Environment of every actor of the job: this checkout first on PYTHONPATH (then any PYTHONPATH the
    job was submitted with: its runtime env's variables are this process's too). RAY_ADDRESS where the
    cluster is known: Ray Train's PlacementGroupCleaner finds "its" cluster by auto-detection, which
    fails with a traceback when a second Ray runs on the machine ("Found multiple active Ray instances")."""
    root = str(Path(__file__).resolve().parents[1])
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env = {"PYTHONPATH": os.pathsep.join(paths),
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # Ray Train 2.60 tees a worker's print to its logger: every line twice
    known = address or os.environ.get("RAY_ADDRESS")
    if known and known not in ("auto", "local") and "://" not in known:
        env["RAY_ADDRESS"] = known
    return env


def init_ray(address: str | None) -> None:
    """Connect (or start a local Ray) with `job_env_vars`. A job submitted with env_vars of its own
    (`ray job submit --runtime-env-json`) holding one of these keys would make ray.init refuse the
    merge; RAY_OVERRIDE_JOB_RUNTIME_ENV lets ours win, and ours keep the job's PYTHONPATH."""
    import ray
    os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True,
             runtime_env={"env_vars": job_env_vars(address)})


def samples_if_converted(config: JobConfig) -> int | None:
    """The training split's size when its shards exist (for --print-config), else None."""
    from pipeline.loader import LoaderError, shard_list
    try:
        return shard_list(Path(config.data.root), config.data.train_split)[2]
    except LoaderError:
        return None


def check_inputs(config: JobConfig) -> tuple[int, np.ndarray, list[str]]:
    """Fail before any Ray resource exists: the shards and manifest of both splits must be there."""
    from pipeline.loader import LoaderError, shard_list
    from pipeline.manifest import Manifest, ManifestError
    root = Path(config.data.root)
    try:
        _, _, count = shard_list(root, config.data.train_split)
        shard_list(root, config.data.val_split)
        manifest = Manifest(root, config.data.train_split)
        labels, classes = manifest.labels(), manifest.classes
        manifest.close()
    except (LoaderError, ManifestError) as exc:
        raise ConfigError(f"{exc}") from None
    return count, labels, classes


def run(config: JobConfig, address: str | None = None) -> dict:
    import ray
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from bank import BankSpec, MemoryBank
    from pipeline.actors import create_loader_actors
    from runtime.build import build_method, training_recipe
    from runtime.preflight import check_data, check_resources, check_shared_storage
    from runtime.train import CHECKPOINTS_KEPT, train_loop_per_worker

    started = time.perf_counter()
    num_samples, labels, classes = check_inputs(config)
    resolve_optimizer(config)  # a config built without parse_args gets the method's optimiser too
    probe = build_method(config, len(classes))
    check_data(config, probe, num_samples)
    print_config(config)
    config.data.root = str(Path(config.data.root).resolve())
    storage = Path(config.storage).resolve()
    run_dir = storage / config.name

    init_ray(address)
    nodes, requests = ray.nodes(), probe.bank_requests()
    check_resources(config, ray.cluster_resources(), nodes, num_banks=len(requests))
    lock = hold_run(run_dir)  # before anything of the run folder is written
    banks, loaders, gpus = [], [], None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        check_shared_storage(run_dir, nodes)  # the bank snapshots (run_dir/bank-i) are in the same folder
        gpus = reserve_gpus(config, nodes, len(requests))
        for i, request in enumerate(requests):
            spec = BankSpec(num_samples, request.dim, num_shards=config.bank.shards,
                            num_clusters=config.bank.clusters if request.clusters else 1, momentum=request.momentum,
                            seed=config.train.seed, dtype=config.bank.dtype, snapshot_root=str(run_dir / f"bank-{i}"),
                            min_cluster=config.bank.min_cluster, relabel=config.bank.labels == "online")
            banks.append(MemoryBank.create(spec, true_labels=labels if request.clusters else None,
                                           actor_options=bank_actor_options(config, nodes, gpus, i, len(requests))))
        for rank in range(config.train.num_workers if config.data.loaders else 0):
            loaders.append(create_loader_actors(  # one rank at a time: the finally kills every group made
                config.data.root, training_recipe(probe, config), config.data.batch_size,
                num_loaders=config.data.loaders, rank=rank, world_size=config.train.num_workers,
                seed=config.train.seed, split=config.data.train_split, device=config.data.device,
                num_threads=config.data.loader_threads, actor_options=loader_actor_options(config, gpus, rank)))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": config, "banks": banks, "loaders": loaders or None,
                               "num_samples": num_samples, "num_classes": len(classes), "run_dir": str(run_dir)},
            scaling_config=scaling_config(config, gpus),
            run_config=RunConfig(name=config.name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=config.train.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)))
        result = trainer.fit()
        train_seconds = time.perf_counter() - started
        summary = evaluate(config, result.checkpoint, run_dir, banks, classes)
    finally:
        for group in loaders:
            for actor in group:
                ray.kill(actor, no_restart=True)
        for bank in banks:
            bank.shutdown()
        if gpus is not None:
            gpus.release()
        ray.kill(lock)
    summary.update(wall_seconds=time.perf_counter() - started, train_seconds=train_seconds,
                   **throughput(run_dir / "metrics.jsonl"))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {run_dir / 'summary.json'}")
    rate, wait = summary.get("img_per_s"), summary.get("data_wait_fraction")
    measured = f"img/s {rate:.1f} | data-wait {wait:.1%} | " if rate is not None and wait is not None else ""
    print(f"{measured}wall {summary['wall_seconds']:.0f} s")  # no step trained here: no rate to print
    pixels = f" | pixels {summary['knn_top1_pixels']:.3f}" if "knn_top1_pixels" in summary else ""
    print(f"kNN top-1: trained {summary['knn_top1']:.3f} | random init {summary['knn_top1_random_init']:.3f}{pixels}")
    return summary


def throughput(metrics_path: Path) -> dict:
    if not metrics_path.exists():
        return {}
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rates = [r["img_per_s"] for r in records if "img_per_s" in r]
    waits = [r["data_wait_fraction"] for r in records if "data_wait_fraction" in r]
    last = records[-1] if records else {}
    return {"img_per_s": float(np.median(rates)) if rates else None,
            "data_wait_fraction": float(np.mean(waits)) if waits else None, "steps": last.get("step")}


def evaluate(config: JobConfig, checkpoint, run_dir: Path, banks, classes) -> dict:
    """The numbers the Train workers measured on their devices after the last step (kNN top-1 of the
    trained backbone and of its random init, a supervised classifier's val top-1; runtime.evaluate
    `evaluate_on_workers`, run_dir/eval.json), the mean-centred pixel baseline, bank stats, and the
    pictures drawn from what rank 0 saved. No model runs here."""
    import torch

    from pipeline.manifest import Manifest
    from runtime import evaluate as ev
    from runtime.train import bank_metrics

    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/meta.json") as meta:
        results = ev.read_worker_results(run_dir, json.loads(meta.read())["step"])
    d, e = config.data, config.eval
    space = results.pop("colorspace")  # the centre views' colour space the workers used (CMC: Lab / YDbDr)
    if e.pixel_baseline:
        torch.set_num_threads(os.cpu_count() or 1)
        results["knn_top1_pixels"] = ev.pixel_knn_top1(d.root, d.train_split, d.val_split, d.image_size, space,
                                                       e.knn_k, e.knn_temperature, limit=e.knn_train_samples)
        print(f"kNN (pixels): {results['knn_top1_pixels']:.4f} (mean-centred pixels of the same split)", flush=True)
    results.update(bank_metrics(banks))
    if e.pictures:
        saved = dict(np.load(run_dir / ev.PICTURES_FILE))
        train_manifest, val_manifest = Manifest(d.root, d.train_split), Manifest(d.root, d.val_split)
        pictures = {"retrieval.png": lambda p: ev.retrieval_grid(p, saved["query_ids"], saved["neighbour_ids"],
                                                                 train_manifest, val_manifest),
                    "tsne.png": lambda p: ev.tsne_plot(p, saved["tsne_feats"], saved["tsne_labels"], classes),
                    "loss_curves.png": lambda p: ev.loss_curves(p, run_dir / "metrics.jsonl")}
        clustered = [banks[i] for i in saved["clustered_banks"]]
        if clustered:
            ids = saved["anchor_ids"]
            pictures["negatives.png"] = lambda p: ev.negatives_figure(p, clustered[0], clustered[0].get(ids), ids,
                                                                      train_manifest)
        for filename, draw in pictures.items():
            try:
                draw(run_dir / filename)
            except Exception as exc:  # a picture must never cost the run its summary
                print(f"warning: {filename} not written: {str(exc).splitlines()[0]}", flush=True)
    return results


def main(argv: list[str] | None = None, method: str = "interclr", default_preset: str = "imagenet",
         description: str = "") -> int:
    try:
        config, args = parse_args(argv, method, default_preset, description)
        if args.print_config:
            print_config(config)
            from runtime.build import build_method
            from runtime.preflight import placement_plan
            dims = [request.dim for request in build_method(config, 1000).bank_requests()]
            print("\n".join(placement_plan(config, dims, samples_if_converted(config))), file=sys.stderr)
            return 0
        run(config, args.address)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
