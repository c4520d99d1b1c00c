"""Linear evaluation of a trained backbone on Ray Train workers (jobs/linear_eval.py): a linear
classifier on the frozen backbone, val top-1. Every rank works on its own device and its share of
each split (DALI's rank split: disjoint, every id once); the classifier is data-parallel (DDP:
gradients all-reduced, so every rank holds the same head and w ranks of batch B/w are one SGD on
batch B); val is scored by every rank on its share and the counts summed. Two protocols:

fast ("linear_top1"): the pooled, L2-normalised features of the `center` view are extracted once
    and cached on the rank's device, and the classifier trains on them (SGD, momentum 0.9, lr 0.1,
    cosine, no augmentation). A quick probe for comparing runs of this project
    (benchmarks/fidelity.py), not a number to set beside a paper's.
standard ("linear_top1_standard"): MoCo's linear classification protocol (facebookresearch/moco
    main_lincls.py, which also trains it with DDP): a linear layer, N(0, 0.01) weights and zero
    bias, on the raw pooled features of the frozen backbone (eval mode: BatchNorm statistics
    untouched, no gradient), trained on fresh RandomResizedCrop (scale 0.08-1) + flip views every
    epoch (pipeline.views.supervised), SGD momentum 0.9, lr 30, weight decay 0, batch 256, 100
    epochs; top-1 on the centre crop of val (pipeline.views.center: shorter side to the image
    size, then the crop; MoCo resizes to 256 and crops 224). One change: the lr follows a cosine
    over the epochs (torch.optim.lr_scheduler.CosineAnnealingLR, as MoCo v3's main_lincls.py)
    instead of MoCo's x0.1 steps at epochs 60 and 80. `head_bn` puts a BatchNorm1d without affine
    parameters before the linear layer (MAE's linear probe), which takes out the features' scale
    (it differs between methods, and lr 30 is tuned for MoCo's); off by default, as in MoCo.

Every rank runs the same number of steps per epoch (DDP): the fewest batches any rank's share makes.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULT_FILE = "linear_eval.json"
HEAD_FILE = "linear_head_{protocol}.pt"  # rank 0's head: state_dict of a `linear_head`
FAST = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
STANDARD = {"lr": 30.0, "momentum": 0.9, "weight_decay": 0.0}  # MoCo main_lincls.py


def say(message: str) -> None:
    print(message, flush=True)


def linear_head(dim: int, num_classes: int, batch_norm: bool = False) -> torch.nn.Module:
    """MoCo's classifier: Linear with weights N(0, 0.01) and zero bias; `batch_norm`: after a
    BatchNorm1d without affine parameters (MAE's linear probe)."""
    linear = torch.nn.Linear(dim, num_classes)
    torch.nn.init.normal_(linear.weight, std=0.01)
    torch.nn.init.zeros_(linear.bias)
    if not batch_norm:
        return linear
    return torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False), linear)


def reduced(values: list[float], world: int, device, op: str = "sum") -> list[float]:
    """`values` reduced over the ranks ("sum" or "min"); one collective for the list."""
    if world == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, torch.distributed.ReduceOp.MIN if op == "min" else torch.distributed.ReduceOp.SUM)
    return tensor.tolist()


def data_parallel(head: torch.nn.Module, world: int, device) -> torch.nn.Module:
    """What trains `head` (already on `device`): itself on one rank, else its DDP wrapper (rank 0's
    initial weights broadcast, gradients all-reduced)."""
    if world == 1:
        return head
    device = torch.device(device)
    return torch.nn.parallel.DistributedDataParallel(head, device_ids=[device] if device.type == "cuda" else None)


@torch.no_grad()
def val_top1(head: torch.nn.Module, feats, labels, world: int, device) -> tuple[float, int]:
    """(top-1 of `head` on this rank's val features, the val rows of all ranks): the correct counts
    summed over the ranks."""
    head.eval()
    feats, labels = torch.as_tensor(feats).to(device), torch.as_tensor(labels).long().to(device)
    correct, rows = reduced([int((head(feats).argmax(1) == labels).sum()), len(labels)], world, device)
    return correct / rows, int(rows)


def fast_probe(backbone, config, space: str | None, num_classes: int, epochs: int, lr: float, batch_size: int,
               rank: int = 0, world: int = 1, device="cpu", log=say) -> tuple[torch.nn.Module, float, dict]:
    """The cached-feature probe: this rank's L2-normalised centre-crop features of both splits,
    extracted once on `device`; a DDP linear classifier on them (batch `batch_size` over all ranks,
    each rank's order drawn from a generator seeded by its rank), SGD momentum 0.9, cosine lr.
    Returns (the head, val top-1, the samples each split held over all ranks)."""
    from runtime.evaluate import centre_view_loader, features_of
    d = config.data
    train_x, train_y, _ = features_of(backbone, centre_view_loader(config, space, rank, world, d.train_split),
                                      device=device)
    val_x, val_y, _ = features_of(backbone, centre_view_loader(config, space, rank, world, d.val_split),
                                  device=device)
    train_x, val_x = torch.from_numpy(train_x).to(device), torch.from_numpy(val_x).to(device)
    train_y, val_y = torch.from_numpy(train_y).long().to(device), torch.from_numpy(val_y).long().to(device)
    local = batch_size // world
    steps = int(reduced([-(-len(train_x) // local)], world, device, "min")[0])
    head = torch.nn.Linear(train_x.shape[1], num_classes).to(device)
    model = data_parallel(head, world, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=FAST["momentum"], weight_decay=FAST["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(rank)
    every = max(1, epochs // 10)  # an epoch takes milliseconds: ten lines at most
    for epoch in range(epochs):
        loss_sum, rows = torch.zeros((), device=device), 0
        for batch in torch.randperm(len(train_x), generator=generator).split(local)[:steps]:
            batch = batch.to(device)
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            rows += len(batch)
        scheduler.step()
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            total, seen = reduced([float(loss_sum), rows], world, device)  # one host sync per logged epoch
            if rank == 0:
                log(f"linear eval (fast): epoch {epoch + 1}/{epochs} loss {total / seen:.4f}")
    top1, val_rows = val_top1(head, val_x, val_y, world, device)
    train_rows = int(reduced([len(train_x)], world, device)[0])
    return head, top1, {"train_samples": train_rows, "val_samples": val_rows}


def standard_loaders(root, train_split: str, val_split: str, size: int, space: str | None, batch_size: int,
                     seed: int = 0, drop_last: bool = False, device: str = "cpu", num_threads: int = 2,
                     rank: int = 0, world: int = 1):
    """(train, val) DALI loaders of this rank's share for the standard protocol, `batch_size` rows per
    rank: RandomResizedCrop (scale 0.08-1) + flip, drawn afresh every epoch in a fresh seeded order,
    no colour augmentation (MoCo main_lincls.py's transforms); the deterministic centre crop for
    val. `space`: CMC encoders see Lab / YDbDr views."""
    from dataclasses import replace

    from pipeline.loader import build_loader
    from pipeline.views import center, supervised
    keep_on_gpu = device == "gpu"
    train = build_loader(root, replace(supervised(size), colorspace=space), batch_size, device, rank=rank,
                         world_size=world, seed=seed, split=train_split, drop_last=drop_last,
                         num_threads=num_threads, keep_on_gpu=keep_on_gpu)
    val = build_loader(root, center(size, space), batch_size, device, rank=rank, world_size=world,
                       split=val_split, shuffle=False, num_threads=num_threads, initial_fill=1,
                       keep_on_gpu=keep_on_gpu)
    return train, val


def standard_linear_eval(backbone, loaders, num_classes: int, epochs: int, lr: float = STANDARD["lr"],
                         batch_norm: bool = False, device="cpu", log=say, rank: int = 0,
                         world: int = 1) -> tuple[torch.nn.Module, float, dict]:
    """Train a DDP `linear_head` on the frozen `backbone` with this rank's (train, val) `loaders` of
    `standard_loaders`; returns (the head, val top-1, the samples trained per epoch and scored, over
    all ranks)."""
    from runtime.evaluate import features_of
    train_loader, val_loader = loaders
    backbone.to(device).eval()  # frozen: no gradient, BatchNorm running statistics untouched
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    steps = int(reduced([len(train_loader)], world, device, "min")[0])
    head = linear_head(backbone.dim, num_classes, batch_norm).to(device)
    model = data_parallel(head, world, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=STANDARD["momentum"],
                                weight_decay=STANDARD["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    trained = 0
    for epoch in range(epochs):
        started, head_lr = time.perf_counter(), scheduler.get_last_lr()[0]
        model.train()
        loss_sum, correct, rows = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for batch in itertools.islice(train_loader.epoch(epoch), steps):
            with torch.no_grad():
                features = backbone(batch["views"][0].to(device)).float()
            labels = batch["label"].long().to(device)
            logits = model(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            rows += len(labels)
        scheduler.step()
        total_loss, total_correct, trained = reduced([float(loss_sum), float(correct), rows], world, device)
        if rank == 0:
            log(f"linear eval (standard): epoch {epoch + 1}/{epochs} lr {head_lr:.4g} loss {total_loss / trained:.4f} "
                f"train top-1 {total_correct / trained:.4f} (augmented views) {time.perf_counter() - started:.0f} s")
    val_x, val_y, _ = features_of(backbone, val_loader, device=device, normalize=False)
    top1, val_rows = val_top1(head, torch.from_numpy(val_x), torch.from_numpy(val_y), world, device)
    return head, top1, {"train_samples_per_epoch": int(trained), "val_samples": val_rows}


def linear_eval_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: every rank loads the run's checkpoint from the run folder
    (shared storage, as a resume reads it) and runs the protocols in turn on its share; rank 0 writes
    the results into RUN/linear_eval.json (another protocol's earlier result stays) and each head
    beside it. `loop_config["lr"]` None: each protocol's own."""
    import ray.train
    import ray.train.torch

    from runtime.runs import load_run
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir, protocols, epochs = Path(loop_config["run_dir"]), loop_config["protocols"], loop_config["epochs"]
    batch_size, head_bn = loop_config["batch_size"], loop_config["head_bn"]
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config, checkpoint, state, classes, method = load_run(run_dir)
    config.data.device = loop_config["loader_device"]  # GPU decoding only beside a GPU model
    config.data.loader_threads = loop_config["loader_threads"]
    d = config.data
    space = method.recipe_for(d.image_size).colorspace  # CMC encoders see Lab / YDbDr
    backbone = method.backbone.to(device)
    if rank == 0:
        say(f"linear eval ({' then '.join(protocols)}): {checkpoint} (step {state['step']}), {classes} classes, "
            f"{epochs} epochs, {world} worker(s) on {device}")
    fields, heads = {}, {}
    for protocol in protocols:
        started = time.perf_counter()
        torch.manual_seed(config.train.seed)  # the head's initial weights (DDP broadcasts rank 0's)
        lr = loop_config["lr"] if loop_config["lr"] is not None else (FAST if protocol == "fast" else STANDARD)["lr"]
        if protocol == "fast":
            heads[protocol], top1, counts = fast_probe(backbone, config, space, classes, epochs, lr, batch_size, rank,
                                                       world, device)
            fields.update(linear_top1=top1, checkpoint=str(checkpoint), step=state["step"], epochs=epochs,
                          num_classes=classes, fast={**FAST, "lr": lr, "batch_size": batch_size, "workers": world,
                                                     **counts})
        else:
            loaders = standard_loaders(d.root, d.train_split, d.val_split, d.image_size, space, batch_size // world,
                                       config.train.seed, drop_last=head_bn, device=d.device,
                                       num_threads=d.loader_threads, rank=rank, world=world)
            heads[protocol], top1, counts = standard_linear_eval(backbone, loaders, classes, epochs, lr, head_bn,
                                                                 device, rank=rank, world=world)
            fields["linear_top1_standard"] = top1
            fields["standard"] = {
                "checkpoint": str(checkpoint), "step": state["step"], "num_classes": classes,
                "protocol": "MoCo main_lincls.py with a cosine lr", "epochs": epochs, "lr": lr,
                "momentum": STANDARD["momentum"], "weight_decay": STANDARD["weight_decay"], "batch_size": batch_size,
                "schedule": "cosine", "head_batch_norm": head_bn,
                "train_views": "RandomResizedCrop(scale 0.08-1) + flip", "val_views": "centre crop",
                "image_size": d.image_size, "workers": world, **counts}
        fields[f"{protocol}_seconds"] = time.perf_counter() - started
    if rank != 0:
        return
    path = run_dir / RESULT_FILE
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update(fields)
    for protocol, head in heads.items():
        torch.save(head.cpu().state_dict(), run_dir / HEAD_FILE.format(protocol=protocol))
    path.write_text(json.dumps(result, indent=1))
