"""`build_optimizer`: SGD or LARS with the settings of a method's paper (each method's
`MethodConfig.optimizer`, models/; `models.method.sgd` / `lars`).

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
