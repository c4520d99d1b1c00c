import contextlib
import dataclasses
import os
from pathlib import Path

import pytest

# Ray Train's controller polls its workers every 2 s by default, and a worker's `ray.train.report`
# waits for the poll that takes the report before it (Ray Train v2 keeps one pending): each checkpoint
# of a test run stalled training up to 2 s, and each run's end was seen up to 2 s late (measured: a
# 20-step run with 4 checkpoints, 20.5 s -> 16.8 s in `fit`). Every Ray a test starts inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process Ray cluster for the whole session (2 CPUs, like the CI machine)."""
    import ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@dataclasses.dataclass
class ServedCluster:
    address: str
    nodes: list[str]  # node ids, the head's first
    env: dict[str, str]  # for a process that connects: the cluster's token, this checkout on PYTHONPATH


_CLUSTER_SERVER = {}  # the process serving `three_nodes`, started once the session's tests are known


def pytest_collection_finish(session):
    """Start the three-node cluster in the background as soon as a collected test needs it: its ~6 s
    of start-up overlap the tests before it."""
    if any("three_nodes" in getattr(item, "fixturenames", ()) for item in session.items):
        _start_cluster_server()


def _start_cluster_server():
    import secrets
    import subprocess
    import sys
    import tempfile
    if not _CLUSTER_SERVER:
        from tests.cluster import ROOT, token_env
        env = token_env(secrets.token_hex(32))
        log = tempfile.NamedTemporaryFile("w+", prefix="three_nodes-", suffix=".log", delete=False)
        process = subprocess.Popen([sys.executable, "-m", "tests.cluster", "3"], cwd=ROOT, env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        _CLUSTER_SERVER.update(process=process, env=env, log=Path(log.name))
    return _CLUSTER_SERVER


@pytest.fixture(scope="session")
def three_nodes():
    """One `ray.cluster_utils.Cluster` of three one-CPU nodes for the session's multi-node tests (the
    converter's --ray tasks, then the three-node job), served by `python -m tests.cluster` in its own
    process and settled (tests/cluster.py). `Cluster` does not create ~/.ray/auth_token as `ray start`
    does: the cluster and every process that connects to it share a token of their own."""
    import json
    server = _start_cluster_server()
    process, log = server["process"], server["log"]
    try:
        line = process.stdout.readline()
        if not line.startswith("ADDRESS "):
            raise RuntimeError(f"the three-node cluster did not start: {line!r} {log.read_text()[-3000:]}")
        _, address, nodes = line.split(" ", 2)
        yield ServedCluster(address, json.loads(nodes), server["env"])
    finally:
        _stop_cluster_server()


def pytest_sessionfinish(session):
    _stop_cluster_server()  # started at collection, but its fixture never ran (the session stopped early)


def _stop_cluster_server():
    import subprocess
    process, log = _CLUSTER_SERVER.get("process"), _CLUSTER_SERVER.get("log")
    if process is not None and process.poll() is None:
        process.stdin.close()  # the server shuts the cluster down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    if log is not None:
        log.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """A test that builds a bank shard in-process sets torch's global thread count; later tests must
    not run (and round) differently because of it."""
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shard_pool(ray_cluster):
    """BankShard actors kept for the session's tests. A bank from `make_bank` takes free ones and has
    each re-run `BankShard.__init__` with its shard's arguments (the bank's spec, its index; the state
    a new actor starts in; torch's threads back to Ray's one) instead of a new process importing torch
    (1.5–2.4 s per shard, measured). Fresh banks (the killed-shard tests) and banks with their own actor
    options go through `MemoryBank.create`."""
    from bank.shard import BankShard
    ray = ray_cluster
    free, spawn = [], ray.remote(BankShard).options(num_cpus=0, max_restarts=-1, max_task_retries=0)

    def reinit(shard, *args):
        import os
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        shard.__init__(*args)

    def take(args):
        if not free:
            return spawn.remote(*args)
        actor = free.pop()
        ray.get(actor.__ray_call__.remote(reinit, *args))
        return actor

    def give_back(actors):
        for actor in actors:
            try:
                fresh = ray.get(actor.ping.remote(), timeout=30)["generation"] == 0
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                fresh = False
            if fresh:
                free.append(actor)
            else:
                ray.kill(actor, no_restart=True)

    yield take, give_back
    for actor in free:
        ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def pooled_banks(shard_pool):
    """make(*BankSpec's fields, true_labels=, actor_options=): banks on pooled shard actors, given
    back on exit."""
    take, give_back = shard_pool
    banks = []

    def make(*args, fresh: bool = False, true_labels=None, actor_options=None, **kwargs):
        """fresh=True: new actors from `MemoryBank.create` (a killed one restarts from its creation
        arguments, which a pooled actor does not have)."""
        from bank import BankSpec, MemoryBank
        spec = BankSpec(*args, **kwargs)
        if fresh or actor_options is not None or "max_restarts" in kwargs:
            bank = MemoryBank.create(spec, true_labels, actor_options)
        else:
            spec.warn_if_upkeep_thrashes()
            bank = MemoryBank.connect([take((spec, s, spec.shard_labels(true_labels, s)))
                                       for s in range(spec.num_shards)], spec)
        banks.append(bank)
        return bank

    try:
        yield make
    finally:
        for bank in banks:
            give_back(bank.shards)


@pytest.fixture
def make_bank(shard_pool):
    """A test's banks on pooled shard actors (`pooled_banks`), given back after the test."""
    with pooled_banks(shard_pool) as make:
        yield make


@pytest.fixture(scope="module")
def make_module_bank(shard_pool):
    """The same for banks a test module shares, given back after the module."""
    with pooled_banks(shard_pool) as make:
        yield make
