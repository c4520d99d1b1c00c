"""One training step, with mixed precision and channels_last: what every Train worker runs per batch,
importable with torch alone (benchmarks/device.py runs it on a GPU machine without Ray or DALI).

Precision (`train.precision`, Lightning's names):
    32           float32 everywhere
    bf16-mixed   autocast to bfloat16 over the method's forward (encoders and heads); no scaler
    16-mixed     autocast to float16, `torch.amp.GradScaler` (CUDA only)
None resolves on the worker's device: 32 on CPU; on a GPU bf16-mixed where it has bf16, else 16-mixed.
What stays float32 and where it is cast: the losses (`losses._common.float32` at each loss), the MoCo
queue (`MoCoQueue.gather`), bank features and scores (`MemoryBank._feats` / `query`), k-means on
the shards, and evaluation (the kNN runs outside autocast). Parameters and optimiser state are
float32 (autocast's master weights), so EMA targets update in float32.

A 16-mixed step whose gradients are not finite is skipped whole, as Lightning's
`MixedPrecision.optimizer_step` (lightning/pytorch/plugins/precision/amp.py) and apex do: the scaler
skips `optimizer.step()` and lowers its scale, and here the method's EMA, queue pushes and bank
writes of that step are discarded (`Method.discard_step`). The step counter and the lr schedule
advance as in Lightning, whose loop counts the step and steps its schedulers either way.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_DTYPES = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class PrecisionError(ValueError):
    """A precision the device cannot run (a job prints it as one error: line)."""


def check_precision(requested: str | None, on_gpu: bool) -> None:
    """What any machine can tell about `train.precision` (config validation and the worker share it)."""
    if requested is not None and requested not in PRECISIONS:
        raise PrecisionError(f"train.precision must be 32, bf16-mixed or 16-mixed (Lightning's names), got "
                             f"{requested!r}")
    if requested == "16-mixed" and not on_gpu:
        raise PrecisionError("train.precision=16-mixed needs GPUs (train.use_gpu=true): fp16 gradient scaling is "
                             "CUDA's; on CPU use bf16-mixed or 32")


def resolve_precision(requested: str | None, device: torch.device) -> str:
    """`train.precision` for `device`: None picks the device's default; a choice the device cannot
    run is refused, naming what it can."""
    check_precision(requested, device.type == "cuda")
    if device.type != "cuda":
        return requested or "32"
    bf16 = torch.cuda.is_bf16_supported()
    if requested == "bf16-mixed" and not bf16:
        name = torch.cuda.get_device_name(device)
        raise PrecisionError(f"train.precision=bf16-mixed: {name} has no bfloat16; use 16-mixed")
    return requested or ("bf16-mixed" if bf16 else "16-mixed")


@dataclass
class Precision:
    """Autocast and, for 16-mixed, the gradient scaler of one worker."""
    name: str
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, requested: str | None, device: torch.device) -> "Precision":
        name = resolve_precision(requested, device)
        scaler = torch.amp.GradScaler(device.type) if name == "16-mixed" else None
        return cls(name, device.type, scaler)

    def autocast(self):
        """Autocast to the precision's dtype over a forward (nothing for 32)."""
        dtype = _DTYPES[self.name]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def state_dict(self) -> dict:
        return {"name": self.name, "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """The scaler's scale and growth tracker from a checkpoint of the same precision."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def prepare_model(method: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The method on its device, in channels_last when asked (once, before DDP and the optimiser);
    cuDNN picks its fastest kernels for the fixed input shapes of training."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last:
        return method.to(device, memory_format=torch.channels_last)
    return method.to(device)


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """A batch's views and labels on `device` (non-blocking: the loaders hand over pinned host
    memory), image views in channels_last when the model is."""
    def move(view: torch.Tensor) -> torch.Tensor:
        if channels_last and view.dim() == 4:
            return view.to(device, non_blocking=True, memory_format=torch.channels_last)
        return view.to(device, non_blocking=True)
    return {"views": [move(v) for v in batch["views"]], "index": batch["index"],
            "label": batch["label"].to(device, non_blocking=True)}


@dataclass
class StepResult:
    out: dict  # the method's outputs: "loss" and per-branch values (float32 tensors)
    applied: bool  # False: a 16-mixed step with non-finite gradients, skipped whole


def train_step(method, model, optimizer: torch.optim.Optimizer, schedule, precision: Precision, batch: dict,
               progress: float, epoch: int) -> StepResult:
    """Forward under autocast, backward (scaled for 16-mixed), gradients unscaled before the optimiser
    (LARS's trust ratio reads true gradient norms; clipping would go there too), optimiser step, lr
    schedule, then the method's EMA and queued side effects — or, for a skipped step, none of them.
    `model` is what runs the forward (the method or its DDP wrapper); `batch` is on the device."""
    with precision.autocast():
        out = model(batch, progress, epoch)
    optimizer.zero_grad(set_to_none=True)
    scaler = precision.scaler
    if scaler is None:
        out["loss"].backward()
        optimizer.step()
        applied = True
    else:
        scale = scaler.get_scale()
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)  # skips optimizer.step() when the unscaled gradients are not finite
        scaler.update()
        # the scale drops exactly when the step was skipped (Hugging Face accelerate's
        # `optimizer_step_was_skipped`); one host sync per step, 16-mixed only
        applied = scaler.get_scale() >= scale
    with warnings.catch_warnings():
        # torch warns of a schedule stepped before its optimiser: by design on a skipped step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        schedule.step()
    if applied:
        method.after_optimizer_step(progress)
    else:
        method.discard_step()
    return StepResult(out, applied)
