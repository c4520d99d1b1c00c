"""Everything on the session's three-node cluster. pipeline.convert --ray: the shard writers as Ray
tasks write the bytes of a local run, resume the same way, and a node that cannot see the source is
named in a one-line error. The InterCLR job: Train workers on distinct nodes, a killed Train worker
and a resubmitted run name (shards, configs and helpers from tests/test_jobs.py).

The cluster is the session's `three_nodes` (conftest.py: a head and two added nodes with one CPU each,
served by another process); the conversions run in a subprocess of their own, a driver of that cluster
(this session may already hold an in-process Ray, `ray_cluster`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from pipeline.convert import convert
from tests import datasets
from tests.test_jobs import JOB, LIGHT_EVAL, SMALL, metrics, shards  # noqa: F401 (shards: a fixture)

ROOT = Path(__file__).resolve().parents[1]

CLUSTER_SCRIPT = """
import json, shutil, sys
from pathlib import Path
import pipeline.convert as convert_module
from pipeline.convert import ConversionError, convert, main

src, tmp, address = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
report = {}


def error_of_a_run(out, step, then):
    \"\"\"The ConversionError of a conversion into `out` where `then()` happens right after `step`.\"\"\"
    original = getattr(convert_module, step)
    def step_then(*args):
        result = original(*args)
        then()
        return result
    setattr(convert_module, step, step_then)
    try:
        convert("imagenet22k", src, out, max_count=6, ray_address=address, log=lambda m: None)
    except ConversionError as exc:
        return str(exc)
    finally:
        setattr(convert_module, step, original)


# 1. the command line, as a user runs it
report["cli_exit"] = main(["imagenet22k", str(src), str(tmp / "ray"), "--max-count", "6", "--ray", address])

# 2. a run killed after five of seven shards: records 2 and 5, their tars and the split files gone
shutil.copytree(tmp / "ray", tmp / "resumed")
state = tmp / "resumed" / ".convert"
for n in (2, 5):
    (state / f"train-00000{n}.json").unlink()
    (tmp / "resumed" / f"train-00000{n}.tar").unlink()
(tmp / "resumed" / "train.json").unlink()
inodes = {p.name: p.stat().st_ino for p in state.glob("train-0*.json")}
log = []
convert("imagenet22k", src, tmp / "resumed", max_count=6, resume=True, ray_address=address,
        log=log.append)
report["resume_log"] = log
report["rewritten"] = sorted(p.name for p in state.glob("train-0*.json") if inodes.get(p.name) != p.stat().st_ino)

# 3. a source the driver listed but the nodes cannot read (storage not shared)
gone = src / "n01440764.tar"
try:
    report["missing_error"] = error_of_a_run(tmp / "unshared", "list_source",
                                             lambda: gone.rename(gone.with_suffix(".away")))
finally:
    gone.with_suffix(".away").rename(gone)

# 4. an OUT the nodes do not see: the plan the driver wrote is not there for them
report["unshared_out_error"] = error_of_a_run(
    tmp / "elsewhere", "plan_shards", lambda: (tmp / "elsewhere" / ".convert" / "train-plan.json").unlink())
print("REPORT", json.dumps(report))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, three_nodes):
    """The same 40-image ImageNet-22K source converted locally and on the three-node cluster."""
    tmp = tmp_path_factory.mktemp("convert_ray")
    datasets.make_imagenet22k(tmp / "src", per_class=8)
    convert("imagenet22k", tmp / "src", tmp / "local", max_count=6, workers=2, log=lambda m: None)  # 7 shards
    result = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(tmp / "src"), str(tmp), three_nodes.address],
                            cwd=ROOT, env=three_nodes.env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, {**json.loads(lines[0].removeprefix("REPORT ")), "nodes": three_nodes.nodes}


def output_files(out: Path) -> dict[str, bytes]:
    """Every file a reader uses, by relative path; not the LMDB files (compared by content) nor the
    per-shard records in .convert/ (they name the node that wrote them)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".convert" not in p.parts and "manifest.lmdb" not in p.parts}


def manifest_content(out: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(out / "manifest.lmdb"), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        content = dict(txn.cursor())
    env.close()
    return content


def test_ray_run_writes_the_bytes_of_the_local_run(runs):
    tmp, report = runs
    assert report["cli_exit"] == 0
    local, ray = output_files(tmp / "local"), output_files(tmp / "ray")
    assert sorted(local) == sorted(ray)
    assert len([name for name in local if name.endswith(".tar")]) == 7
    for name in local:  # shards, DALI indexes, train.json, train-rejected.txt
        assert local[name] == ray[name], name
    assert manifest_content(tmp / "ray") == manifest_content(tmp / "local")
    assert len(manifest_content(tmp / "local")) == 40 + 4  # ids, count, classes, shards, labels
    # a fresh manifest written in the same order is even the same file
    assert (tmp / "ray/manifest.lmdb/data.mdb").read_bytes() == (tmp / "local/manifest.lmdb/data.mdb").read_bytes()


def test_ray_tasks_ran_on_every_node(runs):
    tmp, report = runs
    records = [json.loads(p.read_text()) for p in sorted((tmp / "ray" / ".convert").glob("train-0*.json"))]
    assert len(records) == 7
    assert {record["node"]["id"] for record in records} == set(report["nodes"])
    assert len(set(report["nodes"])) == 3


def test_ray_resume_writes_only_the_missing_shards_and_the_same_bytes(runs):
    tmp, report = runs
    assert "resume: 5 of 7 shards already written" in report["resume_log"]
    assert report["rewritten"] == ["train-000002.json", "train-000005.json"]
    assert output_files(tmp / "resumed") == output_files(tmp / "local")
    assert manifest_content(tmp / "resumed") == manifest_content(tmp / "local")


def test_ray_source_missing_on_a_node_names_the_node_and_the_path(runs):
    tmp, report = runs
    message = report["missing_error"]
    assert len(message.splitlines()) == 1
    assert f"cannot read {tmp / 'src' / 'n01440764.tar'}" in message
    assert any(f"Ray node id {node_id}" in message for node_id in report["nodes"])
    assert "SRC must be on storage every node mounts at the same path" in message


def test_ray_out_the_nodes_cannot_see_names_the_node_and_the_path(runs):
    tmp, report = runs
    message = report["unshared_out_error"]
    assert f"cannot see {tmp / 'elsewhere' / '.convert' / 'train-plan.json'}" in message
    assert any(f"Ray node id {node_id}" in message for node_id in report["nodes"])
    assert "OUT must be on storage every node mounts at the same path" in message


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_three_nodes_a_killed_train_worker_and_a_resubmitted_run_name(shards, tmp_path, three_nodes):
    """Nothing assumes one machine, and the faults a user meets are survived there: the session's
    `ray.cluster_utils.Cluster` of three nodes with one CPU each (conftest.py `three_nodes`) runs the
    job with two Train workers (DDP over gloo) that must land on different nodes, a loader actor each
    and bank shards spread over the nodes (placement read from the GCS's actor table). A Train worker
    SIGKILLed mid-run: Ray Train restarts the worker group from the last checkpoint, model and bank.
    Then the run name resubmitted with more steps by a new process (`jobs/interclr_imagenet.py
    --address`): it resumes at the step it ended on, nothing repeated, nothing skipped. The run trains
    in float32: on a CPU without AVX-512 BF16, bf16 autocast is emulated and a step takes many times
    longer (docs/benchmarks.md); tests/test_precision.py covers the bf16 step."""
    run_dir = tmp_path / "nodes"
    common = [*SMALL, *LIGHT_EVAL, "--shards", str(shards), "--storage", str(tmp_path), "--name", "nodes",
              "--workers", "2", "--set", "train.cpus_per_worker=1", "--set", "data.loader_cpus=0.25",
              "--set", "train.torch_threads=1", "--set", "method.warmup_epochs=0",
              "--set", "train.checkpoint_every=5"]
    script = f"""
import json, os, signal, subprocess, sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import ray
from ray._private import state
from runtime.config import parse_args
from runtime.driver import run
address = {three_nodes.address!r}
metrics, report = Path({str(run_dir / "metrics.jsonl")!r}), {{}}

def alive(name):
    return [info for info in state.actors().values() if info["ActorClassName"] == name and info["State"] == "ALIVE"]

def kill_a_worker_after_the_step_10_checkpoint():
    while not (metrics.exists() and any(json.loads(line).get("checkpoint") and json.loads(line)["step"] >= 10
                                        for line in metrics.read_text().splitlines())):
        time.sleep(0.5)
    report["placed"] = {{name: [info["Address"]["NodeID"] for info in alive(name)]
                        for name in ("RayTrainWorker", "LoaderActor", "BankShard")}}
    os.kill(alive("RayTrainWorker")[0]["Pid"], signal.SIGKILL)

killer = threading.Thread(target=kill_a_worker_after_the_step_10_checkpoint, daemon=True)
killer.start()
config, _ = parse_args({common + ["--max-steps", "20"]!r})
run(config, address=address)
report["nodes"] = len(ray.nodes())
report["first_steps"] = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
second = subprocess.run([sys.executable, {str(JOB)!r}, *{common!r}, "--max-steps", "24", "--address", address],
                        capture_output=True, text=True, timeout=300)
report["second"] = {{"rc": second.returncode, "output": second.stdout + second.stderr}}
print("REPORT", json.dumps(report))
ray.shutdown()
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=three_nodes.env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    # the first run's log: the script's own output without the report (which holds the second's)
    output = "\n".join(line for line in result.stdout.splitlines() if not line.startswith("REPORT ")) + result.stderr
    assert "placed" in report, "no worker was killed: no checkpoint at step 10 before the run ended"
    # placement: three nodes, the two Train workers on two of them, bank shards SPREAD
    assert report["nodes"] == 3
    placed = report["placed"]
    assert len(placed["RayTrainWorker"]) == 2 and len(set(placed["RayTrainWorker"])) == 2  # one per node
    assert len(placed["LoaderActor"]) == 2
    assert len(placed["BankShard"]) == 2 and len(set(placed["BankShard"])) == 2
    # RAY_ADDRESS reaches Ray Train's actors: its PlacementGroupCleaner does not auto-detect the cluster
    assert "multiple active Ray instances" not in output
    assert "Reporting training result" not in output and "FutureWarning" not in output  # quiet with DDP too
    # the killed worker: the group restarted from a checkpoint and every step up to 20 was trained
    assert "resumed from step" in output and "precision 32 (the device's default) on cpu" in output
    steps = report["first_steps"]
    assert steps[-1] == 20 and set(range(1, 21)) <= set(steps)
    # the resubmitted run name: from step 20 on, in a new process
    second = report["second"]
    assert second["rc"] == 0, second["output"][-3000:]
    assert "resumed from step 20" in second["output"]
    assert [r["step"] for r in metrics(run_dir) if "loss" in r][len(steps):] == [21, 22, 23, 24]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 24
    assert summary["bank0_step"] == 2 * 24  # one update per worker and step, continued from the snapshot twice
    snapshots = sorted(p.name for p in (run_dir / "bank-0").glob("step-*"))
    # every 5 steps and at the epoch's end (3,000 images / (2 workers × 64) = 23 steps); older ones pruned
    assert snapshots == ["step-000000020", "step-000000023", "step-000000024"]
