"""A run folder as the jobs read it back (jobs/linear_eval.py, jobs/export.py, benchmarks): its
newest checkpoint, its config and the method it builds with the checkpoint's weights."""
from __future__ import annotations

import json
from pathlib import Path


class RunError(ValueError):
    """A run folder that cannot be read back: the jobs print `error: <message>` and exit 2."""


def checkpoint_step(checkpoint: Path) -> int:
    """The training step of a checkpoint_*/model.pt: its meta.json (runtime.train.report), else the
    step saved in model.pt (a checkpoint folder holding model.pt alone)."""
    meta = checkpoint.parent / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["step"])
    import torch
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["step"])


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint_*/model.pt of the highest step (the newest file among equal steps): a copied
    or restored run folder does not keep the order of its files' times."""
    checkpoints = list(run_dir.glob("checkpoint_*/model.pt"))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint_*/model.pt under {run_dir} (is it a viewbank run folder?)")
    return max(checkpoints, key=lambda p: (checkpoint_step(p), p.stat().st_mtime))


def num_classes(config, model_state: dict) -> int | None:
    """The train split's classes from its manifest; else the supervised classifier's rows; else None."""
    from pipeline.manifest import Manifest, ManifestError
    try:
        manifest = Manifest(config.data.root, config.data.train_split)
    except ManifestError:
        classifier = model_state.get("classifier.weight")
        return None if classifier is None else int(classifier.shape[0])
    count = len(manifest.classes)
    manifest.close()
    return count


def load_run(run_dir: Path):
    """(config, checkpoint path, checkpoint dict, number of classes or None, the method with the
    checkpoint's weights)."""
    import torch

    from runtime.build import build_method
    from runtime.config import JobConfig
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} not found")
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} has no config.json (is it a viewbank run folder?)")
    config = JobConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    try:
        checkpoint = latest_checkpoint(run_dir)
    except FileNotFoundError as exc:
        raise RunError(str(exc)) from None
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    classes = num_classes(config, state["model"])
    method = build_method(config, classes)
    try:
        method.load_state_dict(state["model"])  # strict, as a resume loads it
    except RuntimeError as exc:
        detail = str(exc).splitlines()[-1].strip()[:200]  # the first missing / unexpected / mismatched keys
        raise RunError(f"{checkpoint} does not fit the method {run_dir / 'config.json'} builds: {detail}") from None
    return config, checkpoint, state, classes, method
