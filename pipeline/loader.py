"""The in-process DALI loader: shards → batches of K views.

    loader = build_loader("shards/in1k", "two_crop", batch_size=256, rank=r, world_size=w, seed=0)
    len(loader)                          # batches per epoch for this rank
    for batch in loader.epoch(e):        # {"views": [K × float NCHW], "index": int64 [B], "label": int64 [B]}
        ...
    loader.epoch(e, skip=s)              # a resumed run: batches s… of epoch e, the rest as uninterrupted

Views are host tensors, or with device="gpu" and keep_on_gpu=True CUDA tensors on the pipeline's
device (no host round trip; see `_to_torch`); "index" and "label" are always host tensors
(pin_memory=True: views and labels in pinned memory, so a trainer's non_blocking copy to its GPU
is asynchronous).

ImCLR recipes (`imclr(n)`, concat = n) give rows of n distinct samples side by side (views
[B, 3, H, n·W]), "index" int64 [B, n] (part j's sample id) and "label" float [B, C], the mean of the
n one-hot labels; the pairing is drawn inside each DALI batch (`pipeline.views.imclr_parts`).

Every epoch a fresh order (`epoch_order`): one seeded permutation of the split per (seed, epoch),
shared by all ranks, each rank serving its share [⌊N·r/w⌋, ⌊N·(r+1)/w⌋) of it (torch's
DistributedSampler with set_epoch), so the partition across ranks changes every epoch and every
sample is served once per epoch across ranks. DALI's `fn.readers.webdataset` reads the index files
it is given in order, so the loader writes this epoch's order as private index files (runs of
samples of one tar, `_write_epoch_index`), builds the epoch's pipeline on them (reader shuffle off:
the order is exactly the planned one) and deletes them once DALI has parsed them. A resumed epoch
(`skip`) leaves the batches already trained on out of the index: nothing is decoded to be dropped.
shuffle=False (evaluation) serves DALI's own split in reader order, the same every epoch.

Undecodable samples (a corrupt JPEG inside a shard: DALI's decoder stops the pipeline) are skipped
and counted, not a crash: on a failure the loader runs one decode check, with the same decoder,
over the samples the failed pipeline had in flight (all the rest of the epoch if none fails there),
records the bad ones in `loader.skipped` ({id: reason}, also one warning line; kept for the process,
so later epochs and loaders of the split plan without them), rebuilds the pipeline on the rest of
the epoch and serves it. Every epoch keeps its planned length (DDP ranks must step together): the
missing rows are filled by repeating rows already served, counted in `loader.duplicates`.
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


_UNDECODABLE: dict[tuple, dict[int, tuple[int, str]]] = {}  # (root, split) → {position: (id, reason)}, per process
_DEAD_PIPELINES: list = []  # failed DALI pipelines, never destroyed (see find_undecodable_isolated)
RUNS_PER_BATCH = 8  # a shuffled batch mixes about this many runs (tars): runs of ⌈B/8⌉ samples …
MAX_RUNS = 16_384  # … but at most this many index files per rank and epoch (longer runs past it)


def _first_ids(batch: dict) -> torch.Tensor:
    index = batch["index"]
    return index if index.dim() == 1 else index[:, 0]


def _take(batch: dict, rows: torch.Tensor) -> dict:
    return {"views": [v[rows] for v in batch["views"]], "index": batch["index"][rows], "label": batch["label"][rows]}


def _rows(batch: dict | None) -> int:
    return 0 if batch is None else len(batch["index"])


def _cat_rows(batches: list[dict | None]) -> dict | None:
    batches = [b for b in batches if b is not None]
    if len(batches) <= 1:  # nothing to join: no copy
        return batches[0] if batches else None
    return {"views": [torch.cat(vs) for vs in zip(*(b["views"] for b in batches))],
            "index": torch.cat([b["index"] for b in batches]), "label": torch.cat([b["label"] for b in batches])}


def _first_line(exc: Exception) -> str:
    """The line of a DALI error that says what went wrong (after "encountered:"), else its last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else type(exc).__name__


def shard_counts(indexes: list[str]) -> np.ndarray:
    """Samples per index file, from each file's header line (`v1.2 <count>`)."""
    counts = []
    for path in indexes:
        with open(path, "rb") as f:
            header = f.readline().split()
        if len(header) < 2 or not header[1].isdigit():
            raise LoaderError(f"{path} has no `v1.2 <count>` header (rerun pipeline.convert with --resume)")
        counts.append(int(header[1]))
    return np.asarray(counts, dtype=np.int64)


def epoch_order(counts: np.ndarray, stream: int, streams: int, seed: int, epoch: int, shuffle: bool = True,
                run_length: int = 1) -> np.ndarray:
    """The samples stream `stream` of `streams` serves in epoch `epoch`, in serving order, as positions
    in the split's reader order (index files in turn, then their lines; `counts` per index file).

    shuffle: one permutation of all N positions drawn from (seed, epoch), the same on every stream,
    stream s serving its slice [⌊N·s/S⌋, ⌊N·(s+1)/S⌋) — torch's DistributedSampler with set_epoch
    (`g.manual_seed(seed + epoch)`, `randperm(N)`, rank r's share of it): the shares are disjoint and
    cover the split, and both the partition and the order change every epoch. The slice is then laid
    out as runs of at most `run_length` samples of one tar (each tar's samples in their random order),
    the runs in a random order seeded by (seed, epoch, stream): DALI's reader reads one index file
    after another, so a batch holds about batch / run_length runs and each run costs one index file.
    Without shuffle: the slice [⌊N·s/S⌋, ⌊N·(s+1)/S⌋) of the reader order (DALI's own split)."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    first, last = total * stream // streams, total * (stream + 1) // streams
    if not shuffle or last == first:
        return np.arange(first, last, dtype=np.int64)
    mine = np.random.default_rng([seed, epoch]).permutation(total)[first:last]
    shard = np.searchsorted(ends, mine, side="right")
    # stable: each tar's samples keep their random order; 16-bit keys take numpy's radix sort
    by_shard = np.argsort(shard.astype(np.uint16) if len(ends) <= 1 << 16 else shard, kind="stable")
    mine, shard = mine[by_shard], shard[by_shard]
    group_first = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
    within = np.arange(len(mine)) - np.repeat(group_first, np.diff(np.r_[group_first, len(mine)]))
    run = np.cumsum(within % run_length == 0) - 1
    run_rank = np.random.default_rng([seed, epoch, stream]).permutation(int(run[-1]) + 1)
    return mine[np.argsort(run_rank[run], kind="stable")]


_LINE_BOUNDS: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # index path → ((mtime, size), bounds)


def _line_bounds(index: str) -> np.ndarray:
    """Byte offsets where the sample lines of a DALI index file start, and its end: sample k is bytes
    [bounds[k], bounds[k+1]) with its newline. Cached per process (4 bytes a sample)."""
    stat = os.stat(index)
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _LINE_BOUNDS.get(index)
    if cached is not None and cached[0] == key:
        return cached[1]
    text = np.fromfile(index, dtype=np.uint8)
    ends = np.flatnonzero(text == ord("\n")) + 1
    if len(text) and text[-1] != ord("\n"):
        ends = np.r_[ends, len(text)]
    bounds = ends.astype(np.uint32 if len(text) < 1 << 32 else np.int64)  # ends[0]: the header's end
    count = int(text[:ends[0]].tobytes().split()[1]) if len(ends) else -1
    if len(bounds) - 1 != count or np.any(np.diff(bounds) <= 1):
        raise LoaderError(f"{index}: its header counts {count} samples but it holds {len(bounds) - 1} lines "
                          "(or blank ones); rerun pipeline.convert with --resume")
    _LINE_BOUNDS[index] = (key, bounds)
    return bounds


def _gather_lines(text: np.ndarray, bounds: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """The bytes of index lines `lines` (with their newlines), one after another, in that order."""
    starts = bounds[lines].astype(np.int64)
    sizes = bounds[lines + 1].astype(np.int64) - starts
    out_starts = np.cumsum(sizes) - sizes
    return text[np.repeat(starts - out_starts, sizes) + np.arange(int(sizes.sum()))]


def _write_epoch_index(paths: list[str], indexes: list[str], counts: np.ndarray, positions: np.ndarray,
                       folder: Path) -> tuple[list[str], list[str]]:
    """(tar paths, index paths) that make DALI's webdataset reader serve `positions` in this order:
    one index file per run (consecutive positions in one tar), the lines copied from the tar's own
    index file. Each tar's index is read once, its runs' lines gathered together (numpy)."""
    ends = np.cumsum(counts)
    shard = np.searchsorted(ends, positions, side="right")
    line = positions - (ends - counts)[shard]
    run_first = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]])
    run_size = np.diff(np.r_[run_first, len(positions)])
    run_shard = shard[run_first]
    by_shard = np.argsort(run_shard, kind="stable")
    names = [str(folder / f"{k:06d}.idx") for k in range(len(run_first))]
    for group in np.split(by_shard, np.flatnonzero(np.diff(run_shard[by_shard])) + 1):
        number = int(run_shard[group[0]])
        bounds = _line_bounds(indexes[number])
        lines = np.concatenate([line[run_first[k]:run_first[k] + run_size[k]] for k in group])
        data = _gather_lines(np.memmap(indexes[number], dtype=np.uint8, mode="r"), bounds, lines)
        offsets = np.r_[0, np.cumsum(bounds[lines + 1].astype(np.int64) - bounds[lines])]
        done = 0
        for k in group:
            with open(names[k], "wb") as f:
                f.write(f"v1.2 {run_size[k]}\n".encode())
                f.write(data[offsets[done]:offsets[done + run_size[k]]])
            done += run_size[k]
    return [paths[int(s)] for s in run_shard], names


def _scratch_folder(nbytes: int) -> Path:
    """A fresh folder for an epoch's index files (`nbytes` of them): in /dev/shm when it has room
    (tmpfs: creating thousands of small files there is far cheaper than on a VM's disk), else in
    the temporary directory."""
    import tempfile
    shm = Path("/dev/shm")
    try:
        space = os.statvfs(shm)
        if os.access(shm, os.W_OK) and space.f_bavail * space.f_frsize > 2 * nbytes + (64 << 20):
            return Path(tempfile.mkdtemp(prefix="viewbank-epoch-", dir=shm))
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="viewbank-epoch-"))


def _entries(paths: list[str], indexes: list[str], positions):
    """(position, members, sample id, open tar) of each of `positions`, in reader order; members maps
    ext → (offset, size)."""
    counts = shard_counts(indexes)
    ends = np.cumsum(counts)
    positions = np.sort(np.asarray(positions, dtype=np.int64))
    shard = np.searchsorted(ends, positions, side="right")
    for number in np.unique(shard):
        bounds = _line_bounds(indexes[number])
        text = np.memmap(indexes[number], dtype=np.uint8, mode="r")
        with open(paths[number], "rb") as tar:
            for position in positions[shard == number]:
                k = int(position - ends[number] + counts[number])
                members = _members(text[bounds[k]:bounds[k + 1]].tobytes().decode())
                tar.seek(members["id"][0])
                yield int(position), members, int(tar.read(members["id"][1])), tar


def _members(line: str) -> dict[str, tuple[int, int]]:
    """ext → (offset, size) of one DALI index line: `ext offset size name` repeated."""
    parts = line.split()
    return {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}


def find_undecodable(paths: list[str], indexes: list[str], positions, num_threads: int = 2,
                     chunk: int = 16) -> dict[int, tuple[int, str]]:
    """{position: (sample id, reason)} for the samples at `positions` (reader order of the split) that
    DALI's CPU image decoder (the decoder the loader runs) rejects: one decode pass, `chunk` images
    per run, a failing chunk bisected down to its bad samples."""
    checker = _DecodeCheck(num_threads)
    found: dict[int, tuple[int, str]] = {}
    pending: list[tuple[tuple[int, int], bytes]] = []
    for position, members, sample_id, tar in _entries(paths, indexes, positions):
        image = members.get("jpg") or members.get("png")
        if image is None:
            found[position] = (sample_id, "no jpg or png member")
            continue
        tar.seek(image[0])
        pending.append(((position, sample_id), tar.read(image[1])))
        if len(pending) == chunk:
            found.update(checker.bad(pending))
            pending = []
    if pending:
        found.update(checker.bad(pending))
    return found


def find_undecodable_isolated(paths: list[str], indexes: list[str], positions,
                              num_threads: int = 2) -> dict[int, tuple[int, str]]:
    """`find_undecodable` in a fresh Python process: DALI 2.4 can crash (SIGSEGV) in a process
    where a pipeline failed (a failed pipeline crashes when destroyed, so it is kept in
    `_DEAD_PIPELINES`, and decoders run beside it can crash too), so the check runs apart, in chunks
    of 16 images (larger batches after a failed one crash more often: docs/benchmarks.md, lab
    notes); a crashed check is run again (twice at most)."""
    code = ("import json, sys; from pipeline.loader import find_undecodable; "
            "a = json.load(sys.stdin); print(json.dumps(find_undecodable(*a)), flush=True); import os; os._exit(0)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    request = json.dumps([paths, indexes, [int(p) for p in positions], num_threads])
    for _ in range(3):  # the result is deterministic; a crashed check is run again
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, input=request)
        if done.returncode == 0:
            break
    if done.returncode != 0:
        raise LoaderError(f"the decode check of {len(positions)} samples failed: "
                          f"{(done.stderr.strip().splitlines() or ['exit status %d' % done.returncode])[-1]}")
    return {int(k): (int(v[0]), v[1]) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


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

    def _decodes(self, samples: list[tuple[object, bytes]]) -> str | None:
        if self.pipe is None or self.pipe.max_batch_size != len(samples):  # full batches only
            self._build(len(samples))
        self.feed = [np.frombuffer(data, dtype=np.uint8) for _, data in samples]
        try:
            self.pipe.run()
            return None
        except RuntimeError as exc:
            self.pipe = None
            return _first_line(exc)

    def bad(self, samples: list[tuple[tuple[int, int], bytes]]) -> dict[int, tuple[int, str]]:
        """{position: (id, reason)} of the samples ((position, id), bytes) the decoder rejects."""
        reason = self._decodes(samples)
        if reason is None:
            return {}
        if len(samples) == 1:
            (position, sample_id), _ = samples[0]
            return {position: (sample_id, f"DALI's image decoder rejects it: {reason}")}
        half = len(samples) // 2
        return {**self.bad(samples[:half]), **self.bad(samples[half:])}


PREFETCH_DEPTH = 2  # DALI's prefetch_queue_depth: a failure surfaces within this many batches ahead


class DaliLoader:
    """Batches of one epoch per `epoch(e)` (or `iter()`: the next epoch); see `build_loader`."""

    def __init__(self, root, recipe: Recipe, batch_size: int, device: str, rank: int, world_size: int,
                 seed: int, split: str, drop_last: bool, shuffle: bool, num_threads: int, initial_fill: int,
                 raw: bool = False, pad_last: bool = False, keep_on_gpu: bool = False, pin_memory: bool = False):
        if device not in ("cpu", "gpu"):
            raise LoaderError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if keep_on_gpu and device != "gpu":
            raise LoaderError("keep_on_gpu needs device='gpu': a CPU pipeline's views are host tensors")
        if pin_memory and keep_on_gpu:
            raise LoaderError("pin_memory is for host views: keep_on_gpu views are already on the GPU")
        if not 0 <= rank < world_size:
            raise LoaderError(f"rank {rank} outside a world of {world_size}")
        if batch_size <= 0:
            raise LoaderError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise LoaderError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        check_last_batch(drop_last, pad_last)
        self.paths, self.indexes, count = shard_list(root, split)
        self.counts = shard_counts(self.indexes)
        if int(self.counts.sum()) != count:
            raise LoaderError(f"the index files of {root}/{split}.json count {int(self.counts.sum())} samples, "
                              f"the listing {count} (rerun pipeline.convert with --resume)")
        if recipe.concat > 1 and batch_size < recipe.concat:
            raise LoaderError(f"{recipe.name} rows take {recipe.concat} distinct samples of a batch: "
                              f"batch_size must be >= {recipe.concat}, got {batch_size}")
        self.num_classes = len(Manifest(root, split).classes) if recipe.concat > 1 else None
        if raw and recipe.colorspace is not None:
            raise LoaderError(f"raw (uint8) views are RGB only; recipe {recipe.name!r} makes {recipe.colorspace} views")
        self.recipe, self.batch_size, self.drop_last, self.raw = recipe, batch_size, drop_last, raw
        self.pad_last, self.pin_memory = pad_last, pin_memory
        self.device, self.rank, self.world_size, self.seed = device, rank, world_size, seed
        self.device_id = None if device == "cpu" else torch.cuda.current_device()  # kept across rebuilds
        self.views_device = torch.device("cuda", self.device_id) if keep_on_gpu else None  # None: host
        self.shuffle, self.num_threads = shuffle, num_threads  # initial_fill: unused, the order is planned
        self.samples = count * (rank + 1) // world_size - count * rank // world_size  # rows every epoch yields
        self.padded = -self.samples % batch_size if pad_last else 0  # rows repeated to fill the last batch
        self.run_length = max(-(-batch_size // RUNS_PER_BATCH), -(-self.samples // MAX_RUNS))
        self._line_bytes = sum(os.path.getsize(i) for i in self.indexes) // max(1, count) + 1  # per sample
        self._undecodable = _UNDECODABLE.setdefault((str(Path(root).resolve()), split), {})
        self.duplicates = 0  # rows repeated to keep the epoch length while samples are skipped
        self.pipe, self._next_epoch, self._generation = None, 0, 0

    @property
    def skipped(self) -> dict[int, str]:
        """Undecodable samples of the split found in this process, {id: reason}; left out of every plan."""
        return {sample_id: reason for sample_id, reason in self._undecodable.values()}

    @property
    def undecodable(self) -> dict[int, tuple[int, str]]:
        """`skipped` by split position, {position: (id, reason)}: what `add_undecodable` takes."""
        return dict(self._undecodable)

    def add_undecodable(self, found: dict[int, tuple[int, str]]) -> None:
        """Undecodable samples another process found (loader actors share theirs between epochs):
        later plans leave them out without failing on them first."""
        self._undecodable.update({int(k): (int(v[0]), str(v[1])) for k, v in found.items()})

    def __len__(self) -> int:
        full, rest = divmod(self.samples, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self):
        """The next epoch (0, 1, … in turn; after `epoch(e)`, e + 1)."""
        return self.epoch(self._next_epoch)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's samples of the epoch as split positions, in serving order (`epoch_order`)."""
        return epoch_order(self.counts, self.rank, self.world_size, self.seed, epoch, self.shuffle, self.run_length)

    def augmentation_seed(self, epoch: int) -> int:
        """DALI's pipeline seed for (seed, epoch, global rank): other draws every epoch and rank."""
        return int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0] >> 1)

    def epoch(self, epoch: int, skip: int = 0):
        """The batches `skip`, `skip`+1, … of epoch `epoch`, equal (ids, labels, order) to those of the
        uninterrupted epoch: the first `skip` batches' samples are left out of the epoch's index files,
        never read. The pipeline is built here; iterate the result. With pad_last, a final partial
        batch is filled by repeating its last row; drop_last plans no final partial batch."""
        if epoch < 0:
            raise LoaderError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= skip <= len(self):
            raise LoaderError(f"cannot skip {skip} batches of an epoch of {len(self)}")
        self._next_epoch, self._generation = epoch + 1, self._generation + 1
        # the served sequence: the order without known undecodable samples (a drop_last epoch's spare
        # sample takes a skipped one's place); batches are cut from it, the first `skip` left out
        readable = self._without_undecodable(self.order(epoch))[skip * self.batch_size:]
        self._build(epoch, readable)
        sizes = [min(self.batch_size, self.samples - k * self.batch_size) for k in range(skip, len(self))]
        return self._serve(epoch, readable, sizes, self._generation)

    def _without_undecodable(self, positions: np.ndarray) -> np.ndarray:
        if not self._undecodable:
            return positions
        return positions[~np.isin(positions, np.fromiter(self._undecodable, dtype=np.int64))]

    def _build(self, epoch: int, positions: np.ndarray) -> None:
        """The DALI pipeline that reads `positions` in this order, over private index files written
        for it (deleted once DALI has parsed them, which it does in build())."""
        import shutil
        self.pipe = None  # a healthy pipeline is freed before the next one allocates
        if len(positions) == 0:
            return
        recipe, device, seed = self.recipe, self.device, self.augmentation_seed(epoch)
        folder = _scratch_folder(len(positions) * self._line_bytes)
        try:
            paths, indexes = _write_epoch_index(self.paths, self.indexes, self.counts, positions, folder)

            @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                          seed=seed, enable_conditionals=True, prefetch_queue_depth=PREFETCH_DEPTH)
            def graph():
                encoded, label, sample_id = fn.readers.webdataset(
                    paths=paths, index_paths=indexes, ext=["jpg;png", "cls", "id"], name="reader",
                    random_shuffle=False, pad_last_batch=True, missing_component_behavior="error")
                views = views_graph(encoded, recipe, device, self.raw)
                if recipe.concat == 1:
                    return (*views, label, sample_id)
                parts = imclr_parts(recipe.concat, self.batch_size)  # the reader pads: every batch is full
                labels = [fn.permute_batch(label, indices=part) for part in parts]
                ids = [fn.permute_batch(sample_id, indices=part) for part in parts]
                return (*concat_parts(views, parts), *labels, *ids, parts[0])

            self.pipe = graph()
            self.pipe.build()
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _serve(self, epoch: int, readable: np.ndarray, sizes: list[int], generation: int):
        """Batches of `sizes` rows from the pipeline over `readable`. A decode failure skips the bad
        samples and goes on with the rest; rows the epoch lacks then repeat rows already served."""
        consumed, buffer, last = 0, None, None  # consumed: rows of `readable` taken from pipelines
        for size in sizes:
            while _rows(buffer) < size and consumed < len(readable):
                if generation != self._generation:
                    raise LoaderError("this epoch's iterator is stale: a later epoch() rebuilt the pipeline")
                try:
                    batch = self._run(min(self.batch_size, len(readable) - consumed))
                except RuntimeError as exc:  # DALI stops at an undecodable image; the pipeline is dead
                    readable = np.r_[readable[:consumed], self._skip_undecodable(exc, epoch, readable[consumed:])]
                    continue
                consumed += _rows(batch)
                buffer = _cat_rows([buffer, batch])
            short = size - _rows(buffer)
            if short > 0:  # the readable rows are used up: repeat rows already served
                source = _cat_rows([last, buffer])
                if _rows(source) == 0:
                    raise LoaderError(f"rank {self.rank}: no decodable sample left to serve")
                buffer = _cat_rows([buffer, _take(source, torch.arange(short) % _rows(source))])
                self.duplicates += short
            if _rows(buffer) == size:
                last, buffer = buffer, None
            else:
                last, buffer = _take(buffer, torch.arange(size)), _take(buffer, torch.arange(size, _rows(buffer)))
            if self.pad_last and size < self.batch_size:
                yield _take(last, torch.arange(self.batch_size).clamp(max=size - 1))
            else:
                yield last

    def _run(self, take: int) -> dict:
        # views kept on the GPU: DALI hands its outputs over on torch's current stream (no host wait)
        stream = None if self.views_device is None else torch.cuda.current_stream(self.views_device)
        outputs = self.pipe.run(stream)
        n, k = self.recipe.concat, self.recipe.num_views
        views, rows = [_to_torch(out, stream, self.pin_memory) for out in outputs[:k]], list(range(take))
        if n > 1 and take < self.batch_size:
            # the reader padded this batch and ImCLR rows come in a random order: keep the rows that
            # start with one of its `take` real samples, in reader order (once an epoch: a second copy)
            order = np.array(outputs[k + 2 * n].as_array()).reshape(-1)  # reader position of each row's part 0
            rows = np.argsort(order)[:take].tolist()
            views = [view[rows] for view in views]
        elif take < self.batch_size:
            views = [view[:take] for view in views]
        labels = torch.tensor([[_number(outputs[k + j][i]) for j in range(n)] for i in rows])
        index = torch.tensor([[_number(outputs[k + n + j][i]) for j in range(n)] for i in rows])
        if n == 1:
            label = labels[:, 0]
        else:
            label = torch.nn.functional.one_hot(labels, self.num_classes).float().mean(dim=1)  # ImCLR: mean one-hot
        return {"views": views, "index": index[:, 0] if n == 1 else index,
                "label": label.pin_memory() if self.pin_memory else label}

    def _skip_undecodable(self, exc: RuntimeError, epoch: int, rest: np.ndarray) -> np.ndarray:
        """Find the samples DALI's decoder rejects among the failed pipeline's next batches (then,
        if none, the rest of the epoch), in a separate process; leave them out of this and every later
        plan of the process; rebuild the pipeline on the rest. Returns the rest without them."""
        _DEAD_PIPELINES.append(self.pipe)  # destroying a pipeline that failed can crash DALI: keep it
        self.pipe = None
        window = rest[:(PREFETCH_DEPTH + 2) * self.batch_size]
        found = find_undecodable_isolated(self.paths, self.indexes, window, self.num_threads)
        if not found and len(window) < len(rest):
            found = find_undecodable_isolated(self.paths, self.indexes, rest, self.num_threads)
        if not found:
            raise LoaderError(f"rank {self.rank}: DALI failed and every sample left in the epoch decodes: "
                              f"{_first_line(exc)}") from None
        self._undecodable.update(found)
        first_id, reason = next(iter(found.values()))
        print(f"warning: rank {self.rank}: skipping {len(found)} undecodable sample(s), e.g. id {first_id}: "
              f"{reason}", file=sys.stderr, flush=True)
        rest = self._without_undecodable(rest)
        self._build(epoch, rest)
        return rest


def _number(sample) -> int:
    return int(np.array(sample).tobytes())  # .cls / .id members are ASCII decimal


def _to_torch(tensor_list, stream: torch.cuda.Stream | None = None, pin_memory: bool = False) -> torch.Tensor:
    """One copy out of DALI's buffers into a tensor torch owns (DALI reuses or frees its buffers).

    CPU outputs: `as_array` copies once (np.array(as_tensor()) copies twice); with pin_memory the one copy goes into pinned memory
    (`copy_to_external`, as DALI's `feed_ndarray`), so the trainer's non_blocking copy to its GPU is
    asynchronous (from pageable memory it is not). GPU outputs with `stream` (torch's current stream,
    the one `pipe.run(stream)` handed them over on): one device-to-device copy into a fresh tensor on
    that stream's device with DALI's `feed_ndarray` (its DALIGenericIterator's copy), queued on the
    same stream, so it follows DALI's work, precedes torch's later kernels, and DALI frees its buffer
    in that stream's order, after the copy; the host never waits. GPU outputs without `stream` go to
    host memory: loader actors (pipeline.actors) ship numpy through Ray's object store, so there a
    GPU pipeline's views necessarily cross to the host."""
    if isinstance(tensor_list, TensorListGPU):
        if stream is None:
            return torch.from_numpy(tensor_list.as_cpu().as_array())
        dense = tensor_list.as_tensor()  # one [B, ...] tensor over the batch (fixed-size views)
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=stream.device)
        return feed_ndarray(dense, out, cuda_stream=stream)
    if not pin_memory:
        return torch.from_numpy(tensor_list.as_array())
    dense = tensor_list.as_tensor()
    return feed_ndarray(dense, torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], pin_memory=True))


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`. CUDA: one copy into a pinned staging tensor, then a
    non_blocking copy (asynchronous only from pinned memory); torch's pinned allocator
    (CachingHostAllocator) keeps a freed staging block until the copies queued on it are done, so
    the staging tensor may go out of scope at once. CPU: one copy into a tensor torch owns (arrays
    from Ray's object store are read-only)."""
    if device.type != "cuda":
        return torch.from_numpy(np.array(array))
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype  # numpy's dtype in torch's terms
    staging = torch.empty(array.shape, dtype=dtype, pin_memory=True)
    staging.numpy()[...] = array
    return staging.to(device, non_blocking=True)


def build_loader(root, recipe: str | Recipe, batch_size: int, device: str = "cpu", rank: int = 0,
                 world_size: int = 1, seed: int = 0, split: str = "train", drop_last: bool = False,
                 shuffle: bool = True, num_threads: int = 2, initial_fill: int = 1024,
                 raw: bool = False, pad_last: bool = False, keep_on_gpu: bool = False,
                 pin_memory: bool = False) -> DaliLoader:
    """A DALI loader over the shards of `root/<split>.json`.

    recipe: a `Recipe` or a name ("two_crop", "lab", "ydbdr", "k_views(K)"). device "cpu" decodes
    and augments on the CPU (`device_id=None`); "gpu" decodes with nvJPEG and augments on the
    current CUDA device. rank / world_size are global (every node's trainers together; a loader
    actor's stream r·L + i of w·L); the epoch's order comes from (seed, epoch) alone, the same on
    every rank (`epoch_order`), the augmentations from (seed, epoch, rank). shuffle=False: DALI's
    split in reader order, every epoch. drop_last drops a final partial batch; pad_last fills it to
    batch_size by repeating its last row (`loader.padded` rows per epoch: fixed shapes for compiled
    models and BatchNorm); otherwise it is returned short (no sample repeated). raw=True gives
    uint8 RGB views, flipped but not normalised (`pipeline.views.normalize` finishes them; loader
    actors ship these). keep_on_gpu=True (device "gpu" only) hands the views to torch as CUDA
    tensors on the pipeline's device with no host round trip (the in-process trainer); by default
    a GPU pipeline's views are copied to host memory (loader actors need numpy). pin_memory=True
    (a CPU graph feeding a CUDA trainer) puts the host views and labels in pinned memory.
    initial_fill is accepted and unused: the order is planned, DALI's shuffle buffer is off."""
    if isinstance(recipe, str):
        recipe = recipe_by_name(recipe)
    return DaliLoader(root, recipe, batch_size, device, rank, world_size, seed, split, drop_last, shuffle,
                      num_threads, initial_fill, raw, pad_last, keep_on_gpu, pin_memory)
