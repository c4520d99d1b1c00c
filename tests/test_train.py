"""runtime/train.py's pure schedule decisions."""
from __future__ import annotations

import pytest

from runtime.build import build_method
from runtime.config import parse_args
from runtime.train import clustering_due


@pytest.mark.parametrize("method,sets,epochs", [
    ("interclr", [], [1]),  # the demo: k-means after its one-epoch warm-up only (online labels after that)
    ("interclr", ["bank.labels=offline"], [1, 2, 3, 4, 5]),  # and again at every later epoch
    ("interclr", ["bank.labels=offline", "method.warmup_epochs=0"], [1, 2, 3, 4, 5]),  # epoch 0's: at the bank fill
    ("interclr", ["method.warmup_epochs=0"], []),
    ("moco", ["bank.labels=offline"], []),  # no clustered bank
])
def test_kmeans_runs_after_the_warmup_and_every_epoch_with_offline_labels(method, sets, epochs):
    argv = ["--preset", "demo"] + [arg for item in sets for arg in ("--set", item)]
    config, _ = parse_args(argv, method=method, default_preset="demo")
    model = build_method(config, 10)
    assert [e for e in range(config.train.epochs) if clustering_due(model, config, e)] == epochs
