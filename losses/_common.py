"""Argument checks, the normalisation every cosine-similarity loss shares, and `float32`."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

EPS = 1e-8  # zero vectors normalise to zero with finite gradients


def _as_float32(value):
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(v) for v in value)
    return value


def _device_type(values) -> str:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)) and value:
            return _device_type(value)
    return "cpu"


def float32(loss):
    """Mixed precision's boundary for a loss: its half-precision tensor arguments (and lists of them)
    cast to float32 and autocast off inside, so log-softmax / logsumexp and the similarity matmuls
    behind them run in float32 whatever precision the encoder ran in (solo-learn via Lightning,
    NVIDIA's AMP guidance: reductions and softmax in fp32). Gradients flow back through the casts."""
    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        device_type = _device_type([*args, *kwargs.values()])
        with torch.autocast(device_type=device_type, enabled=False):
            return loss(*_as_float32(args), **{k: _as_float32(v) for k, v in kwargs.items()})
    return wrapper


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=EPS)


def check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() != 2:
        raise ValueError(f"{name_a} must be [B, D], got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def check_negatives(query: torch.Tensor, negatives: torch.Tensor, name: str = "negatives") -> None:
    """negatives: [B, K, D] per sample (memory bank) or [K, D] shared (MoCo queue)."""
    batch, dim = query.shape
    if negatives.dim() == 2:
        if negatives.shape[1] != dim:
            raise ValueError(f"shared {name} {tuple(negatives.shape)} must be [K, {dim}]")
    elif negatives.dim() == 3:
        if negatives.shape[0] != batch or negatives.shape[2] != dim:
            raise ValueError(f"per-sample {name} {tuple(negatives.shape)} must be [{batch}, K, {dim}]")
    else:
        raise ValueError(f"{name} must be [B, K, D] or [K, D], got shape {tuple(negatives.shape)}")


def similarities_to_negatives(query: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """query [B, D] · negatives ([B, K, D] or [K, D]) → [B, K]."""
    if negatives.dim() == 2:
        return query @ negatives.T  # [B, D] x [D, K] -> [B, K]
    return torch.einsum("bd,bkd->bk", query, negatives)  # per-sample: [B, D] x [B, K, D] -> [B, K]
