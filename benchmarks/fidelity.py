"""The papers' claims, reproduced on Fashion-MNIST through the product (issue 16): every cell is a
`demo`-preset JobConfig with a few overrides, run by `runtime.driver.run` (Ray bank actors, DALI
loader actors, Ray Train), then a linear probe on frozen features (`jobs/linear_eval.py`) on the
full 60k train / 10k test split. Writes OUT/fidelity.json and OUT/fidelity.md.

    python benchmarks/fidelity.py --dry-run                 # the cells and the budget estimate
    python benchmarks/fidelity.py --quick                   # one seed, 2 epochs of 5k images, ≤ 30 min
    python benchmarks/fidelity.py                           # 2 seeds, 8 epochs of 9k images, ≤ 4 h
    python benchmarks/fidelity.py --only negative_sampling --seeds 3
    python benchmarks/fidelity.py --report                  # the table from the cells cached so far

Each finished cell is cached as OUT/cells/<claim>/<config>/seed<k>.json; a rerun skips cached
cells, so a killed study resumes (a cell killed mid-training resumes from its Ray Train
checkpoint: run folders are RUNS/<name>, RUNS = runs/<OUT's folder name>). Cells whose training
overrides are identical (e.g. CL on the regular set in two claims) run once.

The "holds" rule (`compare`): on the claim's metric, `a > b` holds when mean(a) - mean(b) exceeds
max(sd(a), sd(b)), the sample standard deviations over seeds; `a >= b` holds unless mean(b) -
mean(a) exceeds that spread. A difference `a - b` is taken per seed (paired), then compared the
same way. With fewer than two seeds a comparison is not decidable (null). A claim holds when every
comparison holds, fails when any fails, and is null otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
DATA_DIR = Path("data/fidelity")  # relative to the repository root (the study runs there); gitignored
PROBE_SET = "probe"  # the full 60k train / 10k test split every linear probe uses
FASHION_MNIST_PER_CLASS = 6000


@dataclass(frozen=True)
class Budget:
    train_images: int  # per training set (regular and both imbalanced sets: same size, same steps)
    epochs: int
    seeds: int
    quick: bool


BUDGETS = {
    "quick": Budget(train_images=5000, epochs=2, seeds=1, quick=True),
    "full": Budget(train_images=9000, epochs=8, seeds=2, quick=False),
}

# --- time model (2 cores, demo preset: 28 px, ResNet-18 x0.5, batch 256) ----------------------------
# Measured by the lead: InterCLR-MoCo and MoCo-v2 training rates, and ~60 s of start-up and driver
# evaluation per job. The rest is derived, in forward-equivalents per image (forward 1, backward 2):
# MoCo-v2 costs 4 (query forward + backward, key forward); the bank branch costs what InterCLR-MoCo
# adds to MoCo-v2. The ETA printed during a run rescales these by the cells measured so far.
MEASURED_RATES = {"interclr-moco": 330.0, "moco": 580.0}
UNIT_SECONDS = 1 / (580.0 * 4)
BANK_BRANCH_SECONDS = 1 / 330.0 - 1 / 580.0
STARTUP_EVAL_SECONDS = 60.0
PROBE_SECONDS = 35.0  # estimate: 70k centre views through the frozen encoder + 100 probe epochs
CONVERT_IMAGES_PER_SECOND = 2500.0


@dataclass(frozen=True)
class Arm:
    """One configuration of a claim: dotted overrides on top of the demo preset."""
    key: str
    overrides: dict
    dataset: str = "regular"  # regular | linear | exponential (pipeline.convert --imbalance)
    needs: str | None = None  # the product change this arm waits for; it is not run until then
    quick: bool = True  # part of --quick


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    source: str
    paper: dict
    arms: tuple[Arm, ...]
    comparisons: tuple[str, ...]  # "a > b", "a >= b", "a - b > c - d" over arm keys
    metric: str = "linear"  # the number a comparison reads: linear | knn | val_top1
    note: str = ""


MOCO_INTERCLR = {"method.name": "interclr", "method.base": "moco"}
# 003 Sect. 5.3.1: the label-maintenance study uses random negatives and a zero margin, the sampling study
# online labels and a zero margin
OBSERVATION_PROTOCOL = {**MOCO_INTERCLR, "method.inter_margin": 0.0}
# 004 App. C.1: one optimiser for every objective (SGD, momentum 0.9, lr 0.12 per 256, linearly scaled);
# the demo's weight decay is kept for all
CACR_OPTIMIZER = {"train.optimizer": "sgd", "train.lr": 0.12, "train.momentum": 0.9, "train.lr_warmup_epochs": 0,
                  "train.exclude_bias_and_norm": False}
CL = {"method.name": "simclr", "method.temperature": 0.19, **CACR_OPTIMIZER}  # App. C.1: CL's τ 0.19
# mini-batch form (no queue: the demo's queue_size would select Algorithm 3); K = 4 divides the batch by 4
CACR_K1 = {"method.name": "cacr", "method.positives": 1, "method.queue_size": 0, **CACR_OPTIMIZER}
CACR_K4 = {"method.name": "cacr", "method.positives": 4, "method.queue_size": 0, "data.batch_size": 64,
           **CACR_OPTIMIZER}

CLAIMS: tuple[Claim, ...] = (
    Claim(
        id="interclr_vs_base",
        claim="InterCLR-MoCo beats MoCo-v2; InterCLR-NPID beats NPIDv2",
        source="003_*.txt Table 1",
        paper={"metric": "ImageNet linear top-1 % (VOC07 SVM mAP in brackets), R50, 200 epochs",
               "moco": "67.5 (84.2)", "interclr_moco": "68.0 (85.3)",
               "npid": "64.6 (81.7)", "interclr_npid": "65.7 (82.8)"},
        arms=(Arm("interclr_moco", dict(MOCO_INTERCLR)),
              Arm("moco", {"method.name": "moco"}),
              Arm("interclr_npid", {"method.name": "interclr", "method.base": "npid"}, quick=False),
              Arm("npid", {"method.name": "npid"}, quick=False)),
        comparisons=("interclr_moco > moco", "interclr_npid > npid"),
        note="The demo's InterCLR settings (semi-hard, m = -0.5, λ 0.75, 100 clusters, one intra-only warm-up "
             "epoch); each base keeps its paper optimiser. --quick runs the MoCo pair only."),
    Claim(
        id="online_vs_offline",
        claim="online pseudo-labels beat offline ones (k-means rerun each epoch, labels fixed in between)",
        source="003_*.txt Observation 1, Fig. 6(a); cost in Table 4",
        paper={"metric": "VOC07 SVM mAP over training (curves; no numbers in the text)",
               "finding": "online above offline throughout training",
               "time_per_200_epochs": "online 5 days, offline 6.4 days, intra only 2.6 days (8 V100)"},
        arms=(Arm("online", {**OBSERVATION_PROTOCOL, "method.strategy": "random"}),
              Arm("offline", {**OBSERVATION_PROTOCOL, "method.strategy": "random", "bank.labels": "offline"})),
        comparisons=("online > offline",),
        note="The paper's protocol for this study: random inter negatives, zero margin. Offline: bank.labels=offline "
             "(global k-means at the start of every epoch after the warm-up, labels and centroids fixed in "
             "between, no upkeep)."),
    Claim(
        id="negative_sampling",
        claim="semi-hard >= random > hard inter negatives; semi-easy reported too",
        source="003_*.txt Observation 2, Fig. 6(b)",
        paper={"metric": "VOC07 SVM mAP over training (curves; no numbers in the text)",
               "finding": "semi-hard best; hard below random"},
        arms=(Arm("semi_hard", {**OBSERVATION_PROTOCOL, "method.strategy": "semi_hard"}),
              Arm("random", {**OBSERVATION_PROTOCOL, "method.strategy": "random"}),
              Arm("hard", {**OBSERVATION_PROTOCOL, "method.strategy": "hard"}),
              Arm("semi_easy", {**OBSERVATION_PROTOCOL, "method.strategy": "semi_easy"}, quick=False)),
        comparisons=("semi_hard >= random", "random > hard"),
        note="The paper's protocol for this study: online labels, zero margin. The paper's prototype is "
             "NPIDv2-InterCLR; we use the demo's MoCo base, the one that beats random init at this budget "
             "(README demo sweep: InterCLR-NPID 0.690 vs random init 0.762)."),
    Claim(
        id="cacr_vs_cl",
        claim="CACR (K = 4 positives) beats multi-view CL (K = 4) and SimCLR (K = 1); AU-CL and HN-CL reported",
        source="004_*.txt Table 2",
        paper={"metric": "CIFAR-10 linear top-1 % (CIFAR-100 in brackets), AlexNet, 200 epochs",
               "cl": "83.47 (55.41)", "au_cl": "83.49 (55.31)", "hn_cl": "83.67 (55.87)",
               "cacr_k1": "83.73 (56.52)", "multiview_cl_k4": "85.54 (58.64)", "cacr_k4": "86.54 (59.41)"},
        arms=(Arm("cl", dict(CL)),
              Arm("cacr_k4", dict(CACR_K4)),
              Arm("multiview_cl_k4", {**CL, "method.loss": "cmc", "method.positives": 4, "method.temperature": 0.07,
                                      "data.batch_size": 64}),
              Arm("cacr_k1", dict(CACR_K1), quick=False),
              Arm("au_cl", {**CL, "method.loss": "align_uniform"}, quick=False),
              Arm("hn_cl", {**CL, "method.loss": "hard_negative", "method.temperature": 0.5},
                  quick=False)),
        comparisons=("cacr_k4 > cl", "cacr_k4 > multiview_cl_k4"),
        note="App. C.1's protocol: one optimiser for all (SGD, lr 0.12 per 256), CL's τ 0.19, CACR t+ 1.0 / t- 2.0 "
             "(the model's defaults; C.1 uses t- 0.9 for K = 4 on CIFAR-10), the K = 4 batch divided by 4 (64), "
             "CACR's mini-batch form (no queue)."),
    Claim(
        id="cacr_imbalance",
        claim="on label-imbalanced subsets (linear and exponential rules) CACR's margin over CL grows",
        source="004_*.txt Table 2, label-imbalanced columns (Sect. 5.1)",
        paper={"metric": "CIFAR-10 linear top-1 %, CL / CACR (K = 4) / margin (CIFAR-100 margin in brackets)",
               "regular": "83.47 / 86.54 / 3.07 (4.00)", "linear": "79.88 / 83.62 / 3.74 (4.62)",
               "exponential": "71.74 / 75.89 / 4.15 (6.88)"},
        arms=(Arm("cl_regular", dict(CL)),
              Arm("cacr_k4_regular", dict(CACR_K4)),
              Arm("cl_linear", dict(CL), dataset="linear"),
              Arm("cacr_k4_linear", dict(CACR_K4), dataset="linear"),
              Arm("cl_exponential", dict(CL), dataset="exponential"),
              Arm("cacr_k4_exponential", dict(CACR_K4), dataset="exponential")),
        comparisons=("cacr_k4_linear - cl_linear > cacr_k4_regular - cl_regular",
                     "cacr_k4_exponential - cl_exponential > cacr_k4_regular - cl_regular"),
        note="pipeline.convert --imbalance (class c keeps (c+1)/10, or exp(c+1-10)) then --limit, so the three "
             "sets have the same size and every cell the same steps (the paper's imbalanced sets are smaller "
             "than the regular one); the probe trains on the balanced 60k set, as the paper evaluates on the "
             "standard split. Margins are per seed (paired)."),
    Claim(
        id="imclr",
        claim="supervised training with ImCLR concatenations beats the same training without",
        source="000_*.txt Results",
        paper={"metric": "test accuracy gain, percentage points",
               "tiny_imagenet_resnet56": "+3.24", "cifar100_vgg16": "+1.40", "cifar100_preact_resnet18": "+0.64",
               "stl10_wrn16_8": "+2.28", "cifar10_resnet20": "+0.14"},
        arms=(Arm("plain", {"method.name": "supervised", "method.imclr": 0}),
              Arm("imclr2", {"method.name": "supervised", "method.imclr": 2})),
        comparisons=("imclr2 > plain",),
        metric="val_top1",
        note="As jobs/imclr.py: the supervised method's optimiser for both, two images per input, single "
             "centre views at test time; the classifier's val top-1 decides (no probe)."),
    Claim(
        id="cmc_colour",
        claim="CMC L|ab and Y|DbDr",
        source="002_*.txt Table 1",
        paper={"metric": "ImageNet linear top-1 %, ResNet-50 x0.5 / x1 / x2 per view",
               "L|ab": "57.5 / 64.0 / 68.3", "Y|DbDr": "58.4 / 64.8 / 69.0"},
        arms=(),
        comparisons=(),
        note="Not measurable here: CMC's views are colour channels, and Fashion-MNIST is grayscale (its shards "
             "hold the gray value in R = G = B), so ab and DbDr are zero for every image and jitter cannot add "
             "chroma: the chroma encoder sees a constant and the contrast is degenerate. Needs colour data "
             "(CIFAR-10 or STL-10, as 002 and 004 use), which this machine does not have."),
)
CLAIMS_BY_ID = {claim.id: claim for claim in CLAIMS}


# --- cells ---------------------------------------------------------------------------------------

@dataclass
class Cell:
    claim: str
    arm: str
    seed: int
    dataset: str
    overrides: dict  # everything the cell sets on top of the demo preset, budget included
    train_images: int = 0
    needs: str | None = None
    estimate_seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.claim}/{self.arm}/seed{self.seed}"

    def training_key(self) -> str:
        """Identical for cells that train the same thing (the run name aside)."""
        same = {k: v for k, v in self.overrides.items() if k != "name"}
        return hashlib.sha1(json.dumps(same, sort_keys=True).encode()).hexdigest()[:16]


def dataset_dir(dataset: str, train_images: int) -> Path:
    if dataset == PROBE_SET:
        return DATA_DIR / "fmnist-60k"
    return DATA_DIR / f"fmnist-{dataset}-{train_images}"


def budget_overrides(claim: str, arm: str, seed: int, dataset: str, budget: Budget, runs: Path) -> dict:
    return {"name": f"fid-{claim}-{arm}-s{seed}", "storage": str(runs),
            "data.root": str(dataset_dir(dataset, budget.train_images)), "train.epochs": budget.epochs,
            "train.seed": seed, "eval.pictures": False}


def plan(budget: Budget, runs: Path, only: list[str] | None = None, seeds: int | None = None) -> list[Cell]:
    """Every (claim, arm, seed) of the budget; arms with `needs` (or a config the product rejects)
    are listed but not run."""
    from runtime.config import ConfigError
    cells = []
    for claim in CLAIMS:
        if only and claim.id not in only:
            continue
        for arm in claim.arms:
            if budget.quick and not arm.quick:
                continue
            for seed in range(budget.seeds if seeds is None else seeds):
                extra = budget_overrides(claim.id, arm.key, seed, arm.dataset, budget, runs)
                clash = sorted(set(extra) & set(arm.overrides))
                if clash:
                    raise ValueError(f"{claim.id}/{arm.key} sets the study's budget keys {clash}")
                cell = Cell(claim.id, arm.key, seed, arm.dataset, {**extra, **arm.overrides}, budget.train_images,
                            arm.needs)
                if cell.needs is None:
                    try:
                        build_config(cell)
                    except ConfigError as exc:
                        cell.needs = f"the product rejects this config: {exc}"
                cell.estimate_seconds = estimate_seconds(cell)
                cells.append(cell)
    return cells


def _set_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def build_config(cell: Cell):
    """The JobConfig a job would build: `--preset demo` plus one `--set` per override."""
    from runtime.config import parse_args
    argv = ["--preset", "demo"]
    for key, value in cell.overrides.items():
        argv += ["--set", f"{key}={_set_text(value)}"]
    config, _ = parse_args(argv, method="interclr", default_preset="demo")
    return config


# --- budget --------------------------------------------------------------------------------------

def training_rate(overrides: dict) -> tuple[float, str]:
    """Images per second and whether the lead measured it or the cost model derived it."""
    name = overrides.get("method.name", "interclr")
    base = overrides.get("method.base", "moco")
    key = f"interclr-{base}" if name == "interclr" else name
    if key in MEASURED_RATES:
        return MEASURED_RATES[key], "measured"
    positives = overrides.get("method.positives", 1)
    seconds = {
        "interclr-npid": 3 * UNIT_SECONDS + 2 * BANK_BRANCH_SECONDS,  # one view, intra and inter bank queries
        "npid": 3 * UNIT_SECONDS + BANK_BRANCH_SECONDS,
        "simclr": 3 * (positives + 1) * UNIT_SECONDS,  # every view forward and backward
        "cacr": 3 * (positives + 1) * UNIT_SECONDS,
        "supervised": 3 * max(1, overrides.get("method.imclr", 0)) * UNIT_SECONDS,  # ImCLR rows n images wide
    }.get(key, 4 * UNIT_SECONDS)
    return 1 / seconds, "derived"


def estimate_seconds(cell: Cell) -> float:
    if cell.needs:
        return 0.0
    rate, _ = training_rate(cell.overrides)
    probe = 0.0 if cell.overrides.get("method.name") == "supervised" else PROBE_SECONDS
    return STARTUP_EVAL_SECONDS + probe + cell.overrides["train.epochs"] * cell.train_images / rate


def datasets_needed(cells: list[Cell], budget: Budget) -> list[tuple[str, Path]]:
    names = sorted({c.dataset for c in cells if not c.needs})
    if names:
        names.append(PROBE_SET)
    return [(name, dataset_dir(name, budget.train_images)) for name in names]


def conversion_seconds(cells: list[Cell], budget: Budget) -> float:
    images = 0
    for name, path in datasets_needed(cells, budget):
        if not (REPO / path / "train.json").exists():
            images += 60_000 if name == PROBE_SET else budget.train_images
        if not (REPO / path / "val.json").exists():
            images += 10_000
    return images / CONVERT_IMAGES_PER_SECOND


# --- cache and the cell loop -------------------------------------------------------------------

def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.claim / cell.arm / f"seed{cell.seed}.json"


def write_json_atomic(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def load_cached(out: Path, cell: Cell) -> dict | None:
    """The cached record of this cell, if it ran with exactly these overrides."""
    path = cell_path(out, cell)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("overrides") == cell.overrides else None


def cached_records(out: Path, cells: list[Cell]) -> dict[str, dict]:
    """{cell label: cached record} of the runnable cells that have one (each file read once)."""
    return {cell.label: record for cell in cells if not cell.needs and (record := load_cached(out, cell)) is not None}


def schedule(cells: list[Cell], out: Path, others: list[Cell] = (),
             cached: dict[str, dict] | None = None) -> list[tuple[Cell, str, str | None]]:
    """(cell, status, source) in run order: status "needs" (not runnable yet), "cached", "reuse"
    (the same training as `source`, a cached cell or one that runs earlier) or "run". `others`: the
    cells of claims not selected (`--only`), whose cached trainings may be reused too. `cached`:
    `cached_records(out, cells + others)` where the caller has it."""
    if cached is None:
        cached = cached_records(out, [*cells, *others])
    first = {}
    for cell in [*cells, *others]:
        if cell.label in cached:
            first.setdefault(cell.training_key(), cell.label)
    plan_ = []
    for cell in cells:
        if cell.needs:
            plan_.append((cell, "needs", None))
        elif cell.label in cached:
            plan_.append((cell, "cached", None))
        elif cell.training_key() in first:
            plan_.append((cell, "reuse", first[cell.training_key()]))
        else:
            first[cell.training_key()] = cell.label
            plan_.append((cell, "run", None))
    return plan_


def run_cells(cells: list[Cell], out: Path, runner: Callable, log=print, others: list[Cell] = ()) -> dict[str, dict]:
    """Run every runnable cell not cached yet, caching each as it finishes (a rerun skips it);
    `runner(cell, config)` returns the cell's metrics; a cell that trains exactly as a cached one
    (of `cells` or of `others`, the claims not selected) or an earlier one reuses its record.
    Returns {cell label: record} of `cells`."""
    cached = cached_records(out, [*cells, *others])
    steps = schedule(cells, out, others, cached)
    records = {cell.label: cached[cell.label] for cell, status, _ in steps if status == "cached"}
    todo = [(cell, status, source) for cell, status, source in steps if status in ("run", "reuse")]
    runs = [cell for cell, status, _ in todo if status == "run"]
    log(f"fidelity: {len(records)} cells cached, {len(runs)} to run, {len(todo) - len(runs)} reused "
        f"(estimate {_clock(sum(c.estimate_seconds for c in runs))})")
    started = time.monotonic()
    spent = estimated = 0.0
    for i, (cell, status, source) in enumerate(todo, 1):
        if status == "reuse":  # the same training ran for another claim
            earlier = records[source] if source in records else cached[source]  # run now, or cached
            record = {**earlier, "claim": cell.claim, "config": cell.arm, "seed": cell.seed,
                      "overrides": cell.overrides, "reused_from": source}
            write_json_atomic(cell_path(out, cell), record)
            records[cell.label] = record
            log(f"cell {i}/{len(todo)} {cell.label}: same training as {source}, reused")
            continue
        log(f"cell {i}/{len(todo)} {cell.label}: running (estimate {cell.estimate_seconds:.0f} s)")
        config = build_config(cell)
        cell_started = time.monotonic()
        metrics = runner(cell, config)
        seconds = time.monotonic() - cell_started
        record = {"claim": cell.claim, "config": cell.arm, "seed": cell.seed, "dataset": cell.dataset,
                  "overrides": cell.overrides, "metrics": metrics, "seconds": seconds,
                  "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        write_json_atomic(cell_path(out, cell), record)
        records[cell.label] = record
        spent += seconds
        estimated += cell.estimate_seconds
        remaining = sum(c.estimate_seconds for c, s, _ in todo[i:] if s == "run")
        eta = remaining * (spent / estimated if estimated else 1.0)  # the estimates, rescaled by the cells so far
        log(f"cell {i}/{len(todo)} {cell.label}: {seconds:.0f} s | {_metrics_line(metrics)} | "
            f"elapsed {_clock(time.monotonic() - started)} | ETA {_clock(eta)}")
    return records


def _metrics_line(metrics: dict) -> str:
    parts = [f"{name} {metrics[name]:.3f}" for name in ("knn", "linear", "val_top1") if metrics.get(name) is not None]
    return " ".join(parts) or "no metrics"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --- the product's cell runner ---------------------------------------------------------------

def make_runner(budget: Budget, probe_epochs: int = 100) -> Callable:
    """runner(cell, config): the real driver, then the linear probe of jobs/linear_eval.py on the
    full train split (not for supervised cells: their classifier's val top-1 is the metric)."""
    probe_root = dataset_dir(PROBE_SET, budget.train_images)

    def run_cell(cell: Cell, config) -> dict:
        from runtime.driver import run
        run_dir = Path(config.storage).resolve() / config.name
        discard_stale_run(run_dir, config)
        summary = run(config)
        metrics = {key: value for key, value in summary.items() if isinstance(value, (int, float)) or value is None}
        metrics["knn"] = summary["knn_top1"]
        metrics["val_top1"] = summary.get("val_top1")
        metrics["linear"] = None
        if config.method.name != "supervised":
            metrics["linear"] = linear_probe(run_dir, config, probe_root, probe_epochs)
        return metrics
    return run_cell


def discard_stale_run(run_dir: Path, config) -> None:
    """A run folder under this name from other settings would be resumed by Ray Train: remove it."""
    written = run_dir / "config.json"
    if not written.exists():
        return
    expected = config.to_dict()
    expected["data"]["root"] = str(Path(config.data.root).resolve())  # the driver writes it resolved
    if json.loads(written.read_text()) != expected:
        print(f"fidelity: {run_dir} was trained with other settings; starting it afresh", flush=True)
        shutil.rmtree(run_dir)


def linear_probe(run_dir: Path, config, probe_root: Path, epochs: int) -> float:
    """jobs/linear_eval.py on a probe folder: the run's config with data.root = the full split and
    its last checkpoint linked in (linear_eval reads both from the folder it is given)."""
    from jobs import linear_eval
    from runtime import runs
    from runtime.config import JobConfig
    probe_dir = run_dir.parent / f"{run_dir.name}-probe"
    probe_config = JobConfig.from_dict(config.to_dict())
    probe_config.data.root = str(Path(probe_root).resolve())
    link = probe_dir / "checkpoint_final" / "model.pt"
    link.parent.mkdir(parents=True, exist_ok=True)
    (probe_dir / "config.json").write_text(json.dumps(probe_config.to_dict(), indent=1))
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(runs.latest_checkpoint(run_dir).resolve())
    status = linear_eval.main([str(probe_dir), "--epochs", str(epochs)])
    if status != 0:
        raise RuntimeError(f"jobs/linear_eval.py {probe_dir} exited {status}")
    return float(json.loads((probe_dir / "linear_eval.json").read_text())["linear_top1"])


def require_fashion_mnist() -> None:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"error: Fashion-MNIST not found in {FASHION_MNIST_DIR} "
                         "(apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR)")


def prepare_datasets(cells: list[Cell], budget: Budget, log=print) -> None:
    """Fashion-MNIST shards for every set the cells use, by pipeline.convert (skipped when done;
    an interrupted conversion is resumed). Every set's val split is the full 10k test set."""
    from pipeline.convert import convert
    require_fashion_mnist()
    for name, path in datasets_needed(cells, budget):
        for split in ("train", "val"):
            if (path / f"{split}.json").exists():
                continue
            limit = budget.train_images if split == "train" and name != PROBE_SET else None
            imbalance = name if name in ("linear", "exponential") and split == "train" else None
            log(f"fidelity: converting {split} of {path}")
            convert("fashion-mnist", FASHION_MNIST_DIR, path, split, shard_size=4_000_000, limit=limit,
                    imbalance=imbalance, resume=(path / ".convert" / f"{split}-plan.json").exists(),
                    workers=os.cpu_count(), log=log)


def imbalanced_size(rule: str) -> int:
    """Images the rule keeps of Fashion-MNIST's 6,000 per class (pipeline.convert.keep_imbalanced)."""
    from pipeline.convert import class_fractions
    return int(sum(max(1, round(FASHION_MNIST_PER_CLASS * f)) for f in class_fractions(rule, 10)))


# --- the "holds" rule and the table ----------------------------------------------------------

def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); sd is None below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def compare(a: list[float], op: str, b: list[float]) -> dict:
    """`a > b`: holds when mean(a) - mean(b) > max(sd(a), sd(b)); `a >= b`: holds unless
    mean(b) - mean(a) > that spread. Fewer than two values on either side: not decidable (None)."""
    if op not in (">", ">="):
        raise ValueError(f"a comparison is '>' or '>=', got {op!r}")
    mean_a, sd_a = mean_sd(a)
    mean_b, sd_b = mean_sd(b)
    if sd_a is None or sd_b is None:
        gap = None if mean_a is None or mean_b is None else mean_a - mean_b
        return {"gap": gap, "spread": None, "holds": None}
    gap, spread = mean_a - mean_b, max(sd_a, sd_b)
    holds = gap > spread if op == ">" else -gap <= spread
    return {"gap": gap, "spread": spread, "holds": holds}


def parse_comparison(text: str) -> tuple[list[str], str, list[str]]:
    """"a - b > c - d" → (["a", "b"], ">", ["c", "d"]); an operand is an arm or a difference."""
    for op in (">=", ">"):
        if f" {op} " in text:
            left, right = text.split(f" {op} ")
            return [s.strip() for s in left.split(" - ")], op, [s.strip() for s in right.split(" - ")]
    raise ValueError(f"no ' > ' or ' >= ' in comparison {text!r}")


def operand_values(operand: list[str], per_seed: dict[str, dict[int, float]]) -> list[float] | None:
    """Per-seed values of an arm, or of a paired difference of two arms (seeds both have)."""
    if any(name not in per_seed for name in operand):
        return None
    if len(operand) == 1:
        return [per_seed[operand[0]][s] for s in sorted(per_seed[operand[0]])]
    first, second = per_seed[operand[0]], per_seed[operand[1]]
    return [first[s] - second[s] for s in sorted(set(first) & set(second))]


def combine(verdicts: list[bool | None]) -> bool | None:
    if any(v is False for v in verdicts):
        return False
    if verdicts and all(v is True for v in verdicts):
        return True
    return None


def claim_row(claim: Claim, cells: list[Cell], records: dict[str, dict]) -> dict:
    ours, per_seed = {}, {}
    for arm in claim.arms:
        arm_cells = [c for c in cells if c.claim == claim.id and c.arm == arm.key]
        if not arm_cells:
            ours[arm.key] = {"n": 0, "skipped": "not part of --quick"}
            continue
        if arm_cells[0].needs:
            ours[arm.key] = {"needs": arm_cells[0].needs}
            continue
        done = [records[c.label] for c in arm_cells if c.label in records]
        entry = {"n": len(done)}
        for metric in ("knn", "linear", "val_top1"):
            values = [r["metrics"].get(metric) for r in done if r["metrics"].get(metric) is not None]
            if values or metric != "val_top1":
                entry[metric], entry[f"{metric}_sd"] = mean_sd(values)
        ours[arm.key] = entry
        values = {r["seed"]: r["metrics"][claim.metric] for r in done if r["metrics"].get(claim.metric) is not None}
        if values:
            per_seed[arm.key] = values
    comparisons = []
    for text in claim.comparisons:
        left, op, right = parse_comparison(text)
        a, b = operand_values(left, per_seed), operand_values(right, per_seed)
        result = {"gap": None, "spread": None, "holds": None} if a is None or b is None else compare(a, op, b)
        missing = [name for name in left + right if name not in per_seed]
        comparisons.append({"comparison": text, **result, **({"missing": missing} if missing else {})})
    holds = combine([c["holds"] for c in comparisons]) if comparisons else None
    return {"claim": claim.claim, "id": claim.id, "source": claim.source, "paper": claim.paper, "metric": claim.metric,
            "ours": ours, "comparisons": comparisons, "holds": holds, "note": claim.note}


RULE = ("A comparison `a > b` holds when mean(a) - mean(b) exceeds max(sd(a), sd(b)), the sample standard "
        "deviations over seeds of the row's metric; `a >= b` holds unless mean(b) - mean(a) exceeds that spread; "
        "a margin `a - b` is taken per seed. With one seed nothing is decidable. A claim holds when all its "
        "comparisons hold, fails when any fails, and is not decidable otherwise.")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(mean, sd) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if sd is None else f"{mean:.3f} ± {sd:.3f}"


def render_markdown(rows: list[dict], header: dict) -> str:
    lines = ["# Fidelity study (issue 16)", "",
             f"{header['date']} · {header['mode']}: {header['train_images']} Fashion-MNIST images per training "
             f"set, {header['epochs']} epochs, {header['seeds']} seed(s), demo preset (ResNet-18 ×0.5, 28 px, "
             f"2 CPU cores) · {header['cells_done']} cells, {_clock(header['cell_seconds'])} of cell wall time "
             "(driver and probe) · linear probe: jobs/linear_eval.py on the full 60k train / 10k test split.",
             "", "Baselines on the same split (kNN memory of the regular set, the 10k test images): random-init "
             f"encoder kNN {_number(*header['baselines']['random_init_knn'])}, mean-centred pixels kNN "
             f"{_number(*header['baselines']['pixels_knn'])} (mean ± sd over the cells' runs). A method that "
             "does not beat these has not learned more than its architecture or the pixels give.",
             "", RULE, "",
             "| claim | source | paper | ours | holds | note |", "|---|---|---|---|---|---|"]
    verdict = {True: "yes", False: "no", None: "not decidable"}
    for row in rows:
        paper = "<br>".join(f"{k}: {v}" for k, v in row["paper"].items())
        ours = []
        for arm, entry in row["ours"].items():
            if "needs" in entry or "skipped" in entry:
                ours.append(f"{arm}: needs a change (note)" if "needs" in entry else f"{arm}: {entry['skipped']}")
                continue
            main = _number(entry.get(row["metric"]), entry.get(f"{row['metric']}_sd"))
            knn = _number(entry.get("knn"), entry.get("knn_sd"))
            ours.append(f"{arm}: {row['metric']} {main}, kNN {knn} (n={entry['n']})")
        checks = [f"{c['comparison']}: " + (verdict[c["holds"]] if c["gap"] is None or c["spread"] is None else
                                            f"gap {c['gap']:+.3f} vs spread {c['spread']:.3f}, {verdict[c['holds']]}")
                  for c in row["comparisons"]]
        holds = verdict[row["holds"]] if row["comparisons"] else "not measurable"
        waiting = {}  # needs text → the arms waiting for it
        for arm, entry in row["ours"].items():
            if "needs" in entry:
                waiting.setdefault(entry["needs"], []).append(arm)
        note = " ".join([row["note"], *(f"{', '.join(arms)} need: {text}" for text, arms in waiting.items())])
        lines.append("| " + " | ".join(_cell(x) for x in (
            row["claim"], row["source"], paper, "<br>".join(ours) or "—",
            "<br>".join([holds, *checks]), note)) + " |")
    return "\n".join(lines) + "\n"


def baselines(records: dict[str, dict]) -> dict:
    """The job's own baselines on the regular set's cells (their kNN memory and val split are the
    same): kNN top-1 of the encoder at random init (per seed: the same initial weights) and of
    mean-centred raw pixels."""
    regular = [r["metrics"] for r in records.values() if r.get("dataset", "regular") == "regular"]
    return {name: mean_sd([m[key] for m in regular if m.get(key) is not None])
            for name, key in (("random_init_knn", "knn_top1_random_init"), ("pixels_knn", "knn_top1_pixels"))}


def write_report(out: Path, cells: list[Cell], budget: Budget, mode: str, only: list[str] | None) -> list[dict]:
    """OUT/fidelity.json and OUT/fidelity.md from the cached cells (a partial study gives a partial table)."""
    records = {cell.label: record for cell in cells if not cell.needs
               for record in [load_cached(out, cell)] if record is not None}
    trained = {other.training_key(): records[other.label] for other in cells
               if other.label in records and "reused_from" not in records[other.label]}
    for cell in cells:  # a cell whose training another cached cell already did (e.g. random = online)
        if not cell.needs and cell.label not in records and cell.training_key() in trained:
            source = trained[cell.training_key()]
            records[cell.label] = {**source, "claim": cell.claim, "config": cell.arm, "seed": cell.seed,
                                   "reused_from": f"{source['claim']}/{source['config']}/seed{source['seed']}"}
    rows = [claim_row(claim, cells, records) for claim in CLAIMS if not only or claim.id in only]
    header = {"date": datetime.date.today().isoformat(), "mode": mode, "train_images": budget.train_images,
              "epochs": budget.epochs, "seeds": max((c.seed + 1 for c in cells), default=0),
              "cell_seconds": sum(r.get("seconds", 0.0) for r in records.values() if "reused_from" not in r),
              "cells_done": len(records), "baselines": baselines(records)}
    write_json_atomic(out / "fidelity.json", rows)
    tmp = out / ".fidelity.md.tmp"
    tmp.write_text(render_markdown(rows, header))
    os.replace(tmp, out / "fidelity.md")
    return rows


# --- command line --------------------------------------------------------------------------------

def print_plan(cells: list[Cell], out: Path, budget: Budget, log=print) -> None:
    steps = schedule(cells, out)
    for cell, status, source in steps:
        rate, kind = training_rate(cell.overrides)
        text = {"needs": f"needs a change: {(cell.needs or '')[:80]}...", "cached": "cached",
                "reuse": f"same training as {source}",
                "run": f"run, ~{cell.estimate_seconds:.0f} s ({rate:.0f} img/s {kind})"}[status]
        log(f"{cell.label:<48} {cell.dataset:<12} {text}")
    runs = [cell for cell, status, _ in steps if status == "run"]
    count = {status: sum(1 for _, s, _ in steps if s == status) for status in ("run", "reuse", "cached", "needs")}
    total = sum(c.estimate_seconds for c in runs)
    startup = STARTUP_EVAL_SECONDS * len(runs)
    probes = PROBE_SECONDS * sum(1 for c in runs if c.overrides.get("method.name") != "supervised")
    convert_s = conversion_seconds(cells, budget)
    log(f"\n{len(cells)} cells: {count['run']} to run, {count['reuse']} reused, {count['cached']} cached, "
        f"{count['needs']} waiting for a change")
    log(f"estimate {_clock(total + convert_s)}: training {_clock(total - startup - probes)}, start-up and "
        f"evaluation {_clock(startup)}, probes {_clock(probes)}, data conversion {_clock(convert_s)}")
    log("datasets: " + ", ".join(str(path) for _, path in datasets_needed(cells, budget)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 2 epochs of 5k images, no reported-only arms")
    parser.add_argument("--only", action="append", metavar="CLAIM",
                        help=f"run only these claims (repeat or comma-separate): {', '.join(CLAIMS_BY_ID)}")
    parser.add_argument("--seeds", type=int, help="seeds per cell (default: 1 quick, 2 full)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/fidelity[-quick])")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and the budget estimate; run nothing")
    parser.add_argument("--report", action="store_true",
                        help="write fidelity.json / fidelity.md from the cells cached so far; run nothing")
    args = parser.parse_args(argv)
    if args.only:
        args.only = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
        unknown = [name for name in args.only if name not in CLAIMS_BY_ID]
        if unknown:
            parser.error(f"unknown claim(s) {', '.join(unknown)} (choose from {', '.join(CLAIMS_BY_ID)})")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def main(argv=None, runner: Callable | None = None, log=print) -> int:
    args = parse_args(argv)
    os.chdir(REPO)  # the cells' data and run paths are relative to the repository root
    mode = "quick" if args.quick else "full"
    budget = BUDGETS[mode]
    out = args.out or Path("benchmarks/results") / ("fidelity-quick" if args.quick else "fidelity")
    runs = Path("runs") / out.resolve().name
    for rule in ("linear", "exponential"):
        if budget.train_images > imbalanced_size(rule):
            raise SystemExit(f"error: {budget.train_images} images exceed the {rule} set ({imbalanced_size(rule)})")
    cells = plan(budget, runs, args.only, args.seeds)
    if args.dry_run:
        print_plan(cells, out, budget, log)
        return 0
    if args.report:
        write_report(out, cells, budget, mode, args.only)
        log(f"fidelity: {out / 'fidelity.md'} (from the cached cells)")
        return 0
    prepare_datasets(cells, budget, log)
    try:
        selected = {cell.label for cell in cells}
        others = [c for c in plan(budget, runs, None, args.seeds) if c.label not in selected] if args.only else []
        run_cells(cells, out, runner or make_runner(budget), log, others)
    finally:  # a study stopped by a failing cell still reports what it finished
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        write_report(out, cells, budget, mode, args.only)
        log(f"fidelity: {out / 'fidelity.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
