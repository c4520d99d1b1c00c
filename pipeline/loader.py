"""The in-process DALI loader: shards → batches of K views.

    loader = build_loader("shards/in1k", "two_crop", batch_size=256, rank=r, world_size=w, seed=0)
    len(loader)            # batches per epoch for this rank
    for batch in loader:   # {"views": [K × float NCHW], "index": int64 [B], "label": int64 [B]}
        ...

Views are host tensors, or with device="gpu" and keep_on_gpu=True CUDA tensors on the pipeline's
device (no host round trip; see `_to_torch`); "index" and "label" are always host tensors.

ImCLR recipes (`imclr(n)`, concat = n) give rows of n distinct samples side by side (views
[B, 3, H, n·W]), "index" int64 [B, n] (part j's sample id) and "label" float [B, C], the mean of the
n one-hot labels; the pairing is drawn inside each DALI batch (`pipeline.views.imclr_parts`).

Reads `fn.readers.webdataset` with the DALI index files listed in `OUT/<split>.json`, shards by
global rank (`shard_id=rank`, `num_shards=world_size`, the same split DALI documents: rank r
reads samples [⌊N·r/w⌋, ⌊N·(r+1)/w⌋)), seeds by global rank, and stops at the epoch end.

Undecodable samples (a corrupt JPEG inside a shard: DALI's decoder stops the pipeline) are skipped
and counted, not a crash: on the first failure the loader runs one decode check over its rank's
samples with the same decoder, records the bad ones in `loader.skipped` ({id: reason}, also one
warning line), rebuilds its pipeline over private index files without them (kept for the process,
so later loaders of the same range start without them) and serves the rest of the epoch. Every
epoch keeps its planned length (DDP ranks must step together): the missing rows are filled by
repeating rows already served, counted in `loader.duplicates`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
from nvidia.dali.tensors import TensorListGPU

from pipeline.manifest import Manifest
from pipeline.views import Recipe, concat_parts, imclr_parts, recipe_by_name, views_graph


class LoaderError(Exception):
    """Missing shards or index files, or a bad loader argument."""


def check_last_batch(drop_last: bool, pad_last: bool) -> None:
    """The final partial batch is dropped, padded, or returned short: never both options."""
    if drop_last and pad_last:
        raise LoaderError("drop_last and pad_last are exclusive: drop the final partial batch or pad it")


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


_UNDECODABLE: dict[tuple, dict[int, str]] = {}  # (root, split, first, last) → {id: reason}, per process
_DEAD_PIPELINES: list = []  # failed DALI pipelines, never destroyed (see find_undecodable_isolated)


def _first_ids(batch: dict) -> torch.Tensor:
    index = batch["index"]
    return index if index.dim() == 1 else index[:, 0]


def _take(batch: dict, rows: torch.Tensor) -> dict:
    return {"views": [v[rows] for v in batch["views"]], "index": batch["index"][rows], "label": batch["label"][rows]}


def _rows(batch: dict | None) -> int:
    return 0 if batch is None else len(batch["index"])


def _cat_rows(batches: list[dict | None]) -> dict | None:
    batches = [b for b in batches if b is not None]
    if not batches:
        return None
    return {"views": [torch.cat(vs) for vs in zip(*(b["views"] for b in batches))],
            "index": torch.cat([b["index"] for b in batches]), "label": torch.cat([b["label"] for b in batches])}


def _first_line(exc: Exception) -> str:
    """The line of a DALI error that says what went wrong (after "encountered:"), else its last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else type(exc).__name__


def _range_entries(paths: list[str], indexes: list[str], first: int, last: int):
    """(index file number, index line, members, sample id, open tar) of the samples [first, last)
    in the reader's order (files, then lines); members maps ext → (offset, size)."""
    handles: dict[int, object] = {}
    n = 0
    try:
        for number, path in enumerate(indexes):
            with open(path) as f:
                count = int(next(f).split()[1])  # "v1.2 <count>"
                if n + count <= first:
                    n += count
                    continue
                for line in f:
                    if not line.strip():
                        continue
                    if first <= n < last:
                        members = _members(line)
                        tar = handles.get(number) or handles.setdefault(number, open(paths[number], "rb"))
                        tar.seek(members["id"][0])
                        yield number, line.rstrip("\n"), members, int(tar.read(members["id"][1])), tar
                    n += 1
                    if n >= last:
                        return
    finally:
        for tar in handles.values():
            tar.close()


def _members(line: str) -> dict[str, tuple[int, int]]:
    """ext → (offset, size) of one DALI index line: `ext offset size name` repeated."""
    parts = line.split()
    return {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}


def find_undecodable(paths: list[str], indexes: list[str], first: int, last: int,
                     num_threads: int = 2, chunk: int = 16) -> dict[int, str]:
    """{sample id: reason} for the samples [first, last) of the split that DALI's CPU image decoder
    (the decoder the loader runs) rejects: one decode pass, `chunk` images per run, a failing
    chunk bisected down to its bad samples."""
    checker = _DecodeCheck(num_threads)
    found: dict[int, str] = {}
    pending: list[tuple[int, bytes]] = []
    for _, _, members, sample_id, tar in _range_entries(paths, indexes, first, last):
        image = members.get("jpg") or members.get("png")
        if image is None:
            found[sample_id] = "no jpg or png member"
            continue
        tar.seek(image[0])
        pending.append((sample_id, tar.read(image[1])))
        if len(pending) == chunk:
            found.update(checker.bad(pending))
            pending = []
    if pending:
        found.update(checker.bad(pending))
    return found


def find_undecodable_isolated(paths: list[str], indexes: list[str], first: int, last: int,
                              num_threads: int = 2) -> dict[int, str]:
    """`find_undecodable` in a fresh Python process. DALI 2.4 can crash (SIGSEGV) in a process
    where a pipeline failed: the loader's failed pipeline crashed when destroyed (so it is kept, in
    `_DEAD_PIPELINES`) and decoders run beside it crashed too, so the check runs apart. Within the
    check, runs after a failed one crashed in 17 of 24 checks with 50- or 256-image batches and in
    none of 50 with 16–32, hence `chunk` 16; a crashed check is still run again (twice at most)."""
    code = ("import json, sys; from pipeline.loader import find_undecodable; "
            "a = json.load(sys.stdin); print(json.dumps(find_undecodable(*a)), flush=True); import os; os._exit(0)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):  # the result is deterministic; a crashed check is run again
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              input=json.dumps([paths, indexes, first, last, num_threads]))
        if done.returncode == 0:
            break
    if done.returncode != 0:
        raise LoaderError(f"the decode check of samples [{first}, {last}) failed: "
                          f"{(done.stderr.strip().splitlines() or ['exit status %d' % done.returncode])[-1]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


class _DecodeCheck:
    """DALI's CPU decoder over batches of encoded images fed from Python; a failed run kills the
    pipeline, so it is rebuilt and the batch split in halves until the bad images are alone."""

    def __init__(self, num_threads: int):
        self.num_threads, self.pipe, self.feed = num_threads, None, []

    def _build(self, batch_size: int):
        from nvidia.dali import types

        @pipeline_def(batch_size=batch_size, num_threads=max(1, self.num_threads), device_id=None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def check():
            encoded = fn.external_source(source=lambda: self.feed, batch=True, dtype=types.UINT8)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        self.pipe = check()
        self.pipe.build()

    def _decodes(self, samples: list[tuple[int, bytes]]) -> str | None:
        if self.pipe is None or self.pipe.max_batch_size != len(samples):  # full batches only
            self._build(len(samples))
        self.feed = [np.frombuffer(data, dtype=np.uint8) for _, data in samples]
        try:
            self.pipe.run()
            return None
        except RuntimeError as exc:
            self.pipe = None
            return _first_line(exc)

    def bad(self, samples: list[tuple[int, bytes]]) -> dict[int, str]:
        reason = self._decodes(samples)
        if reason is None:
            return {}
        if len(samples) == 1:
            return {samples[0][0]: f"DALI's image decoder rejects it: {reason}"}
        half = len(samples) // 2
        return {**self.bad(samples[:half]), **self.bad(samples[half:])}


def _filtered_index(paths: list[str], indexes: list[str], first: int, last: int,
                    skipped: dict[int, str]) -> tuple[list[str], list[str]]:
    """Private DALI index files holding the samples [first, last) minus `skipped`, and their tars."""
    import tempfile
    kept: dict[int, list[str]] = {}
    for number, line, _, sample_id, _ in _range_entries(paths, indexes, first, last):
        if sample_id not in skipped:
            kept.setdefault(number, []).append(line)
    if not kept:
        raise LoaderError(f"no decodable sample in samples [{first}, {last}) of {len(paths)} shards")
    folder = Path(tempfile.mkdtemp(prefix="viewbank-index-"))
    out_paths, out_indexes = [], []
    for number, lines in sorted(kept.items()):
        index = folder / f"{number:06d}.idx"
        index.write_text("\n".join([f"v1.2 {len(lines)}", *lines]) + "\n")
        out_paths.append(paths[number])
        out_indexes.append(str(index))
    return out_paths, out_indexes


class DaliLoader:
    """Iterable over one epoch per `iter()`; see `build_loader`."""

    def __init__(self, root, recipe: Recipe, batch_size: int, device: str, rank: int, world_size: int,
                 seed: int, split: str, drop_last: bool, shuffle: bool, num_threads: int, initial_fill: int,
                 raw: bool = False, pad_last: bool = False, keep_on_gpu: bool = False):
        if device not in ("cpu", "gpu"):
            raise LoaderError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if keep_on_gpu and device != "gpu":
            raise LoaderError("keep_on_gpu needs device='gpu': a CPU pipeline's views are host tensors")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} outside a world of {world_size}")
        if batch_size <= 0:
            raise LoaderError(f"batch_size must be positive, got {batch_size}")
        check_last_batch(drop_last, pad_last)
        self.paths, self.indexes, count = shard_list(root, split)
        if recipe.concat > 1 and batch_size < recipe.concat:
            raise LoaderError(f"{recipe.name} rows take {recipe.concat} distinct samples of a batch: "
                              f"batch_size must be >= {recipe.concat}, got {batch_size}")
        self.num_classes = len(Manifest(root, split).classes) if recipe.concat > 1 else None
        if raw and recipe.colorspace is not None:
            raise LoaderError(f"raw (uint8) views are RGB only; recipe {recipe.name!r} makes {recipe.colorspace} views")
        self.recipe, self.batch_size, self.drop_last, self.raw = recipe, batch_size, drop_last, raw
        self.pad_last = pad_last
        self.device, self.rank, self.world_size, self.seed = device, rank, world_size, seed
        self.device_id = None if device == "cpu" else torch.cuda.current_device()  # kept across rebuilds
        self.views_device = torch.device("cuda", self.device_id) if keep_on_gpu else None  # None: host
        self.shuffle, self.num_threads, self.initial_fill = shuffle, num_threads, initial_fill
        self.first, self.last = count * rank // world_size, count * (rank + 1) // world_size  # DALI's split
        self.samples = self.last - self.first  # this rank's share; every epoch yields this many rows
        self.padded = -self.samples % batch_size if pad_last else 0  # rows repeated to fill the last batch
        self._undecodable_key = (str(Path(root).resolve()), split, self.first, self.last)
        self.skipped: dict[int, str] = dict(_UNDECODABLE.get(self._undecodable_key, {}))  # id → reason
        self.duplicates = 0  # rows repeated to keep the epoch length while samples are skipped
        self._build()

    def _build(self) -> None:
        """The DALI pipeline over this rank's samples: the listed index files split by rank, or, once
        samples were found undecodable, private index files of this rank's range without them."""
        paths, indexes, shard_id, num_shards = self.paths, self.indexes, self.rank, self.world_size
        if self.skipped:
            paths, indexes = _filtered_index(self.paths, self.indexes, self.first, self.last, self.skipped)
            shard_id, num_shards = 0, 1
        self.readable = self.samples - len(self.skipped)
        recipe, device = self.recipe, self.device
        seed = self.seed * 1_000_003 + self.rank

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=seed, enable_conditionals=True, prefetch_queue_depth=2)
        def graph():
            encoded, label, sample_id = fn.readers.webdataset(
                paths=paths, index_paths=indexes, ext=["jpg;png", "cls", "id"], name="reader",
                shard_id=shard_id, num_shards=num_shards, random_shuffle=self.shuffle,
                initial_fill=self.initial_fill, pad_last_batch=True, stick_to_shard=True,
                missing_component_behavior="error", seed=seed)
            views = views_graph(encoded, recipe, device, self.raw)
            if recipe.concat == 1:
                return (*views, label, sample_id)
            parts = imclr_parts(recipe.concat, self.batch_size)  # the reader pads: every batch is full
            labels = [fn.permute_batch(label, indices=part) for part in parts]
            ids = [fn.permute_batch(sample_id, indices=part) for part in parts]
            return (*concat_parts(views, parts), *labels, *ids, parts[0])

        self.pipe = graph()
        self.pipe.build()

    def __len__(self) -> int:
        full, rest = divmod(self.samples, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self):
        """One epoch; with pad_last, a final partial batch is filled by repeating its last row."""
        for batch in self._epoch():
            rows = _rows(batch)
            if self.pad_last and rows < self.batch_size:
                batch = _take(batch, torch.arange(self.batch_size).clamp(max=rows - 1))
            yield batch

    def _epoch(self):
        if self.skipped:
            yield from self._rows_to_batches(served=set())
            return
        served, left = [], self.samples
        for _ in range(len(self)):
            try:
                batch = self._run(min(self.batch_size, left))  # the reader pads the last batch; drop the padding
            except RuntimeError as exc:  # DALI stops at an undecodable image; the pipeline is dead
                self._skip_undecodable(exc)
                yield from self._rows_to_batches(set(torch.cat(served).tolist()) if served else set(),
                                                 wanted=left)
                return
            left -= len(batch["index"])
            served.append(_first_ids(batch))
            yield batch
        if self.drop_last and left:  # consume a dropped partial batch so the next epoch starts on a boundary
            self.pipe.run()

    def _run(self, take: int) -> dict:
        # views kept on the GPU: DALI hands its outputs over on torch's current stream (no host wait)
        stream = None if self.views_device is None else torch.cuda.current_stream(self.views_device)
        outputs = self.pipe.run(stream)
        n, k = self.recipe.concat, self.recipe.num_views
        views, rows = [_to_torch(out, stream) for out in outputs[:k]], list(range(take))
        if n > 1 and take < self.batch_size:
            # the reader padded this batch and ImCLR rows come in a random order: keep the rows that
            # start with one of its `take` real samples, in reader order (once an epoch: a second copy)
            order = np.array(outputs[k + 2 * n].as_array()).reshape(-1)  # reader position of each row's part 0
            rows = np.argsort(order)[:take].tolist()
            views = [view[rows] for view in views]
        else:
            views = [view[:take] for view in views]
        labels = torch.tensor([[_number(outputs[k + j][i]) for j in range(n)] for i in rows])
        index = torch.tensor([[_number(outputs[k + n + j][i]) for j in range(n)] for i in rows])
        if n == 1:
            return {"views": views, "index": index[:, 0], "label": labels[:, 0]}
        soft = torch.nn.functional.one_hot(labels, self.num_classes).float().mean(dim=1)  # ImCLR: mean one-hot
        return {"views": views, "index": index, "label": soft}

    def _rows_to_batches(self, served: set, wanted: int | None = None):
        """The rest of an epoch once samples are skipped: one full pass of the filtered pipeline,
        leaving out rows already served this epoch, re-batched to `batch_size`, streamed. A pass
        short of `wanted` rows repeats rows it already gave (counted in `duplicates`), so every epoch
        keeps the length the trainer planned for."""
        wanted = self.samples if wanted is None else wanted
        full, rest = divmod(wanted, self.batch_size)
        sizes = [self.batch_size] * full + ([rest] if rest and not self.drop_last else [])
        buffer, last, left = None, None, self.readable
        for size in sizes:
            while _rows(buffer) < size and left > 0:
                batch = self._run_again(min(self.batch_size, left))
                left -= len(batch["index"])
                keep = torch.tensor([int(i) not in served for i in _first_ids(batch)], dtype=torch.bool)
                buffer = _cat_rows([buffer, _take(batch, keep)])
            short = size - _rows(buffer)
            if short > 0:  # the pass is over: repeat rows already served
                source = _cat_rows([last, buffer])
                if _rows(source) == 0:
                    raise LoaderError(f"rank {self.rank}: no decodable sample left to serve")
                buffer = _cat_rows([buffer, _take(source, torch.arange(short) % _rows(source))])
                self.duplicates += short
            last, buffer = _take(buffer, torch.arange(size)), _take(buffer, torch.arange(size, _rows(buffer)))
            yield last
        while left > 0:  # finish the pass so the next epoch starts on its boundary
            left -= min(self.batch_size, left)
            self._run_again(self.batch_size)

    def _run_again(self, take: int) -> dict:
        try:
            return self._run(take)
        except RuntimeError as exc:
            raise LoaderError(f"rank {self.rank}: DALI failed again after skipping {len(self.skipped)} "
                              f"undecodable samples: {_first_line(exc)}") from None

    def _skip_undecodable(self, exc: RuntimeError) -> None:
        """Find every sample of this rank's range that DALI's decoder rejects (in a separate process), leave
        them out of this and every later pipeline of the process, and rebuild the pipeline."""
        _DEAD_PIPELINES.append(self.pipe)  # destroying a pipeline that failed can crash DALI: keep it
        found = find_undecodable_isolated(self.paths, self.indexes, self.first, self.last, self.num_threads)
        if not found or set(found) <= set(self.skipped):
            raise LoaderError(f"rank {self.rank}: DALI failed and every sample of the rank decodes: "
                              f"{_first_line(exc)}") from None
        self.skipped.update(found)
        _UNDECODABLE[self._undecodable_key] = dict(self.skipped)
        first_id, reason = next(iter(found.items()))
        print(f"warning: rank {self.rank}: skipping {len(found)} undecodable sample(s), e.g. id {first_id}: "
              f"{reason}", file=sys.stderr, flush=True)
        self._build()


def _number(sample) -> int:
    return int(np.array(sample).tobytes())  # .cls / .id members are ASCII decimal


def _to_torch(tensor_list, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """One copy out of DALI's buffers into a tensor torch owns (DALI reuses or frees its buffers).

    CPU outputs: `as_array` copies once (np.array(as_tensor()) copied twice, 23 vs 17 ms per
    64 × 3 × 224² float view batch). GPU outputs with `stream` (torch's current stream, the one
    `pipe.run(stream)` handed them over on): one device-to-device copy into a fresh tensor on that
    stream's device with DALI's `feed_ndarray` (its DALIGenericIterator's copy), queued on the same
    stream, so it follows DALI's work, precedes torch's later kernels, and DALI frees its buffer in
    that stream's order, after the copy; the host never waits. GPU outputs without `stream` go to
    host memory: loader actors (pipeline.actors) ship numpy through Ray's object store, so there a
    GPU pipeline's views necessarily cross to the host."""
    if not isinstance(tensor_list, TensorListGPU):
        return torch.from_numpy(tensor_list.as_array())
    if stream is None:
        return torch.from_numpy(tensor_list.as_cpu().as_array())
    dense = tensor_list.as_tensor()  # one [B, ...] tensor over the batch (fixed-size views)
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=stream.device)
    return feed_ndarray(dense, out, cuda_stream=stream)


def build_loader(root, recipe: str | Recipe, batch_size: int, device: str = "cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, split: str = "train", drop_last: bool = False,
                 shuffle: bool = True, num_threads: int = 2, initial_fill: int = 1024,
                 raw: bool = False, pad_last: bool = False, keep_on_gpu: bool = False) -> DaliLoader:
    """A DALI loader over the shards of `root/<split>.json`.

    recipe: a `Recipe` or a name ("two_crop", "lab", "ydbdr", "k_views(K)"). device "cpu" decodes
    and augments on the CPU (`device_id=None`); "gpu" decodes with nvJPEG and augments on the
    current CUDA device. rank / world_size are global (every node's trainers together); the seed
    is offset by the global rank. drop_last drops a final partial batch; pad_last fills it to
    batch_size by repeating its last row (`loader.padded` rows per epoch: fixed shapes for compiled
    models and BatchNorm); otherwise it is returned short (no sample repeated). raw=True gives
    uint8 RGB views, flipped but not normalised (`pipeline.views.normalize` finishes them; loader
    actors ship these). keep_on_gpu=True (device "gpu" only) hands the views to torch as CUDA
    tensors on the pipeline's device with no host round trip (the in-process trainer); by default
    a GPU pipeline's views are copied to host memory (loader actors need numpy)."""
    if isinstance(recipe, str):
        recipe = recipe_by_name(recipe)
    return DaliLoader(root, recipe, batch_size, device, rank, world_size, seed, split, drop_last, shuffle,
                      num_threads, initial_fill, raw, pad_last, keep_on_gpu)
