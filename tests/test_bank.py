"""bank/: InterCLR Eq. 2/3 semantics, distributed k-means against faiss, shard-count invariance,
sampling semantics on known geometry, exact folded gradients, shard failure, bad input."""
from __future__ import annotations

import math
import time

from pathlib import Path

import numpy as np
import pytest
import torch

from bank import BankSpec, BankStateError, MemoryBank
from bank.kmeans import normalized_mutual_info
from losses import info_nce, info_nce_from_logits


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def blobs(n, k, d, noise, seed=0):
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(k, d)))
    labels = rng.permutation(np.arange(n) % k)
    return unit(centers[labels] + noise * rng.normal(size=(n, d))).astype(np.float32), labels


def clustered_bank(make_bank, n=600, k=6, d=8, noise=0.3, shards=1, seed=0, **kwargs):
    x, truth = blobs(n, k, d, noise, seed)
    bank = make_bank(n, d, num_shards=shards, num_clusters=k, seed=seed, **kwargs)
    bank.set_features(np.arange(n), x)
    bank.init_clusters(iters=10)
    return bank, x, truth


# --- Eq. 2 / Eq. 3 / running means ---------------------------------------------------------------

def test_momentum_update_follows_eq2_and_leaves_other_rows(make_bank):
    rng = np.random.default_rng(1)
    old = unit(rng.normal(size=(40, 4)))
    bank = make_bank(40, 4, num_shards=2, num_clusters=2, momentum=0.3)
    bank.set_features(np.arange(40), old)
    bank.init_clusters(iters=3, init="random")
    ids = np.array([3, 7, 8, 20, 39])
    new = rng.normal(size=(5, 4))
    bank.update(ids, new)
    expected = unit(0.7 * old[ids] + 0.3 * new)  # v̂ ← (1-ω)v̂ + ωv, ω = 0.3, re-normalised
    np.testing.assert_allclose(bank.get(ids).numpy(), expected, atol=1e-6)
    others = np.setdiff1d(np.arange(40), ids)
    np.testing.assert_allclose(bank.get(others).numpy(), old[others], atol=1e-6)


def test_update_relabels_each_row_to_its_most_similar_centroid(make_bank):
    """Online relabel = argmax_c v·c over the centroids before the update (mmselfsup's rule)."""
    bank, _, _ = clustered_bank(make_bank, shards=2)
    centroids = bank.centroids()
    ids = np.arange(0, 600, 7)
    bank.update(ids, np.random.default_rng(2).normal(size=(len(ids), 8)))
    feats = bank.get(ids).numpy()
    np.testing.assert_array_equal(bank.labels(ids).numpy(), (feats @ centroids.T).argmax(1))  # brute force


def test_centroids_equal_member_means_after_a_sequence_of_updates(make_bank):
    bank, _, _ = clustered_bank(make_bank, shards=3)
    rng = np.random.default_rng(3)
    for _ in range(10):
        ids = rng.choice(600, size=64, replace=False)
        bank.update(ids, rng.normal(size=(64, 8)))
    feats, labels = bank.get(np.arange(600)).numpy(), bank.labels(np.arange(600)).numpy()
    centroids = bank.centroids()
    for c in np.unique(labels):
        np.testing.assert_allclose(centroids[c], feats[labels == c].mean(0), atol=1e-5)
    assert bank.stats()["step"] == 10


# --- k-means --------------------------------------------------------------------------------------

def test_distributed_kmeans_recovers_blobs_and_matches_faiss_inertia(make_bank):
    import faiss
    from sklearn.metrics import normalized_mutual_info_score
    x, truth = blobs(3000, 10, 32, noise=0.05, seed=4)
    bank = make_bank(3000, 32, num_shards=3, num_clusters=10, seed=4, true_labels=truth)
    bank.set_features(np.arange(3000), x)
    result = bank.init_clusters(iters=20, init="kmeans++")
    labels = bank.labels(np.arange(3000)).numpy()
    assert normalized_mutual_info_score(truth, labels) >= 0.99
    assert bank.stats()["nmi"] == pytest.approx(normalized_mutual_info_score(truth, labels), abs=1e-9)

    reference = faiss.Kmeans(32, 10, niter=20, seed=4, max_points_per_centroid=10_000)
    reference.train(x, init_centroids=result["initial_centroids"])

    def inertia(centroids):
        index = faiss.IndexFlatL2(32)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        return float(index.search(x, 1)[0].sum())

    ours, theirs = inertia(bank.centroids()), inertia(reference.centroids)
    assert abs(ours - theirs) <= 0.01 * theirs
    assert result["inertia"][-1] == pytest.approx(ours, rel=1e-4)


def test_waiting_ranks_return_only_after_another_clients_kmeans_has_completed(make_bank):
    """The other Train ranks wait through the bank (runtime.train.cluster_banks): wait_clustered
    must block while rank 0's k-means runs and return once its final labels are in place."""
    import threading
    x, _ = blobs(600, 6, 8, noise=0.3, seed=7)
    bank = make_bank(600, 8, num_shards=2, num_clusters=6, seed=7)
    bank.set_features(np.arange(600), x)
    before = bank.clusterings()
    done = {}

    def rank_zero():
        time.sleep(0.5)
        bank.init_clusters(iters=4)
        done["labels"] = bank.labels(np.arange(600)).numpy()

    worker = threading.Thread(target=rank_zero)
    started = time.perf_counter()
    worker.start()
    bank.wait_clustered(before, poll_seconds=0.05)
    waited = time.perf_counter() - started
    seen = bank.labels(np.arange(600)).numpy()
    worker.join()
    assert waited >= 0.5 and bank.clusterings() == before + 1
    np.testing.assert_array_equal(seen, done["labels"])  # not a half-finished clustering
    assert np.bincount(seen, minlength=6).min() > 0


def test_kmeans_reports_progress_and_refuses_an_unknown_seeding(make_bank):
    x, _ = blobs(300, 3, 8, noise=0.3, seed=8)
    bank = make_bank(300, 8, num_clusters=3, seed=8)
    bank.set_features(np.arange(300), x)
    messages = []
    result = bank.init_clusters(iters=3, progress=messages.append)
    assert len(messages) == 4 and "seeded (random)" in messages[0] and "iteration 3/3" in messages[-1]
    assert len(result["iteration_seconds"]) == 3 and result["seed_seconds"] >= 0
    with pytest.raises(ValueError, match="init must be 'random' or 'kmeans\\+\\+'"):
        bank.init_clusters(iters=1, init="forgy")


def test_empty_clusters_are_split_from_large_ones(make_bank):
    # 40 identical points and 2 distinct ones: a random seeding gives duplicate centroids, whose
    # clusters come out empty and must be refilled.
    x = np.zeros((42, 4), dtype=np.float32)
    x[:, 0] = 1.0
    x[40] = [0, 1, 0, 0]
    x[41] = [0, 0, 1, 0]
    bank = make_bank(42, 4, num_clusters=5, seed=0)
    bank.set_features(np.arange(42), x)
    result = bank.init_clusters(iters=5, init="random")
    assert result["empty_splits"] > 0
    assert result["final_refills"] > 0  # the final assignment left clusters empty: refilled by splits
    sizes = np.bincount(bank.labels(np.arange(42)).numpy(), minlength=5)
    assert (sizes > 0).all() and bank.stats()["empty_clusters"] == 0
    assert_replicas_are_member_means(bank)


def test_one_shard_and_three_shards_agree_on_kmeans_updates_upkeep_and_labels(make_bank):
    x, _ = blobs(900, 5, 16, noise=0.4, seed=5)
    banks = []
    for shards in (1, 3):
        bank = make_bank(900, 16, num_shards=shards, num_clusters=5, seed=5, momentum=1.0, min_cluster=20)
        bank.set_features(np.arange(900), x)
        bank.init_clusters(iters=8, init="kmeans++")
        banks.append(bank)
    everything = np.arange(900)
    np.testing.assert_array_equal(banks[0].labels(everything).numpy(), banks[1].labels(everything).numpy())
    np.testing.assert_allclose(banks[0].centroids(), banks[1].centroids(), atol=1e-6)
    rng = np.random.default_rng(6)
    for _ in range(5):
        ids = rng.choice(900, size=100, replace=False)
        feats = rng.normal(size=(100, 16))
        for bank in banks:
            bank.update(ids, feats)
    np.testing.assert_array_equal(banks[0].labels(everything).numpy(), banks[1].labels(everything).numpy())
    np.testing.assert_allclose(banks[0].get(everything).numpy(), banks[1].get(everything).numpy(), atol=1e-7)
    np.testing.assert_allclose(banks[0].centroids(), banks[1].centroids(), atol=1e-6)
    for bank in banks:  # upkeep: one cluster emptied, one left below min_cluster; both refilled by splits
        move_members(bank, cluster=0, keep=0, target=1)
        move_members(bank, cluster=3, keep=4, target=2)
    counts = [(b.upkeep["dissolved"], b.upkeep["refilled"], b.upkeep["random_splits"]) for b in banks]
    assert counts[0] == counts[1] and counts[0][1] == 2
    np.testing.assert_array_equal(banks[0].labels(everything).numpy(), banks[1].labels(everything).numpy())
    np.testing.assert_allclose(banks[0].centroids(), banks[1].centroids(), atol=1e-6)


# --- cluster upkeep (mmselfsup InterCLRMemory.deal_with_small_clusters) ----------------------------

def assert_replicas_are_member_means(bank):
    """Every shard's replica: counts per shard and centroid = mean of the members, from get + labels."""
    import ray
    everything = np.arange(bank.num_samples)
    feats, labels = bank.get(everything).numpy(), bank.labels(everything).numpy()
    for shard in bank.shards:
        state = ray.get(shard.cluster_state.remote())
        for s in range(bank.num_shards):
            np.testing.assert_array_equal(state["counts"][s], np.bincount(labels[s::bank.num_shards],
                                                                          minlength=bank.num_clusters))
        for c in np.unique(labels):
            np.testing.assert_allclose(state["centroids"][c], feats[labels == c].mean(0), atol=1e-5)


def move_members(bank, cluster, keep, target):
    """Momentum-1 update moving all but `keep` members of `cluster` onto centroid `target`. Returns
    (moved ids, the labels an update without upkeep gives: argmax v·c over the centroids before)."""
    everything = np.arange(bank.num_samples)
    labels, centroids = bank.labels(everything).numpy(), bank.centroids()
    moved = np.flatnonzero(labels == cluster)[keep:]
    noise = 0.01 * np.random.default_rng(cluster).normal(size=(len(moved), bank.dim))
    bank.update(moved, centroids[target] + noise)
    labels[moved] = (bank.get(moved).numpy() @ centroids.T).argmax(1)
    return moved, labels


def test_a_cluster_emptied_by_updates_is_refilled_by_a_2_means_split_of_the_largest(make_bank):
    bank, _, _ = clustered_bank(make_bank, shards=2, momentum=1.0, min_cluster=20)
    _, before = move_members(bank, cluster=2, keep=0, target=4)
    sizes_before = np.bincount(before, minlength=6)
    assert sizes_before[2] == 0
    largest = int(np.argmax(sizes_before))
    labels = bank.labels(np.arange(600)).numpy()
    sizes = np.bincount(labels, minlength=6)
    assert sizes.min() >= 20 and bank.stats()["empty_clusters"] == 0
    # cluster 2 now holds part of the largest cluster, and nothing else moved
    assert set(np.flatnonzero((labels == 2) | (labels == largest))) == set(np.flatnonzero(before == largest))
    np.testing.assert_array_equal(labels[(before != largest)], before[before != largest])
    # the split is a 2-means fixed point: each half's members are nearer its own mean (Euclidean)
    feats = bank.get(np.arange(600)).numpy()
    halves = np.flatnonzero(labels == largest), np.flatnonzero(labels == 2)
    means = [feats[h].mean(0) for h in halves]
    for own, other, half in [(0, 1, halves[0]), (1, 0, halves[1])]:
        distance = lambda m: ((feats[half] - m) ** 2).sum(1)
        assert (distance(means[own]) <= distance(means[other]) + 1e-9).all()
    assert bank.stats()["upkeep_refilled"] == 1
    assert_replicas_are_member_means(bank)


def test_small_clusters_are_dissolved_into_the_most_similar_remaining_centroid(make_bank):
    bank, _, _ = clustered_bank(make_bank, shards=2, momentum=1.0, min_cluster=20)
    ids = np.arange(0, 600, 10)
    feats = bank.get(ids)
    trips = bank.round_trips
    bank.update(ids, feats)  # no cluster gets small
    # the steady state: one wait (the shards pass the deltas to each other), no upkeep
    assert bank.round_trips - trips == 1 and bank.upkeep["round_trips"] == 0
    _, before = move_members(bank, cluster=1, keep=5, target=3)
    leftovers = np.flatnonzero(before == 1)
    assert len(leftovers) == 5  # below min_cluster: dissolved
    feats = bank.get(np.arange(600)).numpy()
    remaining = np.array([c for c in range(6) if c != 1])
    means = np.stack([feats[before == c].mean(0) for c in remaining])  # centroids before upkeep
    targets = remaining[(feats[leftovers] @ means.T).argmax(1)]
    after_dissolve = np.bincount(before[before != 1], minlength=6)
    np.add.at(after_dissolve, targets, 1)
    largest = int(np.argmax(after_dissolve))  # split next, to refill the emptied cluster 1
    labels = bank.labels(np.arange(600)).numpy()
    for row, target in zip(leftovers, targets):
        assert labels[row] == target or (target == largest and labels[row] == 1)
    assert np.bincount(labels, minlength=6).min() >= 20
    stats = bank.stats()
    assert (stats["upkeep_dissolved"], stats["upkeep_refilled"], stats["empty_clusters"]) == (1, 1, 0)
    assert_replicas_are_member_means(bank)


def test_clusters_stay_pure_over_50_updates_of_drifting_blobs_with_upkeep(make_bank):
    """10 true blobs, 20 clusters, the features turned 2.5 rad in all: the centroids must follow.

    The measure is homogeneity (each cluster holds one true blob), not NMI: with k = 2x the true
    classes, upkeep's refills split big blobs to keep every cluster >= min_cluster, which costs
    completeness by design (about 0.03 here) while homogeneity stays 1.0. Centroids that did not
    follow the drift would assign rows to stale centroids and mix blobs, which homogeneity catches.
    """
    from sklearn.datasets import make_blobs
    from sklearn.metrics import homogeneity_score
    x, truth = make_blobs(1000, 16, centers=10, cluster_std=2.0, random_state=0)
    x -= x.mean(0)
    bank = make_bank(1000, 16, num_shards=2, num_clusters=20, seed=0, true_labels=truth, min_cluster=20)
    bank.set_features(np.arange(1000), x)
    bank.init_clusters(iters=10)
    assert homogeneity_score(truth, bank.labels(np.arange(1000)).numpy()) > 0.98
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    turn = np.eye(16)
    turn[:2, :2] = [[np.cos(0.05), -np.sin(0.05)], [np.sin(0.05), np.cos(0.05)]]
    rotation = basis @ turn @ basis.T  # 0.05 rad per step in a random plane: 2.5 rad in all
    feats = x
    for _ in range(50):
        feats = feats @ rotation.T
        ids = rng.choice(1000, 200, replace=False)
        bank.update(ids, feats[ids] + 0.5 * rng.normal(size=(200, 16)))
    stats = bank.stats()
    assert stats["upkeep_refilled"] > 0  # upkeep did run
    assert stats["empty_clusters"] == 0 and stats["cluster_size_min"] >= 20
    assert homogeneity_score(truth, bank.labels(np.arange(1000)).numpy()) > 0.98
    assert stats["nmi"] > 0.8
    assert_replicas_are_member_means(bank)


def test_min_cluster_zero_disables_upkeep(make_bank):
    bank, _, _ = clustered_bank(make_bank, shards=1, momentum=1.0, min_cluster=0)
    move_members(bank, cluster=2, keep=0, target=4)
    assert bank.stats()["empty_clusters"] == 1
    with pytest.raises(ValueError, match="min_cluster"):
        BankSpec(10, 4, num_clusters=2, min_cluster=-1)


# --- sampling semantics ---------------------------------------------------------------------------

def geometry(bank, query, anchor_ids, members=None):
    """For each anchor: ids of other-cluster rows sorted nearest first (optionally among `members`)."""
    n = bank.num_samples
    members = np.arange(n) if members is None else members
    feats, labels = bank.get(members).numpy(), bank.labels(members).numpy()
    anchor_labels = bank.labels(anchor_ids).numpy()
    q = unit(query.numpy())
    ranked = []
    for i in range(len(anchor_ids)):
        other = labels != anchor_labels[i]
        order = np.argsort(-(feats[other] @ q[i]))
        ranked.append(members[other][order])
    return ranked


@pytest.fixture(scope="module")
def one_shard_bank(make_module_bank):
    """Read-only: the sampling tests only query it."""
    return clustered_bank(make_module_bank, shards=1)[0]


@pytest.fixture(scope="module")
def three_shard_bank(make_module_bank):
    return clustered_bank(make_module_bank, shards=3)[0]


def anchors_and_queries(bank, count=8, seed=7):
    ids = np.arange(count) * 37
    query = bank.get(ids) + 0.05 * torch.from_numpy(np.random.default_rng(seed).normal(size=(count, 8))).float()
    return ids, query


def test_hard_negatives_are_exactly_the_k_nearest_of_other_clusters(one_shard_bank):
    ids, query = anchors_and_queries(one_shard_bank)
    _, negatives = one_shard_bank.sample_inter(query, ids, 5, "hard", seed=1)
    for ranked, chosen in zip(geometry(one_shard_bank, query, ids), negatives):
        assert set(chosen) == set(ranked[:5])


@pytest.mark.parametrize("strategy", ["semi_hard", "semi_easy"])
def test_semi_hard_from_nearest_and_semi_easy_from_farthest_ten_percent(one_shard_bank, strategy):
    ids, query = anchors_and_queries(one_shard_bank)
    _, negatives = one_shard_bank.sample_inter(query, ids, 12, strategy, pool_fraction=0.1, seed=2)
    for ranked, chosen in zip(geometry(one_shard_bank, query, ids), negatives):
        pool_size = math.ceil(0.1 * len(ranked))
        pool = ranked[:pool_size] if strategy == "semi_hard" else ranked[::-1][:pool_size]
        assert len(chosen) == 12 and len(set(chosen)) == 12  # drawn without replacement
        assert set(chosen) <= set(pool)


def test_semi_hard_pool_fraction_is_configurable(one_shard_bank):
    ids, query = anchors_and_queries(one_shard_bank)
    _, negatives = one_shard_bank.sample_inter(query, ids, 40, "semi_hard", pool_fraction=0.5, seed=3)
    ranked = geometry(one_shard_bank, query, ids)
    assert all(set(c) <= set(r[:math.ceil(0.5 * len(r))]) for r, c in zip(ranked, negatives))
    assert any(not set(c) <= set(r[:math.ceil(0.1 * len(r))]) for r, c in zip(ranked, negatives))


def test_random_negatives_are_uniform_over_other_clusters(one_shard_bank):
    from scipy.stats import chisquare
    anchor = np.array([5] * 400)  # 400 queries of one anchor, 50 draws each
    query = one_shard_bank.get(anchor)
    _, negatives = one_shard_bank.sample_inter(query, anchor, 50, "random", seed=4)
    draws = np.concatenate(negatives)
    others = geometry(one_shard_bank, query[:1], anchor[:1])[0]
    assert set(draws) <= set(others)
    counts = np.array([np.sum(draws == i) for i in others])
    assert chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("strategy", ["hard", "semi_hard", "random", "semi_easy"])
def test_negatives_never_share_the_anchor_label_and_positives_do(three_shard_bank, strategy):
    bank = three_shard_bank
    ids, query = anchors_and_queries(bank, count=12)
    positives, negatives = bank.sample_inter(query, ids, 30, strategy, seed=5)
    anchor_labels = bank.labels(ids).numpy()
    np.testing.assert_array_equal(bank.labels(positives).numpy(), anchor_labels)
    assert not np.any(positives == ids)
    for label, chosen in zip(anchor_labels, negatives):
        assert len(chosen) == 30
        assert not np.any(bank.labels(chosen).numpy() == label)


def test_with_three_shards_semi_hard_negatives_come_from_each_shards_nearest_pool(three_shard_bank):
    bank = three_shard_bank
    ids, query = anchors_and_queries(bank)
    # 60 draws from per-shard pools of ~17 rows: shares beyond a pool are drawn again from it
    _, negatives = bank.sample_inter(query, ids, 60, "semi_hard", seed=6)
    assert all(len(chosen) == 60 for chosen in negatives)
    for s in range(3):
        ranked = geometry(bank, query, ids, members=np.arange(s, 600, 3))
        for r, chosen in zip(ranked, negatives):
            mine = chosen[chosen % 3 == s]
            assert set(mine) <= set(r[:math.ceil(0.1 * len(r))])


# --- exactness of what crosses the wire -----------------------------------------------------------

@pytest.mark.parametrize("strategy", ["semi_hard", "random"])
def test_folded_negatives_give_the_exact_info_nce_value_and_gradient(three_shard_bank, strategy):
    bank = three_shard_bank
    ids = np.array([1, 50, 99, 301, 302, 555])
    g = torch.Generator().manual_seed(8)
    q = torch.randn(6, 8, generator=g, dtype=torch.float32, requires_grad=True)
    pos, neg = bank.inter(q, ids, 25, strategy, temperature=0.2, seed=9)
    folded = info_nce_from_logits(pos, neg, 0.2, margin=-0.5)
    (grad_folded,) = torch.autograd.grad(folded, q)

    positive_ids, negative_ids = bank.sample_inter(q.detach(), ids, 25, strategy, seed=9)
    negatives = torch.stack([bank.get(n) for n in negative_ids])  # [B, K, D] explicit features
    explicit = info_nce(q, bank.get(positive_ids), negatives, 0.2, margin=-0.5)
    (grad_explicit,) = torch.autograd.grad(explicit, q)
    assert folded.item() == pytest.approx(explicit.item(), rel=1e-5)
    torch.testing.assert_close(grad_folded, grad_explicit, rtol=1e-4, atol=1e-6)


def test_one_query_for_both_branches_is_exact_for_each(three_shard_bank):
    bank = three_shard_bank
    ids = np.array([2, 3, 77, 400])
    q = torch.randn(4, 8, generator=torch.Generator().manual_seed(12), requires_grad=True)
    answer = bank.query(q, ids, intra_negatives=30, inter_negatives=20, strategy="semi_hard",
                        temperature=0.1, seed=13, return_ids=True)
    for name, margin in (("intra", 0.0), ("inter", -0.5)):
        folded = info_nce_from_logits(getattr(answer, f"{name}_pos"), getattr(answer, f"{name}_neg"), 0.1, margin)
        negatives = torch.stack([bank.get(n) for n in getattr(answer, f"{name}_negative_ids")])
        positives = bank.get(getattr(answer, f"{name}_positive_ids"))
        explicit = info_nce(q, positives, negatives, 0.1, margin=margin)
        grads = [torch.autograd.grad(loss, q, retain_graph=True)[0] for loss in (folded, explicit)]
        assert folded.item() == pytest.approx(explicit.item(), rel=1e-5)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert all(len(n) == 30 for n in answer.intra_negative_ids)
    assert not any(i in n for i, n in zip(ids, answer.intra_negative_ids))


def test_fp16_storage_keeps_updates_and_exact_folded_gradients(make_bank):
    bank, x, _ = clustered_bank(make_bank, shards=2, dtype="float16")
    np.testing.assert_allclose(bank.get(np.arange(600)).numpy(), x, atol=1e-3)  # fp16 rounding only
    ids = np.array([0, 1, 2, 3])
    q = torch.randn(4, 8, generator=torch.Generator().manual_seed(14), requires_grad=True)
    answer = bank.query(q, ids, intra_negatives=10, inter_negatives=10, seed=15, return_ids=True)
    folded = info_nce_from_logits(answer.inter_pos, answer.inter_neg, 0.1, margin=-0.5)
    negatives = torch.stack([bank.get(n) for n in answer.inter_negative_ids])
    explicit = info_nce(q, bank.get(answer.inter_positive_ids), negatives, 0.1, margin=-0.5)
    assert folded.item() == pytest.approx(explicit.item(), rel=1e-4)
    bank.update(ids, torch.randn(4, 8))
    assert bank.stats()["step"] == 1


def test_intra_positive_is_the_bank_feature_of_the_anchor(make_bank):
    bank, _, _ = clustered_bank(make_bank, shards=2)
    ids = np.array([4, 9, 10])
    q = torch.randn(3, 8)
    pos, neg = bank.intra(q, ids, 16, temperature=0.1, seed=1)
    expected = (torch.nn.functional.normalize(q, dim=1) * bank.get(ids)).sum(1)
    torch.testing.assert_close(pos, expected)
    assert neg.shape == (3, 1) and torch.isfinite(neg).all()


# --- failures, snapshots, bad input ---------------------------------------------------------------

def kill_and_wait_for_restart(ray, shard):
    """ray.kill is asynchronous: wait until the actor is really a new incarnation."""
    import time
    ray.kill(shard, no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if ray.get(shard.ping.remote(), timeout=10)["generation"] == 1:
                return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError("the killed shard did not restart")


def saved_then_more_work(make_bank, tmp_path, seed: int):
    """A fresh 2-shard bank: an update, a snapshot, another update (lost by a restore to the snapshot).
    Returns (bank, the snapshot's directory, the features it holds)."""
    bank, _, _ = clustered_bank(make_bank, shards=2, snapshot_root=str(tmp_path), fresh=True)
    rng = np.random.default_rng(seed)
    bank.update(np.arange(50), rng.normal(size=(50, 8)))
    snapshot = bank.save()
    saved = bank.get(np.arange(600)).numpy()
    bank.update(np.arange(50, 100), rng.normal(size=(50, 8)))
    return bank, snapshot, saved


def test_a_train_workers_client_raises_on_a_lost_shard_and_restore_then_brings_the_snapshot_back(
        make_bank, tmp_path, ray_cluster):
    """A Train worker's client (`restore_on_failure=False`, runtime/train.py) does not restore in place:
    it raises, Ray Train restarts the group from its checkpoint and rank 0 restores the snapshot the
    checkpoint names; the model and the bank stay each other's."""
    from bank.client import BankShardLostError
    bank, snapshot, saved = saved_then_more_work(make_bank, tmp_path, 9)
    bank.restore_on_failure = False
    kill_and_wait_for_restart(ray_cluster, bank.shards[0])
    with pytest.raises(BankShardLostError, match="restart from the last checkpoint"):
        bank.get(np.arange(600))
    assert bank.recoveries == 0
    bank.restore(snapshot)  # what runtime.train.resume does on rank 0
    np.testing.assert_allclose(bank.get(np.arange(600)).numpy(), saved, atol=1e-7)
    assert bank.stats()["step"] == 1


def test_killed_shard_restores_from_the_last_snapshot(make_bank, tmp_path, ray_cluster):
    bank, _, _ = clustered_bank(make_bank, shards=2, snapshot_root=str(tmp_path), fresh=True)
    rng = np.random.default_rng(9)
    bank.update(np.arange(50), rng.normal(size=(50, 8)))
    bank.save()
    saved_feats, saved_labels = bank.get(np.arange(600)).numpy(), bank.labels(np.arange(600)).numpy()
    bank.update(np.arange(50, 100), rng.normal(size=(50, 8)))  # work after the snapshot is lost
    kill_and_wait_for_restart(ray_cluster, bank.shards[1])
    feats = bank.get(np.arange(600)).numpy()
    np.testing.assert_allclose(feats, saved_feats, atol=1e-7)
    assert np.abs(feats).sum(1).min() > 0, "no row came back as zeros"
    np.testing.assert_array_equal(bank.labels(np.arange(600)).numpy(), saved_labels)
    assert bank.stats()["step"] == 1
    pos, neg = bank.inter(torch.randn(4, 8), np.arange(4), 10, "semi_hard", 0.1)
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all()


def test_a_shard_lost_while_a_snapshot_is_written_leaves_the_previous_one_whole(make_bank, tmp_path, ray_cluster):
    """Shard 1 dies as the step-2 snapshot starts: shard 0 writes its file, shard 1 cannot. The save
    is an error (the Train step that checkpoints fails, and Ray Train resumes from the checkpoint that
    names step 1), not retried: a retry after the restore would write the step-1 state under step 2's
    name. LATEST still names step 1, every shard holds it, and the half directory is no snapshot."""
    bank, first, saved = saved_then_more_work(make_bank, tmp_path, 11)
    stats = bank.stats

    def stats_then_lose_shard_1():  # save() names the snapshot by the step, then writes it
        answer = stats()
        kill_and_wait_for_restart(ray_cluster, bank.shards[1])
        return answer

    bank.stats = stats_then_lose_shard_1
    with pytest.raises(BankStateError, match="failed during save.*last snapshot, which is intact"):
        bank.save()
    del bank.stats
    half = tmp_path / "step-000000002"
    assert (half / "shard-0000.pt").exists() and not (half / "shard-0001.pt").exists()
    assert (tmp_path / "LATEST").read_text() == Path(first).name
    np.testing.assert_allclose(bank.get(np.arange(600)).numpy(), saved, atol=1e-7)  # all shards: step 1
    assert bank.stats()["step"] == 1
    with pytest.raises(BankStateError, match="not a complete bank snapshot"):
        bank.restore(str(half))
    with pytest.raises(FileNotFoundError, match="not a bank snapshot"):
        MemoryBank.load(str(half))
    assert Path(bank.save()).name == "step-000000001"  # usable again: the next snapshot is whole


def test_killed_shard_without_snapshot_is_an_error_not_zeros(make_bank, ray_cluster):
    bank, _, _ = clustered_bank(make_bank, shards=2, fresh=True)
    kill_and_wait_for_restart(ray_cluster, bank.shards[0])
    with pytest.raises(BankStateError, match="no snapshot"):
        bank.get(np.arange(600))


def test_save_and_load_round_trip(make_bank, tmp_path, ray_cluster):
    bank, _, _ = clustered_bank(make_bank, shards=2, min_cluster=7)
    bank.update(np.arange(30), np.random.default_rng(10).normal(size=(30, 8)))
    bank.save(str(tmp_path / "snap"))
    loaded = MemoryBank.load(str(tmp_path / "snap"))
    try:
        everything = np.arange(600)
        np.testing.assert_array_equal(loaded.get(everything).numpy(), bank.get(everything).numpy())
        np.testing.assert_array_equal(loaded.labels(everything).numpy(), bank.labels(everything).numpy())
        np.testing.assert_allclose(loaded.centroids(), bank.centroids(), atol=1e-6)
        assert loaded.stats()["step"] == 1 and loaded.min_cluster == 7
    finally:
        loaded.shutdown()


@pytest.fixture(scope="module")
def bad_update_bank(make_module_bank):
    bank = clustered_bank(make_module_bank, shards=2)[0]
    return bank, bank.get(np.arange(600)).numpy()


@pytest.mark.parametrize("ids, feats, message", [
    (np.array([0, 600]), np.zeros((2, 8)), "out of range"),
    (np.array([-1, 2]), np.zeros((2, 8)), "out of range"),
    (np.array([0, 1]), np.zeros((2, 7)), r"must be \[2, 8\]"),
    (np.array([0, 1]), np.array([[np.nan] * 8, [0.0] * 8]), "NaN"),
    (np.array([3, 3]), np.zeros((2, 8)), "duplicate"),
])
def test_bad_update_is_a_clear_error_and_leaves_the_bank_unchanged(bad_update_bank, ids, feats, message):
    bank, before = bad_update_bank  # one bank for every case: each one, in turn, must leave it as it was
    with pytest.raises(ValueError, match=message):
        bank.update(ids, feats)
    np.testing.assert_array_equal(bank.get(np.arange(600)).numpy(), before)
    assert bank.stats()["step"] == 0


def test_inter_query_before_clustering_is_a_clear_error(make_bank):
    bank = make_bank(100, 4, num_clusters=3)
    with pytest.raises(BankStateError, match="init_clusters"):
        bank.inter(torch.randn(2, 4), np.array([0, 1]), 5)


def test_nmi_matches_sklearn():
    from sklearn.metrics import normalized_mutual_info_score
    rng = np.random.default_rng(11)
    a, b = rng.integers(0, 7, 500), rng.integers(0, 4, 500)
    b[:250] = a[:250] % 4  # partly dependent
    pairs, counts = np.unique(np.stack([a, b], 1), axis=0, return_counts=True)
    assert normalized_mutual_info(pairs, counts) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


def test_the_bank_handle_works_inside_another_ray_worker(three_shard_bank, ray_cluster):
    @ray_cluster.remote(num_cpus=0)
    def trainer_side(bank, ids):
        # what a Ray Train worker does with the handle it receives in train_loop_config
        q = torch.randn(len(ids), 8, requires_grad=True)
        pos, neg = bank.inter(q, ids, 10, "semi_hard", 0.1, seed=3)
        info_nce_from_logits(pos, neg, 0.1).backward()
        return bank.get(ids).numpy(), bool(torch.isfinite(q.grad).all())

    ids = np.array([7, 8, 9])
    feats, finite = ray_cluster.get(trainer_side.remote(three_shard_bank, ids))
    np.testing.assert_array_equal(feats, three_shard_bank.get(ids).numpy())
    assert finite


def test_semi_hard_refill_with_one_short_row_and_one_pool_larger_than_k():
    """A batch where one query's pool is smaller than its share (refilled with replacement) and
    another's pool exceeds the largest share (found by the demo job: it indexed past k)."""
    import torch
    from bank.shard import BankShard
    shard = BankShard(BankSpec(100, 4, num_clusters=2, threads_per_shard=1), 0)
    shard.labels = torch.tensor([0] * 95 + [1] * 5)
    sims = torch.rand(2, 100)
    labels = torch.tensor([1, 0])  # query 0: 95 allowed rows; query 1: 5 allowed rows
    anchor_rows = torch.tensor([96, 0])
    shares = torch.tensor([20, 20])
    g = torch.Generator().manual_seed(0)
    rows, valid = shard._sample_by_similarity(sims, labels, anchor_rows, shares, "semi_hard", 1.0, g)
    assert bool(valid.all())
    assert set(rows[1].tolist()) <= set(range(95, 100))  # only cluster-1 rows are allowed
    assert all(shard.labels[r] == 0 for r in rows[0].tolist())


def test_semi_hard_draws_are_uniform_over_the_exact_pool_and_without_replacement():
    """The pool found as a threshold (kthvalue) is exactly the 10 % nearest allowed rows (a sort
    says which), and 4,000 draws of 10 over it are uniform (chi-square) with no repeats in a draw."""
    from scipy.stats import chisquare

    from bank.shard import BankShard
    shard = BankShard(BankSpec(1000, 4, num_clusters=2, threads_per_shard=1), 0)
    shard.labels = torch.tensor([0] * 100 + [1] * 900)
    sims = torch.rand(1, 1000, generator=torch.Generator().manual_seed(1)).expand(400, 1000).contiguous()
    labels, anchors = torch.zeros(400, dtype=torch.int64), torch.zeros(400, dtype=torch.int64)
    shares = torch.full((400,), 10)
    rows, valid = shard._sample_by_similarity(sims.clone(), labels, anchors, shares, "semi_hard", 0.1,
                                              torch.Generator().manual_seed(2))
    assert bool(valid.all())
    allowed = torch.arange(100, 1000)  # cluster 0 (the anchor's) excluded
    pool = set(allowed[torch.argsort(sims[0, 100:], descending=True)[:90]].tolist())  # ceil(0.1 · 900)
    assert set(rows.flatten().tolist()) == pool
    assert all(len(set(r.tolist())) == 10 for r in rows)
    counts = np.bincount(rows.flatten().numpy(), minlength=1000)[sorted(pool)]
    assert chisquare(counts).pvalue > 1e-3


# --- offline pseudo-labels (003 Observation 1) ---------------------------------------------------------

def test_offline_labels_stay_fixed_between_kmeans_runs(make_bank):
    """relabel=False: update writes Eq. 2 features in one round trip; labels and centroids stay those
    of the last k-means (the same updates on an online bank relabel rows), until init_clusters runs."""
    n, rng = 600, np.random.default_rng(5)
    offline, x, _ = clustered_bank(make_bank, shards=2, relabel=False, momentum=0.5)
    online, _, _ = clustered_bank(make_bank, shards=2, momentum=0.5)
    labels, centroids = offline.labels(np.arange(n)).numpy(), offline.centroids()
    trips = offline.round_trips
    for _ in range(5):
        ids, new = rng.choice(n, size=64, replace=False), rng.normal(size=(64, 8))
        offline.update(ids, new)
        online.update(ids, new)
    assert offline.round_trips - trips == 5
    np.testing.assert_allclose(offline.get(np.arange(n)).numpy(), online.get(np.arange(n)).numpy(), atol=1e-6)
    np.testing.assert_array_equal(offline.labels(np.arange(n)).numpy(), labels)
    np.testing.assert_array_equal(offline.centroids(), centroids)
    assert (online.labels(np.arange(n)).numpy() != labels).sum() > 10  # online relabelled the moved rows
    offline.init_clusters(iters=10, seed=1)  # the next epoch's k-means
    feats, new_labels = offline.get(np.arange(n)).numpy(), offline.labels(np.arange(n)).numpy()
    assert (new_labels != labels).sum() > 10
    for c in np.unique(new_labels):
        np.testing.assert_allclose(offline.centroids()[c], feats[new_labels == c].mean(0), atol=1e-5)


# --- the bank off the trainer's critical path (issue 17) -------------------------------------------

def test_an_asynchronous_update_costs_no_wait_and_the_next_read_sees_it(make_bank):
    """update(block=False) returns at once; the next call of the same client completes it in its own
    ray.get (Ray runs one caller's tasks on an actor in order), so a step is the query's two waits."""
    bank, _, _ = clustered_bank(make_bank, shards=2, momentum=0.5)
    sync, _, _ = clustered_bank(make_bank, shards=2, momentum=0.5)
    rng = np.random.default_rng(7)
    for step in range(6):
        ids = rng.choice(600, size=48, replace=False)
        q = torch.randn(48, 8)
        trips = bank.round_trips
        answer = bank.query(q, ids, intra_negatives=32, inter_negatives=32, strategy="semi_hard", seed=step)
        expected = sync.query(q, ids, intra_negatives=32, inter_negatives=32, strategy="semi_hard", seed=step)
        bank.update(ids, q, block=False)
        assert bank.round_trips - trips == 2  # anchors (+ the last update), score; the update: none
        sync.update(ids, q)
        torch.testing.assert_close(answer.inter_pos, expected.inter_pos)  # the same bank state was read
        torch.testing.assert_close(answer.intra_neg, expected.intra_neg)
        np.testing.assert_allclose(bank.get(ids).numpy(), sync.get(ids).numpy(), atol=1e-6)
    np.testing.assert_array_equal(bank.labels(np.arange(600)).numpy(), sync.labels(np.arange(600)).numpy())
    assert_replicas_are_member_means(bank)


def test_upkeep_due_after_an_asynchronous_update_runs_before_the_next_query_reads_labels(make_bank):
    bank, _, _ = clustered_bank(make_bank, shards=2, momentum=1.0, min_cluster=20)
    feats = bank.get(np.arange(600)).numpy()
    labels = bank.labels(np.arange(600)).numpy()
    members = np.flatnonzero(labels == 1)[:-5]  # all but 5 members of cluster 1 move to cluster 3
    target = bank.centroids()[3] / np.linalg.norm(bank.centroids()[3])
    bank.update(members, np.tile(target, (len(members), 1)), block=False)
    answer = bank.query(torch.tensor(feats[:4]), np.arange(4), inter_negatives=8, strategy="random", seed=0,
                        return_ids=True)
    after = bank.labels(np.arange(600)).numpy()
    assert bank.stats()["upkeep_dissolved"] >= 1 and np.bincount(after, minlength=6).min() >= 20
    for i in range(4):  # negatives drawn with the labels after upkeep: none shares the anchor's label
        assert (after[answer.inter_negative_ids[i]] != after[i]).all()


def test_a_shard_call_names_a_bankshard_method_not_a_string():
    from bank.shard import BankShard, Call
    assert Call(1, BankShard.get, (np.arange(3),)).method.__name__ == "get"
    for wrong in ("get", len, MemoryBank.get):
        with pytest.raises(TypeError, match="BankShard method"):
            Call(0, wrong)


def test_a_bank_json_without_the_newer_fields_reads_with_their_defaults():
    """bank.json of a snapshot written before upkeep and offline labels existed."""
    old = {"num_samples": 100, "dim": 8, "num_shards": 2, "num_clusters": 4, "momentum": 1.0, "seed": 3,
           "dtype": "float16", "snapshot_root": None}
    assert BankSpec.from_json(old) == BankSpec(100, 8, num_shards=2, num_clusters=4, momentum=1.0, seed=3,
                                               dtype="float16", min_cluster=20, relabel=True)
    assert BankSpec.from_json(BankSpec(50, 4, num_clusters=5, relabel=False).to_json()).relabel is False
