"""Where Ray tasks and actors go when every node must take a share: slots dealt over the alive nodes
like cards, each pinned to its node; the GPUs a job's Train workers share with its bank shards and GPU
loader actors (`gpu_slots`, `assign_nodes`, `GpuReservation`); a file read on every node.

Ray's `SPREAD` is best effort, and for zero-CPU actors (the bank shards) Ray 2.60 honours neither
SPREAD nor a soft node affinity: on a settled three-node `ray.cluster_utils.Cluster`, two bank
shards landed on one node in one of three tries with SPREAD and in two of three with soft affinity,
never with a hard one (docs/benchmarks.md, lab notes). So bank shards are pinned hard (a shard killed on a live node
restarts there and restores its snapshot; if its node dies the job fails and a resubmission resumes
from the last checkpoint and bank snapshot), and the converter's one-CPU tasks softly (a node that
dies hands its shards to the others)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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


# --- GPUs: each bank shard (and GPU loader actor) on the GPU of a Train worker ----------------------
#
# Ray gives a fractional GPU request the tightest-fitting GPU of its node (checked with fake GPUs on
# Ray 2.60): four 0.25-GPU shards created before the trainer all land on GPU 0, and the fourth
# 0.75-GPU Train worker is never placed. Ray Train v2 makes its own placement group for the workers,
# so shards cannot join the workers' bundles. `GpuReservation` therefore (1) reserves, on each worker
# GPU that gets companions, the share the companions leave (1 - c: more than half a GPU, so each lands
# on a GPU of its own), (2) places one bundle of the companions' share c per slot, which the
# tightest fit puts exactly into the c left on each reserved GPU, (3) releases the first reservation.
# The companions' bundles stay for the job: a restarted shard or loader goes back to its GPU. The
# workers are pinned to the slots' nodes (ScalingConfig.label_selector), where the tightest fit for
# their share is the 1 - c left beside the companions. Shards on whole GPUs would waste a GPU per shard;
# tightest-fit placement after placeholders alone (no bundles) moves a restarted shard to any GPU with room.

NODE_LABEL = "ray.io/node-id"  # every Ray 2.60 node's own label (ray.util.placement_group.NODE_ID_LABEL_KEY)
_EPS = 1e-6


@dataclass
class GpuSlot:
    """One GPU of the job and what shares it: a Train worker's `worker` share (0: none here), the
    `loaders` GPU loader actors of worker slot `rank` (each `loader_share` of the GPU and `loader_cpus`),
    and at most one bank shard, `shard` (its index over every bank's shards). `node`: where it is planned."""
    worker: float = 0.0
    worker_cpus: float = 0.0
    rank: int | None = None
    loaders: int = 0
    loader_share: float = 0.0
    loader_cpus: float = 0.0
    shard: int | None = None
    shard_share: float = 0.0
    node: str | None = None

    @property
    def companions(self) -> float:
        """The share of the actors the driver places here: everything but the Train worker."""
        return self.loaders * self.loader_share + (self.shard_share if self.shard is not None else 0.0)

    @property
    def used(self) -> float:
        return self.worker + self.companions

    @property
    def cpus(self) -> float:
        return self.worker_cpus + self.loaders * self.loader_cpus

    def describe(self) -> str:
        """'Train worker 0.75 + bank shard 0.25'; 'bank shard 0.25 alone' (no worker: the GPU is its own)."""
        parts = [f"Train worker {self.worker:g}"] if self.worker else []
        if self.loaders:
            parts.append(f"{self.loaders} loader actor{'s' if self.loaders > 1 else ''} × {self.loader_share:g}")
        if self.shard is not None:
            parts.append(f"bank shard {self.shard_share:g}")
        return " + ".join(parts) + ("" if self.worker else " alone")


def gpu_slots(workers: int, worker_share: float, worker_cpus: float, loaders: int, loader_share: float,
              loader_cpus: float, shards: int, shard_share: float) -> list[GpuSlot]:
    """The job's GPUs, a slot each: one per Train worker (`worker_share` > 0), holding that worker's
    `loaders` GPU loader actors (`loader_share` > 0; without GPU workers they get a slot of their own);
    then each of `shards` bank shards (`shard_share` > 0) beside a worker slot with room for it, one
    shard per GPU, or else on a GPU of its own."""
    slots = []
    if worker_share > 0 or (loaders and loader_share > 0):
        slots = [GpuSlot(worker=worker_share, worker_cpus=worker_cpus if worker_share > 0 else 0.0, rank=rank,
                         loaders=loaders if loader_share > 0 else 0, loader_share=loader_share,
                         loader_cpus=loader_cpus if loader_share > 0 else 0.0) for rank in range(workers)]
    if shard_share > 0:
        room = [slot for slot in slots if slot.used + shard_share <= 1 + _EPS]
        for shard in range(shards):
            if shard < len(room):
                room[shard].shard, room[shard].shard_share = shard, shard_share
            else:
                slots.append(GpuSlot(shard=shard, shard_share=shard_share))
    return slots


def assign_nodes(slots: list[GpuSlot], nodes: list[dict]) -> list[GpuSlot]:
    """Each slot a whole GPU and its CPUs on an alive node of `nodes` (`ray.nodes()`), first fit over
    the nodes with the most GPUs first (the workers on as few nodes as possible, as Ray Train's PACK):
    sets `slot.node`; returns the slots that fit on no node."""
    alive = [node for node in nodes if node.get("Alive", True)]
    alive.sort(key=lambda node: -float(node.get("Resources", {}).get("GPU", 0.0)))
    left = [[int(node.get("Resources", {}).get("GPU", 0.0) + _EPS), float(node.get("Resources", {}).get("CPU", 0.0))]
            for node in alive]
    unplaced = []
    for slot in slots:
        for i, node in enumerate(alive):
            if left[i][0] >= 1 and slot.cpus <= left[i][1] + _EPS:
                left[i][0] -= 1
                left[i][1] -= slot.cpus
                slot.node = node.get("NodeID", str(i))
                break
        else:
            unplaced.append(slot)
    return unplaced


class PlacementError(RuntimeError):
    """Ray could not place what a plan asked for (the job turns it into its one `error:` line)."""


class GpuReservation:
    """The companions' placement group of a job's GPU slots (`assign_nodes` placed), made by `create`;
    the actor options of its bank shards and loader actors, the Train workers' label selectors, and
    `release` when the job ends."""

    def __init__(self, slots: list[GpuSlot], group=None, bundles: dict | None = None):
        self.slots, self.group, self.bundles = slots, group, bundles or {}

    @classmethod
    def create(cls, slots: list[GpuSlot], timeout: float = 120.0) -> "GpuReservation":
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        placed = [slot for slot in slots if slot.companions > 0]
        if not placed:
            return cls(slots)
        beside = [slot for slot in placed if slot.worker > 0]
        # (1) what the companions leave of each worker's GPU: > 0.5 GPU (pre-flight refuses workers of
        # 0.5 or less), so no two of these share a GPU
        held = placement_group([{"GPU": round(1.0 - slot.companions, 4)} for slot in beside],
                               bundle_label_selector=[{NODE_LABEL: slot.node} for slot in beside]) if beside else None
        # (2) the companions' bundles; a slot without a worker takes its whole GPU
        group = placement_group(
            [{"GPU": round(slot.companions, 4) if slot.worker > 0 else 1.0,  # Ray's resource precision
              **({"CPU": slot.loaders * slot.loader_cpus} if slot.loaders and slot.loader_cpus else {})}
             for slot in placed], bundle_label_selector=[{NODE_LABEL: slot.node} for slot in placed])
        try:
            for pg in (held, group):
                if pg is not None and not pg.wait(timeout):
                    raise PlacementError(f"the job's GPUs were not free within {timeout:.0f} s (another job holds "
                                      f"some: `ray status` shows what is in use)")
        except BaseException:
            remove_placement_group(group)
            raise
        finally:
            if held is not None:
                remove_placement_group(held)  # (3)
        return cls(slots, group, {id(slot): i for i, slot in enumerate(placed)})

    def _strategy(self, slot: GpuSlot):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=self.bundles[id(slot)])

    def shard_options(self, shard: int) -> dict:
        """Ray actor options of bank shard `shard` (an index over every bank's shards)."""
        slot = next(slot for slot in self.slots if slot.shard == shard)
        return {"num_gpus": slot.shard_share, "scheduling_strategy": self._strategy(slot)}

    def loader_options(self, rank: int) -> dict:
        """Ray actor options of each GPU loader actor of Train worker slot `rank`."""
        slot = next(slot for slot in self.slots if slot.rank == rank)
        return {"num_cpus": slot.loader_cpus, "num_gpus": slot.loader_share, "scheduling_strategy": self._strategy(slot)}

    def worker_labels(self) -> list[dict] | None:
        """ScalingConfig.label_selector: each Train worker on the node of its slot (None: no companions)."""
        workers = [slot for slot in self.slots if slot.worker > 0]
        if self.group is None or not workers:
            return None
        return [{NODE_LABEL: slot.node} for slot in workers]

    def release(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.group)
            self.group = None


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def read_on_nodes(path: str, node_ids: list[str], timeout: float = 60.0) -> dict[str, str | None]:
    """{node id: the text of `path` as that node sees it, None where it cannot}, read by a zero-CPU
    task pinned hard to each node; a node that does not answer within `timeout` is left out."""
    import ray
    task = ray.remote(num_cpus=0, max_retries=0)(_read_text)
    refs = {node: task.options(scheduling_strategy=pinned(node, soft=False)).remote(path) for node in node_ids}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    done = set(ready)
    return {node: ray.get(ref) for node, ref in refs.items() if ref in done}
