"""Cross-entropy with soft targets, for ImCLR's averaged labels (000_*.txt)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses._common import float32


@float32
def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_b -Σ_c targets[b, c]·log_softmax(logits)[b, c]. logits, targets: [B, C]; each target
    row is a distribution (ImCLR: the mean of the one-hot labels of the concatenated images)."""
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be [B, C], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
