"""ImCLR (000_*.txt) on real Fashion-MNIST shards: rows of n = 2, 3, 4 samples side by side, each
part exactly its sample's view, labels the mean one-hot; the recipe by name; the supervised method's
targets and classifier top-1; the job's command line (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from models.supervised import Supervised, classifier_top1
from pipeline.convert import convert
from pipeline.loader import LoaderError, build_loader
from pipeline.manifest import Manifest
from pipeline.views import center, imclr, recipe_by_name, supervised
from tests import datasets

pytestmark = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
SIZE = 28
COUNT = 200  # samples converted
BATCH = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("imclr") / "fmnist"
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "train", limit=COUNT, workers=1, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def centre_views(shards) -> dict[int, torch.Tensor]:
    """Each sample's own centre view, id → [3, 28, 28], from a plain (n = 1) loader."""
    views = {}
    for batch in build_loader(shards, center(SIZE), 64, shuffle=False, num_threads=1):
        views.update(zip(batch["index"].tolist(), batch["views"][0]))
    return views


def mean_one_hot(ids: list[int], labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.stack([F.one_hot(torch.tensor(int(labels[i])), num_classes).float() for i in ids]).mean(dim=0)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_each_row_is_n_distinct_samples_side_by_side_with_their_mean_one_hot_label(shards, centre_views, n):
    manifest = Manifest(shards)
    labels, num_classes = manifest.labels(), len(manifest.classes)
    batch = next(iter(build_loader(shards, imclr(n, center(SIZE)), BATCH, seed=n, num_threads=1)))
    (rows,) = batch["views"]
    assert rows.shape == (BATCH, 3, SIZE, n * SIZE)
    assert batch["index"].shape == (BATCH, n) and batch["label"].shape == (BATCH, num_classes)
    for row, ids in enumerate(batch["index"].tolist()):
        assert len(set(ids)) == n
        for j, sample_id in enumerate(ids):  # part j is sample index[:, j]'s own view, pixel for pixel
            torch.testing.assert_close(rows[row, :, :, j * SIZE:(j + 1) * SIZE], centre_views[sample_id])
        torch.testing.assert_close(batch["label"][row], mean_one_hot(ids, labels, num_classes))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_part_uses_each_sample_of_the_batch_once(shards, n):
    batch = next(iter(build_loader(shards, imclr(n, center(SIZE)), BATCH, seed=n, num_threads=1)))
    first = sorted(batch["index"][:, 0].tolist())
    assert len(set(first)) == BATCH
    for j in range(1, n):
        assert sorted(batch["index"][:, j].tolist()) == first
        assert (batch["index"][:, j] != batch["index"][:, 0]).all()  # no sample is its own partner


def test_every_sample_starts_one_row_per_epoch_including_the_final_partial_batch(shards, centre_views):
    loader = build_loader(shards, imclr(3, center(SIZE)), 24, seed=0, num_threads=1)
    batches = list(loader)
    assert [len(b["index"]) for b in batches] == [24] * 8 + [COUNT - 8 * 24]
    assert sorted(torch.cat([b["index"][:, 0] for b in batches]).tolist()) == list(range(COUNT))
    last = batches[-1]
    for row, ids in enumerate(last["index"].tolist()):
        torch.testing.assert_close(last["views"][0][row, :, :, :SIZE], centre_views[ids[0]])


def test_imclr_by_name_is_n_supervised_views_side_by_side(shards):
    recipe = recipe_by_name("imclr(3)", SIZE)
    assert recipe.concat == 3 and recipe.views == supervised(SIZE).views and recipe.num_views == 1
    assert recipe_by_name("imclr", SIZE).concat == 2
    (spec,) = recipe.views
    assert spec.random and spec.flip and spec.scale == (0.08, 1.0)
    assert spec.p_jitter == spec.p_gray == spec.p_blur == 0  # the supervised pipeline: crop and flip only
    batch = next(iter(build_loader(shards, recipe, BATCH, num_threads=1)))
    assert batch["views"][0].shape == (BATCH, 3, SIZE, 3 * SIZE)
    torch.testing.assert_close(batch["label"].sum(dim=1), torch.ones(BATCH))
    with pytest.raises(LoaderError, match="batch_size must be >= 4"):
        build_loader(shards, imclr(4, center(SIZE)), 3)
    with pytest.raises(ValueError, match="n >= 2"):
        imclr(1)


def tiny_backbone() -> torch.nn.Module:
    from models import build_encoder
    return build_encoder("resnet18", width=0.125)


def test_plain_labels_become_one_hot_targets_and_one_loss_serves_both():
    torch.manual_seed(0)
    method = Supervised(tiny_backbone(), 10)
    images, labels = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 3, 3, 9])
    torch.testing.assert_close(method.targets(labels), F.one_hot(labels, 10).float())
    loss = method.training_step({"views": [images], "label": labels, "index": torch.arange(4)})["loss"]
    torch.testing.assert_close(loss, F.cross_entropy(method.classify(images), labels))
    assert method.recipe == "supervised" and Supervised(tiny_backbone(), 10, samples_per_input=3).recipe == "imclr(3)"
    with pytest.raises(ValueError, match="samples_per_input"):
        Supervised(tiny_backbone(), 10, samples_per_input=1)


def test_a_model_trained_on_rows_classifies_single_images():
    torch.manual_seed(0)
    method = Supervised(tiny_backbone(), 10, samples_per_input=2)
    assert method.classify(torch.randn(2, 3, SIZE, 2 * SIZE)).shape == (2, 10)
    images = torch.randn(6, 3, SIZE, SIZE)
    predicted = method.eval().classify(images).argmax(dim=1)
    labels = predicted.clone()
    labels[:2] = (labels[:2] + 1) % 10  # two of six wrong
    assert classifier_top1(method, [{"views": [images[:4]], "label": labels[:4]},
                                    {"views": [images[4:]], "label": labels[4:]}]) == pytest.approx(4 / 6)


def test_job_command_line_names_the_run_after_n_and_trains_supervised(capsys):
    import importlib.util
    from pathlib import Path
    from runtime.driver import main
    path = Path(__file__).resolve().parents[1] / "jobs" / "imclr.py"
    spec = importlib.util.spec_from_file_location("imclr_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    for n, name in (("3", "imclr3-demo"), ("0", "supervised-demo")):
        assert main(job.driver_argv(["--preset", "demo", "--imclr", n, "--print-config"]), method="supervised") == 0
        config = yaml.safe_load(capsys.readouterr().out)
        assert (config["name"], config["method"]["name"], config["method"]["imclr"]) == (name, "supervised", int(n))
    assert main(job.driver_argv(["--preset", "demo", "--imclr", "1"]), method="supervised") == 2
    assert "method.imclr" in capsys.readouterr().err
