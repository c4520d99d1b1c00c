"""For tests on a `ray.cluster_utils.Cluster`: wait until its head schedules on every node."""
from __future__ import annotations


def settle(address: str, timeout: float = 120) -> list[str]:
    """Connect, run one task pinned hard to each alive node, disconnect; returns the node ids.

    A node added seconds ago is in the GCS (`Cluster.wait_for_nodes`) before the head's scheduler
    counts it: until then a soft node affinity to it falls back to another node (measured: the third
    of three actors placed on the second node) and Ray's SPREAD packs. A hard affinity waits for it."""
    import ray

    from runtime.placement import node_capacity, pinned
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
