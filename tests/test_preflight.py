"""runtime.preflight: a request the data or the cluster cannot serve is a one-line ConfigError before
any Ray actor starts; and a job that fails once its actors exist leaves none of them alive."""
from __future__ import annotations

import time

import pytest
from ray.train.torch import TorchTrainer

from pipeline.convert import convert
from runtime.build import build_method
from runtime.config import ConfigError, parse_args
from runtime.driver import run
from runtime.preflight import check_data, check_resources
from tests import datasets

# the demo preset cut to what 120 images can serve: 2 workers × 1 loader × 3 batches of 16
FITS_120 = ["data.batch_size=16", "method.queue_size=64", "method.num_negatives=64", "bank.clusters=10",
            "bank.min_cluster=5", "eval.knn_k=20"]
NPID_FITS_120 = ["data.batch_size=16", "method.num_negatives=64", "eval.knn_k=20"]  # NPID reads no queue, no clusters


def demo(*overrides: str, method: str = "interclr"):
    argv = ["--preset", "demo"]
    for override in overrides:
        argv += ["--set", override]
    config, _ = parse_args(argv, method=method, default_preset="demo")
    return config


def data_error(config, num_samples: int) -> str:
    with pytest.raises(ConfigError) as caught:
        check_data(config, build_method(config, 10), num_samples)
    return str(caught.value)


def test_a_config_the_data_can_serve_passes():
    config = demo(*FITS_120, "train.num_workers=2")
    check_data(config, build_method(config, 10), 120)


def test_a_batch_larger_than_a_loader_streams_share_is_refused():
    config = demo(*FITS_120, "data.batch_size=64", "train.num_workers=2", "data.loaders=2")
    message = data_error(config, 200)  # 200 // (2 × 2) = 50 per stream
    assert message == ("200 training samples make no full batch of data.batch_size=64: each of the 4 loader "
                       "streams (2 Train workers × 2) gets 50 (lower data.batch_size to at most 50)")


def test_more_clusters_than_samples_is_refused_for_a_clustering_method_only():
    assert data_error(demo(*FITS_120, "bank.clusters=121"), 120).startswith(
        "bank.clusters=121 exceeds the 120 training samples")
    npid = demo(*NPID_FITS_120, method="npid")  # NPID's bank has no clusters: bank.clusters (10,000) is not read
    check_data(npid, build_method(npid, 10), 120)


def test_too_few_samples_per_cluster_for_upkeep_is_refused():
    """6 per cluster with min_cluster 5: upkeep would refill about half the clusters every step."""
    assert data_error(demo(*FITS_120, "bank.clusters=20"), 120) == (
        "bank.min_cluster=5 with 120 samples in 20 clusters (6 per cluster): upkeep needs at least 10 per "
        "cluster (lower bank.clusters to at most 12, or bank.min_cluster; 0 turns upkeep off)")
    off = demo(*FITS_120, "bank.clusters=20", "bank.min_cluster=0")
    check_data(off, build_method(off, 10), 120)


def test_the_demo_queue_on_512_images_is_refused_before_priming_runs_out_of_batches():
    # queue 4096 / (256 × 1 worker) = 16 batches to prime; 512 images make 2
    assert data_error(demo(), 512) == ("method.queue_size=4096 needs 16 batches of 256 × 1 Train worker to fill "
                                       "but an epoch of 512 samples has 2 (lower method.queue_size to at most 512)")


def test_as_many_negatives_as_bank_samples_is_refused():
    assert data_error(demo(*NPID_FITS_120, "method.num_negatives=120", method="npid"), 120).startswith(
        "method.num_negatives=120 must be below the 120 samples in the bank")
    below = demo(*NPID_FITS_120, "method.num_negatives=119", method="npid")
    check_data(below, build_method(below, 10), 120)


def test_a_byol_base_draws_no_negatives_so_num_negatives_is_not_checked():
    config = demo(*FITS_120, "method.base=byol", "method.num_negatives=16384")
    check_data(config, build_method(config, 10), 120)


def test_knn_k_beyond_the_knn_memory_is_refused():
    config = demo(*FITS_120, "eval.knn_k=60", "eval.knn_train_samples=50")
    assert data_error(config, 120).startswith("eval.knn_k=60 must be between 1 and the kNN memory of 50 train samples")


def one_node(**resources) -> tuple[dict, list[dict]]:
    return dict(resources), [{"Alive": True, "Resources": dict(resources)}]


def test_cpus_beyond_the_cluster_name_every_share():
    config = demo("train.num_workers=2")  # 1.5 CPUs per worker, 1 loader actor × 0.5 per worker
    with pytest.raises(ConfigError) as caught:
        check_resources(config, *one_node(CPU=2.0), num_banks=1)
    assert str(caught.value).startswith(
        "the job needs 4.0 CPUs (2 Train workers × 1.5, 2 loader actors × 0.5) but the cluster has 2.0")


def test_gpus_of_workers_and_bank_shards_count_together():
    config = demo("train.num_workers=2", "train.use_gpu=true", "bank.gpus_per_shard=0.5")
    with pytest.raises(ConfigError) as caught:
        check_resources(config, *one_node(CPU=16.0, GPU=2.0), num_banks=1)
    assert str(caught.value).startswith(
        "the job needs 3.0 GPUs (2 Train workers × 1, 2 bank shards × 0.5) but the cluster has 2.0")


def test_a_train_worker_larger_than_any_node_is_refused_though_the_total_fits():
    config = demo("train.cpus_per_worker=3")  # 3 + 0.5 of the 4 CPUs, but 2 per node
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0}}]
    with pytest.raises(ConfigError) as caught:
        check_resources(config, {"CPU": 4.0}, nodes, num_banks=1)
    assert str(caught.value) == ("one Train worker needs 3.0 CPUs on one node but the largest node has 2.0 CPUs "
                                 "(lower train.cpus_per_worker)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    datasets.make_imagenet(root / "src", per_class=24)  # 120 real photos, 5 classes
    datasets.make_imagenet(root / "src", per_class=2, split="val")
    for split in ("train", "val"):
        convert("imagenet", root / "src", root / "out", split, workers=1, log=lambda m: None)
    return root / "out"


def actor_states() -> dict[str, str]:
    """Every actor the cluster has known (id → state), from the GCS: ray.util.state needs the
    dashboard, which the test cluster runs without."""
    from ray._private import state
    return {actor_id: info["State"] for actor_id, info in state.actors().items()}


def job(shards, tmp_path, *overrides: str):
    config = demo(*FITS_120, *overrides)
    config.data.root, config.storage, config.name = str(shards), str(tmp_path), "preflight"
    return config


def test_run_refuses_an_infeasible_request_before_any_actor_starts(ray_cluster, shards, tmp_path, monkeypatch):
    def fit(self):
        raise AssertionError("the trainer started")
    monkeypatch.setattr(TorchTrainer, "fit", fit)
    before = actor_states()
    with pytest.raises(ConfigError, match=r"needs 4\.0 CPUs \(2 Train workers × 1\.5, 2 loader actors × 0\.5\) "
                                          r"but the cluster has 2\.0"):
        run(job(shards, tmp_path, "train.num_workers=2"))
    assert actor_states().keys() == before.keys()


def test_a_job_failing_inside_fit_leaves_no_actor_alive(ray_cluster, shards, tmp_path, monkeypatch):
    before = set(actor_states())
    started = {}

    def fit(self):  # an actor's registration with the GCS is asynchronous: give it a few seconds
        deadline = time.monotonic() + 20
        while len(started) < 3 and time.monotonic() < deadline:
            started.update({a: s for a, s in actor_states().items() if a not in before})
            time.sleep(0.1)
        raise RuntimeError("the worker group died")
    monkeypatch.setattr(TorchTrainer, "fit", fit)
    with pytest.raises(RuntimeError, match="worker group died"):
        run(job(shards, tmp_path, "bank.shards=1"))
    assert len(started) == 3  # the run's lock, the bank shard and the loader actor existed when fit failed
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(actor_states()[a] != "DEAD" for a in started):
        time.sleep(0.2)
    assert {actor_states()[a] for a in started} == {"DEAD"}


def test_gpu_presets_put_the_bank_shards_on_the_train_workers_gpus():
    """imagenet22k: 8 Train workers × 0.75 GPU + 8 bank shards × 0.25 GPU = one 8-GPU node."""
    config, _ = parse_args(["--preset", "imagenet22k"], method="interclr", default_preset="imagenet")
    node = {"Alive": True, "Resources": {"CPU": 24.0, "GPU": 8.0}}
    check_resources(config, node["Resources"], [node], num_banks=1)
    small = {"Alive": True, "Resources": {"CPU": 24.0, "GPU": 7.0}}
    with pytest.raises(ConfigError, match=r"needs 8\.0 GPUs \(8 Train workers × 0\.75, 8 bank shards × 0\.25\)"):
        check_resources(config, small["Resources"], [small], num_banks=1)


def test_placement_plan_names_every_component_and_a_shards_memory_worked_by_hand():
    from runtime.preflight import placement_plan
    config = demo()
    lines = placement_plan(config, [128], 20_000)
    # 10,000 rows × (128 float32 + label, true label, member index: 3 × int64) + 100 clusters × 128 ×
    # (float64 sum + float32 centroid) + 2 shards × 100 int64 counts = 5,515,200 B = 5.26 MiB
    assert "  bank shards: 2 × (CPU memory, no CPU reserved); ≈ 5 MiB per shard (10,000 rows × 128 float32, " \
           "100 clusters)" in lines
    assert "  Train workers: 1 × (1.5 CPU)" in lines and lines[-1] == "  total: 2 CPU, 0 GPU"
