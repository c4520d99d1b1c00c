"""Two gloo workers on CPU, each with half of a batch, against one process with the whole batch:
NT-Xent over the global batch, and shuffle BN across workers (MoCo's keys)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import nt_xent, nt_xent_global
from models.momentum import all_gather_with_grad, shuffled_forward

WORLD_SIZE, BATCH, IN_DIM, DIM, TEMPERATURE = 2, 6, 5, 4, 0.5


def whole_batch():
    """Inputs of both views [BATCH, IN_DIM] and the encoder's initial weight, the same everywhere."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64),
            torch.randn(BATCH, IN_DIM, generator=g, dtype=torch.float64),
            torch.randn(DIM, IN_DIM, generator=g, dtype=torch.float64))


def linear_encoder(weight: torch.Tensor) -> torch.nn.Linear:
    encoder = torch.nn.Linear(IN_DIM, DIM, bias=False).double()
    with torch.no_grad():
        encoder.weight.copy_(weight)
    return encoder


def single_process() -> dict:
    x1, x2, weight = whole_batch()
    encoder = linear_encoder(weight)
    z1, z2 = encoder(x1), encoder(x2)
    z1.retain_grad()
    z2.retain_grad()
    loss = nt_xent(z1, z2, TEMPERATURE)
    loss.backward()
    return {"loss": loss.detach(), "z1_grad": z1.grad, "z2_grad": z2.grad, "weight_grad": encoder.weight.grad}


BN_ROWS = 8


def bn_inputs() -> torch.Tensor:
    return torch.randn(BN_ROWS, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def worker(rank: int, port: int, out_dir: str) -> None:
    """Each worker's loss and gradients for its half of the batch, with and without the gather."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        x1, x2, weight = whole_batch()
        shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        results = {}
        for gather in (True, False):
            encoder = torch.nn.parallel.DistributedDataParallel(linear_encoder(weight))  # averages gradients
            z1, z2 = encoder(x1[shard]), encoder(x2[shard])
            z1.retain_grad()
            z2.retain_grad()
            if gather:
                both, offset = all_gather_with_grad(torch.stack([z1, z2], dim=1))
                loss = nt_xent_global(z1, z2, both[:, 0], both[:, 1], offset, TEMPERATURE)
            else:
                loss = nt_xent(z1, z2, TEMPERATURE)
            loss.backward()
            results[gather] = {"loss": loss.detach(), "z1_grad": z1.grad, "z2_grad": z2.grad,
                               "weight_grad": encoder.module.weight.grad}
        # shuffle BN: the permutation is rank 0's (broadcast), whatever the other ranks draw
        generator = torch.Generator().manual_seed(1 if rank == 0 else 99)
        x = bn_inputs()[rank * BN_ROWS // WORLD_SIZE:(rank + 1) * BN_ROWS // WORLD_SIZE]
        results["keys"] = shuffled_forward(torch.nn.BatchNorm1d(3, affine=False).double(), x, generator=generator)
        torch.save(results, f"{out_dir}/{rank}.pt")
        # both ranks done before either tears gloo down: a rank that destroys the group while the
        # other still talks to rank 0's store aborts with "terminate called without an active exception"
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> dict[bool, list[dict]]:
    """{gather: [rank 0's results, rank 1's]} from one spawn of two gloo workers (imports dominate)."""
    out_dir = tmp_path_factory.mktemp("workers")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a fork after this process has used torch's OpenMP pool deadlocks the child
    mp.start_processes(worker, args=(port, str(out_dir)), nprocs=WORLD_SIZE, join=True, start_method="spawn")
    per_rank = [torch.load(out_dir / f"{rank}.pt") for rank in range(WORLD_SIZE)]
    return {**{gather: [r[gather] for r in per_rank] for gather in (True, False)},
            "keys": [r["keys"] for r in per_rank]}


def test_mean_of_worker_losses_with_gather_is_the_whole_batch_loss(workers):
    gathered = workers[True]
    expected = single_process()["loss"]
    assert torch.stack([r["loss"] for r in gathered]).mean().item() == pytest.approx(expected.item(), rel=1e-12)


def test_ddp_averaged_gradients_with_gather_are_the_whole_batch_gradients(workers):
    gathered = workers[True]
    expected = single_process()
    # DDP divides by the world size: each worker's embedding gradient / W is its rows of the
    # single-process gradient, and the averaged weight gradient (identical on both) is the whole one.
    for name in ("z1_grad", "z2_grad"):
        assert torch.allclose(torch.cat([r[name] for r in gathered]) / WORLD_SIZE, expected[name], atol=1e-12)
    for r in gathered:
        assert torch.allclose(r["weight_grad"], expected["weight_grad"], atol=1e-12)


def test_without_gather_each_worker_sees_only_its_own_negatives(workers):
    local = workers[False]
    expected = single_process()
    mean_loss = torch.stack([r["loss"] for r in local]).mean().item()
    assert abs(mean_loss - expected["loss"].item()) > 1e-3
    assert not torch.allclose(local[0]["weight_grad"], expected["weight_grad"], atol=1e-6)


def test_shuffle_bn_across_workers_normalises_each_key_with_rank_0s_shuffled_slice(workers):
    """moco builder.py `_batch_shuffle_ddp`: the gathered batch is shuffled by rank 0's permutation,
    worker r normalises slice r of it, and every worker gets its own rows back in order."""
    x = bn_inputs()
    order = torch.randperm(BN_ROWS, generator=torch.Generator().manual_seed(1))
    expected = torch.empty_like(x)
    for group in order.view(WORLD_SIZE, -1):
        part = x[group]
        expected[group] = (part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(torch.cat(workers["keys"]), expected)
    own_half = (x[:4] - x[:4].mean(0)) / torch.sqrt(x[:4].var(0, unbiased=False) + 1e-5)
    assert not torch.allclose(workers["keys"][0], own_half)  # not the worker's own batch statistics
