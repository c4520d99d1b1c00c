"""The Ray Train worker loop shared by every job: `train_loop_per_worker(loop_config)`.

loop_config (built by runtime.driver): "config" (the JobConfig itself, so a method registered
outside models/ reaches the workers), "banks" (MemoryBank clients, driver-owned), "loaders" (per
global rank, the handles of its loader actors; None = DALI in the worker), "num_samples",
"num_classes", "run_dir". Each worker, top to bottom:
  1. `setup_worker`: builds the method, attaches the banks, wraps it in DDP (gloo on CPU, nccl on
     GPU), the method's optimiser (SGD or LARS, runtime.optim) and `lr_schedule` (warm-up, cosine);
  2. `resume` from `ray.train.get_checkpoint()` (model, optimiser, schedule, step; rank 0 restores
     the banks from the snapshot the checkpoint names), or `initialise_banks` and `prime_queue`;
  3. `train`: InterCLR k-means where `clustering_due`, then per step `runtime.step.train_step`
     (forward under `train.precision`'s autocast, backward, optimiser, schedule, the method's EMA and
     queued bank / queue writes); `report` checkpoints every `checkpoint_every` steps and at every
     epoch end;
  4. `evaluate_on_workers` (runtime.evaluate): kNN top-1 of the trained backbone and of its random
     init, each rank on its share of the data on its device; rank 0 writes run_dir/eval.json.
Rank 0 writes metrics.jsonl + TensorBoard and prints one progress line per interval.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2._internal.execution import context as train_context  # its logger: see setup_worker

from pipeline.actors import ActorLoader
from pipeline.loader import build_loader
from runtime.build import build_method, training_recipe, uses_sync_bn
from runtime.config import JobConfig
from runtime import preflight
from runtime.evaluate import evaluate_on_workers, knn_on_workers
from runtime.optim import build_optimizer
from runtime.step import Precision, prepare_model, to_device, train_step

PROGRESS_SECONDS = 10.0
CHECKPOINTS_KEPT = 2  # Ray Train checkpoints kept (CheckpointConfig.num_to_keep)
BANK_SNAPSHOTS_KEPT = CHECKPOINTS_KEPT + 1  # each kept checkpoint names one; one spare while reporting


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def lr_schedule(optimizer: torch.optim.Optimizer, config: JobConfig, total_steps: int,
                steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear scaling (`train.lr` is per 256 images), linear warm-up over `lr_warmup_epochs` (at most a
    tenth of the schedule: step k of w runs at (k+1)/w of the base), then cosine decay to 0 over the
    rest (SimCLR Sect. B.1, MoCo-v2's cos). Stepped once per optimiser step."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
    t = config.train
    base = t.lr * config.data.batch_size * t.num_workers / 256
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = base
    warmup = min(t.lr_warmup_epochs * steps_per_epoch, total_steps // 10)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
    if warmup == 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


class Batches:
    """This worker's batches of one epoch, from its loader actors or an in-process DALI loader,
    cut to `steps` so every rank runs the same number of DDP steps; counts the time spent waiting."""

    def __init__(self, config: JobConfig, recipe, rank: int, world: int, actors, device="cpu"):
        self.wait_seconds = 0.0
        d = config.data
        if actors:
            self.actor_loader = ActorLoader(actors, prefetch=d.prefetch, device=device)
        else:
            self.actor_loader = None
            self.loader = build_loader(d.root, recipe, d.batch_size, device=d.device, rank=rank, world_size=world,
                                       seed=config.train.seed, split=d.train_split, num_threads=d.loader_threads,
                                       keep_on_gpu=d.device == "gpu",
                                       pin_memory=d.device == "cpu" and torch.device(device).type == "cuda")

    def head(self, steps: int):
        """The first `steps` batches of epoch 0, without reading the rest (every epoch builds its own
        pipeline: nothing to drain)."""
        yield from self.epoch(0, steps)

    def epoch(self, epoch: int, steps: int, skip: int = 0):
        """Batches `skip` … `steps`-1 of the epoch, in the epoch's own seeded order; a resumed epoch
        starts the reader at its offset (pipeline.loader `epoch_order`): nothing skipped is decoded."""
        if self.actor_loader is not None:
            source = self.actor_loader.epoch(epoch, skip=skip)
        else:
            source = iter(self.loader.epoch(epoch, skip=skip))
        for _ in range(skip, steps):
            start = time.perf_counter()
            batch = next(source)
            self.wait_seconds += time.perf_counter() - start
            yield batch


def initialise_banks(method, banks, batches: Batches, device, steps: int, config: JobConfig, rank: int,
                     precision: Precision) -> None:
    """Fill the banks (one no-grad pass of the initial encoder, or unit noise), then rank 0 runs
    k-means for the banks that need pseudo-labels (unless a warm-up comes first)."""
    if not banks:
        return
    if config.bank.init == "extract":
        method.train(False)
        for batch in batches.epoch(0, steps):
            with torch.no_grad(), precision.autocast():
                features = method.bank_features(to_device(batch, device, config.model.channels_last))
            for bank, feats in zip(banks, features):
                bank.set_features(batch["index"], feats)
        method.train(True)
    elif rank == 0:
        generator = torch.Generator().manual_seed(config.train.seed)
        for bank in banks:
            for start in range(0, bank.num_samples, 65_536):
                ids = torch.arange(start, min(bank.num_samples, start + 65_536))
                bank.set_features(ids, torch.nn.functional.normalize(
                    torch.randn(len(ids), bank.dim, generator=generator), dim=1))
    barrier()
    if getattr(method, "warmup_epochs", 0) == 0:
        cluster_banks(method, banks, config, rank)


def prime_queue(method, batches: Batches, device, config: JobConfig, precision: Precision) -> None:
    """Fill a MoCo-style queue with keys of real images (no grad; every rank, as push gathers)."""
    queue = getattr(method, "queue", None)
    if queue is None:
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    steps = -(-len(queue.keys) // (config.data.batch_size * world))  # push enqueues every rank's keys
    method.train(True)  # keys as in training (batch statistics)
    for batch in batches.head(steps):
        with precision.autocast():
            method.prime(to_device(batch, device, config.model.channels_last))


def cluster_banks(method, banks, config: JobConfig, rank: int, epoch: int = 0) -> None:
    """Rank 0 runs the global k-means (the shards do the work, bank.client.MemoryBank.init_clusters);
    the other ranks wait for it through the bank (`wait_clustered`), not in a process-group
    barrier, so a k-means longer than torch.distributed's timeout (30 min by default) does not
    abort the job. Every rank reads the completed-run count before the first barrier, so none can
    mistake an earlier run for this one."""
    clustered = [bank for bank, request in zip(banks, method.bank_requests()) if request.clusters]
    before = [bank.clusterings() for bank in clustered]
    barrier()
    for bank, count in zip(clustered, before):
        if rank == 0:
            bank.init_clusters(iters=config.bank.kmeans_iters, init=config.bank.kmeans_init,
                               seed=config.train.seed + epoch, progress=lambda m: print(m, flush=True))
        else:
            bank.wait_clustered(count)
    barrier()


def clustering_due(method, config: JobConfig, epoch: int) -> bool:
    """Global k-means at the start of `epoch` (epoch 0's, without a warm-up, runs in
    `initialise_banks`): at the end of the intra-only warm-up, on the features it learned; and with
    offline labels (`bank.labels`, 003 Observation 1) at every later epoch too, the labels fixed in
    between."""
    if not any(request.clusters for request in method.bank_requests()):
        return False
    warmup = getattr(method, "warmup_epochs", 0)
    if epoch == warmup > 0:
        return True
    return config.bank.labels == "offline" and epoch > warmup


@dataclass
class Worker:
    """What one Train worker builds before its first step (`setup_worker`)."""
    config: JobConfig
    rank: int
    world: int
    device: torch.device
    method: torch.nn.Module  # the Method (state_dict, banks, EMA)
    model: torch.nn.Module  # what runs the step: the method, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    batches: "Batches"
    banks: list
    steps_per_epoch: int
    total_steps: int
    last_step: int
    run_dir: Path


def train_loop_per_worker(loop_config: dict) -> None:
    worker = setup_worker(loop_config)
    step = resume(worker)
    if step is None:
        step = 0
        initialise_banks(worker.method, worker.banks, worker.batches, worker.device, worker.steps_per_epoch,
                         worker.config, worker.rank, worker.precision)
        prime_queue(worker.method, worker.batches, worker.device, worker.config, worker.precision)
    step = train(worker, step)
    evaluate_on_workers(worker.method, worker.config, worker.rank, worker.world, worker.device, worker.run_dir,
                        loop_config.get("num_classes"), step)


def setup_worker(loop_config: dict) -> Worker:
    """Seeded model (identical on every rank), SyncBN / DDP where they apply, optimiser and lr
    schedule, this rank's batches, and the step counts."""
    config = loop_config["config"]
    banks = loop_config["banks"]
    for bank in banks:
        # a lost bank shard fails this worker: the group restarts from the last checkpoint and its bank
        # snapshot, so the model and the bank stay each other's (restored in place, the bank would lose
        # the updates since the snapshot while the model kept them)
        bank.restore_on_failure = False
    # Ray Train logs two INFO lines per checkpoint ("Checkpoint successfully created", "Reporting
    # training result"): the job's own progress line says it once per interval. The second comes
    # from a logger named by its file's path, outside the "ray.train" hierarchy.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    torch.manual_seed(config.train.seed)  # identical initial weights on every rank
    device = ray.train.torch.get_device() if config.train.use_gpu else torch.device("cpu")
    precision = Precision.create(config.train.precision, device)
    if rank == 0:
        chosen = " (the device's default)" if config.train.precision is None else ""
        print(f"precision {precision.name}{chosen} on {device}, channels_last {config.model.channels_last}",
              flush=True)
    method = prepare_model(build_method(config, loop_config.get("num_classes")).attach_banks(banks), device,
                           config.model.channels_last)
    if world > 1 and uses_sync_bn(config):
        if config.train.use_gpu:
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        elif rank == 0:  # torch's SyncBatchNorm runs on GPUs only
            print("note: model.sync_bn needs GPUs; BN statistics stay per worker on CPU", flush=True)
    model = method
    if world > 1:
        # BN statistics stay per rank in the forward passes (torch's `broadcast_buffers=False`, renamed;
        # at init every rank holds the same seeded buffers, which DDP syncs once)
        model = ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"forward_sync_buffers": False})
    t = config.train
    optimizer = build_optimizer(method, t.optimizer, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
                                trust_coefficient=t.trust_coefficient, exclude_bias_and_norm=t.exclude_bias_and_norm)
    actors = loop_config["loaders"][rank] if loop_config.get("loaders") else None
    batches = Batches(config, training_recipe(method, config), rank, world, actors, device)
    steps_per_epoch = preflight.steps_per_epoch(loop_config["num_samples"], world, len(actors) if actors else 1,
                                                config.data.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{loop_config['num_samples']} samples make no full batch of {config.data.batch_size} "
                         f"per loader on {world} workers; lower data.batch_size")
    total_steps = steps_per_epoch * t.epochs
    return Worker(config, rank, world, device, method, model, optimizer,
                  lr_schedule(optimizer, config, total_steps, steps_per_epoch), precision, batches, banks,
                  steps_per_epoch, total_steps, min(total_steps, t.max_steps or total_steps), Path(loop_config["run_dir"]))


def resume(worker: Worker) -> int | None:
    """The step of Ray Train's checkpoint, with model, optimiser and lr schedule restored on every
    rank and the banks by rank 0 from the snapshots it names; None when there is none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "model.pt", map_location=worker.device, weights_only=False)
    worker.method.load_state_dict(state["model"])
    worker.optimizer.load_state_dict(state["optimizer"])
    step = state["step"]
    worker.precision.load_state_dict(state.get("precision", {}))
    if "schedule" in state:
        worker.schedule.load_state_dict(state["schedule"])
    else:  # a checkpoint from before the schedule was saved: replay it
        for _ in range(step):
            worker.schedule.step()
    if worker.rank == 0:
        for bank, path in zip(worker.banks, state["bank_snapshots"]):
            bank.restore(path)
    barrier()
    if worker.rank == 0:
        print(f"resumed from step {step} (epoch {step // worker.steps_per_epoch})", flush=True)
    return step


def train(worker: Worker, step: int) -> int:
    """Steps `step` … `last_step`: k-means where an epoch asks for it, forward, backward, optimiser,
    lr schedule, EMA; a checkpoint every `checkpoint_every` steps and at every epoch end. Returns the
    step the model is at (the last checkpoint's)."""
    w, config = worker, worker.config
    logger = MetricsLogger(w.run_dir, w.rank, config) if w.rank == 0 else None
    ids_log = None
    if config.train.log_ids:  # appended to: a restarted group re-logs the steps after its checkpoint
        (w.run_dir / "ids").mkdir(parents=True, exist_ok=True)
        ids_log = open(w.run_dir / "ids" / f"rank-{w.rank}.jsonl", "a")
    started = time.perf_counter()
    window = {"start": time.perf_counter(), "images": 0, "wait": w.batches.wait_seconds + _bank_wait(w.banks)}
    while step < w.last_step:
        epoch, skip = divmod(step, w.steps_per_epoch)
        if skip == 0 and clustering_due(w.method, config, epoch):
            cluster_banks(w.method, w.banks, config, w.rank, epoch)
        for batch in w.batches.epoch(epoch, w.steps_per_epoch, skip):
            lr = w.optimizer.param_groups[0]["lr"]
            result = train_step(w.method, w.model, w.optimizer, w.schedule, w.precision,
                                to_device(batch, w.device, config.model.channels_last), step / w.total_steps, epoch)
            step += 1
            if ids_log is not None:
                ids_log.write(json.dumps({"step": step, "epoch": epoch, "time": time.time(),
                                          "ids": batch["index"].tolist()}) + "\n")
                ids_log.flush()
            window["images"] += len(batch["index"]) * w.world
            if logger is not None:
                logger.step(step, epoch, lr, result, window, w.batches, w.banks, w.last_step, started)
            if step % config.train.checkpoint_every == 0 or step % w.steps_per_epoch == 0 or step == w.last_step:
                report(w, step, epoch, logger)
            if step % w.steps_per_epoch == 0 and monitor_due(config, epoch + 1) and step < w.last_step:
                monitor(w, step, epoch + 1, logger)
            if step >= w.last_step:
                break
    if logger is not None:
        logger.close()
    if ids_log is not None:
        ids_log.close()
    return step


def monitor_due(config: JobConfig, epochs_done: int) -> bool:
    every = config.eval.monitor_every
    return every > 0 and epochs_done % every == 0


def monitor(worker: Worker, step: int, epochs_done: int, logger) -> None:
    """Online kNN (solo-learn's `knn` callback): the trained backbone's weighted kNN top-1 on val
    with a memory of `eval.monitor_samples` train images, every rank extracting its share; rank 0
    logs it to metrics.jsonl and TensorBoard as `knn_top1_monitor`, with the wall clock (`time`, Unix
    seconds: benchmarks/learning.py's curves against wall minutes). Training mode is restored."""
    config = worker.config
    space = worker.method.recipe_for(config.data.image_size).colorspace
    with torch.no_grad():
        found = knn_on_workers(worker.method.backbone, config, space, worker.rank, worker.world, worker.device,
                               config.eval.monitor_samples, f"monitor, epoch {epochs_done}")
    worker.method.train(True)
    if logger is not None and found is not None:
        logger.write({"step": step, "epoch": epochs_done, "knn_top1_monitor": found[0], "time": time.time()})


def _bank_wait(banks) -> float:
    return sum(b.wait_seconds for b in banks)


def report(worker: Worker, step: int, epoch: int, logger) -> None:
    """A checkpoint every rank joins: rank 0 snapshots the banks under run_dir/bank-<i> and writes
    the model, optimiser, lr schedule and step with the snapshot paths; the others report metrics only.
    The snapshot holds exactly the updates of steps 1..step of every rank: each rank completes its
    asynchronous bank update and meets the others before the save, and none starts step + 1 before it
    (without the two barriers a two-worker run resumed with one rank's update missing: 46 updates
    counted after 24 steps instead of 48)."""
    metrics = {"step": step, "epoch": epoch}
    banks, run_dir = worker.banks, worker.run_dir
    for bank in banks:
        bank.settle()
    barrier()
    if worker.rank != 0:
        barrier()  # rank 0 saves the banks meanwhile
        ray.train.report(metrics)
        return
    snapshots = [bank.save(str(run_dir / f"bank-{i}" / f"step-{step:09d}")) for i, bank in enumerate(banks)]
    barrier()
    with tempfile.TemporaryDirectory() as directory:
        torch.save({"model": worker.method.state_dict(), "optimizer": worker.optimizer.state_dict(),
                    "schedule": worker.schedule.state_dict(), "precision": worker.precision.state_dict(),
                    "step": step, "bank_snapshots": snapshots},
                   Path(directory) / "model.pt")
        (Path(directory) / "meta.json").write_text(json.dumps({"step": step, "epoch": epoch}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    for i in range(len(banks)):
        prune_bank_snapshots(run_dir / f"bank-{i}")
    if logger is not None:
        try:
            logger.write({"step": step, "checkpoint": True, **bank_metrics(banks)})
        except Exception as exc:  # stats are reporting only; never fail a step for them
            logger.write({"step": step, "checkpoint": True, "stats_error": str(exc)[:100]})


def prune_bank_snapshots(root: Path) -> None:
    """Delete all but the newest snapshots: a 14.2M × 128 fp16 bank is 3.6 GB per snapshot, and
    the checkpoints Ray has deleted no longer name the older ones."""
    for old in sorted(root.glob("step-*"))[:-BANK_SNAPSHOTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)


def bank_metrics(banks) -> dict:
    """The numeric `stats()` of every bank as flat metrics: bank<i>_<name>."""
    return {f"bank{i}_{key}": value for i, bank in enumerate(banks)
            for key, value in bank.stats().items() if isinstance(value, (int, float))}


class MetricsLogger:
    """metrics.jsonl + TensorBoard + one progress line (step, epoch, img/s, loss, ETA) per interval.
    A step's losses stay on the device until `train.log_every` steps are due (or a progress line, a
    checkpoint record, the end): then one host transfer for all of them, so no step waits for its
    loss to reach the host."""

    def __init__(self, run_dir: Path, rank: int, config: JobConfig):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.config = config
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tensorboard = None
        self.last_print = time.perf_counter()
        self.pending = []  # (record without losses, {name: 0-dim device tensor})

    def write(self, record: dict) -> None:
        self.flush()
        self._write(record)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def flush(self) -> dict | None:
        """Write the pending step records (one device → host copy); returns the last one."""
        if not self.pending:
            return None
        values = torch.stack([v.detach().float().reshape(()) for _, losses in self.pending
                              for v in losses.values()]).tolist()
        position = 0
        for record, losses in self.pending:
            record.update(zip(losses, values[position:position + len(losses)]))
            position += len(losses)
            self._write(record)
        last = self.pending[-1][0]
        self.pending = []
        return last

    def step(self, step, epoch, lr, result, window, batches, banks, last_step, started) -> None:
        now = time.perf_counter()
        record = {"step": step, "epoch": epoch, "lr": lr}
        if not result.applied:
            record["skipped"] = True  # 16-mixed: non-finite gradients, no update (runtime.step)
        if step % 10 == 0 or now - self.last_print >= PROGRESS_SECONDS or step == last_step:
            elapsed = now - window["start"]  # measured for every printed line: real numbers, never nan
            wait = batches.wait_seconds + _bank_wait(banks)
            record["img_per_s"] = window["images"] / elapsed
            record["data_wait_fraction"] = min(1.0, (wait - window["wait"]) / elapsed)
            record["loader_wait_s"], record["bank_wait_s"] = batches.wait_seconds, _bank_wait(banks)
            window.update(start=now, images=0, wait=wait)
        self.pending.append((record, {k: v for k, v in result.out.items() if isinstance(v, torch.Tensor)}))
        printing = now - self.last_print >= PROGRESS_SECONDS or step == last_step
        if not printing and step % self.config.train.log_every:
            return
        last = self.flush()
        if printing:
            self.last_print = now
            rate = step / max(now - started, 1e-9)
            eta = time.strftime("%H:%M:%S", time.gmtime((last_step - step) / max(rate, 1e-9)))
            print(f"step {step}/{last_step} epoch {epoch + 1}/{self.config.train.epochs} "
                  f"{last['img_per_s']:.0f} img/s loss {last['loss']:.4f} "
                  f"wait {last['data_wait_fraction']:.0%} ETA {eta}", flush=True)

    def close(self) -> None:
        self.flush()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
