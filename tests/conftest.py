import os

import pytest


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
