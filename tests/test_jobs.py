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
         "--set", "method.queue_size=1024", "--set", "data.batch_size=64", "--set", "eval.pictures=false"]
# tests that do not check the kNN numbers: a 256-image memory, no pixel baseline (seconds, not a minute)
LIGHT_EVAL = ["--set", "eval.knn_train_samples=256", "--set", "eval.pixel_baseline=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs") / "fmnist"
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "train", limit=3000, workers=2, log=lambda m: None)
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "val", limit=1000, workers=2, log=lambda m: None)
    return out


def env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}


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
def test_bad_input_is_one_line_exit_2_and_starts_no_ray(args, message, capsys, monkeypatch):
    """In-process (the job's `main` is the whole command line): one `error:` line, exit 2, and
    `ray.init` never reached."""
    import ray

    from runtime.driver import main

    def no_ray(*_, **__):
        raise AssertionError("ray.init called for a bad request")
    monkeypatch.setattr(ray, "init", no_ray)
    assert main(args, method="interclr", default_preset="imagenet") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_make_demo_script_trains_evaluates_and_stops_only_its_own_ray(shards, tmp_path, ray_cluster):
    """scripts/demo.sh (what `make demo` runs: its own `ray start --head` on free ports with token
    authentication, `ray job submit`, its head stopped at exit) on the short CI variant (3,000 images,
    92 steps): trained, clustered, evaluated — the trained encoder's kNN beats the same architecture
    at random init (measured 0.712 vs 0.687 on 1,000 val images) — and another Ray on the machine
    (this session's in-process cluster) is still alive afterwards."""
    demo_env = {**env(), "DEMO_DATA": str(shards), "DEMO_RUNS": str(tmp_path), "PY": sys.executable, "RAY": str(RAY)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), *SMALL[2:], "--epochs", "2"], cwd=ROOT,
                            env=demo_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert 0.1 < summary["knn_top1_random_init"] < summary["knn_top1"] - 0.01, summary  # it learned
    assert summary["step"] == 2 * (3000 // 64)
    assert "kNN top-1: trained" in result.stdout
    progress = [line for line in result.stdout.splitlines() if " img/s loss " in line]
    assert progress and len(progress) == len(set(progress))  # each progress line once (Ray Train's print tee off)
    assert summary["bank0_nmi"] > 0  # pseudo-labels carry class information
    assert summary["feature_std"] > 0.01  # not collapsed
    assert ray_cluster.get(ray_cluster.remote(lambda: 41 + 1).remote(), timeout=60) == 42  # the other Ray
    head = [line.split()[4].rstrip(",") for line in result.stdout.splitlines() if line.startswith("demo: Ray head in")]
    assert head and subprocess.run(["pgrep", "-f", head[0]], capture_output=True).returncode == 1  # its own: gone


def test_resubmitting_a_run_name_resumes_model_step_and_bank(shards, tmp_path):
    common = [*SMALL, *LIGHT_EVAL, "--shards", str(shards), "--storage", str(tmp_path), "--name", "resumed",
              "--set", "train.checkpoint_every=2", "--set", "method.warmup_epochs=0"]
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
    snapshots = sorted(p.name for p in (tmp_path / "resumed" / "bank-0").glob("step-*"))
    assert snapshots == ["step-000000008", "step-000000010", "step-000000012"]  # 2, 4, 6 pruned


def test_a_killed_train_worker_resumes_from_the_last_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "fault"
    job = subprocess.Popen([sys.executable, str(JOB), *SMALL, *LIGHT_EVAL, "--shards", str(shards),
                            "--storage", str(tmp_path),
                            "--name", "fault", "--max-steps", "30", "--set", "train.checkpoint_every=5",
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
    assert steps[-1] == 30 and set(range(1, 31)) <= set(steps)


def test_the_job_runs_on_a_three_node_cluster(shards, tmp_path):
    """Nothing assumes one machine: a `ray.cluster_utils.Cluster` of three nodes with one CPU each,
    two Train workers (DDP over gloo) that must land on different nodes, a loader actor each, and
    bank shards spread over the nodes."""
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
import ray
from ray.cluster_utils import Cluster
from runtime.config import parse_args
from runtime.driver import run
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
for _ in range(2):
    cluster.add_node(num_cpus=1)
config, _ = parse_args({SMALL + LIGHT_EVAL + ["--shards", str(shards), "--storage", str(tmp_path), "--name", "nodes",
                                  "--workers", "2", "--max-steps", "6", "--set", "train.cpus_per_worker=1",
                                  "--set", "data.loader_cpus=0.25", "--set", "train.torch_threads=1",
                                  "--set", "method.warmup_epochs=0"]!r})
summary = run(config, address=cluster.address)
print("NODES", len(ray.nodes()))
ray.shutdown()
cluster.shutdown()
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NODES 3" in result.stdout
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["step"] == 6
    assert "world_size=2" in result.stdout + result.stderr
