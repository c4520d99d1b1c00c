"""For tests on a `ray.cluster_utils.Cluster`: one cluster of three one-CPU nodes for the session
(`three_nodes` in conftest.py, served by `python -m tests.cluster` in its own process: this session may
already hold an in-process Ray), and `settle`, which waits until its head schedules on every node."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def token_env(token: str) -> dict[str, str]:
    """The environment of a process that starts or joins a test's Ray with token authentication:
    `token` (ray.cluster_utils.Cluster does not create ~/.ray/auth_token as `ray start` does), this
    checkout on PYTHONPATH, every worker's log lines in full."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(ROOT),
            "RAY_DEDUP_LOGS": "0"}


def settle(address: str, timeout: float = 120) -> list[str]:
    """Connect, run one task pinned hard to each alive node, disconnect; returns the node ids.

    A node added seconds ago is in the GCS (`Cluster.wait_for_nodes`) before the head's scheduler
    counts it: until then a soft node affinity to it falls back to another node (measured: the third
    of three actors placed on the second node) and Ray's SPREAD packs. A hard affinity waits for it."""
    import ray

    from pipeline.placement import node_capacity, pinned
    ray.init(address=address, configure_logging=False)
    try:
        nodes = list(node_capacity(ray.nodes(), "CPU"))  # the alive ones
        probe = ray.remote(num_cpus=0)(lambda: ray.get_runtime_context().get_node_id())
        where = ray.get([probe.options(scheduling_strategy=pinned(node, soft=False)).remote() for node in nodes],
                        timeout=timeout)
        assert where == nodes, (where, nodes)
        return nodes
    finally:
        ray.shutdown()


def serve(num_nodes: int = 3) -> None:
    """A head and `num_nodes - 1` added nodes, one CPU each, settled; prints `ADDRESS <gcs address>`
    and the node ids, then keeps the cluster until stdin closes (the test session's end)."""
    import json

    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(num_nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = settle(cluster.address)
        print("ADDRESS", cluster.address, json.dumps(nodes), flush=True)
        os.dup2(2, 1)  # anything printed later goes to the log, not into a pipe nobody reads
        sys.stdin.read()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
