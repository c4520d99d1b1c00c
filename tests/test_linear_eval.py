"""jobs/linear_eval.py on run folders written as runtime.train.report() writes them (small ResNet-18,
500 Fashion-MNIST images): the checkpoint of the highest step, the manifest's classes, strict loading
with one-line errors, the standard protocol (frozen backbone, augmented train views, centre-crop val),
and both protocols on two Ray Train workers: every id once, the DDP head equal to one SGD on the
union of the ranks' batches, val top-1 what the saved head predicts."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from jobs import linear_eval
from runtime import linear_probe, runs
from pipeline.convert import convert
from pipeline.manifest import Manifest
from runtime.build import build_method
from runtime.config import parse_args
from runtime.evaluate import extract_features
from tests import datasets

SMALL = ["--set", "model.encoder=resnet18", "--set", "model.width=0.25"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    if not datasets.FASHION_MNIST_DIR.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("linear_eval") / "fmnist"
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "train", limit=500, workers=1, log=lambda m: None)
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "val", limit=200, workers=1, log=lambda m: None)
    return out


def run_config(method_name, shards, *overrides):
    config, _ = parse_args(["--shards", str(shards), *SMALL, *overrides], method=method_name, default_preset="demo")
    return config


def write_checkpoint(run, name, method, step, meta=True):
    folder = run / name
    folder.mkdir(parents=True)
    torch.save({"model": method.state_dict(), "optimizer": {}, "schedule": {}, "step": step, "bank_snapshots": []},
               folder / "model.pt")
    if meta:
        (folder / "meta.json").write_text(json.dumps({"step": step, "epoch": 0}))
    return folder / "model.pt"


def write_run(tmp_path, config, method, step=4):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    write_checkpoint(run, "checkpoint_2026-01-01_00-00-00.000000", method, step)
    return run


def test_latest_checkpoint_is_the_highest_step_not_the_newest_file(tmp_path):
    method = torch.nn.Linear(2, 2)
    highest = write_checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-00.000000", method, step=900)
    newer = write_checkpoint(tmp_path, "checkpoint_2026-01-02_00-00-00.000000", method, step=500)
    os.utime(highest, (1_000, 1_000))  # the higher step is the older file and sorts first by name
    os.utime(newer, (2_000, 2_000))
    assert runs.latest_checkpoint(tmp_path) == highest


def test_latest_checkpoint_reads_the_step_from_model_pt_without_meta_json(tmp_path):
    method = torch.nn.Linear(2, 2)
    linked = write_checkpoint(tmp_path, "checkpoint_final", method, step=700, meta=False)  # benchmarks/fidelity.py
    newer = write_checkpoint(tmp_path, "checkpoint_2026-01-02_00-00-00.000000", method, step=300)
    os.utime(linked, (1_000, 1_000))
    os.utime(newer, (2_000, 2_000))
    assert runs.latest_checkpoint(tmp_path) == linked


def test_missing_run_and_run_without_checkpoint_are_one_line_errors(tmp_path, capsys):
    assert linear_eval.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"error: run folder {tmp_path / 'nowhere'} not found\n"
    (tmp_path / "config.json").write_text("{}")
    assert linear_eval.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no checkpoint_*/model.pt under {tmp_path}") and err.count("\n") == 1


def test_checkpoint_that_does_not_fit_its_config_is_a_one_line_error(tmp_path, shards, capsys):
    wider = run_config("moco", shards, "--set", "model.width=0.5")
    run = write_run(tmp_path, run_config("moco", shards), build_method(wider))
    assert linear_eval.main([str(run), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit the method" in err and err.count("\n") == 1
    assert not (run / "linear_eval.json").exists()


def test_supervised_run_loads_strictly_with_the_manifests_ten_classes(tmp_path, shards):
    config = run_config("supervised", shards)
    trained = build_method(config, num_classes=10)
    run = write_run(tmp_path, config, trained, step=4)
    _, _, state, classes, method = runs.load_run(run)
    assert classes == len(Manifest(shards, "train").classes) == 10 and state["step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), trained.state_dict().values()))


def test_standard_protocol_trains_the_head_only_on_a_frozen_backbone(shards):
    config = run_config("moco", shards)
    backbone = build_method(config).backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}  # BN running statistics included
    loaders = linear_probe.standard_loaders(shards, "train", "val", 28, None, batch_size=128)
    torch.manual_seed(0)
    initial = linear_probe.linear_head(backbone.dim, 10).weight.detach().clone()
    torch.manual_seed(0)
    head, top1, _ = linear_probe.standard_linear_eval(backbone, loaders, 10, epochs=1, log=lambda m: None)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not torch.equal(head.weight.detach(), initial)
    assert 0.0 <= top1 <= 1.0


def views_by_index(loader) -> dict[int, torch.Tensor]:
    return {int(i): view for batch in loader for i, view in zip(batch["index"], batch["views"][0])}


def test_standard_protocol_augments_train_views_afresh_each_epoch_and_not_val_views(shards):
    train, val = linear_probe.standard_loaders(shards, "train", "val", 28, None, batch_size=100, num_threads=1)
    first, second = views_by_index(train), views_by_index(train)
    assert len(first) == 500 and first.keys() == second.keys()
    assert all(not torch.equal(first[i], second[i]) for i in first)
    first, second = views_by_index(val), views_by_index(val)
    assert len(first) == 200 and all(torch.equal(first[i], second[i]) for i in first)


EPOCHS = 3


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, shards, ray_cluster):
    """A MoCo run folder evaluated by both protocols in one job on two Ray Train workers, over a
    linear_eval.json that holds an earlier result."""
    config = run_config("moco", shards, "--set", "method.queue_size=256")
    run = write_run(tmp_path_factory.mktemp("two_workers"), config, build_method(config), step=6)
    (run / "linear_eval.json").write_text(json.dumps({"earlier": 0.5}))
    assert linear_eval.main([str(run), "--protocol", "both", "--epochs", str(EPOCHS), "--device", "cpu",
                             "--workers", "2", "--loader-threads", "1", "--batch-size", "256"]) == 0
    return run, config


def saved_head(run, protocol, dim):
    head = linear_probe.linear_head(dim, 10)
    head.load_state_dict(torch.load(run / f"linear_head_{protocol}.pt"))
    return head


def top1_of(head, feats, labels):
    with torch.no_grad():
        return float((head(torch.from_numpy(feats)).argmax(1) == torch.from_numpy(labels).long()).float().mean())


def test_fast_probe_on_two_workers_reads_every_id_once_and_is_one_sgd_on_the_union_of_their_batches(two_worker_run):
    run, config = two_worker_run
    result = json.loads((run / "linear_eval.json").read_text())
    assert {k: result["fast"][k] for k in ("workers", "train_samples", "val_samples", "batch_size")} == {
        "workers": 2, "train_samples": 500, "val_samples": 200, "batch_size": 256}
    # the same SGD in one process: rank r holds the r-th half of the split in reader order and draws
    # its order from a generator seeded by r; DDP averages the two ranks' mean-loss gradients
    _, _, _, _, method = runs.load_run(run)
    feats, labels, _ = extract_features(method.backbone, config.data.root, "train", 28)
    shares = [(torch.from_numpy(feats[a:b]), torch.from_numpy(labels[a:b]).long()) for a, b in ((0, 250), (250, 500))]
    torch.manual_seed(config.train.seed)
    head = torch.nn.Linear(feats.shape[1], 10)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    generators = [torch.Generator().manual_seed(rank) for rank in range(2)]
    for _ in range(EPOCHS):
        orders = [torch.randperm(250, generator=g).split(128) for g in generators]
        for batches in zip(*orders):
            loss = sum(F.cross_entropy(head(x[b]), y[b]) for (x, y), b in zip(shares, batches)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    trained = saved_head(run, "fast", feats.shape[1])
    assert torch.allclose(trained.weight, head.weight, atol=1e-4) and torch.allclose(trained.bias, head.bias, atol=1e-4)
    val_feats, val_labels, _ = extract_features(method.backbone, config.data.root, "val", 28)
    assert abs(top1_of(trained, val_feats, val_labels) - result["linear_top1"]) <= 1 / 200  # a near tie at most


def test_standard_protocol_on_two_workers_lands_beside_the_other_results_with_its_settings(two_worker_run):
    run, config = two_worker_run
    result = json.loads((run / "linear_eval.json").read_text())
    assert {"earlier", "linear_top1", "linear_top1_standard"} <= result.keys() and result["earlier"] == 0.5
    settings = result["standard"]
    assert {k: settings[k] for k in ("step", "num_classes", "epochs", "lr", "momentum", "weight_decay",
                                     "batch_size", "schedule", "head_batch_norm", "workers",
                                     "train_samples_per_epoch", "val_samples")} == {
        "step": 6, "num_classes": 10, "epochs": EPOCHS, "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0,
        "batch_size": 256, "schedule": "cosine", "head_batch_norm": False, "workers": 2,
        "train_samples_per_epoch": 500, "val_samples": 200}  # 2 ranks x (128 + 122) rows
    _, _, _, _, method = runs.load_run(run)
    torch.manual_seed(config.train.seed)
    initial = linear_probe.linear_head(method.backbone.dim, 10)
    trained = saved_head(run, "standard", method.backbone.dim)
    assert not torch.equal(trained.weight, initial.weight)
    val_feats, val_labels, _ = extract_features(method.backbone, config.data.root, "val", 28, normalize=False)
    assert abs(top1_of(trained, val_feats, val_labels) - result["linear_top1_standard"]) <= 1 / 200
