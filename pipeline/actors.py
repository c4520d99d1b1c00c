"""Decoupled loaders: DALI pipelines in Ray actors feeding trainers over the object store.

    loaders = create_loader_actors("shards/in1k", "two_crop", batch_size=256, num_loaders=2,
                                   rank=r, world_size=w, seed=0)
    for batch in ActorLoader(loaders, prefetch=2).epoch(e):   # same batch dicts as build_loader
        ...

RGB views cross the object store as uint8 (a quarter of float32's bytes) and are normalised on
the trainer's device (`pipeline.views.normalize`, the graph's own arithmetic; the rounding to uint8
is the only difference from in-process views, at most half a grey level); colour-space views are
float.
Loader i of trainer r serves stream r·L + i of w·L of the epoch's order (`pipeline.loader.epoch_order`:
one seeded permutation per (seed, epoch), a fresh partition every epoch), so every sample appears
once per epoch across all loaders, and loaders scale by count (CPU-only nodes can feed GPU
trainers). An epoch is a deterministic sequence of batches (ids, labels, order): when a loader
dies, it is restarted (max_restarts) and reopens the epoch after the batches the trainer already
received, which are left out of its index, not decoded — no sample lost, none duplicated; the
batches it had delivered are counted in `replayed`. On a CUDA trainer the views are copied from
pinned memory (`pipeline.loader.host_to_device`).
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np
import ray
import torch

from pipeline.loader import build_loader, check_last_batch, host_to_device
from pipeline.views import normalize, recipe_by_name


def _float_views(views: torch.Tensor) -> torch.Tensor:
    return normalize(views) if views.dtype == torch.uint8 else views


class LoaderRestartedError(RuntimeError):
    """The loader actor was restarted and has no epoch open: the trainer must reopen it."""


class LoaderActor:
    def __init__(self, root: str, recipe, batch_size: int, shard_index: int, num_shards: int, seed: int,
                 split: str = "train", device: str = "cpu", num_threads: int = 1, drop_last: bool = False,
                 pad_last: bool = False):
        recipe = recipe_by_name(recipe) if isinstance(recipe, str) else recipe
        self.args = dict(root=root, recipe=recipe, batch_size=batch_size, rank=shard_index,
                         world_size=num_shards, split=split, device=device, num_threads=num_threads,
                         drop_last=drop_last, pad_last=pad_last,
                         raw=recipe.colorspace is None)  # RGB views travel as uint8, normalised by the trainer
        self.seed = seed
        self._batches, self._loader = None, None

    def start_epoch(self, epoch: int, skip: int = 0, undecodable: dict | None = None) -> int:
        """Build this epoch's pipeline from batch `skip` on (the earlier batches' samples are left out
        of its index, never decoded), without the `undecodable` samples other loaders found; return
        the epoch length."""
        if self._loader is None:
            self._loader = build_loader(seed=self.seed, **self.args)
        self._loader.add_undecodable(undecodable or {})
        self._batches = self._loader.epoch(epoch, skip=skip)
        return len(self._loader)

    def next_batch(self) -> dict | None:
        if self._batches is None:
            raise LoaderRestartedError("loader actor restarted; reopen the epoch with start_epoch")
        batch = next(self._batches, None)
        if batch is None:
            return None
        return {"views": [v.numpy() for v in batch["views"]], "index": batch["index"].numpy(),
                "label": batch["label"].numpy()}

    def ping(self) -> bool:
        return True

    def skipped(self) -> dict[int, str]:
        """Undecodable samples this actor's loader left out ({id: reason}; see pipeline.loader)."""
        return dict(self._loader.skipped) if self._loader is not None else {}

    def undecodable(self) -> dict[int, tuple[int, str]]:
        """The same by split position, {position: (id, reason)}, for the other loaders."""
        return self._loader.undecodable if self._loader is not None else {}


def create_loader_actors(root, recipe, batch_size: int, num_loaders: int = 1, rank: int = 0,
                         world_size: int = 1, seed: int = 0, split: str = "train", device: str = "cpu",
                         num_threads: int = 1, drop_last: bool = False, pad_last: bool = False,
                         actor_options: dict | None = None) -> list:
    """Start `num_loaders` loader actors for trainer `rank` of `world_size` (1 CPU each by default;
    `actor_options` e.g. {"num_gpus": 0.1} with device="gpu", which needs a GPU share, or a scheduling
    strategy). drop_last / pad_last act on each loader's own final partial batch, as in `build_loader`."""
    args = loader_actor_args(root, recipe, batch_size, num_loaders, rank, world_size, seed, split, device,
                             num_threads, drop_last, pad_last)
    options = {"num_cpus": 1, "max_restarts": -1, "max_task_retries": 0, **(actor_options or {})}
    if device == "gpu" and not options.get("num_gpus"):  # Ray hides every GPU from an actor that asks for none
        raise ValueError("device='gpu' loader actors need a GPU resource: pass actor_options={'num_gpus': share}")
    remote = ray.remote(LoaderActor).options(**options)
    return [remote.remote(*a) for a in args]


def loader_actor_args(root, recipe, batch_size: int, num_loaders: int = 1, rank: int = 0, world_size: int = 1,
                      seed: int = 0, split: str = "train", device: str = "cpu", num_threads: int = 1,
                      drop_last: bool = False, pad_last: bool = False) -> list[tuple]:
    """The checked request of `create_loader_actors`: each loader actor's `LoaderActor` arguments."""
    if num_loaders < 1:
        raise ValueError(f"num_loaders must be >= 1, got {num_loaders}")
    check_last_batch(drop_last, pad_last)  # here, not first inside every actor
    return [(str(root), recipe, batch_size, rank * num_loaders + i, world_size * num_loaders, seed, split, device,
             num_threads, drop_last, pad_last) for i in range(num_loaders)]


class ActorLoader:
    """Trainer-side iterator over loader actors with at most `prefetch` batches in flight per
    loader (backpressure: a loader computes ahead only that far). Views are delivered on `device`:
    uint8 views are moved there first and normalised there (on a GPU trainer, the cheap way); a CUDA
    device gets them through pinned staging memory with asynchronous copies, and the labels pinned
    (the trainer's own non_blocking copy then waits on nothing)."""

    def __init__(self, actors: list, prefetch: int = 2, restart_timeout: float = 120.0,
                 device: str | torch.device = "cpu"):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.actors, self.prefetch, self.restart_timeout = actors, prefetch, restart_timeout
        self.device = torch.device(device)  # views arrive there (uint8 moved first, then normalised)
        self.replayed = 0  # batches a restarted loader had delivered before it died (it resumes after them)
        self.transferred = 0  # batches delivered through the object store
        self.max_in_flight = 0
        self.wait_seconds = 0.0  # time the trainer spent blocked on the loaders
        # undecodable samples the loaders found, given to all at the next epoch: the epoch's partition
        # moves a sample between loaders, and each would otherwise fail on it and check it again
        self._undecodable: dict[int, tuple[int, str]] = {}

    def __len__(self) -> int:
        return sum(self._lengths) if hasattr(self, "_lengths") else 0

    def epoch(self, epoch: int = 0, skip: int = 0):
        """The epoch's batches, loader 0, 1, …, L-1, 0, … in turn (a loader that has run out is passed
        over). `skip` (a resumed run): the first `skip` batches of that order are left out inside the
        loader actors (`LoaderActor.start_epoch(skip=)`), neither decoded nor sent; the rest arrive as
        without it."""
        count = len(self.actors)
        skips = [len(range(i, skip, count)) for i in range(count)]  # batch j comes from loader j mod L
        for actor in self.actors:  # what the last epoch found, for every loader (one call each)
            try:
                self._undecodable.update(ray.get(actor.undecodable.remote(), timeout=60))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # a loader lost since: the others' findings still travel
        try:
            self._lengths = ray.get([a.start_epoch.remote(epoch, skip=s, undecodable=self._undecodable)
                                     for a, s in zip(self.actors, skips)])
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            # a loader lost before the epoch (or still restarting): open each once it answers
            self._lengths = [self._open(i, epoch, s) for i, s in enumerate(skips)]
        delivered = list(skips)  # counted from the epoch's start: a restarted loader replays to here
        in_flight = [deque() for _ in self.actors]
        issued = list(skips)

        def refill(i):
            while len(in_flight[i]) < self.prefetch and issued[i] < self._lengths[i]:
                in_flight[i].append(self.actors[i].next_batch.remote())
                issued[i] += 1
            self.max_in_flight = max(self.max_in_flight, len(in_flight[i]))

        for i in range(len(self.actors)):
            refill(i)
        turn = skip
        while any(d < n for d, n in zip(delivered, self._lengths)):
            for i in [(turn + k) % count for k in range(count)]:
                if delivered[i] >= self._lengths[i]:
                    continue
                start = time.perf_counter()
                try:
                    batch = ray.get(in_flight[i].popleft())
                except (ray.exceptions.RayActorError, LoaderRestartedError):
                    self._restart(i, epoch, delivered[i])
                    in_flight[i].clear()
                    issued[i] = delivered[i]
                    refill(i)
                    continue
                finally:
                    self.wait_seconds += time.perf_counter() - start
                delivered[i] += 1
                self.transferred += 1
                refill(i)
                label = torch.from_numpy(np.array(batch["label"]))
                yield {"views": [_float_views(host_to_device(v, self.device)) for v in batch["views"]],
                       "index": torch.from_numpy(np.array(batch["index"])),
                       "label": label.pin_memory() if self.device.type == "cuda" else label}

    def skipped(self) -> dict[int, str]:
        """Undecodable samples the loader actors left out, {id: reason}."""
        return {k: v for found in ray.get([a.skipped.remote() for a in self.actors]) for k, v in found.items()}

    def _restart(self, i: int, epoch: int, delivered: int) -> None:
        self._open(i, epoch, delivered)
        self.replayed += delivered

    def _open(self, i: int, epoch: int, skip: int) -> int:
        """Loader i's `start_epoch(epoch, skip)` (its batch count), retried while it restarts."""
        deadline = time.monotonic() + self.restart_timeout
        while True:
            try:
                return ray.get(self.actors[i].start_epoch.remote(epoch, skip=skip, undecodable=self._undecodable),
                               timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
