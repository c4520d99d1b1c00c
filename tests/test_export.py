"""jobs/export.py: a run folder written as runtime.train.report() writes it → state_dicts that
torchvision's ResNet loads (only fc missing) and that reproduce our encoder's features; CMC one file
per channel group; heads apart; export.json; one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from jobs.export import main
from runtime.build import build_method
from runtime.config import parse_args

SMALL_QUEUE = ["--set", "method.queue_size=256"]  # MoCo / InterCLR-MoCo: the queue is saved with the model


def write_run(root, method_name, *overrides, step=7):
    """A run folder in the format of runtime.train.report(), from a method whose backbone differs
    from a fresh build (BN statistics and one BN scale) so that exporting must load the checkpoint."""
    config, _ = parse_args(["--set", "model.encoder=resnet18", "--set", "model.width=1", *overrides],
                           method=method_name, default_preset="imagenet")
    method = build_method(config, num_classes=10)
    with torch.no_grad():
        for module in method.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.fill_(0.9)
    run = root / "run"
    (run / "checkpoint_000000").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    torch.save({"model": method.state_dict(), "optimizer": {}, "step": step, "bank_snapshots": []},
               run / "checkpoint_000000" / "model.pt")
    return run, method.eval(), config


def torchvision_features(constructor, state_file, in_channels=3):
    model = getattr(torchvision.models, constructor)()
    if in_channels != 3:
        model.conv1 = torch.nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    result = model.load_state_dict(torch.load(state_file, weights_only=True), strict=False)
    model.fc = torch.nn.Identity()
    return model.eval(), result


def model_from_snippet(lines, out_dir, monkeypatch):
    """Run the load lines export.json gives, in OUT, as a user would; their `model`."""
    monkeypatch.chdir(out_dir)
    namespace = {}
    exec("\n".join(lines), namespace)
    return namespace["model"].eval()


def assert_same_features(model, reference, x):
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method_name,overrides", [
    ("moco", SMALL_QUEUE), ("simclr", []), ("byol", []), ("interclr", ["--base", "moco", *SMALL_QUEUE])])
def test_backbone_loads_into_torchvision_resnet18_with_only_fc_missing(tmp_path, method_name, overrides):
    run, method, _ = write_run(tmp_path, method_name, *overrides)
    assert main([str(run), str(tmp_path / "out")]) == 0
    model, result = torchvision_features("resnet18", tmp_path / "out" / "backbone.pt")
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"}
    assert result.unexpected_keys == []
    assert_same_features(model, method.backbone, torch.randn(2, 3, 64, 64))


def test_head_round_trips_into_the_methods_head_and_byol_predictor_is_apart(tmp_path):
    run, method, config = write_run(tmp_path, "byol")
    assert main([str(run), str(tmp_path / "out")]) == 0
    fresh = build_method(config).eval()
    fresh.projector.load_state_dict(torch.load(tmp_path / "out" / "head.pt", weights_only=True))
    fresh.predictor.load_state_dict(torch.load(tmp_path / "out" / "predictor.pt", weights_only=True))
    h = torch.randn(4, method.backbone.dim)
    with torch.no_grad():
        assert torch.equal(fresh.predictor(fresh.projector(h)), method.predictor(method.projector(h)))


def test_cmc_writes_one_backbone_per_lab_channel_group_each_a_resnet18_with_its_conv1(tmp_path, capsys):
    run, method, _ = write_run(tmp_path, "cmc")
    assert main([str(run), str(tmp_path / "out")]) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = method.backbone.views(x)
        for file, part, want in zip(["backbone_l.pt", "backbone_ab.pt"], torch.split(x, [1, 2], dim=1), expected):
            model, result = torchvision_features("resnet18", tmp_path / "out" / file, in_channels=part.shape[1])
            assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and result.unexpected_keys == []
            torch.testing.assert_close(model(part), want, rtol=0, atol=1e-5)
    exported = json.loads((tmp_path / "out" / "export.json").read_text())
    assert [(b["file"], b["in_channels"], b["torchvision"]) for b in exported["backbones"]] == [
        ("backbone_l.pt", 1, "resnet18"), ("backbone_ab.pt", 2, "resnet18")]
    assert exported["heads"] == {"head_l": "head_l.pt", "head_ab": "head_ab.pt"}
    assert exported["input"]["colorspace"] == "lab"
    assert "backbone_l.pt loads into torchvision.models.resnet18() after one change" in capsys.readouterr().out


def test_small_image_stem_is_no_torchvision_model_but_its_documented_load_reproduces_features(
        tmp_path, capsys, monkeypatch):
    run, method, _ = write_run(tmp_path, "simclr", "--set", "model.small_images=true")
    assert main([str(run), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "export.json").read_text())
    assert exported["torchvision"] is None and "3x3 stride 1 with no max-pool" in exported["torchvision_note"]
    assert "note: backbone.pt is not loadable into torchvision.models.resnet18(): model.small_images" in \
        capsys.readouterr().out
    model = model_from_snippet(exported["backbones"][0]["torchvision_load"], tmp_path / "out", monkeypatch)
    assert_same_features(model, method.backbone, torch.randn(2, 3, 32, 32))


def test_width_other_than_one_keeps_our_naming_and_says_why_not_torchvision(tmp_path, capsys, monkeypatch):
    run, method, _ = write_run(tmp_path, "simclr", "--set", "model.width=0.5")
    assert main([str(run), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "export.json").read_text())
    assert exported["torchvision"] is None and exported["backbones"][0]["torchvision_load"] is None
    assert "width 0.5 scales every stage (32-64-128-256 planes" in exported["torchvision_note"]
    assert "not loadable into torchvision.models.resnet18(): width 0.5" in capsys.readouterr().out
    model = model_from_snippet(exported["backbones"][0]["viewbank_load"], tmp_path / "out", monkeypatch)
    assert_same_features(model, method.backbone, torch.randn(2, 3, 64, 64))


def test_export_json_records_method_training_knn_and_source(tmp_path):
    run, _, config = write_run(tmp_path, "interclr", "--base", "moco", *SMALL_QUEUE, "--epochs", "30", step=7)
    (run / "checkpoint_000000" / "meta.json").write_text(json.dumps({"step": 7, "epoch": 2}))
    (run / "summary.json").write_text(json.dumps({"step": 7, "knn_top1": 0.5, "knn_top1_random_init": 0.25,
                                                  "wall_seconds": 3.0}))
    assert main([str(run), str(tmp_path / "out")]) == 0
    exported = json.loads((tmp_path / "out" / "export.json").read_text())
    assert {k: exported[k] for k in ("method", "base", "encoder", "width", "small_images", "image_size", "step",
                                     "epoch_index", "epochs", "data_root", "num_classes", "torchvision")} == {
        "method": "interclr", "base": "moco", "encoder": "resnet18", "width": 1.0, "small_images": False,
        "image_size": 224, "step": 7, "epoch_index": 2, "epochs": 30, "data_root": config.data.root,
        "num_classes": None, "torchvision": "resnet18"}
    assert exported["knn"] == {"knn_top1": 0.5, "knn_top1_random_init": 0.25}
    assert exported["checkpoint"] == str((run / "checkpoint_000000" / "model.pt").resolve())
    assert exported["input"]["mean"] == [0.485, 0.456, 0.406]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["backbone.pt", "export.json", "head.pt"]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: run folder {tmp_path / 'nowhere'} not found\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main([str(run), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint_*/model.pt under")
    out = tmp_path / "out"
    out.mkdir()
    (out / "export.json").write_text("{}")
    assert main([str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} exists and is not an empty folder") and "--force" in err
    assert err.count("\n") == 1


def test_force_writes_into_a_folder_that_holds_an_earlier_export(tmp_path):
    run, _, _ = write_run(tmp_path, "simclr")
    out = tmp_path / "out"
    assert main([str(run), str(out)]) == 0
    assert main([str(run), str(out)]) == 2
    assert main([str(run), str(out), "--force"]) == 0
