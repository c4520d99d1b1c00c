"""pipeline.convert --ray: the shard writers as Ray tasks on a three-node cluster write the bytes of a
local run, resume the same way, and a node that cannot see the source is named in a one-line error.

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
