"""models/registry.py: a method defined outside models/ (here, inside a test, as a user's module would)
is one config class and one `register` call; the job's command line reads its keys, and the real job
ships its config to a Ray Train worker, which builds the method from it and trains it."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import yaml

from models.method import Method, MethodConfig, sgd
from models.registry import METHODS, method_config, register
from pipeline.convert import convert
from runtime.config import ConfigError, parse_args, print_config
from tests import datasets


def toy_method() -> type[MethodConfig]:
    """Two views, a linear head, loss = scale · (2 - 2·cos) between the views' embeddings (BYOL's
    regression without target or predictor). Defined in a function: cloudpickle ships the classes to
    the workers by value, as it would a user's module that the workers cannot import."""

    class Toy(Method):
        recipe = "two_crop"

        def __init__(self, backbone: torch.nn.Module, scale: float):
            super().__init__()
            self.backbone, self.head, self.scale = backbone, torch.nn.Linear(backbone.dim, 16), scale

        def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
            z1, z2 = (F.normalize(self.head(self.backbone(v)), dim=1) for v in self.views(batch)[:2])
            loss = self.scale * (2 - 2 * (z1 * z2).sum(1)).mean()
            return {"loss": loss, "scale": torch.tensor(self.scale)}

    @dataclass
    class ToyConfig(MethodConfig):
        name: str = "toy"
        scale: float = 1.0  # the loss's factor
        title = "Toy"
        optimizer = sgd(0.05, 0.0)

        def build(self, job, num_classes: int | None = None) -> Toy:
            return Toy(self.backbone(job), self.scale)

    return ToyConfig


@pytest.fixture
def toy():
    cls = register(toy_method())
    yield cls
    METHODS.pop(cls.name)


def toy_args(*sets: str) -> list[str]:
    return ["--preset", "demo", "--set", "method.name=toy", *[arg for item in sets for arg in ("--set", item)]]


def test_a_registered_method_reads_its_own_keys_and_refuses_the_others(toy, capsys):
    config, _ = parse_args(toy_args("method.scale=0.5"), default_preset="demo")
    assert type(config.method) is toy and config.method.scale == 0.5
    assert (config.train.optimizer, config.train.lr) == ("sgd", 0.05)  # its own optimiser (the demo sets wd)
    print_config(config)
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["method"] == {"name": "toy", "scale": 0.5} and "bank" not in shown
    for item, message in [("method.scael=2", "unknown config key 'method.scael' (did you mean method.scale?)"),
                          ("method.queue_size=8", "method.queue_size does not apply to toy (it is MoCo's, CACR's "
                                                  "and InterCLR's; given by --set method.queue_size=8)"),
                          ("bank.clusters=5", "bank.clusters does not apply to toy (it is InterCLR's"),
                          ("method.scale=big", "method.scale='big': expected float")]:
        with pytest.raises(ConfigError) as error:
            parse_args(toy_args(item), default_preset="demo")
        assert str(error.value).startswith(message)


def test_register_refuses_a_taken_name_and_the_lookup_names_the_closest(toy):
    @dataclass
    class Other(MethodConfig):
        name: str = "moco"
    with pytest.raises(ValueError, match="taken"):
        register(Other)
    with pytest.raises(KeyError, match="did you mean toy"):
        method_config("tyo")


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_a_method_registered_in_a_test_trains_a_two_step_job(toy, tmp_path, ray_cluster):
    from runtime import driver
    shards = tmp_path / "fmnist"
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, shards, "train", limit=512, workers=1, log=lambda m: None)
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, shards, "val", limit=256, workers=1, log=lambda m: None)
    config, _ = parse_args(toy_args("method.scale=0.5", "data.loaders=0", "data.batch_size=64", "train.max_steps=2",
                                    "train.log_every=1", "train.cpus_per_worker=1", "train.torch_threads=1",
                                    "eval.pictures=false", "eval.pixel_baseline=false", "eval.knn_train_samples=256")
                           + ["--shards", str(shards), "--storage", str(tmp_path / "runs"), "--name", "toy"],
                           default_preset="demo")
    summary = driver.run(config)
    run_dir = tmp_path / "runs" / "toy"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in steps if "loss" in record]
    assert summary["step"] == 2 and [r["step"] for r in steps] == [1, 2]
    # the worker built the method from this config: its key's value is in every step's output
    assert all(r["scale"] == 0.5 and 0 <= r["loss"] <= 1.0 for r in steps), steps
    assert json.loads((run_dir / "config.json").read_text())["method"] == {"name": "toy", "scale": 0.5}
