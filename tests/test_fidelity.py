"""benchmarks/fidelity.py, the machinery of issue 16's study, without Ray and without training: the
"holds" rule on synthetic numbers, the cell cache and resume (the cell runner is the loop's
parameter; here one that records its calls), and that a cell's config is the demo preset plus
exactly the cell's overrides."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from models.registry import METHODS
from runtime.config import PRESETS, JobConfig, resolve_optimizer
from tests import datasets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fidelity():
    yield from datasets.benchmark_module("fidelity")


class KilledStudy(Exception):
    pass


class RecordingRunner:
    """Stands in for the driver inside the loop: records each cell and its config, returns fixed
    metrics; `kill_on` makes that call raise, as a study killed mid-way."""

    def __init__(self, kill_on: int | None = None):
        self.calls, self.configs, self.kill_on = [], {}, kill_on

    def __call__(self, cell, config):
        self.calls.append(cell.label)
        if self.kill_on is not None and len(self.calls) == self.kill_on:
            raise KilledStudy(cell.label)
        self.configs[cell.label] = config.to_dict()
        return {"knn": 0.5, "linear": 0.6, "val_top1": None}


def records_for(values: dict[str, list[float]], metric: str = "linear") -> dict:
    """Cached records {label: record} of one claim's arms, one value per seed."""
    return {arm: [{"seed": seed, "metrics": {metric: value, "knn": value}} for seed, value in enumerate(seeds)]
            for arm, seeds in values.items()}


def row_for(fidelity, claim_id: str, values: dict[str, list[float]], metric: str = "linear") -> dict:
    claim = fidelity.CLAIMS_BY_ID[claim_id]
    seeds = max(len(v) for v in values.values())
    cells = [c for c in fidelity.plan(fidelity.BUDGETS["full"], Path("runs/t"), [claim_id], seeds)]
    records = {}
    for arm, per_seed in records_for(values, metric).items():
        for record in per_seed:
            records[f"{claim_id}/{arm}/seed{record['seed']}"] = record
    return fidelity.claim_row(claim, cells, records)


# --- (1) the holds rule --------------------------------------------------------------------------

def test_a_gap_above_the_seed_spread_holds(fidelity):
    # means 0.81 and 0.71, sample sds 0.01 each: gap 0.10 > 0.01
    result = fidelity.compare([0.80, 0.82, 0.81], ">", [0.70, 0.72, 0.71])
    assert result["holds"] is True
    assert result["gap"] == pytest.approx(0.10)
    assert result["spread"] == pytest.approx(0.01)


def test_a_gap_within_the_seed_spread_does_not_hold(fidelity):
    # means 0.82 and 0.80; sds 0.02·√2 ≈ 0.0283 and 0.01·√2 ≈ 0.0141: gap 0.02 < 0.0283
    result = fidelity.compare([0.80, 0.84], ">", [0.79, 0.81])
    assert result["holds"] is False
    assert result["spread"] == pytest.approx(0.02 * math.sqrt(2))


def test_a_reversed_gap_does_not_hold(fidelity):
    assert fidelity.compare([0.70, 0.71], ">", [0.80, 0.81])["holds"] is False


def test_one_seed_is_not_decidable(fidelity):
    result = fidelity.compare([0.9], ">", [0.1])
    assert result["holds"] is None
    assert result["gap"] == pytest.approx(0.8)


def test_at_least_holds_unless_decidably_below(fidelity):
    assert fidelity.compare([0.79, 0.81], ">=", [0.80, 0.82])["holds"] is True  # 0.01 below, spread 0.0141
    assert fidelity.compare([0.80, 0.80], ">=", [0.80, 0.80])["holds"] is True  # equal, no spread
    assert fidelity.compare([0.70, 0.71], ">=", [0.80, 0.81])["holds"] is False


def test_ordering_claim_holds_when_semi_hard_at_least_random_above_hard(fidelity):
    row = row_for(fidelity, "negative_sampling", {"semi_hard": [0.80, 0.81], "random": [0.80, 0.80],
                                                  "hard": [0.70, 0.71], "semi_easy": [0.75, 0.76]})
    assert [c["holds"] for c in row["comparisons"]] == [True, True]
    assert row["holds"] is True
    assert row["ours"]["hard"]["linear"] == pytest.approx(0.705)
    assert row["ours"]["hard"]["linear_sd"] == pytest.approx(0.01 / math.sqrt(2))


def test_ordering_claim_fails_when_hard_is_not_below_random(fidelity):
    row = row_for(fidelity, "negative_sampling", {"semi_hard": [0.80, 0.81], "random": [0.80, 0.80],
                                                  "hard": [0.80, 0.80], "semi_easy": [0.75, 0.76]})
    assert [c["holds"] for c in row["comparisons"]] == [True, False]
    assert row["holds"] is False


def test_ordering_claim_with_one_seed_is_not_decidable(fidelity):
    row = row_for(fidelity, "negative_sampling", {"semi_hard": [0.9], "random": [0.8], "hard": [0.1],
                                                  "semi_easy": [0.5]})
    assert row["holds"] is None
    assert row["ours"]["semi_hard"]["linear_sd"] is None


def test_a_comparison_with_an_arm_not_run_yet_is_not_decidable(fidelity):
    row = row_for(fidelity, "online_vs_offline", {"online": [0.80, 0.81]})
    assert row["ours"]["offline"]["n"] == 0
    assert row["comparisons"][0]["holds"] is None and row["comparisons"][0]["missing"] == ["offline"]
    assert row["holds"] is None


def test_margins_are_paired_per_seed(fidelity):
    # margins (CACR - CL) per seed: regular 0.01, 0.02; linear 0.05, 0.06 → gap 0.04 > sd 0.0071
    # exponential 0.02, 0.01 → gap 0.0 → does not hold
    row = row_for(fidelity, "cacr_imbalance", {
        "cl_regular": [0.80, 0.70], "cacr_k4_regular": [0.81, 0.72],
        "cl_linear": [0.70, 0.60], "cacr_k4_linear": [0.75, 0.66],
        "cl_exponential": [0.60, 0.50], "cacr_k4_exponential": [0.62, 0.51]})
    linear, exponential = row["comparisons"]
    assert linear["gap"] == pytest.approx(0.04) and linear["holds"] is True
    assert exponential["gap"] == pytest.approx(0.0) and exponential["holds"] is False
    assert row["holds"] is False


def test_imclr_claim_reads_val_top1(fidelity):
    row = row_for(fidelity, "imclr", {"plain": [0.80, 0.81], "imclr2": [0.85, 0.86]}, metric="val_top1")
    assert row["metric"] == "val_top1" and row["holds"] is True
    assert row["ours"]["imclr2"]["val_top1"] == pytest.approx(0.855)


# --- (2) cache and resume ----------------------------------------------------------------------

def test_a_killed_study_resumes_without_rerunning_finished_cells(fidelity, tmp_path):
    cells = fidelity.plan(fidelity.BUDGETS["quick"], tmp_path / "runs", ["interclr_vs_base", "negative_sampling"])
    runnable = [c.label for c in cells if not c.needs]
    first_run = RecordingRunner(kill_on=2)
    with pytest.raises(KilledStudy):
        fidelity.run_cells(cells, tmp_path, first_run, log=lambda line: None)
    first, killed = first_run.calls
    assert fidelity.load_cached(tmp_path, next(c for c in cells if c.label == first)) is not None
    assert fidelity.load_cached(tmp_path, next(c for c in cells if c.label == killed)) is None

    second_run = RecordingRunner()
    records = fidelity.run_cells(cells, tmp_path, second_run, log=lambda line: None)
    assert first not in second_run.calls
    assert killed in second_run.calls
    assert sorted(records) == sorted(runnable)
    assert all(fidelity.load_cached(tmp_path, c) is not None for c in cells if not c.needs)
    assert not list(tmp_path.rglob("*.tmp-*"))  # every write went through tmp + os.replace

    third_run = RecordingRunner()
    fidelity.run_cells(cells, tmp_path, third_run, log=lambda line: None)
    assert third_run.calls == []


def test_a_cached_cell_from_other_settings_runs_again(fidelity, tmp_path):
    cells = fidelity.plan(fidelity.BUDGETS["quick"], tmp_path / "runs", ["interclr_vs_base"])
    fidelity.run_cells(cells, tmp_path, RecordingRunner(), log=lambda line: None)
    path = fidelity.cell_path(tmp_path, cells[0])
    record = json.loads(path.read_text())
    record["overrides"]["train.epochs"] = 99
    path.write_text(json.dumps(record))
    rerun = RecordingRunner()
    fidelity.run_cells(cells, tmp_path, rerun, log=lambda line: None)
    assert rerun.calls == [cells[0].label]


def test_identical_training_in_two_claims_runs_once(fidelity, tmp_path):
    cells = fidelity.plan(fidelity.BUDGETS["quick"], tmp_path / "runs", ["cacr_vs_cl", "cacr_imbalance"])
    runner = RecordingRunner()
    fidelity.run_cells(cells, tmp_path, runner, log=lambda line: None)
    assert "cacr_imbalance/cl_regular/seed0" not in runner.calls
    reused = fidelity.load_cached(tmp_path, next(c for c in cells if c.label == "cacr_imbalance/cl_regular/seed0"))
    assert reused["reused_from"] == "cacr_vs_cl/cl/seed0"
    assert reused["metrics"] == {"knn": 0.5, "linear": 0.6, "val_top1": None}


def test_a_claim_run_alone_reuses_the_cached_training_of_another_claim(fidelity, tmp_path):
    """`--only cacr_imbalance` after `--only cacr_vs_cl`: its regular-set arms are cacr_vs_cl's cells."""
    budget = fidelity.BUDGETS["quick"]
    fidelity.run_cells(fidelity.plan(budget, tmp_path / "runs", ["cacr_vs_cl"]), tmp_path, RecordingRunner(),
                       log=lambda line: None)
    cells = fidelity.plan(budget, tmp_path / "runs", ["cacr_imbalance"])
    others = [c for c in fidelity.plan(budget, tmp_path / "runs") if c.claim != "cacr_imbalance"]
    runner = RecordingRunner()
    records = fidelity.run_cells(cells, tmp_path, runner, log=lambda line: None, others=others)
    assert runner.calls == [c.label for c in cells if "regular" not in c.arm]
    assert records["cacr_imbalance/cl_regular/seed0"]["reused_from"] == "cacr_vs_cl/cl/seed0"
    assert records["cacr_imbalance/cacr_k4_regular/seed0"]["reused_from"] == "cacr_vs_cl/cacr_k4/seed0"
    without = RecordingRunner()  # the same run without the other claims' cells trains its regular arms again
    fidelity.run_cells(fidelity.plan(budget, tmp_path / "runs2", ["cacr_imbalance"]), tmp_path / "fresh", without,
                       log=lambda line: None)
    assert len(without.calls) == len(cells)


def test_each_cell_prints_a_progress_line_with_an_eta(fidelity, tmp_path):
    cells = fidelity.plan(fidelity.BUDGETS["quick"], tmp_path / "runs", ["interclr_vs_base"])
    lines = []
    fidelity.run_cells(cells, tmp_path, RecordingRunner(), log=lines.append)
    done = [line for line in lines if "ETA" in line]
    assert len(done) == len([c for c in cells if not c.needs])
    assert all("elapsed" in line and "linear 0.600" in line for line in done)


def test_the_report_is_written_from_the_cache(fidelity, tmp_path):
    cells = fidelity.plan(fidelity.BUDGETS["quick"], tmp_path / "runs", ["negative_sampling", "cmc_colour"])
    fidelity.run_cells(cells, tmp_path, RecordingRunner(), log=lambda line: None)
    rows = fidelity.write_report(tmp_path, cells, fidelity.BUDGETS["quick"], "quick",
                                 ["negative_sampling", "cmc_colour"])
    assert json.loads((tmp_path / "fidelity.json").read_text()) == rows
    assert set(rows[0]) >= {"claim", "source", "paper", "ours", "holds", "note"}
    assert set(rows[0]["ours"]["semi_hard"]) >= {"knn", "knn_sd", "linear", "linear_sd"}
    assert rows[1]["holds"] is None and "grayscale" in rows[1]["note"]
    markdown = (tmp_path / "fidelity.md").read_text()
    assert fidelity.RULE in markdown
    assert "CMC L\\|ab" in markdown  # a '|' in a claim does not break the table


# --- (3) a cell's config reaches the driver unchanged -------------------------------------------

def by_hand(overrides: dict) -> dict:
    """The demo preset and then the cell's overrides written into the nested dict of the defaults;
    then the one step every job adds (the method's paper optimiser for fields left None)."""
    name = overrides.get("method.name", "interclr")
    config = JobConfig(method=METHODS[name]()).to_dict()
    for dotted, value in {**PRESETS["demo"], **overrides}.items():
        section, _, key = dotted.rpartition(".")
        if section != "method" or key in config["method"]:  # the preset's InterCLR keys: not another method's
            (config[section] if section else config)[key] = value
    return resolve_optimizer(JobConfig.from_dict(config)).to_dict()


def test_cell_config_is_the_demo_preset_plus_exactly_the_cell_overrides(fidelity, tmp_path):
    cells = [c for c in fidelity.plan(fidelity.BUDGETS["full"], tmp_path / "runs") if not c.needs]
    assert cells
    for cell in cells:
        assert fidelity.build_config(cell).to_dict() == by_hand(cell.overrides), cell.label


def test_the_runner_receives_each_cell_config_unchanged(fidelity, tmp_path):
    cells = fidelity.plan(fidelity.BUDGETS["quick"], tmp_path / "runs", ["cacr_vs_cl", "imclr"])
    runner = RecordingRunner()
    fidelity.run_cells(cells, tmp_path, runner, log=lambda line: None)
    for cell in cells:
        if not cell.needs:
            assert runner.configs[cell.label] == by_hand(cell.overrides)
            assert fidelity.load_cached(tmp_path, cell)["overrides"] == cell.overrides


def test_dry_run_lists_every_cell_and_runs_nothing(fidelity, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # main runs from the repository root
    for argv, budget in ((["--dry-run"], "full"), (["--dry-run", "--quick"], "quick")):
        out = tmp_path / budget
        lines = []
        assert fidelity.main([*argv, "--out", str(out)], log=lines.append) == 0
        text = "\n".join(lines)
        cells = fidelity.plan(fidelity.BUDGETS[budget], Path("runs") / out.name)
        assert all(cell.label in text for cell in cells)
        assert "estimate" in text
        assert not out.exists()
        assert not (ROOT / "runs" / out.name).exists()


def test_report_writes_the_table_from_cached_cells_and_runs_nothing(fidelity, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cells = fidelity.plan(fidelity.BUDGETS["full"], Path("runs") / tmp_path.name, ["imclr"])
    fidelity.run_cells(cells[:1], tmp_path, RecordingRunner(), log=lambda line: None)  # one cell cached
    runner = RecordingRunner(kill_on=1)  # any cell run would raise
    assert fidelity.main(["--report", "--only", "imclr", "--out", str(tmp_path)], runner=runner,
                         log=lambda line: None) == 0
    assert runner.calls == []
    rows = json.loads((tmp_path / "fidelity.json").read_text())
    assert rows[0]["ours"]["plain"]["n"] == 1 and rows[0]["ours"]["imclr2"]["n"] == 0
    assert "1 cells" in (tmp_path / "fidelity.md").read_text()


def test_report_fills_an_arm_from_the_cached_cell_that_trained_the_same(fidelity, tmp_path):
    """negative_sampling/random trains exactly what online_vs_offline/online trains: the report reads it."""
    cells = fidelity.plan(fidelity.BUDGETS["full"], tmp_path / "runs", ["online_vs_offline", "negative_sampling"])
    online = [c for c in cells if c.claim == "online_vs_offline" and c.arm == "online"]
    fidelity.run_cells(online, tmp_path, RecordingRunner(), log=lambda line: None)
    rows = {row["id"]: row for row in fidelity.write_report(tmp_path, cells, fidelity.BUDGETS["full"], "full", None)}
    assert rows["negative_sampling"]["ours"]["random"]["n"] == 2
    assert rows["negative_sampling"]["ours"]["hard"]["n"] == 0
