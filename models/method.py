"""What every method shares, kept small: the bank it asks for, its EMA pairs, and its backbone.

A method is an `nn.Module` with
    recipe                       the pipeline recipe whose views it expects ("two_crop", "lab", ...)
    bank_requests()              the memory banks it needs (dim, momentum ω, pseudo-labels or not);
                                 the driver creates them and hands the clients to `attach_banks`
    training_step(batch, progress, epoch) -> dict   "loss" (to backpropagate) and per-branch values
    after_optimizer_step(progress)                   EMA updates of its `momentum_pairs`, then the side
                                                     effects its step queued (`after_step`: bank writes,
                                                     queue pushes); `discard_step()` drops them instead
    backbone                     the encoder whose pooled output is the representation (kNN, linear eval)
    bank_features(batch)         what to write into its banks before the first step (no grad)
    intra_step(batch, bank, inter)   InterCLR bases only: the base's loss, anchors and bank update
    queue, prime(batch)          a MoCo-style key queue (optional attribute), filled with real keys
                                 by `prime` before the first step
`progress` = step / total steps ∈ [0, 1] (schedules); `epoch` gates warm-ups.

A method's settings are a `MethodConfig`: the `method:` section of a job config, declared next to
the method's class, and registered by name in models/registry.py.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import nn

from models.momentum import ema_update


class HostCopy:
    """A tensor on its way to host memory. On a CUDA device it is copied into pinned memory
    (`non_blocking`: a real asynchronous copy) behind the kernels queued so far, with a CUDA event
    recorded after the copy; `get()` waits for that event only, not for the work queued later
    (backward, the optimiser step). On the CPU it is the tensor itself."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self.event = None
        if tensor.is_cuda:
            self.value = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.value.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(tensor.device))
        else:
            self.value = tensor

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.value


@dataclass(frozen=True)
class InterQuery:
    """InterCLR's inter-branch request (003 Sect. 4.2): negatives, strategy, τ, semi-hard pool."""
    num_negatives: int
    strategy: str
    temperature: float
    pool_fraction: float


@dataclass
class IntraStep:
    """One step of a base method as InterCLR composes it (003 Eq. 7): the base's own loss; `anchors`,
    the embeddings the inter branch pulls towards the anchor's cluster; `bank_update`, what the bank
    stores for the batch (Eq. 2); and `inter`, one (pos, neg) per anchor when the base already asked
    the bank for the inter branch in its own round trip (NPID), else None."""
    loss: torch.Tensor
    anchors: list[torch.Tensor]
    bank_update: torch.Tensor
    inter: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None


@dataclass(frozen=True)
class BankRequest:
    dim: int
    momentum: float  # InterCLR Eq. 2 ω
    clusters: bool  # needs online k-means pseudo-labels (inter branch)


class Method(nn.Module):
    recipe = "two_crop"
    num_views = 2
    momentum_pairs: tuple[tuple[str, str], ...] = ()  # (online attribute, target attribute)
    contrastive = True  # has negatives (InfoNCE-type loss); BYOL has none
    local_crops = 0  # multi-crop: small views after the `num_views` global ones (the methods that take them)

    banks: list | None = None

    def bank_requests(self) -> list[BankRequest]:
        return []

    def recipe_for(self, size: int):
        """The pipeline Recipe of this method's views at `size` px."""
        from pipeline.views import recipe_by_name
        return recipe_by_name(self.recipe, size)

    def attach_banks(self, banks) -> "Method":
        """Give the method the `MemoryBank` clients of its `bank_requests()`, in order."""
        requests = self.bank_requests()
        banks = list(banks or [])
        if len(banks) != len(requests):
            raise ValueError(f"{type(self).__name__} needs {len(requests)} memory bank(s), got {len(banks)}")
        for bank, request in zip(banks, requests):
            if bank.dim != request.dim:
                raise ValueError(f"{type(self).__name__}: bank dim {bank.dim} != embedding dim {request.dim}")
        self.banks = banks
        return self

    def bank(self, i: int = 0):
        if not self.banks:
            raise ValueError(f"{type(self).__name__} needs its memory bank: create the banks of bank_requests() "
                             "and call attach_banks()")
        return self.banks[i]

    def decay(self, progress: float) -> float:
        return 0.0

    def forward(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        """= training_step, so DDP's forward hooks see the step."""
        return self.training_step(batch, progress, epoch)

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        for online, target in self.momentum_pairs:
            ema_update(getattr(self, online), getattr(self, target), self.decay(progress))
        self.apply_step_effects()

    def after_step(self, effect: Callable[[], None]) -> None:
        """Queue a side effect of this step (a bank write, a queue push) for `after_optimizer_step`: a
        step whose backward or optimiser step fails, or that mixed precision skips (non-finite fp16
        gradients, runtime.step), leaves banks and queues as they were."""
        self.__dict__.setdefault("_step_effects", []).append(effect)

    def apply_step_effects(self) -> None:
        for effect in self.__dict__.pop("_step_effects", []):
            effect()

    def discard_step(self) -> None:
        """Forget the queued side effects of this step, of this method and of the methods it is built
        on (InterCLR's base): the step is skipped whole."""
        for module in self.modules():
            module.__dict__.pop("_step_effects", None)

    def write_bank_after_step(self, bank, ids, feats: torch.Tensor) -> None:
        """Queue a bank update (Eq. 2) for after the optimiser step (`after_step`); the trainer does
        not wait for the shards (`MemoryBank.update(block=False)`; its next query completes it).
        On a GPU the ids and features start their copy to pinned host memory now (`HostCopy`), so
        the update after the step waits for that copy alone, not for backward to finish."""
        ids, feats = HostCopy(ids), HostCopy(feats)
        self.after_step(lambda: bank.update(ids.get(), feats.get(), block=False))

    def push_after_step(self, queue, keys: torch.Tensor) -> None:
        """Enqueue `keys` after the optimiser step. Gathered from every worker now (a collective every
        rank runs in its forward); the loss of this step used the queue before the push, as in
        facebookresearch/moco `builder.py` (logits, then `_dequeue_and_enqueue`)."""
        self.after_step(partial(queue.enqueue, queue.gather(keys)))

    @torch.no_grad()
    def prime(self, batch: dict) -> None:
        """Push keys of real images into the queue before the first step (see MoCo.prime)."""

    def views(self, batch: dict) -> list[torch.Tensor]:
        views = batch["views"]
        if len(views) < self.num_views + self.local_crops:
            locals_ = f" and {self.local_crops} local" if self.local_crops else ""
            raise ValueError(f"{type(self).__name__} needs {self.num_views} global{locals_} views per sample "
                             f"(recipe {self.recipe!r}), the batch has {len(views)}")
        return views

    def local_views(self, batch: dict) -> list[torch.Tensor]:
        """The multi-crop views: the `local_crops` after the global ones (none when off)."""
        return self.views(batch)[self.num_views:self.num_views + self.local_crops]

    @torch.no_grad()
    def bank_features(self, batch: dict) -> list[torch.Tensor]:
        return []

    def intra_step(self, batch: dict, bank=None, inter: InterQuery | None = None, margin: float = 0.0) -> IntraStep:
        """The step InterCLR builds on: `bank` is InterCLR's clustered bank, `inter` its request
        (None during the warm-up), `margin` the intra branch's MarginNCE m. Bases implement it;
        other methods cannot be an InterCLR base."""
        raise NotImplementedError(f"{type(self).__name__} is not an InterCLR base")


# The keys of the other config sections a method may read (MethodConfig.reads)
LOCAL_CROPS = ("data.local_crops", "data.local_size", "data.local_scale")  # SwAV's multi-crop
KEY_ENCODER = ("model.shuffle_bn", "model.bn_splits")  # a MoCo-style key encoder's shuffled BN
BANK = ("bank.shards", "bank.dtype", "bank.init", "bank.gpus_per_shard")  # a memory bank
CLUSTERS = ("bank.clusters", "bank.min_cluster", "bank.labels", "bank.kmeans_iters", "bank.kmeans_init")


def sgd(lr: float, weight_decay: float) -> dict:
    """SGD with momentum 0.9, no warm-up, weight decay on every parameter (mmselfsup's
    sgd_coslr-200e_in1k.py has no paramwise rules); lr per 256 images."""
    return {"optimizer": "sgd", "lr": lr, "weight_decay": weight_decay, "momentum": 0.9, "warmup_epochs": 0,
            "exclude_bias_and_norm": False}


def lars(lr: float, weight_decay: float) -> dict:
    """LARS (runtime.optim), momentum 0.9, η 0.001, 10 warm-up epochs, biases and norms excluded from
    weight decay and adaptation (mmselfsup's lars_coslr-200e_in1k.py, `lars_exclude`); lr per 256."""
    return {"optimizer": "lars", "lr": lr, "weight_decay": weight_decay, "momentum": 0.9, "warmup_epochs": 10,
            "trust_coefficient": 0.001, "exclude_bias_and_norm": True}


@dataclass
class MethodConfig:
    """A method's `method:` section of the job config: its keys, as dataclass fields with the paper's
    defaults. Each method module declares one beside its class; models/registry.py maps `name` to it.

    Class attributes:
        title      the method's name in messages
        paper      its paper: title and arXiv id
        reads      the keys of the other sections it reads (LOCAL_CROPS, KEY_ENCODER, BANK, CLUSTERS);
                   a key that some method reads, set by the user for a method that does not, is refused
        optimizer  the paper's optimiser (`sgd(...)` / `lars(...)`: runtime.optim's settings and
                   warmup_epochs); `train.*` keys left unset take these
        sync_bn    the paper trains with BatchNorm statistics over the whole batch (SyncBatchNorm)
    """
    name: str = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    optimizer: ClassVar[dict] = {}
    sync_bn: ClassVar[bool] = False

    def optimizer_defaults(self) -> dict:
        return dict(self.optimizer)

    def uses_sync_bn(self) -> bool:
        return self.sync_bn

    def checks(self, job) -> list[tuple[bool, str]]:
        """(condition, one-line message) pairs the job config `job` must meet for this method."""
        return []

    def build(self, job, num_classes: int | None = None) -> Method:
        """The method for the job config `job` (runtime.config.JobConfig: its `model` and `data`
        sections); `num_classes` from the manifest, for the methods that need it."""
        raise NotImplementedError(f"{type(self).__name__}.build")

    @staticmethod
    def backbone(job, in_channels: int = 3) -> nn.Module:
        """The encoder `job.model` names."""
        from models.encoders import build_encoder
        m = job.model
        return build_encoder(m.encoder, m.width, m.small_images, in_channels)


def single_ids(batch: dict) -> torch.Tensor:
    """Bank methods key the bank by one sample id per row; ImCLR batches carry several."""
    index = batch["index"]
    if index.dim() != 1:
        raise ValueError("memory-bank methods need one sample id per row; ImCLR views (several ids per row) "
                         "work with SimCLR, MoCo-v2, BYOL, CACR and supervised training")
    return index
