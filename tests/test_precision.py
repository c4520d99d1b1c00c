"""Mixed precision and channels_last (runtime/step.py) on CPU: bf16-mixed runs under CPU autocast, the
16-mixed skip logic under `torch.amp.GradScaler("cpu")` with fp16 autocast, through the one
`train_step` every Train worker runs."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import BYOL, InterCLR, MoCo, SimCLR, resnet
from runtime.config import ConfigError, parse_args
from runtime.optim import build_optimizer
from runtime.step import Precision, PrecisionError, resolve_precision, train_step

ROOT = Path(__file__).resolve().parents[1]
# bf16 keeps 8 mantissa bits (a rounding error of 2^-9 relative per op); through a ResNet-18 and a
# head the loss moved by 0.002-0.3 % here. 2 % leaves room; a loss computed in bf16 throughout
# or a wrong cast at a boundary misses it by far more on InfoNCE's logsumexp.
BF16_LOSS_RTOL = 0.02


def tiny_backbone() -> torch.nn.Module:
    return resnet(18, width=0.125, small_images=True)


def batch_of(num_views: int = 2, batch: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(num_views)],
            "index": torch.arange(batch) * 3, "label": torch.arange(batch) % 4}


def make_bank_for(method, make_bank):
    """A clustered bank as runtime.train builds one, deterministic in its seed: two calls give two
    banks with the same features, clusters and negative sampling."""
    (request,) = method.bank_requests()
    bank = make_bank(64, request.dim, num_shards=2, num_clusters=4, momentum=request.momentum, seed=0,
                     min_cluster=2)
    g = torch.Generator().manual_seed(0)
    bank.set_features(np.arange(64), torch.nn.functional.normalize(torch.randn(64, request.dim, generator=g), dim=1))
    bank.init_clusters(iters=3, seed=0)
    return bank


METHODS = {  # name → (build, optimiser); SimCLR and BYOL with LARS as their papers
    "moco": (lambda: MoCo(tiny_backbone(), hidden_dim=64, queue_size=64), "sgd"),
    "simclr": (lambda: SimCLR(tiny_backbone(), hidden_dim=64), "lars"),
    "byol": (lambda: BYOL(tiny_backbone(), embed_dim=32, hidden_dim=64), "lars"),
    "interclr-moco": (lambda: InterCLR(MoCo(tiny_backbone(), queue_size=64), num_negatives=16), "sgd"),
}


def step_once(method, optimizer_name: str, precision: Precision, batch: dict, seed: int = 1):
    optimizer = build_optimizer(method, optimizer_name, lr=0.1, weight_decay=1e-6, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(seed)  # shuffle BN's permutation
    return train_step(method, method, optimizer, schedule, precision, batch, 0.0, 0), optimizer, schedule


@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_mixed_step_matches_the_fp32_step_from_the_same_weights(name, make_bank):
    build, optimizer_name = METHODS[name]
    torch.manual_seed(0)
    fp32 = build()
    bf16 = copy.deepcopy(fp32)
    if name.startswith("interclr"):
        fp32.attach_banks([make_bank_for(fp32, make_bank)])
        bf16.attach_banks([make_bank_for(bf16, make_bank)])
    encoder_dtypes = []
    bf16.backbone.register_forward_hook(lambda module, args, output: encoder_dtypes.append(output.dtype))
    before = copy.deepcopy(bf16.backbone.state_dict())
    batch = batch_of()
    reference, _, _ = step_once(fp32, optimizer_name, Precision.create("32", torch.device("cpu")), batch)
    mixed, _, _ = step_once(bf16, optimizer_name, Precision.create("bf16-mixed", torch.device("cpu")), batch)
    assert encoder_dtypes and set(encoder_dtypes) == {torch.bfloat16}  # autocast did run the encoder in bf16
    assert mixed.applied and all(v.dtype == torch.float32 for v in mixed.out.values())  # losses in float32
    loss, reference_loss = mixed.out["loss"].item(), reference.out["loss"].item()
    assert loss == pytest.approx(reference_loss, rel=BF16_LOSS_RTOL)
    assert loss != reference_loss  # not secretly the fp32 step
    after = bf16.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # float32 master weights


def test_losses_run_in_float32_under_autocast():
    """Each loss's float32 boundary: bf16 embeddings under autocast give exactly the loss of the same
    values in float32 without autocast."""
    from losses import byol_loss, info_nce, nt_xent
    g = torch.Generator().manual_seed(0)
    q, k, queue = (torch.randn(*shape, generator=g).bfloat16() for shape in ((8, 16), (8, 16), (32, 16)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [info_nce(q, k, queue, 0.2), nt_xent(q, k, 0.5), byol_loss(q, k)]
    plain = [info_nce(q.float(), k.float(), queue.float(), 0.2), nt_xent(q.float(), k.float(), 0.5),
             byol_loss(q.float(), k.float())]
    for m, p in zip(mixed, plain):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, p, rtol=0, atol=0)


def test_16_mixed_skips_a_step_with_non_finite_gradients_whole(make_bank):
    """An injected inf gradient: no optimiser step, no EMA, no queue push, no bank write; the lr
    schedule and step counter advance (Lightning's rule) and the scale backs off. The next finite step
    is applied. BatchNorm's running statistics are the forward's, as in Lightning and apex."""
    torch.manual_seed(0)
    method = InterCLR(MoCo(tiny_backbone(), queue_size=64), num_negatives=16)
    bank = make_bank_for(method, make_bank)
    method.attach_banks([bank])
    precision = Precision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    optimizer = build_optimizer(method, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    batch = batch_of()
    state = copy.deepcopy(method.state_dict())  # weights, key encoder, queue keys and pointer
    rows = bank.get(batch["index"]).clone()
    scale = precision.scaler.get_scale()
    poisoned = next(method.backbone.parameters())
    hook = poisoned.register_hook(lambda grad: grad * float("inf"))
    result = train_step(method, method, optimizer, schedule, precision, batch, 0.0, 0)
    hook.remove()
    assert not result.applied
    for key, value in method.state_dict().items():
        if "running_" in key or "num_batches_tracked" in key:
            continue
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=f"{key} changed in a skipped step")
    assert optimizer.state_dict()["state"] == {}  # no momentum buffer: optimizer.step() never ran
    torch.testing.assert_close(bank.get(batch["index"]), rows, rtol=0, atol=0)
    assert schedule.last_epoch == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert precision.scaler.get_scale() == scale * 0.5

    result = train_step(method, method, optimizer, schedule, precision, batch, 0.0, 0)
    assert result.applied
    assert int(method.queue.pointer) == 16  # this step's keys only
    assert not torch.equal(method.base.key_backbone.conv1.weight, state["base.key_backbone.conv1.weight"])
    assert not torch.allclose(bank.get(batch["index"]), rows)


def test_the_scaler_state_resumes():
    first = Precision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
    first.scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    first.scaler.update(new_scale=256.0)
    resumed = Precision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    resumed.load_state_dict(first.state_dict())
    assert resumed.scaler.get_scale() == 256.0 and resumed.scaler.state_dict() == first.scaler.state_dict()


@pytest.mark.parametrize("name", ["moco", "simclr"])
def test_channels_last_gives_the_contiguous_loss(name, make_bank):
    from runtime.step import prepare_model, to_device
    build, optimizer_name = METHODS[name]
    torch.manual_seed(0)
    plain = build()
    nhwc = prepare_model(copy.deepcopy(plain), torch.device("cpu"), channels_last=True)
    assert nhwc.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = batch_of()
    moved = to_device(batch, torch.device("cpu"), channels_last=True)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in moved["views"])
    reference, _, _ = step_once(plain, optimizer_name, Precision.create("32", torch.device("cpu")), batch)
    result, _, _ = step_once(nhwc, optimizer_name, Precision.create("32", torch.device("cpu")), moved)
    torch.testing.assert_close(result.out["loss"], reference.out["loss"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--set", "train.precision=fp16"], "train.precision must be 32, bf16-mixed or 16-mixed (Lightning's names), "
                                        "got 'fp16'"),
    (["--set", "train.precision=16-mixed"], "train.precision=16-mixed needs GPUs (train.use_gpu=true)"),
])
def test_bad_precisions_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError) as error:
        parse_args(["--preset", "demo", *flags])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_precision_defaults_and_names():
    assert parse_args(["--preset", "demo"])[0].train.precision is None
    assert resolve_precision(None, torch.device("cpu")) == "32"  # CPU presets run in float32
    assert parse_args(["--preset", "demo", "--set", "train.precision=bf16-mixed"])[0].train.precision == "bf16-mixed"
    gpu = parse_args(["--preset", "imagenet"])[0]
    assert gpu.train.precision is None and gpu.model.channels_last  # bf16 / fp16 picked on the GPU
    with pytest.raises(PrecisionError, match="needs GPUs"):
        resolve_precision("16-mixed", torch.device("cpu"))


def test_yaml_precision_32_is_lightnings_name(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("method:\n  name: moco\ntrain:\n  precision: 32\n")
    assert parse_args(["--config", str(config)], method="moco")[0].train.precision == "32"


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "lmdb", "webdataset") or name.startswith("nvidia.dali"):
            raise ImportError(f"{name} is blocked: the core must not need it")
sys.meta_path.insert(0, Block())
"""

CORE_STEP = """
import numpy as np, torch
import bank.autograd, bank.kmeans, losses, models, runtime.optim, runtime.step
from bank.shard import BankShard
from bank.spec import BankSpec
from models import MoCo, resnet
from runtime.step import Precision, train_step
torch.manual_seed(0)
method = MoCo(resnet(18, width=0.125, small_images=True), hidden_dim=32, queue_size=32)
optimizer = runtime.optim.build_optimizer(method, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
out = train_step(method, method, optimizer, schedule, Precision.create("bf16-mixed", torch.device("cpu")),
                 {"views": views, "index": torch.arange(8), "label": torch.zeros(8, dtype=torch.long)}, 0.0, 0)
shard = BankShard(BankSpec(40, 8, num_clusters=4), 0)
shard.set_features(np.arange(40), torch.nn.functional.normalize(torch.randn(40, 8), dim=1).numpy())
shard.update(np.arange(8), torch.nn.functional.normalize(torch.randn(8, 8), dim=1).numpy(), 0.5, relabel=False)
labels = bank.kmeans.nearest_centroid(torch.randn(40, 8), torch.randn(4, 8))
assert all(name not in sys.modules for name in ("ray", "nvidia.dali", "lmdb"))
print("core ok", float(out.out["loss"]) > 0)
"""


def test_the_core_runs_without_ray_or_dali():
    """models/, losses/, the bank's math and runtime.step import and run a bf16 step and a bank
    shard with ray, nvidia.dali and lmdb unimportable (the GPU machines have torch alone)."""
    run = subprocess.run([sys.executable, "-c", BLOCKER + "import sys\n" + CORE_STEP], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "core ok True" in run.stdout


def test_the_device_check_runs_on_cpu_in_smoke_mode():
    """benchmarks/device.py --smoke: the GPU check's code at tiny sizes on CPU, every part run and
    reporting its numbers (so the script the GPU machine runs never rots)."""
    import json
    run = subprocess.run([sys.executable, "benchmarks/device.py", "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(run.stdout)
    for part in ("step", "bank", "kmeans", "knn", "ddp"):
        assert part in report and "error" not in report[part], report.get(part)
    assert report["step"]["moco/bf16-mixed/channels_last"]["loss_finite"]
    assert report["ddp"]["step_matches"] and report["ddp"]["shuffle_bn_matches"]
    assert report["kmeans"]["empty_clusters"] == 0
