"""The optimiser of each method, from its paper: one table of defaults and `build_optimizer`.

SGD with momentum for the memory-bank / queue methods; LARS (You et al., 2017) for SimCLR and BYOL,
whose references exclude biases and normalisation parameters from both weight decay and the
layer-wise adaptation. LARS is timm's `timm.optim.Lars`:

    trust  = η‖w‖ / (‖g‖ + wd·‖w‖ + 1e-8)      (1.0 where ‖w‖ or ‖g‖ is 0)
    buffer = momentum · buffer + trust · (g + wd·w)   (buffer = trust · (g + wd·w) on the first step)
    w      = w − lr · buffer

the trust ratio of mmselfsup's `LARS` and solo-learn's `solo/utils/lars.py`; lr multiplies the
buffer (PyTorch's SGD convention, as BYOL's and solo-learn's LARS), where mmselfsup puts it inside —
the same update while lr is constant. timm adapts a group only when its weight_decay is non-zero or
`always_adapt` is set, so the main group sets `always_adapt` (adapted even at weight decay 0) and
the bias/norm group has neither: plain SGD with momentum, no weight decay (mmselfsup's
`decay_mult=0, lars_exclude=True`).

Learning rates are per 256 images; runtime.train.learning_rate scales them by the global batch.
"""
from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "lars")

_SGD = {"optimizer": "sgd", "momentum": 0.9, "warmup_epochs": 0, "exclude_bias_and_norm": False}
_LARS = {"optimizer": "lars", "momentum": 0.9, "warmup_epochs": 10, "trust_coefficient": 0.001,
         "exclude_bias_and_norm": True}

# Keyed by method name, or "interclr-<base>". The SGD rows decay every parameter, as the
# references do (mmselfsup's sgd_coslr-200e_in1k.py has no paramwise rules).
OPTIMIZER_DEFAULTS = {
    # SimCLR (Chen et al., 2020a): LARS, lr 0.3 × batch/256, wd 1e-6, 10 warm-up epochs; mmselfsup
    # configs/selfsup/simclr/simclr_resnet50_8xb32-coslr-200e_in1k.py (lr 0.3 at batch 256, bn and
    # bias weight_decay 0 + lars_exclude) and _base_/schedules/lars_coslr-200e_in1k.py (warm-up)
    "simclr": {**_LARS, "lr": 0.3, "weight_decay": 1e-6},
    # NPIDv2: InterCLR (003) Sect. 5.1.2 — SGD, momentum 0.9, wd 1e-4, lr 0.03 at batch 256, cosine
    "npid": {**_SGD, "lr": 0.03, "weight_decay": 1e-4},
    # MoCo-v2 (Chen et al., 2020b), followed exactly by InterCLR Sect. 5.1.2; mmselfsup
    # configs/selfsup/interclr/interclr-moco_resnet50_8xb32-coslr-200e_in1k.py → sgd_coslr-200e_in1k.py
    "moco": {**_SGD, "lr": 0.03, "weight_decay": 1e-4},
    # BYOL, 200 epochs: InterCLR Sect. 5.1.2 (Grill et al.'s 300-epoch recipe: lr 0.3, wd 1e-6; the
    # 1000-epoch one is lr 0.2, wd 1.5e-6); mmselfsup configs/selfsup/byol/
    # byol_resnet50_16xb256-coslr-200e_in1k.py (LARS lr 4.8 at 4096 = 0.3 per 256, bn/bias/downsample.1
    # decay_mult 0 + lars_exclude) with lars_coslr-200e_in1k.py (10 warm-up epochs)
    "byol": {**_LARS, "lr": 0.3, "weight_decay": 1e-6},
    # CMC (002) App. E.2: SGD, lr 0.03, momentum 0.9, wd 1e-4, cosine for ResNets
    "cmc": {**_SGD, "lr": 0.03, "weight_decay": 1e-4},
    # CACR (004) App. C.2, ImageNet-1K in the MoCo-v2 frame: SGD, lr 0.03 at batch 256, momentum 0.9,
    # wd 1e-4 (App. C.1's CIFAR/STL runs use 0.12 per 256 with step decay)
    "cacr": {**_SGD, "lr": 0.03, "weight_decay": 1e-4},
    # ImCLR (000) changes no hyper-parameter: the usual ImageNet ResNet recipe, lr 0.1 per 256,
    # wd 1e-4 (He et al., 2016; Goyal et al., 2017)
    "supervised": {**_SGD, "lr": 0.1, "weight_decay": 1e-4},
    # InterCLR Sect. 5.1.2: each base keeps its own training recipe
    "interclr-npid": {**_SGD, "lr": 0.03, "weight_decay": 1e-4},
    "interclr-moco": {**_SGD, "lr": 0.03, "weight_decay": 1e-4},
    "interclr-byol": {**_LARS, "lr": 0.3, "weight_decay": 1e-6},
}


def optimizer_defaults(method: str, base: str | None = None) -> dict:
    """The paper's optimiser settings for `method` (a copy); `base` picks InterCLR's row and is
    ignored for the other methods."""
    key = method
    if method == "interclr":
        if base is None:
            raise ValueError("interclr needs its base (npid, moco or byol) to pick an optimizer")
        key = f"interclr-{base}"
    if key not in OPTIMIZER_DEFAULTS:
        raise ValueError(f"no optimizer defaults for {key!r} (known: {', '.join(OPTIMIZER_DEFAULTS)})")
    return dict(OPTIMIZER_DEFAULTS[key])


def is_bias_or_norm(parameter: torch.Tensor) -> bool:
    """Biases and BatchNorm/LayerNorm scales and shifts: the parameters with fewer than 2 dims."""
    return parameter.ndim <= 1


def build_optimizer(module: torch.nn.Module, optimizer: str, lr: float, weight_decay: float, momentum: float,
                    trust_coefficient: float = 0.001, exclude_bias_and_norm: bool = True) -> torch.optim.Optimizer:
    """SGD or LARS over the trainable parameters of `module`. With `exclude_bias_and_norm`, biases
    and normalisation parameters form a second group with weight decay 0 and, under LARS, no
    layer-wise adaptation; otherwise one group holds everything."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (choose sgd or lars)")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimize")
    if exclude_bias_and_norm:
        main = {"params": [p for p in params if not is_bias_or_norm(p)], "weight_decay": weight_decay}
        excluded = {"params": [p for p in params if is_bias_or_norm(p)], "weight_decay": 0.0}
        groups = [group for group in (main, excluded) if group["params"]]
    else:
        main = {"params": params, "weight_decay": weight_decay}
        groups = [main]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    from timm.optim import Lars  # here, not at the top: importing timm loads its model zoo (seconds)

    main["always_adapt"] = True  # timm would skip adaptation of a group whose weight decay is 0
    return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coefficient,
                always_adapt=False)
