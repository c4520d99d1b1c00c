"""Realistic dataset fixtures in the exact on-disk layouts, built from real photos (`skimage.data`)
encoded as JPEG. Shared by the tests and `benchmarks/`."""
from __future__ import annotations

import io
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@lru_cache(maxsize=1)
def photos() -> list[np.ndarray]:
    from skimage import data
    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]


def photo_jpeg(rng: np.random.Generator, min_side: int = 48, max_side: int = 160, quality: int = 90) -> bytes:
    """A random crop of a real photo, encoded as JPEG: distinct bytes for every call."""
    photo = photos()[rng.integers(len(photos()))]
    h, w = photo.shape[:2]
    ch, cw = rng.integers(min_side, min(max_side, h) + 1), rng.integers(min_side, min(max_side, w) + 1)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    buffer = io.BytesIO()
    Image.fromarray(photo[y:y + ch, x:x + cw]).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_imagenet(root: Path, per_class: int, split: str = "train", classes=WNIDS, seed: int = 0) -> dict:
    """SRC/{split}/<wnid>/<wnid>_<n>.JPEG. Returns {relpath: (bytes, label)}."""
    rng = np.random.default_rng(seed)
    expected = {}
    for label, wnid in enumerate(sorted(classes)):
        folder = root / split / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            data = photo_jpeg(rng)
            (folder / f"{wnid}_{n}.JPEG").write_bytes(data)
            expected[f"{split}/{wnid}/{wnid}_{n}.JPEG"] = (data, label)
    return expected


def make_imagenet22k(root: Path, per_class: int, classes=WNIDS, seed: int = 0) -> dict:
    """SRC/<wnid>.tar holding <wnid>_<n>.JPEG (winter21_whole). Returns {tarname/member: (bytes, label)}."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for label, wnid in enumerate(sorted(classes)):
        with tarfile.open(root / f"{wnid}.tar", "w") as archive:
            for n in range(per_class):
                data = photo_jpeg(rng)
                info = tarfile.TarInfo(f"{wnid}_{n}.JPEG")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                expected[f"{wnid}.tar/{wnid}_{n}.JPEG"] = (data, label)
    return expected


def make_webvision(root: Path, per_class: int, num_classes: int = 4, seed: int = 0) -> dict:
    """WebVision 1.0: google/ and flickr/ query folders with info/train_filelist_{google,flickr}.txt,
    val_images_256/ with info/val_filelist.txt. Returns {split: {relpath: (bytes, label, origin)}}."""
    rng = np.random.default_rng(seed)
    (root / "info").mkdir(parents=True, exist_ok=True)
    expected = {"train": {}, "val": {}}
    for origin in ("google", "flickr"):
        lines = []
        for label in range(num_classes):
            folder = root / origin / f"q{label + 1:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                data = photo_jpeg(rng)
                rel = f"{origin}/q{label + 1:04d}/{n:08d}.jpg"
                (root / rel).write_bytes(data)
                lines.append(f"{rel} {label}")
                expected["train"][rel] = (data, label, origin)
        (root / "info" / f"train_filelist_{origin}.txt").write_text("\n".join(lines) + "\n")
    (root / "val_images_256").mkdir(exist_ok=True)
    lines = []
    for n in range(per_class * num_classes // 2):
        data, label = photo_jpeg(rng), n % num_classes
        name = f"val{n + 1:06d}.jpg"
        (root / "val_images_256" / name).write_bytes(data)
        lines.append(f"{name} {label}")
        expected["val"][f"val_images_256/{name}"] = (data, label, "val")
    (root / "info" / "val_filelist.txt").write_text("\n".join(lines) + "\n")
    return expected


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as module `name` (the folder is not a package), removed again
    afterwards: `yield from` it in a fixture."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)
