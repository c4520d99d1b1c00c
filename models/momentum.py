"""Momentum (EMA) encoders and the MoCo queue."""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` to be the EMA target (MoCo key encoder, BYOL target)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, decay: float) -> None:
    """θ_target ← decay·θ_target + (1 - decay)·θ_online for parameters; buffers (BN statistics) are
    copied, as MoCo and BYOL do."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    online_params, target_params = list(online.parameters()), list(target.parameters())
    torch._foreach_mul_(target_params, decay)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - decay)
    for b_online, b_target in zip(online.buffers(), target.buffers()):
        b_target.copy_(b_online)


def byol_decay(progress: float, base: float = 0.996) -> float:
    """BYOL's target schedule τ = 1 - (1 - τ_base)·(cos(π·k/K) + 1)/2, with progress = k/K ∈ [0, 1]:
    τ_base at the start, 1 at the end."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def gather_across_workers(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every DDP worker (MoCo's concat_all_gather); `x` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class MoCoQueue(nn.Module):
    """The MoCo dictionary: a FIFO of `size` L2-normalised keys [size, dim], kept as a buffer so it
    moves with the model and is saved in its checkpoint. `push` enqueues the keys of every worker."""

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got {size}, {dim}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        keys = gather_across_workers(F.normalize(keys.detach(), dim=1))
        size = self.keys.shape[0]
        if keys.shape[0] > size:
            keys = keys[-size:]
        positions = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[positions] = keys.to(self.keys.dtype)
        self.pointer.copy_((self.pointer + keys.shape[0]) % size)
