"""runtime/evaluate.py: the no-model baseline of every run — weighted kNN on mean-centred pixels —
against the same protocol written in numpy on the images decoded by PIL."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.convert import convert
from pipeline.manifest import Manifest
from runtime import evaluate as ev
from tests import datasets

pytestmark = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def numpy_weighted_knn(train: np.ndarray, train_y: np.ndarray, val: np.ndarray, val_y: np.ndarray,
                       k: int = 20, temperature: float = 0.07) -> float:
    """Wu et al. 2018's weighted kNN, written out: cosine, k nearest, votes exp(cos/τ)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(val) @ unit(train).T
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(val), int(train_y.max()) + 1))
    for i, row in enumerate(nearest):
        np.add.at(votes[i], train_y[row], np.exp(sims[i, row] / temperature))
    return float((votes.argmax(1) == val_y).mean())


def test_pixel_baseline_is_weighted_knn_on_mean_centred_pixels(tmp_path):
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, tmp_path, "train", limit=1500, workers=1, log=lambda m: None)
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, tmp_path, "val", limit=500, workers=1, log=lambda m: None)
    pixels = {}
    for split in ("train", "val"):
        manifest = Manifest(tmp_path, split)
        images = np.stack([ev.read_image(manifest, i)[..., 0] for i in range(len(manifest))]).astype(np.float64)
        pixels[split] = (images.reshape(len(images), -1), manifest.labels().astype(np.int64))
    (train, train_y), (val, val_y) = pixels["train"], pixels["val"]
    mean = train.mean(axis=0)
    expected = numpy_weighted_knn(train - mean, train_y, val - mean, val_y)
    assert 0.6 < expected < 0.95
    assert ev.pixel_knn_top1(tmp_path, "train", "val", 28) == pytest.approx(expected, abs=2 / len(val))
    # centring is the point: raw pixels (cosine dominated by the shared mean image) score differently
    assert numpy_weighted_knn(train, train_y, val, val_y) != pytest.approx(expected, abs=1e-9)
