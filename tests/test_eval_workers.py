"""runtime/evaluate.py `evaluate_on_workers`: the kNN evaluation on the Ray Train workers (each rank its
share of the memory and of val, merged on rank 0) gives the numbers of the driver-side path it
replaces (one loader over each whole split, in one process) for the same checkpoint and seed; the
driver then runs no model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.convert import convert
from pipeline.loader import build_loader
from pipeline.manifest import Manifest
from pipeline.views import center
from runtime import driver
from runtime import evaluate as ev
from runtime.build import build_method
from runtime.config import parse_args
from tests import datasets
from tests.test_evaluate import numpy_weighted_knn

TRAIN, VAL, WORKERS = 2001, 1001, 2  # odd: each rank's last batch is short, and the ranks' shares differ


def test_merged_per_shard_neighbours_are_the_global_neighbours():
    g = torch.Generator().manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    labels, ids = torch.randint(0, 5, (300,), generator=g), torch.arange(1000, 1300)
    whole = ev.nearest(memory, labels, ids, queries, k=20)
    parts = [ev.nearest(memory[s], labels[s], ids[s], queries, k=20, sims_per_chunk=100)
             for s in (slice(0, 7), slice(7, 150), slice(150, 300))]  # one memory shard smaller than k
    merged = ev.merge_nearest(parts, k=20)
    assert torch.equal(merged.ids, whole.ids) and torch.equal(merged.labels, whole.labels)
    assert torch.allclose(merged.sims, whole.sims, atol=1e-6)  # a shard's matmul may round differently
    assert torch.equal(whole.ids, ids[(queries @ memory.T).argsort(dim=1, descending=True)[:, :20]])


def test_memory_shares_add_up_to_the_limit_and_one_worker_takes_the_first_l():
    shares = [ev.memory_share(14_197_122, 1_281_167, r, 8) for r in range(8)]
    assert sum(shares) == 1_281_167 and set(shares) == {160_145, 160_146}  # ⌊L/8⌋ or ⌈L/8⌉ each
    assert sum(ev.memory_share(1000, 333, r, 3) for r in range(3)) == 333
    assert ev.memory_share(1000, 333, 0, 1) == 333  # the driver-side path's first 333
    assert ev.memory_share(1000, None, 0, 4) is None and ev.memory_share(1000, 1000, 1, 4) is None


needs_fashion_mnist = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                                         reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "fmnist"
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "train", limit=TRAIN, workers=1, log=lambda m: None)
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "val", limit=VAL, workers=1, log=lambda m: None)
    return out


def job_config(shards: Path, storage: Path, method: str, *sets: str):
    """The demo preset of a `method` job, small: the in-worker DALI loader, a couple of steps."""
    argv = ["--preset", "demo", "--shards", str(shards), "--storage", str(storage), "--name", method,
            "--set", "data.loaders=0", "--set", "data.batch_size=64", "--set", "train.cpus_per_worker=1",
            "--set", "train.torch_threads=1"]
    for item in sets:
        argv += ["--set", item]
    return parse_args(argv, method=method, default_preset="demo")[0]


class NoModelRuns:
    """While active: building a method, loading a checkpoint's weights or calling any module other
    than the pixel baseline's Flatten is recorded and refused."""

    def __init__(self, monkeypatch):
        self.calls = []
        module_call = torch.nn.Module.__call__

        def guarded_call(module, *args, **kwargs):
            if not isinstance(module, torch.nn.Flatten):
                self.refuse(f"{type(module).__name__}.__call__")
            return module_call(module, *args, **kwargs)
        monkeypatch.setattr(torch.nn.Module, "__call__", guarded_call)
        monkeypatch.setattr("runtime.build.build_method", lambda *a, **k: self.refuse("build_method"))
        monkeypatch.setattr(torch, "load", lambda *a, **k: self.refuse("torch.load"))

    def refuse(self, what: str):
        self.calls.append(what)
        raise AssertionError(f"the driver ran {what} during evaluate")


@pytest.fixture(scope="module")
def job(shards, tmp_path_factory, ray_cluster):
    """One `runtime.driver.run` of SimCLR on 2 gloo workers (2 steps, then the workers' evaluation),
    with the driver's `evaluate` watched by `NoModelRuns` (t-SNE's input recorded, not fitted: 18 s)."""
    storage = tmp_path_factory.mktemp("runs")
    config = job_config(shards, storage, "simclr", "train.num_workers=2", "train.max_steps=2", "train.log_ids=true")
    watched = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        evaluate = driver.evaluate
        monkeypatch.setattr(ev, "tsne_plot", lambda path, feats, labels, classes: watched.update(tsne=(feats, labels)))

        def watched_evaluate(*args, **kwargs):
            with pytest.MonkeyPatch.context() as inner:
                watched["guard"] = NoModelRuns(inner)
                return evaluate(*args, **kwargs)
        monkeypatch.setattr(driver, "evaluate", watched_evaluate)
        summary = driver.run(config)
    return config, summary, storage / config.name, watched


def checkpoint_state(run_dir: Path, step: int) -> dict:
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        if json.loads(meta.read_text())["step"] == step:
            return torch.load(meta.parent / "model.pt", map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"no checkpoint of step {step} under {run_dir}")


def driver_side_knn(config, state: dict) -> dict:
    """The evaluation as the driver ran it before: the random init then the trained model built after
    `torch.manual_seed(train.seed)`, the checkpoint loaded, each whole split through one CPU loader,
    and the weighted kNN written out in numpy (tests/test_evaluate.py)."""
    torch.manual_seed(config.train.seed)
    random_init = build_method(config)
    trained = build_method(config)
    trained.load_state_dict(state["model"])
    d = config.data
    out = {}
    for key, method in (("knn_top1", trained), ("knn_top1_random_init", random_init)):
        train_f, train_y, _ = ev.extract_features(method.backbone, d.root, d.train_split, d.image_size)
        val_f, val_y, _ = ev.extract_features(method.backbone, d.root, d.val_split, d.image_size)
        out[key] = numpy_weighted_knn(train_f, train_y, val_f, val_y, config.eval.knn_k, config.eval.knn_temperature)
    return out


@needs_fashion_mnist
def test_knn_on_two_workers_equals_the_driver_side_path_for_the_same_checkpoint(job):
    config, summary, run_dir, _ = job
    expected = driver_side_knn(config, checkpoint_state(run_dir, summary["step"]))
    assert summary["step"] == 2
    assert summary["knn_top1"] == pytest.approx(expected["knn_top1"], abs=0.001)
    assert summary["knn_top1_random_init"] == pytest.approx(expected["knn_top1_random_init"], abs=0.001)
    assert summary["knn_top1"] != summary["knn_top1_random_init"]  # two models, not one twice


@needs_fashion_mnist
def test_each_rank_logs_the_ids_of_each_step_it_trained_and_the_ranks_share_none(job):
    """`train.log_ids` (benchmarks/chaos.py's accounting): one line per step and rank, the batch's ids."""
    config, _, run_dir, _ = job
    logs = {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((run_dir / "ids").glob("rank-*.jsonl"))}
    assert sorted(logs) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert all([entry["step"] for entry in entries] == [1, 2] for entries in logs.values())
    ids = [i for entries in logs.values() for entry in entries for i in entry["ids"]]
    assert len(ids) == 2 * 2 * config.data.batch_size == len(set(ids))  # 2 ranks × 2 steps, no id twice
    assert 0 <= min(ids) and max(ids) < TRAIN


@needs_fashion_mnist
def test_every_train_and_val_image_is_counted_once_over_the_two_workers(job):
    _, summary, _, _ = job
    assert (summary["eval_memory_samples"], summary["eval_val_samples"]) == (TRAIN, VAL)


@needs_fashion_mnist
def test_the_driver_runs_no_model_and_still_draws_the_pictures_and_the_pixel_baseline(job):
    config, summary, run_dir, watched = job
    assert watched["guard"].calls == []
    assert 0.5 < summary["knn_top1_pixels"] < 1 and summary["feature_std"] > 0
    assert (run_dir / "retrieval.png").stat().st_size > 0
    feats, labels = watched["tsne"]  # the trained backbone's val features: every rank's, each image once
    assert feats.shape[0] == VAL
    assert np.array_equal(np.bincount(labels), np.bincount(Manifest(config.data.root, config.data.val_split).labels()))


@needs_fashion_mnist
def test_a_supervised_classifier_top1_on_a_worker_is_its_top1_on_the_whole_val_split(shards, tmp_path):
    config = job_config(shards, tmp_path, "supervised", "eval.pictures=false", "eval.knn_train_samples=256")
    torch.manual_seed(1)
    method = build_method(config, 10)
    results = ev.evaluate_on_workers(method, config, 0, 1, torch.device("cpu"), tmp_path, 10, step=0)
    from models.supervised import classifier_top1
    val = build_loader(shards, center(28), 256, split="val", shuffle=False, initial_fill=1)
    assert results["val_top1"] == pytest.approx(classifier_top1(method, val), abs=1e-12)
    assert json.loads((tmp_path / ev.EVAL_FILE).read_text())["val_top1"] == results["val_top1"]


@needs_fashion_mnist
def test_the_online_monitors_knn_is_the_weighted_knn_over_its_memory_subset(shards):
    """`knn_on_workers` as the monitor calls it (one worker, the first 500 train images as memory):
    the numpy weighted kNN over the same features; and the monitor is due every N epochs only."""
    from runtime.train import monitor_due
    config = job_config(shards, Path("/tmp"), "simclr", "eval.monitor_every=2", "eval.monitor_samples=500")
    torch.manual_seed(3)
    backbone = build_method(config, 10).backbone
    top1, _, (val_f, val_y, _), memory_ids, size = ev.knn_on_workers(backbone, config, None, 0, 1, torch.device("cpu"),
                                                                     500, "monitor")
    train_f, train_y, train_ids = ev.extract_features(backbone, shards, "train", 28, limit=500)
    assert size == 500 and np.array_equal(memory_ids, train_ids)
    assert top1 == pytest.approx(numpy_weighted_knn(train_f, train_y, val_f, val_y, 20, 0.07), abs=1e-9)
    assert [e for e in range(1, 7) if monitor_due(config, e)] == [2, 4, 6]
