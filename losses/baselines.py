"""The CL baselines CACR compares with (004_*.txt Sect. 5): AU-CL and HN-CL."""
from __future__ import annotations

import math

import torch

from losses._common import check_pair, check_temperature, float32, normalize


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, dim=0) - math.log(x.numel())


@float32
def align_uniform_loss(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0, t: float = 2.0,
                       align_weight: float = 1.0, uniform_weight: float = 1.0) -> torch.Tensor:
    """AU-CL (Wang & Isola, 2020): align_weight · mean_i ‖x_i - y_i‖^α
    + uniform_weight · (U(x) + U(y)) / 2, with U(z) = log mean_{i<j} exp(-t‖z_i - z_j‖²).
    x, y: [N, D] positive pairs, L2-normalised here; N ≥ 2."""
    check_pair("x", x, "y", y)
    check_temperature("t", t)
    if x.shape[0] < 2:
        raise ValueError("align_uniform_loss needs at least 2 samples for the uniformity term")
    x, y = normalize(x), normalize(y)
    squared = (x - y).pow(2).sum(dim=1)  # [N]
    align = squared.mean() if alpha == 2 else squared.clamp_min(1e-12).pow(alpha / 2).mean()

    def uniformity(z: torch.Tensor) -> torch.Tensor:
        i, j = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
        pair_sq = (z[i] - z[j]).pow(2).sum(dim=1)  # [N(N-1)/2], no sqrt: finite gradients at 0
        return _log_mean_exp(-t * pair_sq)

    return align_weight * align + uniform_weight * (uniformity(x) + uniformity(y)) / 2


@float32
def hard_negative_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, tau_plus: float = 0.1,
                       beta: float = 1.0) -> torch.Tensor:
    """HN-CL (Robinson et al., 2021) on the SimCLR batch: 2N anchors, 2N-2 negatives each.

    Negatives are importance-weighted by exp(β·s/τ), debiased with class prior τ⁺, and the
    estimate is clamped at its theoretical minimum N'·e^(-1/τ) (N' = 2N-2):
        Ng = max((-τ⁺·N'·pos + N'·Σ_j w_j neg_j) / (1 - τ⁺), N'·e^(-1/τ)),  w = softmax(β·s/τ)
        loss = -log(pos / (pos + Ng)), averaged over the 2N anchors.
    β = 0 is the debiased loss (Chuang et al.); β = 0 and τ⁺ = 0 is NT-Xent. Computed in log space
    (shifted by each row's maximum), so it stays finite at τ = 0.01.
    """
    check_pair("z1", z1, "z2", z2)
    check_temperature("temperature", temperature)
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    n = z1.shape[0]
    z = normalize(torch.cat([z1, z2], dim=0))  # [2N, D]
    sim = z @ z.T / temperature  # [2N, 2N]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    pos = sim[torch.arange(2 * n, device=z.device), partner]  # [2N]
    negative_mask = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    negative_mask[torch.arange(2 * n, device=z.device), partner] = False
    neg = sim[negative_mask].view(2 * n, 2 * n - 2)  # [2N, N'] scaled similarities
    num_neg = 2 * n - 2
    shift = torch.maximum(neg.max(dim=1).values, pos).detach()  # [2N]
    pos_shifted = torch.exp(pos - shift)
    weights = torch.softmax(beta * neg, dim=1)
    reweighted = num_neg * (weights * torch.exp(neg - shift.unsqueeze(1))).sum(dim=1)
    raw = (reweighted - tau_plus * num_neg * pos_shifted) / (1.0 - tau_plus)
    log_floor = math.log(num_neg) - 1.0 / temperature - shift
    log_raw = raw.clamp_min(torch.finfo(raw.dtype).tiny).log()  # raw ≤ 0 falls to the floor
    log_ng = torch.maximum(log_raw, log_floor)
    return (torch.logaddexp(pos - shift, log_ng) - (pos - shift)).mean()
