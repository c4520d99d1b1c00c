"""The bank shard on a CUDA device (skipped without one; run on a lent GPU): the same sampling and
reduction semantics as on the CPU, checked against brute force on the shard's own data."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bank.shard import BankShard
from bank.spec import BankSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def shard():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    x = centers[rng.integers(0, 6, 3000)] + 0.5 * rng.normal(size=(3000, 16))
    shard = BankShard(BankSpec(3000, 16, num_clusters=6), 0, device="cuda")
    shard.set_features(np.arange(3000), x)
    partial = shard.set_clusters(shard.get(np.arange(0, 3000, 500)))
    shard.set_replicas(partial["sums"], partial["counts"][None], shard.get(np.arange(0, 3000, 500)))
    return shard


def request(labels, k, strategy):
    return {"anchor_labels": labels, "shares": np.full(len(labels), k), "strategy": strategy,
            "pool_fraction": 0.1, "want_positive": True}


def test_feature_storage_is_on_the_gpu(shard):
    assert shard.feats.is_cuda and shard.labels.is_cuda and shard.sums.is_cuda


@pytest.mark.parametrize("strategy", ["hard", "semi_hard", "semi_easy", "random"])
def test_gpu_sampling_semantics_and_exact_reduction(shard, strategy):
    ids = np.arange(0, 3000, 300)
    q = torch.nn.functional.normalize(torch.randn(len(ids), 16), dim=1).numpy()
    labels = shard.get_labels(ids)
    (answer,) = shard.score(q, ids, [request(labels, 20, strategy)], 0.1, seed=1, return_ids=True)
    feats, all_labels = shard.get(np.arange(3000)), shard.get_labels(np.arange(3000))
    for i, chosen in enumerate(answer["ids"]):
        others = np.flatnonzero(all_labels != labels[i])
        ranked = others[np.argsort(-(feats[others] @ q[i]))]
        pool = math.ceil(0.1 * len(others))
        expected = {"hard": ranked[:20], "semi_hard": ranked[:pool], "semi_easy": ranked[::-1][:pool],
                    "random": others}[strategy]
        assert len(chosen) == 20 and set(chosen) <= set(expected)
        logits = feats[chosen] @ q[i] / 0.1
        lse = np.logaddexp.reduce(logits)
        weights = np.exp(logits - lse)
        assert answer["lse"][i] == pytest.approx(lse, rel=1e-4)
        np.testing.assert_allclose(answer["mean"][i], weights @ feats[chosen], atol=1e-4)
        assert all_labels[answer["positive_id"][i]] == labels[i] and answer["positive_id"][i] != ids[i]


def test_gpu_update_follows_eq2_and_eq3(shard):
    ids = np.array([5, 17, 2999])
    old, new = shard.get(ids), np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    centroids = shard.cluster_state()["centroids"]
    delta = shard.update(ids, new, 0.5)
    shard.apply_deltas([delta])
    blended = 0.5 * old + 0.5 * new
    expected = blended / np.linalg.norm(blended, axis=1, keepdims=True)
    np.testing.assert_allclose(shard.get(ids), expected, atol=1e-5)
    distances = ((expected[:, None] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(shard.get_labels(ids), distances.argmin(1))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_shard_scores_from_its_stored_values(dtype):
    """fp16 / bf16 storage on CUDA: similarities by torch.mm(..., out_dtype=float32) over the stored
    values, no float32 copy of the shard; within the query's rounding of the widened product."""
    half = BankShard(BankSpec(3000, 16, num_clusters=6, dtype=dtype), 0, device="cuda")
    half.set_features(np.arange(3000), np.random.default_rng(1).normal(size=(3000, 16)))
    q = torch.nn.functional.normalize(torch.randn(7, 16, device="cuda"), dim=1)
    sims = half._similarity_fn()(q)
    assert sims.dtype == torch.float32
    tolerance = 2e-3 if dtype == "float16" else 1.6e-2  # one rounding of q to the storage dtype
    torch.testing.assert_close(sims, q @ half.feats.float().T, atol=tolerance, rtol=0)


def test_host_copy_of_a_bank_update_is_pinned_and_waits_for_its_own_copy_only():
    """models.method.HostCopy: the features of a bank update leave the GPU through pinned memory
    while later kernels are still queued; get() returns the values without a device-wide sync."""
    from models.method import HostCopy
    x = torch.randn(512, 128, device="cuda")
    copy = HostCopy(x)
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy.T / 4096  # queued behind the copy
    value = copy.get()
    assert value.is_pinned() and not value.is_cuda
    torch.testing.assert_close(value, x.cpu())
    assert copy.event.query()
