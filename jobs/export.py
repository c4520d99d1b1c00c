"""Weights out: a run's trained encoder as plain state_dicts (tensors only) that torchvision loads,
its projection head apart, and export.json saying what they are and how they were trained.

    python jobs/export.py runs/demo exports/demo
    python jobs/export.py runs/demo exports/demo --force    # OUT may hold an earlier export

OUT/backbone.pt     the online encoder (never MoCo's key or BYOL's target copy). A width-1 ResNet
                    with the standard stem loads into torchvision.models.resnetNN() with
                    strict=False, only fc.weight / fc.bias missing; set model.fc = Identity() for
                    the pooled features. Other encoders keep our naming and export.json says why
                    torchvision cannot hold them ("torchvision": null) and how to load them.
OUT/backbone_<channels>.pt   CMC: one encoder per channel group (backbone_l.pt, backbone_ab.pt for
                    Lab); torchvision's resnetNN holds each once its conv1 takes the group's channels.
OUT/head.pt         the projection head (BYOL's projector); predictor.pt (BYOL), head_<channels>.pt
                    (CMC), classifier.pt (supervised: torchvision's fc.weight / fc.bias).
OUT/export.json     method, encoder, input normalisation, training progress (step; epoch_index, 0-based,
                    of that step; epochs planned), kNN, the source checkpoint.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.runs import RunError, load_run  # noqa: E402

CHANNELS = {"lab": ("l", "a", "b"), "ydbdr": ("y", "db", "dr")}  # CMC's colour spaces, channel by channel


class ExportError(RunError):
    """A run that cannot be exported: the job prints `error: <message>` and exits 2."""


def channel_group_names(space: str, groups: tuple[int, ...]) -> list[str]:
    """CMC's channel groups by their channels: ("lab", (1, 2)) → ["l", "ab"]."""
    names, start = [], 0
    for size in groups:
        names.append("".join(CHANNELS[space][start:start + size]))
        start += size
    return names


def torchvision_fit(encoder: str, width: float, small_images: bool, in_channels: int) -> tuple[str | None, str | None]:
    """(torchvision constructor, note) for one exported encoder. The constructor is None where no
    torchvision model holds it and the note says why; otherwise the note says what to change first
    (conv1 of a channel group), or is None where `resnetNN()` loads it as it is."""
    if encoder == "alexnet":
        return None, ("CMC's small AlexNet (Table 10) has no torchvision counterpart "
                      "(torchvision's alexnet has other layers)")
    if width != 1:
        planes = "-".join(str(max(1, round(p * width))) for p in (64, 128, 256, 512))
        wide = f"; wide_{encoder}_2 widens only the bottleneck's 3x3" if encoder in ("resnet50", "resnet101") else ""
        return None, (f"width {width:g} scales every stage ({planes} planes; torchvision.models.{encoder}() has "
                      f"64-128-256-512{wide})")
    if small_images:
        return None, (f"model.small_images: conv1 is 3x3 stride 1 with no max-pool (torchvision.models.{encoder}()'s "
                      "stem is 7x7 stride 2 + max-pool); it loads after replacing model.conv1 and model.maxpool")
    if in_channels != 3:
        return encoder, "a channel group's encoder: replace model.conv1 with one of its in_channels first"
    return encoder, None


def torchvision_load(encoder: str, width: float, small_images: bool, in_channels: int, file: str) -> list[str] | None:
    """The Python lines that load `file` into torchvision (None where no torchvision model holds it)."""
    if encoder == "alexnet" or width != 1:
        return None
    lines = ["import torch, torchvision", f"model = torchvision.models.{encoder}()"]
    if small_images:
        lines += [f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, kernel_size=3, stride=1, padding=1, bias=False)",
                  "model.maxpool = torch.nn.Identity()"]
    elif in_channels != 3:
        lines.append(f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, kernel_size=7, stride=2, padding=3, "
                     "bias=False)")
    return lines + [f"model.load_state_dict(torch.load({file!r}, weights_only=True), strict=False)  # fc.* missing",
                    "model.fc = torch.nn.Identity()  # pooled features"]


def input_normalisation(space: str | None, size: int) -> dict:
    """What the encoder saw: the eval view (shorter side resized to `size`, centre crop), normalised
    as pipeline/views.py (RGB) or pipeline/colorspace.py (CMC) does."""
    if space is None:
        from pipeline.views import IMAGENET_MEAN, IMAGENET_STD
        return {"colorspace": "rgb", "size": size, "normalize": "(x - mean) / std, x = RGB in [0, 1]",
                "mean": [round(m / 255, 6) for m in IMAGENET_MEAN], "std": [round(s / 255, 6) for s in IMAGENET_STD]}
    from pipeline import colorspace
    mean, std = ((colorspace.LAB_MEAN, colorspace.LAB_STD) if space == "lab"
                 else (colorspace.YDBDR_MEAN, colorspace.YDBDR_STD))
    return {"colorspace": space, "size": size, "normalize": f"(x - mean) / std, x = {space} of RGB in [0, 1] "
            "(pipeline/colorspace.py; Lab as skimage.color.rgb2lab)", "mean": list(mean), "std": list(std)}


def online_modules(method) -> tuple[dict, dict]:
    """({file stem: backbone}, {file stem: head}) of the online network: InterCLR's base method's,
    CMC's one per channel group; key encoders and EMA targets are left out."""
    from models import CMC, InterCLR
    if isinstance(method, CMC):
        names = channel_group_names(method.recipe, method.backbone.groups)
        return ({f"backbone_{n}": e for n, e in zip(names, method.backbone.encoders)},
                {f"head_{n}": h for n, h in zip(names, method.heads)})
    inner = method.base if isinstance(method, InterCLR) else method
    heads = {stem: getattr(inner, attribute) for attribute, stem in
             (("head", "head"), ("projector", "head"), ("predictor", "predictor"), ("classifier", "classifier"))
             if hasattr(inner, attribute)}
    return {"backbone": method.backbone}, heads


def export(run_dir: Path, out_dir: Path, force: bool = False, log=print) -> dict:
    """Write OUT's state_dicts and export.json; returns export.json's content."""
    import torch
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not force)):
        raise ExportError(f"{out_dir} exists and is not an empty folder (choose another OUT, or pass --force "
                          "to write over the files of an earlier export)")
    config, checkpoint, state, classes, method = load_run(run_dir)
    m = config.model
    backbones, heads = online_modules(method)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for stem, encoder in backbones.items():
        file = f"{stem}.pt"
        channels = next(c for c in encoder.modules() if isinstance(c, torch.nn.Conv2d)).in_channels
        torch.save(encoder.state_dict(), out_dir / file)
        constructor, note = torchvision_fit(m.encoder, m.width, m.small_images, channels)
        entries.append({
            "file": file, "in_channels": channels, "dim": encoder.dim, "torchvision": constructor,
            "torchvision_note": note,
            "torchvision_load": torchvision_load(m.encoder, m.width, m.small_images, channels, file),
            "viewbank_load": ["import torch", "from models.encoders import build_encoder",
                              f"model = build_encoder({m.encoder!r}, width={m.width}, small_images={m.small_images}, "
                              f"in_channels={channels})",
                              f"model.load_state_dict(torch.load({file!r}, weights_only=True))"]})
        parameters = sum(p.numel() for p in encoder.parameters()) / 1e6
        log(f"wrote {out_dir / file} ({m.encoder} x{m.width:g}, {parameters:.1f}M parameters)")
        if constructor is None:
            log(f"note: {file} is not loadable into torchvision.models.{m.encoder}(): {note}")
        elif note:
            log(f"note: {file} loads into torchvision.models.{constructor}() after one change: {note}")
    for stem, head in heads.items():
        torch.save(head.state_dict(), out_dir / f"{stem}.pt")
        log(f"wrote {out_dir / stem}.pt")
    meta_path = checkpoint.parent / "meta.json"  # report(): the step's epoch, 0-based
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    metadata = {
        "method": config.method.name,
        "base": getattr(config.method, "base", None),
        "encoder": m.encoder, "width": m.width, "small_images": m.small_images,
        "image_size": config.data.image_size,
        "input": input_normalisation(method.recipe_for(config.data.image_size).colorspace, config.data.image_size),
        "step": state["step"],
        "epoch_index": json.loads(meta_path.read_text())["epoch"] if meta_path.is_file() else None,
        "epochs": config.train.epochs, "max_steps": config.train.max_steps,
        "data_root": config.data.root,
        "num_classes": classes,
        "knn": None if summary is None else {k: v for k, v in summary.items() if k.startswith("knn_")},
        "checkpoint": str(checkpoint.resolve()),
        "torchvision": entries[0]["torchvision"],  # every group of a split encoder has the same answer
        "torchvision_note": entries[0]["torchvision_note"],
        "backbones": entries,
        "heads": {stem: f"{stem}.pt" for stem in heads},
    }
    (out_dir / "export.json").write_text(json.dumps(metadata, indent=1))
    log(f"wrote {out_dir / 'export.json'} (checkpoint step {state['step']} of {run_dir})")
    return metadata


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (runs/<name>)")
    parser.add_argument("out", type=Path, help="the folder to create for the exported weights")
    parser.add_argument("--force", action="store_true", help="write into OUT even if it holds files")
    args = parser.parse_args(argv)
    try:
        export(args.run, args.out, args.force)
    except RunError as exc:  # ExportError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
