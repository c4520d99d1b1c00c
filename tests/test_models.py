"""models/: encoders against torchvision, CMC's channel split, EMA against its formula, and one
optimisation step of every method (CPU, tiny networks)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torchvision

from models import (BYOL, CACR, CMC, NPID, InterCLR, MoCo, MoCoQueue, SimCLR, SmallAlexNet, SplitEncoder,
                    Supervised, build_encoder, byol_decay, ema_update, resnet)
from models.interclr import InterCLRConfig
from runtime.config import JobConfig
from tests import datasets

needs_fashion_mnist = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                                         reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_backbone(in_channels: int = 3) -> torch.nn.Module:
    return resnet(18, width=0.125, small_images=True, in_channels=in_channels)


def batch_of(num_views: int, size: int = 16, batch: int = 8, channels: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(batch, channels, size, size, generator=g) for _ in range(num_views)],
            "index": torch.arange(batch) * 3, "label": torch.arange(batch) % 4}


# --- encoders --------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,reference", [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)])
def test_resnet_matches_torchvision_without_fc(depth, reference):
    """Our ResNet (written out: no torchvision import) is torchvision's: the same parameters and
    buffers by name and shape, and with torchvision's weights loaded strictly the same features as
    torchvision's output before fc, in train and in eval mode."""
    ours, theirs = resnet(depth), reference()
    assert count(ours) == count(theirs) - count(theirs.fc)
    assert ours.dim == theirs.fc.in_features
    theirs_state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs_state.items()]
    ours.load_state_dict(theirs_state, strict=True)
    theirs.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_resnet50_has_about_23_5m_parameters():
    assert abs(count(resnet(50)) - 23.5e6) < 0.05e6


def test_width_multiplier_scales_every_stage():
    wide = resnet(50, width=2)
    assert wide.dim == 4096 and wide.conv1.out_channels == 128
    assert wide.layer4[0].conv2.out_channels == 1024


def test_small_image_stem_keeps_resolution():
    net = resnet(18, small_images=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 28, 28)
    assert net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))).shape[-1] == 28
    assert resnet(18).layer1(resnet(18).maxpool(resnet(18).conv1(x))).shape[-1] == 7


def test_split_resnet50_is_two_resnets_on_one_and_two_channels():
    split = SplitEncoder(lambda c: resnet(50, in_channels=c), (1, 2))
    assert count(split) == count(resnet(50, in_channels=1)) + count(resnet(50, in_channels=2))
    assert abs(count(split) - 2 * 23.5e6) < 0.1e6
    assert split.dim == 4096


def test_split_encoder_feeds_channel_0_to_the_first_encoder_and_1_2_to_the_second():
    split = SplitEncoder(lambda c: tiny_backbone(c), (1, 2)).eval()
    x = torch.randn(4, 3, 16, 16)
    l_view, ab_view = split.views(x)
    changed_ab = x.clone()
    changed_ab[:, 1:] = torch.randn(4, 2, 16, 16)
    l2, ab2 = split.views(changed_ab)
    assert torch.equal(l_view, l2) and not torch.allclose(ab_view, ab2)
    changed_l = x.clone()
    changed_l[:, 0] = torch.randn(4, 16, 16)
    l3, ab3 = split.views(changed_l)
    assert torch.equal(ab_view, ab3) and not torch.allclose(l_view, l3)
    assert torch.equal(split(x), torch.cat([l_view, ab_view], dim=1))
    with pytest.raises(ValueError, match="channel groups"):
        split.views(torch.randn(1, 4, 16, 16))


def test_cmc_small_alexnet_follows_table_10():
    net = SmallAlexNet(in_channels=2)
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 96, 192, 192, 96]
    assert convs[0].in_channels == 2
    assert net.eval()(torch.randn(2, 2, 64, 64)).shape == (2, 2048)


# --- momentum -------------------------------------------------------------------------------------

def test_ema_update_is_the_formula():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = copy.deepcopy(target)
    ema_update(online, target, 0.9)
    for p_new, p_old, p_online in zip(target.parameters(), before.parameters(), online.parameters()):
        torch.testing.assert_close(p_new, 0.9 * p_old + 0.1 * p_online)


def test_byol_schedule_goes_from_base_to_one_on_a_cosine():
    assert byol_decay(0.0, 0.99) == pytest.approx(0.99)
    assert byol_decay(1.0, 0.99) == pytest.approx(1.0)
    assert byol_decay(0.5, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)


def test_moco_queue_is_a_fifo_that_wraps():
    queue = MoCoQueue(5, 2)
    keys = torch.nn.functional.normalize(torch.randn(7, 2), dim=1)
    queue.push(keys[:3])
    queue.push(keys[3:7])  # positions 3, 4, 0, 1
    torch.testing.assert_close(queue.keys[[3, 4, 0, 1, 2]], keys[[3, 4, 5, 6, 2]])
    assert int(queue.pointer) == 2


# --- one step of every method ------------------------------------------------------------------------

def train_steps(method, batch, steps: int, lr: float = 0.05, epoch: int = 0) -> list[float]:
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        out = method.training_step(batch, progress=step / steps, epoch=epoch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(step / steps)
        losses.append(float(out["loss"].detach()))
    return losses


def assert_learns(losses: list[float]):
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < losses[0], losses


def assert_learns_against_a_fixed_queue(method, batch, steps: int = 8):
    """A queue method enqueues the repeated batch's own keys, so its running loss would measure a
    changing dictionary. Fill the queue with the keys of other images, keep it fixed, and train."""
    others = batch_of(1, batch=method.queue.keys.shape[0], seed=99)["views"][0]
    key_backbone = getattr(method, "key_backbone")
    with torch.no_grad():
        method.queue.keys.copy_(torch.nn.functional.normalize(method.key_head(key_backbone(others)), dim=1))
    dictionary = method.queue.keys.clone()
    losses = []
    for _ in range(steps):
        losses += train_steps(method, batch, 1)
        method.queue.keys.copy_(dictionary)
    assert_learns(losses)


def assert_target_is_ema(method, online_name: str, target_name: str, decay: float, run_step):
    target_before = copy.deepcopy(getattr(method, target_name))
    run_step()
    online, target = getattr(method, online_name), getattr(method, target_name)
    for p_t, p_old, p_o in zip(target.parameters(), target_before.parameters(), online.parameters()):
        torch.testing.assert_close(p_t, decay * p_old + (1 - decay) * p_o)


def one_step(method, batch, progress: float = 0.0):
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    method.training_step(batch, progress)["loss"].backward()
    optimizer.step()
    method.after_optimizer_step(progress)


def test_host_copy_on_the_cpu_is_the_tensor_itself_detached():
    from models.method import HostCopy
    x = torch.randn(4, 3, requires_grad=True)
    value = HostCopy(x * 2).get()
    assert not value.requires_grad and value.data_ptr() != x.data_ptr()
    torch.testing.assert_close(value, x.detach() * 2)


def test_simclr_learns_on_a_repeated_batch():
    torch.manual_seed(0)
    assert_learns(train_steps(SimCLR(tiny_backbone(), hidden_dim=64), batch_of(2), 8))


def test_moco_learns_and_its_key_encoder_is_the_ema():
    torch.manual_seed(0)
    method = MoCo(tiny_backbone(), hidden_dim=64, queue_size=32)
    assert_learns_against_a_fixed_queue(method, batch_of(2))
    batch = batch_of(2, seed=1)
    assert_target_is_ema(method, "backbone", "key_backbone", 0.999, lambda: one_step(method, batch))


# --- shuffle BN (MoCo's key encoder) ----------------------------------------------------------------------

def bn_by_hand(x: torch.Tensor, rows: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm (training mode, no affine) of x[rows] computed with the statistics of x[rows]."""
    part = x[rows]
    return (part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + eps)


def test_shuffle_bn_normalises_each_key_with_a_shuffled_sub_batch_not_its_queries():
    from models.momentum import forward_in_splits, shuffled_forward
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    bn = torch.nn.BatchNorm1d(3, affine=False)
    queries = forward_in_splits(bn, x, 4)
    for chunk in torch.arange(16).view(4, 4):  # queries: contiguous sub-batches of 4
        torch.testing.assert_close(queries[chunk], bn_by_hand(x, chunk))
    keys = shuffled_forward(bn, x, 4, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))  # the same draw
    for group in order.view(4, 4):
        torch.testing.assert_close(keys[group], bn_by_hand(x, group))
        for i in group:  # a key's BN batch is never its query's
            assert set(group.tolist()) != set(range(int(i) // 4 * 4, int(i) // 4 * 4 + 4))
    torch.testing.assert_close(forward_in_splits(bn, x, 1), bn_by_hand(x, torch.arange(16)))


def test_moco_query_bn_batch_is_its_sub_batch_without_shuffle_bn_the_whole_batch():
    """With shuffle BN on one worker, changing a sample of another sub-batch leaves a query
    unchanged (its BN statistics are its own sub-batch's); without it, the whole batch is one BN batch."""
    torch.manual_seed(0)
    batch = batch_of(2, size=8, batch=64)
    changed = copy.deepcopy(batch)
    changed["views"][0][40] += 5.0  # a sample of the second sub-batch of 32
    for shuffle_bn, same in ((True, True), (False, False)):
        method = MoCo(tiny_backbone(), hidden_dim=64, queue_size=128, shuffle_bn=shuffle_bn, bn_splits=8)
        assert method.bn_splits_here(64) == (2 if shuffle_bn else 1)  # sub-batches of at least 32 rows
        q, q_changed = method.query(batch["views"][0]), method.query(changed["views"][0])
        assert torch.allclose(q[:32], q_changed[:32], atol=1e-6) == same


def test_byol_learns_and_its_target_follows_the_schedule():
    torch.manual_seed(0)
    method = BYOL(tiny_backbone(), embed_dim=32, hidden_dim=64)
    assert_learns(train_steps(method, batch_of(2), 8))
    batch = batch_of(2, seed=1)
    assert_target_is_ema(method, "projector", "target_projector", byol_decay(0.3, 0.99),
                         lambda: one_step(method, batch, 0.3))


@pytest.mark.parametrize("positives,queue", [(1, None), (3, None), (1, 32), (3, 32)])
def test_cacr_learns(positives, queue):
    torch.manual_seed(0)
    method = CACR(tiny_backbone(), num_positives=positives, hidden_dim=64, queue_size=queue)
    assert method.recipe == ("two_crop" if positives == 1 else f"k_views({positives + 1})")
    if queue:
        assert_learns_against_a_fixed_queue(method, batch_of(positives + 1))
    else:
        assert_learns(train_steps(method, batch_of(positives + 1), 8))
    if queue:
        assert_target_is_ema(method, "head", "key_head", 0.999, lambda: one_step(method, batch_of(positives + 1)))


def test_supervised_learns_soft_imclr_labels():
    torch.manual_seed(0)
    batch = batch_of(1)
    soft = torch.zeros(8, 4)
    soft[torch.arange(8), torch.arange(8) % 4] += 0.5
    soft[torch.arange(8), (torch.arange(8) + 1) % 4] += 0.5
    batch["label"] = soft
    assert_learns(train_steps(Supervised(tiny_backbone(), 4), batch, 8))
    with pytest.raises(ValueError, match="classes"):
        Supervised(tiny_backbone(), 5).training_step(batch)


def test_cmc_in_batch_learns_with_core_and_full_graphs():
    for groups, paradigm in [((1, 2), "core"), ((1, 1, 1), "full"), ((1, 1, 1), "core")]:
        torch.manual_seed(0)
        method = CMC(SplitEncoder(tiny_backbone, groups), memory_bank=False, paradigm=paradigm)
        assert len(method.pairs()) == {"core": len(groups) - 1, "full": 3}[paradigm]
        assert_learns(train_steps(method, batch_of(1), 8))


# --- methods with a real bank ------------------------------------------------------------------------

def attach_banks(method, make_bank):
    """Create the banks the method requests (2 shards, random unit features, k-means when it needs
    pseudo-labels; `make_bank` of conftest.py) and attach them."""
    banks = []
    for request in method.bank_requests():
        bank = make_bank(64, request.dim, num_shards=2, num_clusters=4, momentum=request.momentum, seed=0)
        ids = np.arange(bank.num_samples)
        bank.set_features(ids, torch.nn.functional.normalize(torch.randn(len(ids), bank.dim), dim=1))
        if request.clusters:
            bank.init_clusters(iters=3)
        banks.append(bank)
    return method.attach_banks(banks), banks


def test_npid_learns_and_updates_its_bank(make_bank):
    torch.manual_seed(0)
    method, (bank,) = attach_banks(NPID(tiny_backbone(), hidden_dim=64, num_negatives=32), make_bank)
    batch = batch_of(1)
    before = bank.get(batch["index"]).clone()
    assert_learns(train_steps(method, batch, 8))
    assert not torch.allclose(before, bank.get(batch["index"]))


@pytest.mark.parametrize("base", ["npid", "moco", "byol"])
def test_interclr_step_talks_to_a_real_bank(make_bank, base):
    torch.manual_seed(0)
    method, (bank,) = attach_banks(interclr_on(base), make_bank)
    batch = batch_of(2)
    before = bank.get(batch["index"]).clone()
    untouched = bank.get(batch["index"] + 1).clone()
    out = method.training_step(batch)
    assert set(out) == {"loss", "intra", "inter"}
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], 0.75 * out["intra"] + 0.25 * out["inter"])
    out["loss"].backward()
    assert all(p.grad is not None for p in method.backbone.parameters())
    torch.testing.assert_close(before, bank.get(batch["index"]))  # no write before the optimiser step
    method.after_optimizer_step(0.0)
    after = bank.get(batch["index"])
    assert not torch.allclose(before, after)  # the batch's rows moved (Eq. 2)
    torch.testing.assert_close(untouched, bank.get(batch["index"] + 1))  # nothing else did


def test_interclr_warmup_uses_the_intra_branch_only(make_bank):
    torch.manual_seed(0)
    method, (bank,) = attach_banks(interclr_on("npid", warmup_epochs=2), make_bank)
    assert set(method.training_step(batch_of(1), epoch=1)) == {"loss", "intra"}
    assert set(method.training_step(batch_of(1), epoch=2)) == {"loss", "intra", "inter"}


def interclr_on(base: str, num_negatives: int = 16, **kwargs) -> InterCLR:
    """InterCLR over a tiny base: NPID with InterCLR's K, MoCo with a 64-key queue, BYOL."""
    built = {"npid": lambda: NPID(tiny_backbone(), num_negatives=num_negatives),
             "moco": lambda: MoCo(tiny_backbone(), queue_size=64), "byol": lambda: BYOL(tiny_backbone())}[base]()
    return InterCLR(built, num_negatives=num_negatives, **kwargs)


def test_interclr_paper_defaults_from_its_config():
    job = JobConfig(method=InterCLRConfig())  # base npid
    job.model.encoder, job.model.width = "resnet18", 0.125
    method = job.method.build(job)
    assert isinstance(method.base, NPID) and method.base.num_negatives == 16_384
    assert (method.num_negatives, method.strategy, method.inter_margin, method.intra_margin, method.weight,
            method.temperature, method.bank_momentum) == (16_384, "semi_hard", -0.5, 0.0, 0.75, 0.1, 0.5)
    assert method.bank_requests()[0].clusters
    job.method.base = "moco"
    moco = job.method.build(job)
    assert isinstance(moco.base, MoCo) and (moco.temperature, moco.bank_momentum) == (0.2, 1.0)
    assert (moco.base.temperature, moco.base.queue.keys.shape[0]) == (0.2, 65_536)
    job.method.temperature = 0.3  # InterCLR's τ is its base's too
    assert (job.method.build(job).temperature, job.method.build(job).base.temperature) == (0.3, 0.3)
    with pytest.raises(ValueError, match="SimCLR is not an InterCLR base"):
        InterCLR(SimCLR(tiny_backbone()))


def test_cmc_with_banks_learns_and_updates_one_bank_per_view(make_bank):
    torch.manual_seed(0)
    method, banks = attach_banks(CMC(SplitEncoder(tiny_backbone, (1, 2)), num_negatives=32), make_bank)
    assert len(banks) == 2 and method.temperature == 0.07 and banks[0].momentum == 0.5
    batch = batch_of(1)
    before = [b.get(batch["index"]).clone() for b in banks]
    assert_learns(train_steps(method, batch, 8))
    for bank, old in zip(banks, before):
        assert not torch.allclose(old, bank.get(batch["index"]))
    

def test_bank_methods_refuse_imclr_rows_and_missing_banks():
    with pytest.raises(ValueError, match="needs 1 memory bank"):
        NPID(tiny_backbone()).attach_banks([])
    with pytest.raises(ValueError, match="attach_banks"):
        NPID(tiny_backbone()).training_step(batch_of(1))
    method = NPID(tiny_backbone())
    batch = batch_of(1)
    batch["index"] = torch.zeros(8, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="one sample id per row"):
        method.training_step(batch)


# --- collapse guard on real data -----------------------------------------------------------------------

@needs_fashion_mnist
def test_byol_and_simclr_embeddings_do_not_collapse_on_fashion_mnist(tmp_path):
    """BYOL has no negatives and is the method that can collapse: after a short run on real
    Fashion-MNIST shards its normalised embeddings must still spread across samples (per-dimension
    std well above 0; a constant embedding gives 0, a uniform one on the sphere 1/√D)."""
    from pipeline.convert import convert
    from pipeline.loader import build_loader
    from pipeline.views import center, two_crop
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, tmp_path, "train", limit=1024, workers=1, log=lambda m: None)
    loader = build_loader(tmp_path, two_crop(28), 64, num_threads=1, drop_last=True)
    for make in (lambda: BYOL(tiny_backbone(), embed_dim=64, hidden_dim=128),
                 lambda: SimCLR(tiny_backbone(), hidden_dim=128)):
        torch.manual_seed(0)  # before the weights are drawn: the run must not depend on earlier tests
        method = make()
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        for step, batch in enumerate(loader):
            method.training_step(batch, step / len(loader))["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
            method.after_optimizer_step(step / len(loader))
        method.eval()
        with torch.no_grad():
            images = next(iter(build_loader(tmp_path, center(28), 256, shuffle=False, num_threads=1)))["views"][0]
            z = method.head(method.backbone(images)) if isinstance(method, SimCLR) else \
                method.projector(method.backbone(images))
            z = torch.nn.functional.normalize(z, dim=1)
        spread = float(z.std(dim=0).mean())
        assert spread > 0.2 / math.sqrt(z.shape[1]), (type(method).__name__, spread)


@needs_fashion_mnist
def test_moco_keeps_queries_apart_when_its_queue_starts_with_real_keys(tmp_path):
    """MoCo.prime fills the queue with keys of real images before the first step. From the random
    queue of the reference code, the demo's settings (ResNet-18 ×0.5, lr 0.15, m 0.99, real
    Fashion-MNIST) collapse every query to one direction within a few steps; primed, they stay apart."""
    from pipeline.convert import convert
    from pipeline.loader import build_loader
    from pipeline.views import two_crop
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, tmp_path, "train", limit=2048, workers=1, log=lambda m: None)
    loader = build_loader(tmp_path, two_crop(28), 128, num_threads=1, drop_last=True)
    spread = {}
    for primed in (False, True):
        torch.manual_seed(0)
        method = MoCo(build_encoder("resnet18", width=0.5), queue_size=1024, key_momentum=0.99)
        batches = iter(loader)
        if primed:
            first = next(batches)
            torch.manual_seed(1)  # the same shuffle-BN permutation for the queue and the recomputed keys
            method.prime(first)
            torch.manual_seed(1)
            torch.testing.assert_close(method.queue.keys[:128], method.keys(first["views"][1]))
            for _ in range(7):
                method.prime(next(batches))
        optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.15, momentum=0.9)
        for _ in range(8):
            batch = next(batches)
            method.training_step(batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
            method.after_optimizer_step(0.0)
        with torch.no_grad():
            spread[primed] = float(method.query(batch["views"][0]).std(dim=0).mean())
    assert spread[False] < 0.01 < 0.02 < spread[True], spread  # uniform on the sphere: 1/√128 = 0.088


# --- SimCLR with CACR's CL baselines (004 Sect. 5) ----------------------------------------------------

@pytest.mark.parametrize("loss,positives,temperature", [("align_uniform", 1, 0.19), ("hard_negative", 1, 0.5),
                                                        ("cmc", 1, 0.07), ("cmc", 3, 0.07)])
def test_simclr_trains_with_each_cl_baseline_loss_on_its_views(loss, positives, temperature):
    from losses import align_uniform_loss, cmc_loss, hard_negative_loss
    torch.manual_seed(0)
    method = SimCLR(tiny_backbone(), hidden_dim=64, loss=loss, positives=positives, temperature=temperature)
    assert method.recipe == ("two_crop" if positives == 1 else f"k_views({positives + 1})")
    batch = batch_of(positives + 2)  # one view more than the method takes: it uses the first K + 1
    with torch.no_grad():
        z = [method.head(method.backbone(v)) for v in batch["views"][:positives + 1]]
        expected = {"align_uniform": lambda: align_uniform_loss(z[0], z[1], t=2.0),
                    "hard_negative": lambda: hard_negative_loss(z[0], z[1], 0.5, tau_plus=0.1, beta=1.0),
                    "cmc": lambda: cmc_loss(z, 0.07, paradigm="full")}[loss]()
        out = method.training_step(batch)
    assert torch.allclose(out["loss"], expected, atol=1e-6) and loss in out
    assert_learns(train_steps(method, batch, 8))


def test_simclr_takes_several_positives_only_with_the_multi_view_loss():
    with pytest.raises(ValueError, match="multi-view loss"):
        SimCLR(tiny_backbone(), loss="nt_xent", positives=3)
    with pytest.raises(ValueError, match="loss must be one of"):
        SimCLR(tiny_backbone(), loss="triplet")
