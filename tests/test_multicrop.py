"""Multi-crop as a method option (data.local_crops): the multi-positive NT-Xent against its formula
written as loops, each family's loss on a small case recomputed from its parts, locals kept out of
the queue, the target network and the bank, and the config keys and file."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import byol_loss, info_nce, multi_positive_nt_xent, nt_xent, nt_xent_global
from models import BYOL, InterCLR, MoCo, SimCLR, resnet
from runtime.config import CONFIGS, ConfigError, parse_args

LOCAL = 8  # px of the local views in the method tests (globals: 16)


def tiny_backbone() -> torch.nn.Module:
    return resnet(18, width=0.125, small_images=True)


def batch_with_locals(locals_: int, batch: int = 8, seed: int = 0, local_seed: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)]
    g_local = torch.Generator().manual_seed(seed if local_seed is None else local_seed)
    views += [torch.randn(batch, 3, LOCAL, LOCAL, generator=g_local) for _ in range(locals_)]
    return {"views": views, "index": torch.arange(batch) * 3, "label": torch.arange(batch) % 4}


# --- the loss ----------------------------------------------------------------------------------------------

def multi_positive_by_loops(z: torch.Tensor, tau: float) -> float:
    """SupCon's L_out with "same sample" as the class, term by term (z: [N, V, D], one worker)."""
    n, views, _ = z.shape
    flat = F.normalize(z.reshape(n * views, -1).double(), dim=1)
    total = 0.0
    for i in range(n * views):
        others = [a for a in range(n * views) if a != i]
        denominator = sum(math.exp(float(flat[i] @ flat[a]) / tau) for a in others)
        positives = [a for a in others if a // views == i // views]
        total += -sum(math.log(math.exp(float(flat[i] @ flat[p]) / tau) / denominator) for p in positives) / len(positives)
    return total / (n * views)


def test_multi_positive_nt_xent_is_the_formula_and_nt_xent_for_two_views():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, 6, generator=g)
    assert multi_positive_nt_xent(z, z, 0, 0.3).item() == pytest.approx(multi_positive_by_loops(z, 0.3), rel=1e-5)
    pair = z[:, :2]
    torch.testing.assert_close(multi_positive_nt_xent(pair, pair, 0, 0.5), nt_xent(pair[:, 0], pair[:, 1], 0.5))
    # one worker's rows of a global batch: the same as nt_xent_global with that offset
    everyone = torch.randn(9, 2, 6, generator=g)
    mine = everyone[3:6]
    torch.testing.assert_close(multi_positive_nt_xent(mine, everyone, 3, 0.5),
                               nt_xent_global(mine[:, 0], mine[:, 1], everyone[:, 0], everyone[:, 1], 3, 0.5))


# --- each family -------------------------------------------------------------------------------------------

def test_moco_locals_are_queries_against_the_global_keys_and_never_enter_the_queue():
    torch.manual_seed(0)
    method = MoCo(tiny_backbone(), hidden_dim=32, queue_size=64, shuffle_bn=False, local_crops=2)
    batch = batch_with_locals(2)
    x1, x2, l1, l2 = batch["views"]
    queue = method.queue.keys.clone()
    with torch.no_grad():
        k2 = method.keys(x2)
        expected = sum(info_nce(method.query(x), k2, queue, 0.2) for x in (x1, l1, l2)) / 3
        step = method.intra_step(batch)
    torch.testing.assert_close(step.loss, expected)
    torch.testing.assert_close(step.bank_update, k2)  # the bank would store view 2's keys
    method.after_optimizer_step(0.0)
    assert int(method.queue.pointer) == 8  # one batch of keys, not 3
    torch.testing.assert_close(method.queue.keys[:8], F.normalize(k2, dim=1))


def test_symmetric_moco_pairs_each_local_with_both_global_keys():
    torch.manual_seed(0)
    method = MoCo(tiny_backbone(), hidden_dim=32, queue_size=64, shuffle_bn=False, symmetric=True, local_crops=1)
    batch = batch_with_locals(1)
    x1, x2, l1 = batch["views"]
    queue = method.queue.keys.clone()
    with torch.no_grad():
        k1, k2 = method.keys(x1), method.keys(x2)
        q1, q2, ql = method.query(x1), method.query(x2), method.query(l1)
        expected = (info_nce(q1, k2, queue, 0.2) + info_nce(q2, k1, queue, 0.2) + info_nce(ql, k1, queue, 0.2)
                    + info_nce(ql, k2, queue, 0.2)) / 4
        torch.testing.assert_close(method.intra_step(batch).loss, expected)
    method.after_optimizer_step(0.0)
    assert int(method.queue.pointer) == 16  # both global views' keys, no local


def test_simclr_locals_are_positives_of_their_sample_and_negatives_of_the_others():
    torch.manual_seed(0)
    method = SimCLR(tiny_backbone(), hidden_dim=32, local_crops=2)
    batch = batch_with_locals(2)
    out = method.training_step(batch)
    with torch.no_grad():
        z = torch.stack([method.head(method.backbone(v)) for v in batch["views"]], dim=1)
    assert out["loss"].item() == pytest.approx(multi_positive_by_loops(z, 0.5), rel=1e-4)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.backbone.parameters())


def test_byol_locals_predict_both_global_targets_and_skip_the_target_network():
    torch.manual_seed(0)
    method = BYOL(tiny_backbone(), embed_dim=16, hidden_dim=32, local_crops=2)
    batch = batch_with_locals(2)
    x1, x2, l1, l2 = batch["views"]
    target_inputs = []
    method.target_backbone.register_forward_hook(lambda module, args, out: target_inputs.append(args[0].shape[-1]))
    with torch.no_grad():
        z1, z2 = method.target(x1), method.target(x2)
        p1, p2, pl1, pl2 = (method.predict(x) for x in (x1, x2, l1, l2))
        expected = 2 * (byol_loss(p1, z2) + byol_loss(p2, z1) + byol_loss(pl1, z1) + byol_loss(pl1, z2)
                        + byol_loss(pl2, z1) + byol_loss(pl2, z2)) / 6
        target_inputs.clear()
        step = method.intra_step(batch)
    torch.testing.assert_close(step.loss, expected)
    assert target_inputs == [16, 16]  # the two global views only
    no_locals = BYOL(tiny_backbone(), embed_dim=16, hidden_dim=32)
    no_locals.load_state_dict(method.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(no_locals.intra_step(batch).loss, byol_loss(p1, z2) + byol_loss(p2, z1))


@pytest.mark.parametrize("base", ["moco", "byol"])
def test_interclr_bank_sees_the_global_views_only(make_bank, base):
    """Two steps from the same state on batches whose global views match and whose local views
    differ write the same rows into a real bank; the losses differ (the locals are trained on)."""
    written, losses = [], []
    for local_seed in (1, 2):
        torch.manual_seed(0)
        built = (MoCo(tiny_backbone(), queue_size=64, shuffle_bn=False, local_crops=2) if base == "moco" else
                 BYOL(tiny_backbone(), local_crops=2))
        method = InterCLR(built, num_negatives=8)
        bank = make_bank(64, method.embed_dim, num_shards=2, num_clusters=4, momentum=method.bank_momentum, seed=0)
        ids = np.arange(bank.num_samples)
        bank.set_features(ids, F.normalize(torch.randn(len(ids), bank.dim, generator=torch.Generator().manual_seed(3)),
                                           dim=1))
        bank.init_clusters(iters=3)
        method.attach_banks([bank])
        batch = batch_with_locals(2, local_seed=local_seed)
        torch.manual_seed(5)
        out = method.training_step(batch)
        method.after_optimizer_step(0.0)
        losses.append(float(out["intra"]))
        written.append(bank.get(batch["index"]).clone())
    torch.testing.assert_close(written[0], written[1])
    assert losses[0] != losses[1]


# --- config ------------------------------------------------------------------------------------------------

def test_config_file_with_local_crops_makes_global_then_local_views():
    from runtime.build import build_method, training_recipe
    config, _ = parse_args(["--config", str(CONFIGS / "moco" / "fashion_mnist_multicrop.yaml")], method="moco")
    assert config.data.local_crops == 4
    method = build_method(config)
    assert method.local_crops == 4
    recipe = training_recipe(method, config)
    sizes = [(v.size, v.scale) for v in recipe.views]
    assert sizes == [(28, (0.5, 1.0))] * 2 + [(config.data.local_size, tuple(config.data.local_scale))] * 4
    assert config.data.local_scale[1] <= 0.5  # the locals are smaller crops than any global one


def test_local_crop_keys_are_refused_where_a_method_has_no_use_for_them():
    with pytest.raises(ConfigError, match="does not apply to npid"):
        parse_args(["--preset", "demo", "--set", "data.local_crops=2"], method="npid")
    with pytest.raises(ConfigError, match="NPID-InterCLR"):
        parse_args(["--preset", "demo", "--base", "npid", "--set", "data.local_crops=2"], method="interclr")
    with pytest.raises(ConfigError, match="two numbers"):
        parse_args(["--preset", "demo", "--set", "data.local_scale=0.3"], method="moco")
    config, _ = parse_args(["--preset", "demo", "--set", "data.local_crops=3", "--set", "data.local_scale=0.1,0.3"],
                           method="simclr")
    assert (config.data.local_crops, config.data.local_scale) == (3, (0.1, 0.3))
