"""runtime/optim.py: a LARS step worked by hand, bias/norm parameters left to plain SGD, the SGD
path against torch.optim.SGD, and the per-method defaults from the papers."""
from __future__ import annotations

import pytest
import torch

from models.interclr import BASES
from models.registry import METHODS
from runtime.optim import build_optimizer


def linear_with_weight(weight, bias):
    layer = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return layer


def set_grads(layer, weight_grad, bias_grad):
    layer.weight.grad = torch.tensor(weight_grad, dtype=torch.float64)
    layer.bias.grad = torch.tensor(bias_grad, dtype=torch.float64)


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                               torch.nn.Linear(4, 2))


def train_steps(model, optimizer, steps=3, lrs=(0.5, 0.3, 0.1)):
    torch.manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        optimizer.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()


# --- LARS worked by hand -----------------------------------------------------------------------

def test_lars_step_matches_the_update_worked_by_hand():
    # trust = η‖w‖ / (‖g‖ + wd‖w‖); buffer = m·buffer + trust·(g + wd·w); w -= lr·buffer
    # η = 0.1, wd = 0.5, m = 0.9. Step 1, lr 2: ‖w‖ = 5, ‖g‖ = 1 → trust = 0.5 / 3.5 = 1/7,
    # g + wd·w = diag(2.1, 2.8) → buffer diag(0.3, 0.4) → w = diag(3, 4) − 2·buffer = diag(2.4, 3.2)
    layer = linear_with_weight([[3.0, 0.0], [0.0, 4.0]], [1.0, -1.0])
    optimizer = build_optimizer(layer, "lars", lr=2.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.1)
    set_grads(layer, [[0.6, 0.0], [0.0, 0.8]], [0.5, 0.5])
    optimizer.step()
    assert torch.allclose(layer.weight, torch.tensor([[2.4, 0.0], [0.0, 3.2]], dtype=torch.float64))
    # Step 2, lr 1: ‖w‖ = 4, ‖g‖ = 0.5 → trust = 0.4 / 2.5 = 0.16, g + wd·w = [[1.2, 0.3], [0.4, 1.6]],
    # buffer = 0.9·diag(0.3, 0.4) + 0.16·(g + wd·w) = [[0.462, 0.048], [0.064, 0.616]]; w −= 1·buffer
    for group in optimizer.param_groups:
        group["lr"] = 1.0
    set_grads(layer, [[0.0, 0.3], [0.4, 0.0]], [1.0, 0.0])
    optimizer.step()
    assert torch.allclose(layer.weight, torch.tensor([[1.938, -0.048], [-0.064, 2.584]], dtype=torch.float64))


def test_lars_bias_gets_plain_momentum_sgd_without_weight_decay():
    # bias [1, -1], grad [0.5, 0.5], lr 2 → [0, -2]; then grad [1, 0], lr 1: buffer 0.9·[0.5, 0.5] + [1, 0]
    layer = linear_with_weight([[3.0, 0.0], [0.0, 4.0]], [1.0, -1.0])
    optimizer = build_optimizer(layer, "lars", lr=2.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.1)
    set_grads(layer, [[0.6, 0.0], [0.0, 0.8]], [0.5, 0.5])
    optimizer.step()
    assert torch.allclose(layer.bias, torch.tensor([0.0, -2.0], dtype=torch.float64))
    for group in optimizer.param_groups:
        group["lr"] = 1.0
    set_grads(layer, [[0.0, 0.3], [0.4, 0.0]], [1.0, 0.0])
    optimizer.step()
    assert torch.allclose(layer.bias, torch.tensor([-1.45, -2.45], dtype=torch.float64))


def test_lars_adapts_the_weights_even_at_weight_decay_zero():
    # wd 0: trust = 0.1·5 / 1 = 0.5 → w = diag(3, 4) − 2·0.5·diag(0.6, 0.8)
    layer = linear_with_weight([[3.0, 0.0], [0.0, 4.0]], [1.0, -1.0])
    optimizer = build_optimizer(layer, "lars", lr=2.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.1)
    set_grads(layer, [[0.6, 0.0], [0.0, 0.8]], [0.5, 0.5])
    optimizer.step()
    assert torch.allclose(layer.weight, torch.tensor([[2.4, 0.0], [0.0, 3.2]], dtype=torch.float64))


def test_lars_batchnorm_and_biases_step_like_sgd_without_weight_decay():
    # each 1-D parameter (0.bias, BatchNorm 1.weight and 1.bias, 3.bias): buffer = 0.9·buffer + g,
    # p -= lr·buffer, whatever the weight decay and the trust ratio
    model = tiny_net()
    optimizer = build_optimizer(model, "lars", lr=0.5, weight_decay=0.1, momentum=0.9)
    one_dim = {name: p for name, p in model.named_parameters() if p.ndim == 1}
    buffers = {name: torch.zeros_like(p) for name, p in one_dim.items()}
    torch.manual_seed(1)
    for lr in (0.5, 0.3, 0.1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        expected = {}
        for name, p in one_dim.items():
            buffers[name] = 0.9 * buffers[name] + p.grad
            expected[name] = p.detach() - lr * buffers[name]
        optimizer.step()
        for name, p in one_dim.items():
            assert torch.allclose(p, expected[name], atol=1e-7), name


def test_lars_without_exclusion_adapts_biases_too():
    model, reference = tiny_net(), tiny_net()
    train_steps(model, build_optimizer(model, "lars", lr=0.5, weight_decay=0.1, momentum=0.9,
                                       exclude_bias_and_norm=False))
    train_steps(reference, torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9))
    assert not torch.allclose(model[0].bias, reference[0].bias)


def test_lars_multi_tensor_path_used_on_cuda_steps_the_same():
    model, reference = tiny_net(), tiny_net()
    optimizer = build_optimizer(model, "lars", lr=0.5, weight_decay=0.1, momentum=0.9)
    for group in optimizer.param_groups:
        group["foreach"] = True  # timm's default on CUDA; CPU tensors take the single-tensor path
    train_steps(model, optimizer)
    train_steps(reference, build_optimizer(reference, "lars", lr=0.5, weight_decay=0.1, momentum=0.9))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


# --- SGD -----------------------------------------------------------------------------------------

def test_sgd_without_exclusion_equals_torch_sgd_over_all_parameters():
    model, reference = tiny_net(), tiny_net()
    optimizer = build_optimizer(model, "sgd", lr=0.5, weight_decay=1e-2, momentum=0.9, exclude_bias_and_norm=False)
    assert len(optimizer.param_groups) == 1  # loads the single-group SGD checkpoints of before
    train_steps(model, optimizer)
    train_steps(reference, torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_sgd_with_exclusion_equals_torch_sgd_with_a_no_decay_group():
    model, reference = tiny_net(), tiny_net()
    train_steps(model, build_optimizer(model, "sgd", lr=0.5, weight_decay=1e-2, momentum=0.9))
    groups = [{"params": [p for p in reference.parameters() if p.ndim > 1]},
              {"params": [p for p in reference.parameters() if p.ndim == 1], "weight_decay": 0.0}]
    train_steps(reference, torch.optim.SGD(groups, lr=0.5, momentum=0.9, weight_decay=1e-2))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_frozen_parameters_are_left_out():
    model = tiny_net()
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, "lars", lr=0.1, weight_decay=1e-6, momentum=0.9)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(tiny_net(), "adam", lr=0.1, weight_decay=0.0, momentum=0.9)


# --- the defaults table ------------------------------------------------------------------------

def optimizer_defaults(method: str, base: str | None = None) -> dict:
    """The paper's optimiser of a registered method (InterCLR: of its base)."""
    config = METHODS[method]()
    if base is not None:
        config.base = base
    return config.optimizer_defaults()


@pytest.mark.parametrize("method, base", [("byol", None), ("interclr", "byol")])
def test_byol_and_byol_interclr_use_lars_with_grill_et_al_200_epoch_recipe(method, base):
    assert optimizer_defaults(method, base) == {
        "optimizer": "lars", "lr": 0.3, "weight_decay": 1e-6, "momentum": 0.9, "warmup_epochs": 10,
        "trust_coefficient": 0.001, "exclude_bias_and_norm": True}


def test_simclr_uses_lars_with_lr_0_3_and_wd_1e_6():
    row = optimizer_defaults("simclr")
    assert (row["optimizer"], row["lr"], row["weight_decay"], row["warmup_epochs"]) == ("lars", 0.3, 1e-6, 10)
    assert row["exclude_bias_and_norm"]


@pytest.mark.parametrize("method, base", [("moco", None), ("npid", None), ("interclr", "npid"),
                                          ("interclr", "moco"), ("cmc", None), ("cacr", None)])
def test_queue_and_bank_methods_use_sgd_0_03_wd_1e_4(method, base):
    assert optimizer_defaults(method, base) == {
        "optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "momentum": 0.9, "warmup_epochs": 0,
        "exclude_bias_and_norm": False}


def test_every_method_and_base_has_an_optimizer_that_builds():
    rows = {name: optimizer_defaults(name) for name in METHODS if name != "interclr"}
    rows.update({f"interclr-{base}": optimizer_defaults("interclr", base) for base in BASES})
    for key, row in rows.items():
        settings = {k: v for k, v in row.items() if k != "warmup_epochs"}
        assert isinstance(build_optimizer(tiny_net(), **settings), torch.optim.Optimizer), key
