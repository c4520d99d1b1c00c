"""Learning curves through the real job: how far each encoder / method / multi-crop setting gets on
Fashion-MNIST in at most an hour of these CPUs, against random init and raw pixels.

Every cell is `configs/<method>/fashion_mnist.yaml` plus a few `--set`s, trained by
`runtime.driver.run` (Ray Train, DALI loader actors, Ray bank actors for InterCLR) on the full 60k
train split, with the online kNN monitor (`eval.monitor_every`) reading the whole 60k as its memory
and the 10k test set as val; the job's own end-of-run evaluation gives the trained, random-init and
mean-centred-pixel kNN top-1 on the same memory and val.

    python benchmarks/learning.py --dry-run                  # the grid, epochs and estimated wall time
    python benchmarks/learning.py --only moco-small28-w0.25  # one cell (or several, comma-separated)
    python benchmarks/learning.py                            # every runnable cell not cached yet
    python benchmarks/learning.py --report                   # learning.json + learning_curves.png only

Each finished cell is cached as OUT/cells/<name>.json (OUT: benchmarks/results/learning); a rerun skips
it. A cell killed mid-run resumes from its Ray Train checkpoint (run folders: runs/learning/<name>).
OUT/learning.json collects the cached cells, OUT/learning_curves.png draws them (kNN against images
seen and against wall minutes, with each encoder's random-init and pixel lines).

A cell's epochs are chosen so that its estimated wall time stays within `--budget-minutes` (60): the
cost model is the encoder's measured forward+backward rate on these cores (ENCODERS) divided
by the method's forward-equivalents per image (METHOD_UNITS), capped by the loader's rate; the wall
time a cell actually took is what the JSON reports.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.fidelity import FASHION_MNIST_DIR, require_fashion_mnist, write_json_atomic  # noqa: E402

DATA_DIR = REPO / "data" / "learning" / "fashion-mnist"  # the full 60k / 10k conversion; gitignored
OUT = REPO / "benchmarks" / "results" / "learning"
RUNS = REPO / "runs" / "learning"
TRAIN_IMAGES = 60_000

# name → (overrides, forward+backward images/s of the backbone alone: batch 128, 2 torch threads, SGD,
# measured on this 2-core x86_64 machine on 2026-12-07)
ENCODERS = {
    "std28": ({"model.small_images": False, "model.width": 0.5, "data.image_size": 28}, 2350.0),
    "small28-w0.5": ({"model.small_images": True, "model.width": 0.5, "data.image_size": 28}, 216.0),
    "small28-w0.25": ({"model.small_images": True, "model.width": 0.25, "data.image_size": 28}, 710.0),
    "std56": ({"model.small_images": False, "model.width": 0.5, "data.image_size": 56}, 630.0),
}
# forward+backward equivalents per image (a forward alone is 1/3): MoCo query fwd+bwd + key fwd;
# SimCLR both views fwd+bwd; BYOL both views online fwd+bwd + target fwd; InterCLR-MoCo as MoCo with
# the bank queries, measured on the demo as 580 / 330 of MoCo's time
METHOD_UNITS = {"moco": 1 + 1 / 3, "simclr": 2.0, "byol": 2 + 2 / 3, "interclr": (1 + 1 / 3) * 580 / 330}
METHODS = {"moco": {}, "simclr": {}, "byol": {}, "interclr": {"method.base": "moco"}}
LOADER_RATE = 600.0  # images/s of one 0.5-CPU DALI loader actor at 28 px (the demo's measured rate)
EFFICIENCY = 0.6  # measured demo rate / the cost model's: optimizer, loss, host work, monitor, logging
STARTUP_SECONDS = 90.0  # Ray, actors, first batches
# forward+backward equivalents of the evaluations: each monitor one forward over 70k images, the
# end-of-run evaluation two (trained and random init)
MONITORS = 4  # monitor points per cell
EVAL_UNITS = (MONITORS + 2) * 70_000 / 3
MAX_EPOCHS = 40
LOCAL_CROPS = 4  # the multi-crop cells' local views, each costing (local_size / image_size)^2 of a global one


@dataclass(frozen=True)
class Cell:
    method: str
    encoder: str
    local_crops: int = 0

    @property
    def name(self) -> str:
        return f"{self.method}-{self.encoder}" + (f"-mc{self.local_crops}" if self.local_crops else "")

    @property
    def image_size(self) -> int:
        return ENCODERS[self.encoder][0]["data.image_size"]


def images_per_second(cell: Cell) -> float:
    _, rate = ENCODERS[cell.encoder]
    units = METHOD_UNITS[cell.method]
    if cell.local_crops:  # each local view: one query fwd+bwd at (local/global)^2 of the cost
        units += cell.local_crops * (local_size(cell) / cell.image_size) ** 2
    return min(LOADER_RATE, EFFICIENCY * rate / units)


def local_size(cell: Cell) -> int:
    return max(8, round(cell.image_size * 16 / 28))  # 16 px locals at 28 px (SwAV: 96 of 224, ×0.43)


def fixed_seconds(cell: Cell) -> float:
    """What a cell costs besides its epochs: start-up, the monitor points, the final evaluation."""
    return STARTUP_SECONDS + EVAL_UNITS / ENCODERS[cell.encoder][1]


def epochs_for(cell: Cell, budget_minutes: float) -> int:
    epochs = (budget_minutes * 60 - fixed_seconds(cell)) * images_per_second(cell) / TRAIN_IMAGES
    return max(1, min(MAX_EPOCHS, math.floor(epochs)))


def estimate_seconds(cell: Cell, epochs: int) -> float:
    return fixed_seconds(cell) + epochs * TRAIN_IMAGES / images_per_second(cell)


def grid() -> list[Cell]:
    """Most promising first (the order a partial session runs them in)."""
    cells = []
    for encoder in ("small28-w0.25", "std56", "std28", "small28-w0.5"):
        for method in ("moco", "simclr", "byol", "interclr"):
            for local_crops in (0, LOCAL_CROPS):
                cells.append(Cell(method, encoder, local_crops))
    return cells


def overrides_for(cell: Cell, budget_minutes: float) -> dict:
    epochs = epochs_for(cell, budget_minutes)
    out = {"name": f"learning-{cell.name}", "storage": str(RUNS), "data.root": str(DATA_DIR),
           **ENCODERS[cell.encoder][0], **METHODS[cell.method], "train.epochs": epochs,
           "eval.monitor_every": max(1, epochs // MONITORS), "eval.monitor_samples": None,
           "eval.knn_train_samples": None}
    if cell.local_crops:
        out.update({"data.local_crops": cell.local_crops, "data.local_size": local_size(cell)})
    return out


def build_config(cell: Cell, overrides: dict):
    from runtime.config import parse_args
    argv = ["--config", str(REPO / "configs" / cell.method / "fashion_mnist.yaml")]
    for key, value in overrides.items():
        text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        argv += ["--set", f"{key}={text}"]
    config, _ = parse_args(argv, method=cell.method, default_preset="demo")
    return config


def prepare_data(log) -> None:
    from pipeline.convert import convert
    require_fashion_mnist()
    for split in ("train", "val"):
        if not (DATA_DIR / f"{split}.json").exists():
            log(f"learning: converting {split} to {DATA_DIR}")
            convert("fashion-mnist", FASHION_MNIST_DIR, DATA_DIR, split, shard_size=4_000_000,
                    resume=(DATA_DIR / ".convert" / f"{split}-plan.json").exists(), workers=os.cpu_count(), log=log)


def cell_path(cell: Cell) -> Path:
    return OUT / "cells" / f"{cell.name}.json"


def curve(run_dir: Path, batch: int, started: float) -> list[dict]:
    """The monitor's points from metrics.jsonl: images seen, kNN, wall minutes since `started`."""
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "knn_top1_monitor" in record:
            points.append({"images_seen": record["step"] * batch, "knn": record["knn_top1_monitor"],
                           "wall_minutes": (record["time"] - started) / 60 if "time" in record else None})
    return points


def run_cell(cell: Cell, overrides: dict) -> dict:
    from runtime.driver import run
    config = build_config(cell, overrides)
    run_dir = RUNS / config.name
    started_file = run_dir / "learning-started"
    run_dir.mkdir(parents=True, exist_ok=True)
    if not started_file.exists():  # a resumed cell keeps its first start: the wall time it cost in all
        started_file.write_text(str(time.time()))
    started = float(started_file.read_text())
    summary = run(config)
    wall = (time.time() - started) / 60
    batch = config.data.batch_size * config.train.num_workers
    points = curve(run_dir, batch, started)
    images_seen = summary["steps"] * batch
    points.append({"images_seen": images_seen, "knn": summary["knn_top1"], "wall_minutes": wall})
    return {"name": cell.name, "method": cell.method, "encoder": cell.encoder, "image_size": cell.image_size,
            "local_crops": cell.local_crops, "epochs": config.train.epochs, "images_seen": images_seen,
            "wall_minutes": wall, "memory": TRAIN_IMAGES, "knn_trained": summary["knn_top1"],
            "knn_random": summary["knn_top1_random_init"], "knn_pixels": summary.get("knn_top1_pixels"),
            "img_per_s": summary.get("img_per_s"), "overrides": overrides,
            "curve": [[p["images_seen"], p["knn"]] for p in points],
            "curve_wall": [[p["wall_minutes"], p["knn"]] for p in points],
            "machine": "2-core x86_64 CPU, no GPU", "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def report(log) -> dict:
    cells = [json.loads(p.read_text()) for p in sorted((OUT / "cells").glob("*.json"))]
    payload = {"cells": cells, "target": "knn_trained > knn_pixels (0.861 at 28 px) and >= knn_random + 0.10"}
    write_json_atomic(OUT / "learning.json", payload)
    if cells:
        draw(cells, OUT / "learning_curves.png")
    for c in cells:
        log(f"{c['name']}: trained {c['knn_trained']:.3f} | random {c['knn_random']:.3f} | pixels "
            f"{c['knn_pixels']:.3f} | {c['epochs']} epochs, {c['wall_minutes']:.0f} min")
    return payload


def draw(cells: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(cells):
        colour = colours[i % len(colours)]
        for ax, key, scale in ((axes[0], "curve", 1e6), (axes[1], "curve_wall", 1.0)):
            xs = [x / scale for x, _ in c[key] if x is not None]
            ys = [y for x, y in c[key] if x is not None]
            ax.plot(xs, ys, "o-", color=colour, label=c["name"])
            ax.axhline(c["knn_random"], color=colour, ls=":", lw=1)
            if c.get("knn_pixels") is not None:
                ax.axhline(c["knn_pixels"], color=colour, ls="--", lw=1)
    axes[0].set_xlabel("images seen (millions)")
    axes[1].set_xlabel("wall minutes (2-core CPU)")
    axes[0].set_ylabel("weighted kNN top-1 (60k memory, 10k test)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Fashion-MNIST: trained (solid), random init (dotted), mean-centred pixels (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the grid and its estimate, run nothing")
    parser.add_argument("--report", action="store_true", help="write learning.json and the figure from the cache")
    parser.add_argument("--only", help="comma-separated cell names (see --dry-run)")
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="wall budget per cell (default 60)")
    return parser.parse_args(argv)


def main(argv=None, log=lambda text: print(text, flush=True)) -> int:
    args = parse_args(argv)
    if args.report:
        report(log)
        return 0
    cells = grid()
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = sorted(set(names) - {c.name for c in cells})
        if unknown:
            print(f"error: unknown cell {unknown[0]!r} (see --dry-run for the names)", file=sys.stderr)
            return 2
        cells = [c for c in cells if c.name in names]
    todo, total = [], 0.0
    for cell in cells:
        epochs = epochs_for(cell, args.budget_minutes)
        status = "cached" if cell_path(cell).exists() else "run"
        seconds = estimate_seconds(cell, epochs)
        if status == "run":
            todo.append(cell)
            total += seconds
        log(f"{cell.name:28s} {epochs:3d} epochs  ~{seconds / 60:4.0f} min  {status}")
    log(f"learning: {len(todo)} cells to run, estimated {total / 3600:.1f} h on this 2-core CPU")
    if args.dry_run:
        return 0
    prepare_data(log)
    for i, cell in enumerate(todo, 1):
        log(f"learning: cell {i}/{len(todo)} {cell.name}")
        record = run_cell(cell, overrides_for(cell, args.budget_minutes))
        write_json_atomic(cell_path(cell), record)
        report(log)
    report(log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
