"""Linear evaluation of a pretrained run: frozen backbone, a linear classifier on its pooled
features of the `center` view (features are extracted once and cached, so the probe trains in
seconds), top-1 on the val split. Writes <run>/linear_eval.json.

    python jobs/linear_eval.py runs/demo --epochs 100
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def latest_checkpoint(run_dir: Path) -> Path:
    checkpoints = sorted(run_dir.glob("checkpoint_*/model.pt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint_*/model.pt under {run_dir} (is it a viewbank run folder?)")
    return checkpoints[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (runs/<name>)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from runtime.build import build_method
    from runtime.config import JobConfig
    from runtime.evaluate import extract_features
    try:
        config = JobConfig.from_dict(json.loads((args.run / "config.json").read_text()))
        checkpoint = latest_checkpoint(args.run)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    method = build_method(config, num_classes=1000)
    method.load_state_dict(state["model"], strict=False)
    space = method.recipe_for(config.data.image_size).colorspace  # CMC encoders see Lab / YDbDr
    d = config.data
    train_x, train_y, _ = extract_features(method.backbone, d.root, d.train_split, d.image_size, space)
    val_x, val_y, _ = extract_features(method.backbone, d.root, d.val_split, d.image_size, space)
    train_x, val_x = torch.from_numpy(train_x), torch.from_numpy(val_x)
    train_y, val_y = torch.from_numpy(train_y).long(), torch.from_numpy(val_y).long()
    classes = int(max(train_y.max(), val_y.max())) + 1
    classifier = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.epochs):
        for batch in torch.randperm(len(train_x), generator=generator).split(args.batch_size):
            loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    with torch.no_grad():
        top1 = float((classifier(val_x).argmax(1) == val_y).float().mean())
    result = {"linear_top1": top1, "checkpoint": str(checkpoint), "step": state["step"], "epochs": args.epochs}
    (args.run / "linear_eval.json").write_text(json.dumps(result, indent=1))
    print(f"linear top-1: {top1:.4f} ({len(val_y)} val images, checkpoint step {state['step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
