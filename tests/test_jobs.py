"""jobs/: the InterCLR job end to end on Fashion-MNIST shards — `ray job submit` to a `ray start
--head` cluster, resume by run name, a killed Train worker, and one-line errors for bad input.
Each test runs the real job in a subprocess (its own Ray), as a user would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.convert import convert
from tests import datasets

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "interclr_imagenet.py"
RAY = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
# a small, fast variant of the demo preset (same job, same code path, fewer images and steps)
SMALL = ["--preset", "demo", "--set", "bank.clusters=20", "--set", "method.num_negatives=256",
         "--set", "data.batch_size=64", "--set", "eval.pictures=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs") / "fmnist"
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "train", limit=3000, workers=2, log=lambda m: None)
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "val", limit=1000, workers=2, log=lambda m: None)
    return out


def env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}


def run_job(*args, timeout=420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("args,message", [
    (["--preset", "demo", "--shards", "/nonexistent/shards"], "not found"),
    (["--preset", "imagenet1k"], "unknown preset 'imagenet1k'"),
    (["--preset", "demo", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--preset", "demo", "--set", "train.epochs=many"], "train.epochs='many': expected int"),
    (["--preset", "demo", "--base", "swav"], "--base must be npid, moco or byol"),
])
def test_bad_input_is_one_line_exit_2_and_starts_no_ray(args, message):
    result = run_job(*args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Ray instance" not in result.stdout + result.stderr


def test_demo_job_via_ray_job_submit_trains_and_evaluates(shards, tmp_path):
    """The short CI variant of `make demo`. It checks the job end to end (submit, train, bank
    clustering, kNN for both encoders) but not trained > random init: at this budget the trained
    encoder does not yet beat random-init features on Fashion-MNIST (see the jobs issue notes)."""
    subprocess.run([str(RAY), "start", "--head", "--port=6391", "--dashboard-port=8267", "--num-cpus=2",
                    "--disable-usage-stats"], env=env(), check=True, capture_output=True, timeout=120)
    try:
        for _ in range(30):  # the dashboard's job agent comes up a few seconds after `ray start`
            result = subprocess.run(
                [str(RAY), "job", "submit", "--address", "http://127.0.0.1:8267", "--working-dir", str(ROOT), "--",
                 sys.executable, "jobs/interclr_imagenet.py", *SMALL, "--shards", str(shards),
                 "--storage", str(tmp_path), "--name", "submitted", "--epochs", "3"],
                env=env(), capture_output=True, text=True, timeout=600)
            if "No available agent" not in result.stdout + result.stderr:
                break
            time.sleep(2)
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env(), capture_output=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert 0.1 < summary["knn_top1"] <= 1 and 0.1 < summary["knn_top1_random_init"] <= 1, summary
    assert summary["step"] == 3 * (3000 // 64)
    assert "kNN top-1: trained" in result.stdout
    assert summary["bank0_nmi"] > 0  # pseudo-labels carry class information
    assert summary["feature_std"] > 0.01  # not collapsed


def test_resubmitting_a_run_name_resumes_model_step_and_bank(shards, tmp_path):
    common = [*SMALL, "--shards", str(shards), "--storage", str(tmp_path), "--name", "resumed",
              "--set", "train.checkpoint_every=4", "--set", "method.warmup_epochs=0"]
    first = run_job(*common, "--max-steps", "8")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_job(*common, "--max-steps", "12")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 8" in second.stdout + second.stderr
    steps = [r["step"] for r in metrics(tmp_path / "resumed") if "loss" in r]
    assert steps == list(range(1, 13))  # 1..8, then 9..12: nothing repeated, nothing skipped
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["step"] == 12
    assert summary["bank0_step"] == 12  # the bank's update count continued from the snapshot


def test_a_killed_train_worker_resumes_from_the_last_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "fault"
    job = subprocess.Popen([sys.executable, str(JOB), *SMALL, "--shards", str(shards), "--storage", str(tmp_path),
                            "--name", "fault", "--max-steps", "40", "--set", "train.checkpoint_every=5",
                            "--set", "method.warmup_epochs=0"],
                           cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (run_dir / "metrics.jsonl").exists() and any(r.get("checkpoint") and r["step"] >= 10
                                                            for r in metrics(run_dir)):
                break
            time.sleep(1)
        else:
            pytest.fail("no checkpoint within 300 s")
        workers = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True).stdout.split()
        assert workers, "no Ray Train worker process found"
        os.kill(int(workers[0]), signal.SIGKILL)
        output, _ = job.communicate(timeout=400)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    assert "resumed from step" in output
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps[-1] == 40 and set(range(1, 41)) <= set(steps)
