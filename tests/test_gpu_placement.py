"""GPU placement on Ray's fake GPUs: the GPU presets' bank shards each on a GPU of its own beside a
Train worker (runtime.driver `reserve_gpus`, pipeline.placement `GpuReservation`), Train-shaped workers
placing beside them as Ray Train v2 places its workers; and no loader actor that decodes on the GPU
without a GPU resource. One `ray.cluster_utils.Cluster` in a subprocess (this session may hold an
in-process Ray): a 4-GPU head for the imagenet preset, then a second 4-GPU node for imagenet22k."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.cluster import token_env

ROOT = Path(__file__).resolve().parents[1]
GPUS_PER_NODE = 4


def place(preset: str) -> dict:
    """In a process connected to the fake-GPU cluster: the driver's placement of `preset`'s bank shards
    (probe actors with the options `runtime.driver` gives the shards), then the Train workers' bundles
    and actors as Ray Train v2 makes them (worker_group.py `_create_placement_group`, `_create_workers`)
    from the driver's ScalingConfig. Returns where each is: (node id, GPU ids) from inside the actor."""
    import ray
    from ray.train.v2._internal.util import bundle_to_remote_args
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from runtime import driver
    from runtime.config import parse_args
    from runtime.preflight import check_resources

    class Probe:
        def where(self):
            context = ray.get_runtime_context()
            return context.get_node_id(), context.get_accelerator_ids()["GPU"]

    probe = ray.remote(Probe)
    config, _ = parse_args(["--preset", preset])
    nodes = ray.nodes()
    check_resources(config, ray.cluster_resources(), nodes, num_banks=1)
    gpus = driver.reserve_gpus(config, nodes, num_banks=1)
    # MemoryBank.create's defaults (num_cpus=0) under the driver's options
    shards = [probe.options(num_cpus=0, **options).remote()
              for options in driver.bank_actor_options(config, nodes, gpus, bank=0, num_banks=1)]
    report = {"shards": ray.get([shard.where.remote() for shard in shards], timeout=60)}
    scaling, count = driver.scaling_config(config, gpus), config.train.num_workers
    bundle = scaling._resources_per_worker_not_none
    group = placement_group([bundle] * count, strategy=scaling.placement_strategy,
                            bundle_label_selector=scaling._label_selector_per_worker(count))
    report["workers_fit"] = group.wait(10)
    workers = [probe.options(**bundle_to_remote_args(bundle), scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=i)).remote() for i in range(count)] if report["workers_fit"] else []
    report["workers"] = ray.get([worker.where.remote() for worker in workers], timeout=60)
    for actor in shards + workers:
        ray.kill(actor)
    remove_placement_group(group)
    gpus.release()
    return report


def serve() -> None:
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": GPUS_PER_NODE, "num_gpus": GPUS_PER_NODE,
                                                            "include_dashboard": False})
    try:
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        report = {"one_node": place("imagenet")}
        cluster.add_node(num_cpus=GPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
        cluster.wait_for_nodes()
        report["two_nodes"] = place("imagenet22k")
        print("REPORT", json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def placed():
    result = subprocess.run([sys.executable, "-c", "from tests.test_gpu_placement import serve; serve()"], cwd=ROOT,
                            env=token_env(secrets.token_hex(32)), capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[0].removeprefix("REPORT "))


def gpus_of(where: list) -> list[tuple[str, str]]:
    """[(node, GPU id)] of actors that each hold one GPU id."""
    assert all(len(ids) == 1 for _, ids in where), where
    return [(node, ids[0]) for node, ids in where]


def test_imagenet_preset_puts_4_shards_on_4_distinct_gpus_beside_4_workers_on_one_node(placed):
    report = placed["one_node"]
    shards = gpus_of(report["shards"])
    assert sorted(gpu for _, gpu in shards) == ["0", "1", "2", "3"]  # not four 0.25 shares of GPU 0
    assert report["workers_fit"]  # all four 0.75 workers placed with the shards in place
    assert sorted(gpus_of(report["workers"])) == sorted(shards)  # each worker on a shard's GPU


def test_imagenet22k_puts_8_shards_on_8_distinct_gpus_beside_8_workers_on_two_nodes(placed):
    report = placed["two_nodes"]
    shards = gpus_of(report["shards"])
    assert len(set(shards)) == 8 and sorted(Counter(node for node, _ in shards).values()) == [4, 4]
    assert report["workers_fit"]
    assert sorted(gpus_of(report["workers"])) == sorted(shards)


def test_a_loader_actor_decoding_on_the_gpu_is_refused_without_a_gpu_resource():
    from pipeline.actors import create_loader_actors
    with pytest.raises(ValueError, match="need a GPU resource"):
        create_loader_actors("shards", "two_crop", batch_size=4, device="gpu", actor_options={"num_cpus": 1})
