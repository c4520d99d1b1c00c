"""Dataset layouts the converter reads, each turned into a list of `SourceItem`s.

Listing is cheap (paths, tar headers, stat sizes); image bytes are read later, by the shard
writers, through `read_item`. Nothing here extracts an archive to disk.
"""
from __future__ import annotations

import gzip
import os
import struct
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np


class LayoutError(Exception):
    """The source folder is missing or is not the layout the subcommand expects."""


@dataclass(frozen=True)
class SourceItem:
    """One source image. `locator` says how to read its bytes (see `read_item`); `size` is the
    byte size when known cheaply, used only to plan shard sizes."""

    source: str  # human-readable origin, relative to SRC (goes to .json and rejected.txt)
    label: int  # -1 when unlabelled
    class_name: str
    locator: tuple
    size: int
    extra: dict = field(default_factory=dict)  # e.g. {"origin": "flickr"} for WebVision


@dataclass
class SourceListing:
    items: list[SourceItem]
    classes: list[str]
    rejected: list[tuple[str, str]]  # (source, reason) found while listing


IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise LayoutError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise LayoutError(f"{what} {path} is not a folder")


def list_imagenet(src: Path, split: str, list_file: Path | None = None) -> SourceListing:
    """ImageNet-1K: `SRC/{split}/<wnid>/*.JPEG`, label = index of the sorted wnid; or a list file of
    `relpath label` lines, relpath relative to SRC."""
    _require_dir(src, "source folder")
    if list_file is not None:
        return _list_from_file(src, list_file, origin=None)
    split_dir = src / split
    if not split_dir.is_dir():
        raise LayoutError(
            f"{split_dir} not found: expected the ImageNet layout SRC/{split}/n01440764/*.JPEG "
            "(or pass --list FILE with 'relpath label' lines)")
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise LayoutError(f"{split_dir} holds no class folders: expected SRC/{split}/n01440764/*.JPEG")
    classes = [d.name for d in class_dirs]
    items, rejected = [], []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
            if not entry.is_file() or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = f"{split}/{class_dir.name}/{entry.name}"
            items.append(SourceItem(rel, label, class_dir.name, ("file", entry.path), entry.stat().st_size))
            found += 1
        if found == 0:
            rejected.append((f"{split}/{class_dir.name}/", "empty class folder"))
    return SourceListing(items, classes, rejected)


def _list_from_file(src: Path, list_file: Path, origin: str | None,
                    prefix: str = "") -> SourceListing:
    """`relpath label` lines (ImageNet list files, WebVision file lists)."""
    if not list_file.is_file():
        raise LayoutError(f"list file {list_file} does not exist")
    entries = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise LayoutError(f"{list_file}:{line_no}: expected 'relative/path.jpg <class>', got {line!r}")
        entries.append((prefix + parts[0], int(parts[1])))
    return _items_from_entries(src, entries, origin, class_names=None)


def _items_from_entries(src: Path, entries, origin, class_names) -> SourceListing:
    labels = sorted({label for _, label in entries if label >= 0})
    if class_names is None:
        # A class folder per label (ImageNet train lists) names the class; otherwise the number does.
        parent_of = {}
        for rel, label in entries:
            parent_of.setdefault(label, set()).add(Path(rel).parent.name)
        parents = [next(iter(parent_of[c])) if len(parent_of[c]) == 1 else None for c in labels]
        one_to_one = None not in parents and len(set(parents)) == len(parents) and len(parents) > 1
        num = (max(labels) + 1) if labels else 0
        class_names = [str(i) for i in range(num)]
        if one_to_one:
            for label, parent in zip(labels, parents):
                class_names[label] = parent
    items, rejected = [], []
    for rel, label in entries:
        path = src / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            rejected.append((rel, "file listed but missing"))
            continue
        extra = {"origin": origin} if origin else {}
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        items.append(SourceItem(rel, label, name, ("file", str(path)), size, extra))
    return SourceListing(items, list(class_names), rejected)


def list_imagenet22k(src: Path) -> SourceListing:
    """ImageNet-22K `winter21_whole`: `SRC/<wnid>.tar` holding `<wnid>_<n>.JPEG`. Only tar headers are
    read here (tarfile seeks over member data); bytes are read later by offset."""
    _require_dir(src, "source folder")
    tars = sorted(src.glob("n*.tar"))
    if not tars:
        raise LayoutError(f"{src} holds no per-synset tars (expected SRC/n01440764.tar, the winter21_whole layout)")
    classes = [t.stem for t in tars]
    items, rejected = [], []
    for label, tar_path in enumerate(tars):
        file_size = tar_path.stat().st_size
        found = 0
        try:
            with tarfile.open(tar_path, "r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    rel = f"{tar_path.name}/{member.name}"
                    end = member.offset_data + member.size
                    if end > file_size:
                        rejected.append((rel, f"truncated tar member ({member.size} bytes declared, "
                                              f"{max(0, file_size - member.offset_data)} present)"))
                        continue
                    items.append(SourceItem(rel, label, tar_path.stem,
                                            ("tar", str(tar_path), member.offset_data, member.size),
                                            member.size))
                    found += 1
        except tarfile.TarError as exc:
            rejected.append((tar_path.name, f"unreadable tar after {found} members: {exc}"))
        if found == 0:
            rejected.append((tar_path.name, "synset tar holds no images"))
    return SourceListing(items, classes, rejected)


def list_webvision(src: Path, split: str) -> SourceListing:
    """WebVision 1.0: `info/train_filelist_{google,flickr}.txt` (merged, origin kept) or
    `info/val_filelist.txt` with images under `val_images_256/`."""
    _require_dir(src, "source folder")
    info = src / "info"
    if split == "train":
        lists = [(info / "train_filelist_google.txt", "google"), (info / "train_filelist_flickr.txt", "flickr")]
        prefix = ""
    else:
        lists = [(info / "val_filelist.txt", "val")]
        prefix = "val_images_256/"
    missing = [str(p) for p, _ in lists if not p.is_file()]
    if missing:
        raise LayoutError(f"not a WebVision 1.0 layout: missing {', '.join(missing)}")
    class_names = _webvision_class_names(info)
    entries, origins = [], []
    for list_path, origin in lists:
        for line_no, line in enumerate(list_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise LayoutError(f"{list_path}:{line_no}: expected 'relative/path.jpg <class>', got {line!r}")
            entries.append((prefix + parts[0], int(parts[1])))
            origins.append(origin)
    if class_names is None:
        class_names = [str(i) for i in range(max(l for _, l in entries) + 1)] if entries else []
    listing = SourceListing([], class_names, [])
    for origin in dict.fromkeys(origins):
        part = _items_from_entries(src, [e for e, o in zip(entries, origins) if o == origin], origin, class_names)
        listing.items += part.items
        listing.rejected += part.rejected
    return listing


def _webvision_class_names(info: Path) -> list[str] | None:
    synsets = info / "synsets.txt"
    if not synsets.is_file():
        return None
    return [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]


FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def list_fashion_mnist(src: Path, split: str) -> SourceListing:
    """Fashion-MNIST idx `.gz` files (Debian's dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)."""
    _require_dir(src, "source folder")
    images_name, labels_name = FASHION_MNIST_FILES[split]
    for name in (images_name, labels_name):
        if not (src / name).is_file():
            raise LayoutError(f"{src / name} not found: expected the Fashion-MNIST idx files "
                              "(apt-get install dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)")
    labels = read_idx(str(src / labels_name))
    images = read_idx(str(src / images_name))
    if len(labels) != len(images):
        raise LayoutError(f"{src}: {len(images)} images but {len(labels)} labels")
    items = [
        SourceItem(f"{images_name}#{i}", int(labels[i]), FASHION_MNIST_CLASSES[labels[i]],
                   ("idx", str(src / images_name), i), images[i].size)
        for i in range(len(labels))
    ]
    return SourceListing(items, list(FASHION_MNIST_CLASSES), [])


@lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped): unsigned-byte tensors as used by (Fashion-)MNIST."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise LayoutError(f"{path} is not an unsigned-byte idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise LayoutError(f"{path} is truncated: {array.size} bytes for shape {shape}")
    return array.reshape(shape)


def read_item(locator: tuple) -> bytes | np.ndarray:
    """Bytes of a file or tar member, or the pixel array of an idx image."""
    kind = locator[0]
    if kind == "file":
        with open(locator[1], "rb") as f:
            return f.read()
    if kind == "tar":
        _, path, offset, size = locator
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"truncated tar member: {len(data)} of {size} bytes")
        return data
    if kind == "idx":
        return read_idx(locator[1])[locator[2]]
    raise ValueError(f"unknown locator kind {kind!r}")
