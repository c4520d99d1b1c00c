"""Where Ray tasks and actors go when every node must take a share: slots dealt over the alive nodes
like cards, each pinned to its node.

Ray's `SPREAD` is best effort, and for zero-CPU actors (the bank shards) Ray 2.60 honours neither
SPREAD nor a soft node affinity: on a settled three-node `ray.cluster_utils.Cluster`, two bank
shards landed on one node in one of three tries with SPREAD and in two of three with soft affinity,
never with a hard one (measured). So bank shards are pinned hard (a shard killed on a live node
restarts there and restores its snapshot; if its node dies the job fails and a resubmission resumes
from the last checkpoint and bank snapshot), and the converter's one-CPU tasks softly (a node that
dies hands its shards to the others)."""
from __future__ import annotations


def deal(capacity: dict[str, int], count: int) -> list[str]:
    """`count` slots dealt over the nodes, one per unit of capacity, node by node:
    {a: 2, b: 1}, 3 → [a, b, a]; beyond the total capacity the deal goes round again. Nodes with no
    capacity get none; with none anywhere the list is empty."""
    order = [node for level in range(max(capacity.values(), default=0)) for node, n in capacity.items() if n > level]
    return [order[i % len(order)] for i in range(count)] if order else []


def node_capacity(nodes: list[dict], resource: str) -> dict[str, int]:
    """{node id: whole units of `resource`} of the alive nodes in `ray.nodes()`."""
    return {node["NodeID"]: int(node["Resources"].get(resource, 0)) for node in nodes if node["Alive"]}


def pinned(node_id: str, soft: bool):
    """A node affinity to `node_id`; a soft one lets Ray run the work elsewhere when the node is gone."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(node_id, soft=soft)
