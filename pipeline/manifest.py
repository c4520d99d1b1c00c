"""The LMDB manifest beside the shards: id → (key, label, shard, byte offset), class names, counts.

Layout of `OUT/manifest.lmdb` (one database, keys are ASCII):
  `<split>/count`            number of samples (written last: its presence means complete)
  `<split>/classes`          JSON list of class names, index = label
  `<split>/shards`           JSON list of shard file names, index = shard number in entries
  `<split>/labels`           int32 little-endian array of all labels, index = id (bulk reads)
  `<split>/id/<id:010d>`     struct `<iiq` (label, shard, offset) followed by the UTF-8 key
Sizes: 14.2M ids × ~30 B ≈ 430 MB for ImageNet-22K, read with O(1) lookups and no full load.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

ENTRY = struct.Struct("<iiq")
MAP_SIZE = 1 << 40  # virtual reservation; the file grows only as needed
COMMIT_EVERY = 1_000_000


class ManifestError(Exception):
    pass


@dataclass(frozen=True)
class Location:
    shard: str  # absolute path of the tar
    offset: int  # byte offset of the sample's first tar header
    key: str


_READERS: dict[str, lmdb.Environment] = {}  # LMDB allows one open environment per path and process


def _open(path: Path, readonly: bool) -> lmdb.Environment:
    if readonly:
        key = str(path.resolve())
        if key not in _READERS:
            _READERS[key] = lmdb.open(key, map_size=MAP_SIZE, subdir=True, readonly=True, lock=False,
                                      readahead=False, max_dbs=0)
        return _READERS[key]
    reader = _READERS.pop(str(path.resolve()), None)
    if reader is not None:  # a writer replaces the process's reader; the next Manifest reopens it
        reader.close()
    return lmdb.open(str(path), map_size=MAP_SIZE, subdir=True, readonly=readonly,
                     lock=not readonly, readahead=False, max_dbs=0)


class Manifest:
    """Read-only view of one split: `len(m)`, `m.label(id)`, `m.locate(id)`, `m.classes`,
    `m.labels()` (all labels as an int32 array), `m.shards`."""

    def __init__(self, out_dir: str | Path, split: str = "train"):
        self.root = Path(out_dir)
        path = self.root / "manifest.lmdb"
        if not path.exists():
            raise ManifestError(f"{path} not found (run python -m pipeline.convert first)")
        self.split = split
        self._env = _open(path, readonly=True)
        with self._env.begin() as txn:
            count = txn.get(f"{split}/count".encode())
            if count is None:
                splits = sorted({k.decode().split("/")[0] for k, _ in txn.cursor() if k.endswith(b"/count")})
                raise ManifestError(f"{path} has no complete split {split!r} (splits: {', '.join(splits) or 'none'})")
            self._count = int(count)
            self.classes: list[str] = json.loads(txn.get(f"{split}/classes".encode()))
            self.shards: list[str] = json.loads(txn.get(f"{split}/shards".encode()))

    def __len__(self) -> int:
        return self._count

    def _entry(self, sample_id: int) -> tuple[int, int, int, str]:
        if not 0 <= sample_id < self._count:
            raise IndexError(f"id {sample_id} out of range for split {self.split!r} (0..{self._count - 1})")
        with self._env.begin() as txn:
            raw = txn.get(f"{self.split}/id/{sample_id:010d}".encode())
        label, shard, offset = ENTRY.unpack_from(raw)
        return label, shard, offset, raw[ENTRY.size:].decode()

    def label(self, sample_id: int) -> int:
        return self._entry(sample_id)[0]

    def locate(self, sample_id: int) -> Location:
        _, shard, offset, key = self._entry(sample_id)
        return Location(str(self.root / self.shards[shard]), offset, key)

    def labels(self) -> np.ndarray:
        with self._env.begin() as txn:
            return np.frombuffer(txn.get(f"{self.split}/labels".encode()), dtype="<i4").copy()

    def close(self) -> None:
        """Readers share one environment per path (kept open for the process); nothing to release."""


def write_split(out_dir: Path, split: str, classes: list[str], shards: list[str],
                entries) -> int:
    """Replace `split` in the manifest. `entries` yields (id, key, label, shard_number, offset) in
    id order. Idempotent: a rerun after a kill rewrites the split; `count` is written last."""
    env = _open(out_dir / "manifest.lmdb", readonly=False)
    prefix = f"{split}/".encode()
    with env.begin(write=True) as txn:
        cursor = txn.cursor()
        if cursor.set_range(prefix):
            while cursor.key().startswith(prefix):
                if not cursor.delete():
                    break
    labels = []
    txn = env.begin(write=True)
    for n, (sample_id, key, label, shard, offset) in enumerate(entries):
        txn.put(f"{split}/id/{sample_id:010d}".encode(), ENTRY.pack(label, shard, offset) + key.encode())
        labels.append(label)
        if (n + 1) % COMMIT_EVERY == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.put(f"{split}/classes".encode(), json.dumps(classes).encode())
    txn.put(f"{split}/shards".encode(), json.dumps(shards).encode())
    txn.put(f"{split}/labels".encode(), np.asarray(labels, dtype="<i4").tobytes())
    txn.put(f"{split}/count".encode(), str(len(labels)).encode())
    txn.commit()
    env.close()
    return len(labels)
