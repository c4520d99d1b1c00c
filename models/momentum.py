"""Momentum (EMA) encoders and the MoCo queue."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

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


BN_SPLITS = 8  # one worker with shuffle BN: BN sub-batches, as the 8 GPUs of MoCo's recipe (moco_cifar10_demo)
MIN_SPLIT_ROWS = 32  # ... of at least the reference's 32 rows per GPU (256 over 8): BN of fewer rows is noise


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def forward_in_splits(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      splits: int) -> torch.Tensor:
    """`encoder` applied to `splits` contiguous sub-batches of x, so BatchNorm's statistics are those
    of B/splits rows, as `splits` GPUs would compute them (the SplitBatchNorm of facebookresearch/moco's
    single-GPU CIFAR demo, `moco_cifar10_demo.ipynb`). Sub-batches keep at least 2 rows."""
    splits = max(1, min(splits, x.shape[0] // 2))
    if splits == 1:
        return encoder(x)
    return torch.cat([encoder(part) for part in x.chunk(splits)])


@torch.no_grad()
def shuffled_forward(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int = 1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Shuffle BN for a key / target encoder (MoCo, He et al. 2020, Sect. 3.3): a key's BatchNorm
    statistics come from a sub-batch other than its query's, so the positive cannot be found through
    the batch statistics the query and its key would share (the "BN shortcut").

    Under DDP (world > 1): facebookresearch/moco `moco/builder.py` `_batch_shuffle_ddp` /
    `_batch_unshuffle_ddp` — gather the batch, shuffle it by one permutation (rank 0's, broadcast),
    encode this rank's slice, gather and un-shuffle. One worker: the same with the batch permuted and
    encoded in `splits` sub-batches (`forward_in_splits`; the queries use the unpermuted splits), as
    the CIFAR demo's `_batch_shuffle_single_gpu` with SplitBatchNorm. Returns rows in x's order."""
    world = world_size()
    if world == 1:
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        return forward_in_splits(encoder, x[order], splits)[torch.argsort(order)]
    batch = x.shape[0]
    everything = gather_across_workers(x)  # [world·B, ...], rank-major
    order = torch.randperm(everything.shape[0], generator=generator).to(x.device)
    dist.broadcast(order, src=0)
    rank = dist.get_rank()
    mine = encoder(everything[order.view(world, batch)[rank]])
    restore = torch.argsort(order)
    return gather_across_workers(mine)[restore.view(world, batch)[rank]]


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `x` [n, ...] of every DDP worker along dim 0, with gradients: the backward of
    `torch.distributed.nn.functional.all_gather` sums every worker's gradient for this worker's
    shard (a reduce-scatter, solo-learn's GatherLayer all-reduce + own slice), which DDP's mean
    then turns into the single-process gradient. Returns the concatenation and the offset of this
    worker's rows. Every worker must pass the same shape (DistributedSampler with drop_last)."""
    if world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_nn
    return torch.cat(dist_nn.all_gather(x), dim=0), dist.get_rank() * x.shape[0]


class QueryKeyEncoders:
    """For methods with a query encoder (`backbone`, `head`) and a momentum key encoder
    (`key_backbone`, `key_head`) — MoCo, CACR's queue form: queries and keys with shuffle BN
    (`shuffle_bn`, `bn_splits` attributes; see `shuffled_forward`)."""

    min_split_rows = MIN_SPLIT_ROWS

    def bn_splits_here(self, batch: int) -> int:
        """BN sub-batches of a batch on this worker: under DDP the workers are the splits; on one,
        `bn_splits` of at least `min_split_rows` rows each."""
        if not self.shuffle_bn or world_size() > 1:
            return 1
        return max(1, min(self.bn_splits, batch // self.min_split_rows))

    def encode_queries(self, x: torch.Tensor) -> torch.Tensor:
        return forward_in_splits(lambda v: self.head(self.backbone(v)), x, self.bn_splits_here(x.shape[0]))

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        def encode(v):
            return self.key_head(self.key_backbone(v))
        return shuffled_forward(encode, x, self.bn_splits_here(x.shape[0])) if self.shuffle_bn else encode(x)


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
    def gather(self, keys: torch.Tensor) -> torch.Tensor:
        """The L2-normalised keys of every worker, in the queue's dtype (float32 under autocast)."""
        return gather_across_workers(F.normalize(keys.detach().to(self.keys.dtype), dim=1))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write gathered keys at the pointer (FIFO, wrapping)."""
        size = self.keys.shape[0]
        if keys.shape[0] > size:
            keys = keys[-size:]
        positions = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % size
        self.keys[positions] = keys
        self.pointer.copy_((self.pointer + keys.shape[0]) % size)

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        self.enqueue(self.gather(keys))
