"""Linear evaluation of a run: a linear classifier on its frozen backbone, val top-1.

The result goes to <run>/linear_eval.json. Two protocols:

fast (the default; "linear_top1"): the pooled, L2-normalised features of the `center` view are
    extracted once and cached, and the classifier trains on them in seconds (SGD, momentum 0.9,
    lr 0.1, cosine, no augmentation). A quick probe for comparing runs of this project
    (benchmarks/fidelity.py), not a number to set beside a paper's.
standard (`--protocol standard`; "linear_top1_standard"): MoCo's linear classification protocol
    (facebookresearch/moco main_lincls.py): a linear layer, N(0, 0.01) weights and zero bias, on
    the raw pooled features of the frozen backbone (eval mode: BatchNorm statistics untouched, no
    gradient), trained on fresh RandomResizedCrop (scale 0.08-1) + flip views every epoch
    (pipeline.views.supervised), SGD momentum 0.9, lr 30, weight decay 0, batch 256, 100 epochs;
    top-1 on the centre crop of val (pipeline.views.center: shorter side to the image size, then
    the crop; MoCo resizes to 256 and crops 224). One change: the lr follows a cosine over the
    epochs (torch.optim.lr_scheduler.CosineAnnealingLR, as MoCo v3's main_lincls.py) instead of
    MoCo's x0.1 steps at epochs 60 and 80. `--head-bn` puts a BatchNorm1d without affine
    parameters before the linear layer (MAE's linear probe), which takes out the features' scale
    (it differs between methods, and lr 30 is tuned for MoCo's); off by default, as in MoCo.

    python jobs/linear_eval.py runs/demo --epochs 100
    python jobs/linear_eval.py runs/demo --protocol standard          # 100 epochs, lr 30

RUN is the run folder runs/<name> (config.json and Ray Train's checkpoint_*/model.pt), which is
also Ray's `Result.path` (RunConfig(storage_path, name)). The checkpoint of the highest step is
evaluated; the classes are those of the train split's manifest; the checkpoint is loaded strictly
into the method its config builds.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULT_FILE = "linear_eval.json"
FAST = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
STANDARD = {"lr": 30.0, "momentum": 0.9, "weight_decay": 0.0}  # MoCo main_lincls.py


def say(message: str) -> None:
    print(message, flush=True)


def standard_loaders(root, train_split: str, val_split: str, size: int, space: str | None, batch_size: int,
                     seed: int = 0, drop_last: bool = False, device: str = "cpu", num_threads: int = 2):
    """(train, val) DALI loaders of the standard protocol: RandomResizedCrop (scale 0.08-1) + flip,
    drawn afresh every epoch, no colour augmentation (MoCo main_lincls.py's transforms); the
    deterministic centre crop for val. `space`: CMC encoders see Lab / YDbDr views."""
    from dataclasses import replace

    from pipeline.loader import build_loader
    from pipeline.views import center, supervised
    keep_on_gpu = device == "gpu"
    train = build_loader(root, replace(supervised(size), colorspace=space), batch_size, device, seed=seed,
                         split=train_split, drop_last=drop_last, num_threads=num_threads, keep_on_gpu=keep_on_gpu)
    val = build_loader(root, center(size, space), batch_size, device, split=val_split, shuffle=False,
                       num_threads=num_threads, initial_fill=1, keep_on_gpu=keep_on_gpu)
    return train, val


def linear_head(dim: int, num_classes: int, batch_norm: bool = False):
    """MoCo's classifier: Linear with weights N(0, 0.01) and zero bias; `batch_norm`: after a
    BatchNorm1d without affine parameters (MAE's linear probe)."""
    import torch
    linear = torch.nn.Linear(dim, num_classes)
    torch.nn.init.normal_(linear.weight, std=0.01)
    torch.nn.init.zeros_(linear.bias)
    if not batch_norm:
        return linear
    return torch.nn.Sequential(torch.nn.BatchNorm1d(dim, affine=False), linear)


def standard_linear_eval(backbone, loaders, num_classes: int, epochs: int, lr: float = STANDARD["lr"],
                         batch_norm: bool = False, device="cpu", log=say):
    """Train a `linear_head` on the frozen `backbone` with the (train, val) `loaders` of
    `standard_loaders`; returns (the head, val top-1)."""
    import torch
    import torch.nn.functional as F

    from runtime.evaluate import features_of
    train_loader, val_loader = loaders
    backbone.to(device).eval()  # frozen: no gradient, BatchNorm running statistics untouched
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    head = linear_head(backbone.dim, num_classes, batch_norm).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=STANDARD["momentum"],
                                weight_decay=STANDARD["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for epoch in range(epochs):
        started, head_lr = time.perf_counter(), scheduler.get_last_lr()[0]
        head.train()
        loss_sum = correct = seen = 0
        for batch in train_loader:
            with torch.no_grad():
                features = backbone(batch["views"][0].to(device)).float()
            labels = batch["label"].long().to(device)
            logits = head(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        scheduler.step()
        log(f"linear eval (standard): epoch {epoch + 1}/{epochs} lr {head_lr:.4g} loss {loss_sum / seen:.4f} "
            f"train top-1 {correct / seen:.4f} (augmented views) {time.perf_counter() - started:.0f} s")
    val_x, val_y, _ = features_of(backbone, val_loader, device=device, normalize=False)
    head.eval()
    with torch.no_grad():
        predicted = head(torch.from_numpy(val_x).to(device)).argmax(1).cpu()
    return head, float((predicted == torch.from_numpy(val_y).long()).float().mean())


def fast_probe(backbone, config, space: str | None, num_classes: int, epochs: int, lr: float, batch_size: int,
               device="cpu", log=say) -> float:
    """The cached-feature probe: L2-normalised centre-crop features of both splits, extracted once;
    a linear classifier on them, SGD momentum 0.9, cosine lr. Returns val top-1."""
    import torch
    import torch.nn.functional as F

    from runtime.evaluate import extract_features
    d = config.data
    train_x, train_y, _ = extract_features(backbone, d.root, d.train_split, d.image_size, space, device=device)
    val_x, val_y, _ = extract_features(backbone, d.root, d.val_split, d.image_size, space, device=device)
    train_x, val_x = torch.from_numpy(train_x), torch.from_numpy(val_x)
    train_y, val_y = torch.from_numpy(train_y).long(), torch.from_numpy(val_y).long()
    classifier = torch.nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=FAST["momentum"],
                                weight_decay=FAST["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(0)
    every = max(1, epochs // 10)  # an epoch takes milliseconds: ten lines at most
    for epoch in range(epochs):
        loss_sum = 0.0
        for batch in torch.randperm(len(train_x), generator=generator).split(batch_size):
            loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(batch)
        scheduler.step()
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            log(f"linear eval (fast): epoch {epoch + 1}/{epochs} loss {loss_sum / len(train_x):.4f}")
    with torch.no_grad():
        return float((classifier(val_x).argmax(1) == val_y).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (runs/<name>), also Ray's Result.path")
    parser.add_argument("--protocol", choices=("fast", "standard"), default="fast",
                        help="fast: cached centre-crop features (default); standard: MoCo's linear evaluation")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, help=f"default: fast {FAST['lr']}, standard {STANDARD['lr']}")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--head-bn", action="store_true",
                        help="standard: a BatchNorm1d without affine parameters before the linear layer")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--loader-threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="standard: DALI threads per loader")
    args = parser.parse_args(argv)
    import torch

    from runtime.runs import RunError, load_run
    from runtime.config import ConfigError
    from runtime.driver import check_inputs
    try:
        config, checkpoint, state, _, method = load_run(args.run)
        _, _, classes = check_inputs(config)  # the data is there; the classes of its manifest
    except (RunError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    space = method.recipe_for(config.data.image_size).colorspace  # CMC encoders see Lab / YDbDr
    d = config.data
    print(f"linear eval ({args.protocol}): {checkpoint} (step {state['step']}), {len(classes)} classes, "
          f"{args.epochs} epochs on {device}", flush=True)
    path = args.run / RESULT_FILE
    result = json.loads(path.read_text()) if path.is_file() else {}  # the other protocol's result stays
    if args.protocol == "fast":
        lr = FAST["lr"] if args.lr is None else args.lr
        top1 = fast_probe(method.backbone.to(device), config, space, len(classes), args.epochs, lr, args.batch_size,
                          device)
        result.update(linear_top1=top1, checkpoint=str(checkpoint), step=state["step"], epochs=args.epochs,
                      num_classes=len(classes), fast={**FAST, "lr": lr, "batch_size": args.batch_size})
    else:
        lr = STANDARD["lr"] if args.lr is None else args.lr
        loader_device = d.device if device.type == "cuda" else "cpu"  # GPU decoding only with a GPU model
        loaders = standard_loaders(d.root, d.train_split, d.val_split, d.image_size, space, args.batch_size,
                                   config.train.seed, drop_last=args.head_bn, device=loader_device,
                                   num_threads=args.loader_threads)
        torch.manual_seed(config.train.seed)  # the head's initial weights
        _, top1 = standard_linear_eval(method.backbone, loaders, len(classes), args.epochs, lr, args.head_bn, device)
        settings = {"protocol": "MoCo main_lincls.py with a cosine lr", "epochs": args.epochs, "lr": lr,
                    "momentum": STANDARD["momentum"], "weight_decay": STANDARD["weight_decay"],
                    "batch_size": args.batch_size, "schedule": "cosine", "head_batch_norm": args.head_bn,
                    "train_views": "RandomResizedCrop(scale 0.08-1) + flip", "val_views": "centre crop",
                    "image_size": d.image_size}
        result.update(linear_top1_standard=top1, standard={
            "checkpoint": str(checkpoint), "step": state["step"], "num_classes": len(classes), **settings})
    path.write_text(json.dumps(result, indent=1))
    print(f"linear top-1 ({args.protocol}): {top1:.4f} (checkpoint step {state['step']}); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
