"""jobs/linear_eval.py on run folders written as runtime.train.report() writes them (small ResNet-18,
500 Fashion-MNIST images): the checkpoint of the highest step, the manifest's classes, strict loading
with one-line errors, and the standard protocol (frozen backbone, augmented train views, centre-crop val)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from jobs import linear_eval
from runtime import runs
from pipeline.convert import convert
from pipeline.manifest import Manifest
from runtime.build import build_method
from runtime.config import parse_args
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
    run = write_run(tmp_path, config, build_method(config, num_classes=10), step=4)
    assert linear_eval.main([str(run), "--epochs", "1", "--device", "cpu"]) == 0
    result = json.loads((run / "linear_eval.json").read_text())
    assert result["num_classes"] == len(Manifest(shards, "train").classes) == 10
    assert result["step"] == 4 and 0.0 <= result["linear_top1"] <= 1.0


def test_standard_protocol_trains_the_head_only_on_a_frozen_backbone(shards):
    config = run_config("moco", shards)
    backbone = build_method(config).backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}  # BN running statistics included
    loaders = linear_eval.standard_loaders(shards, "train", "val", 28, None, batch_size=128)
    torch.manual_seed(0)
    initial = linear_eval.linear_head(backbone.dim, 10).weight.detach().clone()
    torch.manual_seed(0)
    head, top1 = linear_eval.standard_linear_eval(backbone, loaders, 10, epochs=1, log=lambda m: None)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not torch.equal(head.weight.detach(), initial)
    assert 0.0 <= top1 <= 1.0


def views_by_index(loader) -> dict[int, torch.Tensor]:
    return {int(i): view for batch in loader for i, view in zip(batch["index"], batch["views"][0])}


def test_standard_protocol_augments_train_views_afresh_each_epoch_and_not_val_views(shards):
    train, val = linear_eval.standard_loaders(shards, "train", "val", 28, None, batch_size=100, num_threads=1)
    first, second = views_by_index(train), views_by_index(train)
    assert len(first) == 500 and first.keys() == second.keys()
    assert all(not torch.equal(first[i], second[i]) for i in first)
    first, second = views_by_index(val), views_by_index(val)
    assert len(first) == 200 and all(torch.equal(first[i], second[i]) for i in first)


def test_standard_result_is_written_beside_the_fast_probes_with_its_settings(tmp_path, shards, capsys):
    config = run_config("moco", shards, "--set", "method.queue_size=256")
    run = write_run(tmp_path, config, build_method(config), step=6)
    assert linear_eval.main([str(run), "--epochs", "1", "--device", "cpu"]) == 0
    assert linear_eval.main([str(run), "--protocol", "standard", "--epochs", "1", "--device", "cpu",
                             "--loader-threads", "1"]) == 0
    assert "linear eval (standard): epoch 1/1 lr 30 loss" in capsys.readouterr().out
    result = json.loads((run / "linear_eval.json").read_text())
    assert {"linear_top1", "linear_top1_standard"} <= result.keys()
    settings = result["standard"]
    assert {k: settings[k] for k in ("step", "num_classes", "epochs", "lr", "momentum", "weight_decay",
                                     "batch_size", "schedule", "head_batch_norm")} == {
        "step": 6, "num_classes": 10, "epochs": 1, "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0,
        "batch_size": 256, "schedule": "cosine", "head_batch_norm": False}
