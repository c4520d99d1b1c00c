"""BYOL regression loss (Grill et al., 2020), used by BYOL and BYOL-InterCLR (003_*.txt Sect. 5.1.2)."""
from __future__ import annotations

import torch

from losses._common import check_pair, float32, normalize


@float32
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2·cos(p, z), averaged over the batch. p: [B, D] online predictions; z: [B, D] target
    projections. The stop-gradient on the target is the caller's job: pass `z.detach()` (or
    compute z under `torch.no_grad()`); this function differentiates through both arguments."""
    check_pair("p", p, "z", z)
    return (2 - 2 * (normalize(p) * normalize(z)).sum(dim=1)).mean()
