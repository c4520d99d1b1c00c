"""Projection heads and the BYOL predictor."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear (`hidden_dim=None`) or 2-layer MLP head: Linear(in, 2048) → [BN] → ReLU → Linear(·, 128),
    the head of SimCLR, MoCo-v2 and NPIDv2 (InterCLR Sect. 5.1.2: 2,048 hidden, ReLU, 128-D,
    L2-normalised). BYOL's projector and predictor are the same MLP with BN, 4096 hidden, 256 out
    and no normalisation (`byol_mlp`)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = 2048, batch_norm: bool = False,
                 normalize: bool = True):
        super().__init__()
        if hidden_dim is None:
            self.net = nn.Linear(in_dim, out_dim)
        else:
            norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), *norm, nn.ReLU(inplace=True),
                                     nn.Linear(hidden_dim, out_dim))
        self.normalize = normalize
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return F.normalize(z, dim=1) if self.normalize else z


def byol_mlp(in_dim: int, out_dim: int = 256, hidden_dim: int = 4096) -> ProjectionHead:
    """BYOL projector / predictor: Linear → BN → ReLU → Linear, not normalised."""
    return ProjectionHead(in_dim, out_dim, hidden_dim, batch_norm=True, normalize=False)
