import os

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
    each re-run `BankShard.__init__` with the arguments `MemoryBank.plan` gives its shard (the state
    a new actor starts in; torch's threads back to Ray's one) instead of a new process importing torch
    (1.5–2.4 s per shard, measured). Fresh banks (the killed-shard tests), banks with their own actor
    options and tests/test_bank.py's module-scoped banks go through `MemoryBank.create`."""
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


@pytest.fixture
def make_bank(shard_pool):
    """make_bank(*MemoryBank.create's arguments): a bank on pooled shard actors, given back after the test."""
    take, give_back = shard_pool
    banks = []

    def make(*args, fresh: bool = False, **kwargs):
        """fresh=True: new actors from `MemoryBank.create` (a killed one restarts from its creation
        arguments, which a pooled actor does not have)."""
        from bank import MemoryBank
        if fresh or "actor_options" in kwargs or "max_restarts" in kwargs:
            bank = MemoryBank.create(*args, **kwargs)
        else:
            config, shard_args = MemoryBank.plan(*args, **kwargs)
            bank = MemoryBank.connect([take(a) for a in shard_args], config)
        banks.append(bank)
        return bank

    yield make
    for bank in banks:
        give_back(bank.shards)
