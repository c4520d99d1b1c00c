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
    ("moco", [], []),  # no clustered bank (bank.labels does not apply to moco)
])
def test_kmeans_runs_after_the_warmup_and_every_epoch_with_offline_labels(method, sets, epochs):
    argv = ["--preset", "demo"] + [arg for item in sets for arg in ("--set", item)]
    config, _ = parse_args(argv, method=method, default_preset="demo")
    model = build_method(config, 10)
    assert [e for e in range(config.train.epochs) if clustering_due(model, config, e)] == epochs


@pytest.mark.parametrize("warmup_epochs,total,per_epoch", [(2, 100, 5), (0, 50, 5), (10, 40, 4), (1, 7, 7)])
def test_lr_schedule_is_scaled_warmed_up_then_cosine_as_worked_by_hand(warmup_epochs, total, per_epoch):
    import math

    import torch

    from runtime.train import lr_schedule
    config, _ = parse_args(["--preset", "demo", "--set", f"train.lr_warmup_epochs={warmup_epochs}",
                            "--set", "train.lr=0.1", "--set", "data.batch_size=64"], default_preset="demo")
    base = 0.1 * 64 / 256  # lr per 256 images, one worker of batch 64
    warmup = min(warmup_epochs * per_epoch, total // 10)
    by_hand = [base * (k + 1) / warmup if k < warmup else
               base * 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup))) for k in range(total)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    schedule = lr_schedule(optimizer, config, total, per_epoch)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx(by_hand, rel=1e-9, abs=1e-12)


def test_lr_schedule_resumes_from_its_state_dict():
    import torch

    from runtime.train import lr_schedule
    config, _ = parse_args(["--preset", "demo", "--set", "train.lr_warmup_epochs=1"], default_preset="demo")

    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, lr_schedule(optimizer, config, 60, 6)
    optimizer, schedule = fresh()
    for _ in range(17):
        optimizer.step()
        schedule.step()
    state = schedule.state_dict()
    resumed_optimizer, resumed = fresh()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    for _ in range(20):
        assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        for opt, sched in ((optimizer, schedule), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()
