"""The in-process DALI loader: shards → batches of K views.

    loader = build_loader("shards/in1k", "two_crop", batch_size=256, rank=r, world_size=w, seed=0)
    len(loader)            # batches per epoch for this rank
    for batch in loader:   # {"views": [K × float NCHW], "index": int64 [B], "label": int64 [B]}
        ...

Reads `fn.readers.webdataset` with the DALI index files listed in `OUT/<split>.json`, shards by
global rank (`shard_id=rank`, `num_shards=world_size`, the same split DALI documents: rank r
reads samples [⌊N·r/w⌋, ⌊N·(r+1)/w⌋)), seeds by global rank, and stops at the epoch end.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def

from pipeline.manifest import Manifest
from pipeline.views import Recipe, recipe_by_name, views_graph


class LoaderError(Exception):
    """Missing shards or index files, or a bad loader argument."""


def shard_list(root: str | Path, split: str = "train") -> tuple[list[str], list[str], int]:
    """(tar paths, index paths, sample count) of a converted split, checked to exist."""
    root = Path(root)
    listing = root / f"{split}.json"
    if not listing.exists():
        raise LoaderError(f"{listing} not found: convert the dataset first (python -m pipeline.convert ...)")
    summary = json.loads(listing.read_text())
    paths = [str(root / s["url"]) for s in summary["shardlist"]]
    indexes = [str(root / s["index"]) for s in summary["shardlist"]]
    for path in paths + indexes:
        if not Path(path).exists():
            raise LoaderError(f"{path} is listed in {listing} but missing (rerun pipeline.convert with --resume)")
    return paths, indexes, int(summary["count"])


class DaliLoader:
    """Iterable over one epoch per `iter()`; see `build_loader`."""

    def __init__(self, root, recipe: Recipe, batch_size: int, device: str, rank: int, world_size: int,
                 seed: int, split: str, drop_last: bool, shuffle: bool, num_threads: int, initial_fill: int):
        if device not in ("cpu", "gpu"):
            raise LoaderError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} outside a world of {world_size}")
        if batch_size <= 0:
            raise LoaderError(f"batch_size must be positive, got {batch_size}")
        paths, indexes, count = shard_list(root, split)
        if recipe.concat > 1 and batch_size < 2:
            raise LoaderError("imclr recipes pair samples within a batch: batch_size must be >= 2")
        self.num_classes = len(Manifest(root, split).classes) if recipe.concat > 1 else None
        self.recipe, self.batch_size, self.drop_last = recipe, batch_size, drop_last
        self.samples = count * (rank + 1) // world_size - count * rank // world_size  # this rank's share
        device_id = None if device == "cpu" else torch.cuda.current_device()

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                      seed=seed * 1_000_003 + rank, enable_conditionals=True, prefetch_queue_depth=2)
        def graph():
            encoded, label, sample_id = fn.readers.webdataset(
                paths=paths, index_paths=indexes, ext=["jpg;png", "cls", "id"], name="reader",
                shard_id=rank, num_shards=world_size, random_shuffle=shuffle, initial_fill=initial_fill,
                pad_last_batch=True, stick_to_shard=True, missing_component_behavior="error",
                seed=seed * 1_000_003 + rank)
            views, labels, ids = views_graph(encoded, recipe, device), [label], [sample_id]
            for _ in range(recipe.concat - 1):  # ImCLR: a random partner per row, never itself
                partner = fn.batch_permutation(no_fixed_points=True)
                views = [fn.cat(v, fn.permute_batch(v, indices=partner), axis=2) for v in views]
                labels.append(fn.permute_batch(label, indices=partner))
                ids.append(fn.permute_batch(sample_id, indices=partner))
            return (*views, *labels, *ids)

        self.pipe = graph()
        self.pipe.build()

    def __len__(self) -> int:
        full, rest = divmod(self.samples, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self):
        remaining = self.samples
        for _ in range(len(self)):
            outputs = self.pipe.run()
            take = min(self.batch_size, remaining)  # the reader pads the last batch; drop the padding
            remaining -= take
            n, k = self.recipe.concat, self.recipe.num_views
            views = [_to_torch(out)[:take] for out in outputs[:k]]
            labels = torch.tensor([[_number(outputs[k + j][i]) for j in range(n)] for i in range(take)])
            index = torch.tensor([[_number(outputs[k + n + j][i]) for j in range(n)] for i in range(take)])
            if n == 1:
                yield {"views": views, "index": index[:, 0], "label": labels[:, 0]}
            else:  # ImCLR soft labels: the mean of the n one-hot labels
                soft = torch.nn.functional.one_hot(labels, self.num_classes).float().mean(dim=1)
                yield {"views": views, "index": index, "label": soft}
        # consume the padding of a dropped partial batch so the next epoch starts on a boundary
        if self.drop_last and remaining:
            self.pipe.run()


def _number(sample) -> int:
    return int(np.array(sample).tobytes())  # .cls / .id members are ASCII decimal


def _to_torch(tensor_list) -> torch.Tensor:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return torch.from_numpy(np.array(tensor_list.as_tensor()))


def build_loader(root, recipe: str | Recipe, batch_size: int, device: str = "cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, split: str = "train", drop_last: bool = False,
                 shuffle: bool = True, num_threads: int = 2, initial_fill: int = 1024) -> DaliLoader:
    """A DALI loader over the shards of `root/<split>.json`.

    recipe: a `Recipe` or a name ("two_crop", "lab", "ydbdr", "k_views(K)"). device "cpu" decodes
    and augments on the CPU (`device_id=None`); "gpu" decodes with nvJPEG and augments on the
    current CUDA device. rank / world_size are global (every node's trainers together); the seed
    is offset by the global rank. drop_last drops a final partial batch; otherwise it is returned
    short (no sample repeated)."""
    if isinstance(recipe, str):
        recipe = recipe_by_name(recipe)
    return DaliLoader(root, recipe, batch_size, device, rank, world_size, seed, split, drop_last, shuffle,
                      num_threads, initial_fill)
