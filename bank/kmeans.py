"""k-means pieces shared by the bank shards (assignment, 2-means sides) and the driver (init,
empty-cluster split, NMI)."""
from __future__ import annotations

import numpy as np
import torch

ASSIGN_CHUNK = 4096  # rows per assignment chunk, at most
ASSIGN_BYTES = 128 << 20  # cap on the [chunk, C] score buffer (50k clusters: 655 rows)


def nearest_centroid(feats: torch.Tensor, centroids: torch.Tensor,
                     metric: str = "euclidean") -> tuple[torch.Tensor, torch.Tensor]:
    """metric "euclidean" (k-means, InterCLR Eq. 3 as written): argmin_c ‖v - c‖², computed as
    argmax_c (v·c - ‖c‖²/2); "dot": argmax_c v·c (the online relabel, see BankShard.update).
    In chunks into one reused buffer (never an N×C matrix; fresh per-chunk allocations cost as
    much as the product itself). Returns (labels int64 [N], squared distances float64 [N])."""
    if metric not in ("euclidean", "dot"):
        raise ValueError(f"metric must be 'euclidean' or 'dot', got {metric!r}")
    centroids = centroids.to(device=feats.device, dtype=torch.float32)
    half_sq_norms = 0.5 * centroids.pow(2).sum(dim=1)
    centroids_t = centroids.T.contiguous()
    labels = torch.empty(feats.shape[0], dtype=torch.int64, device=feats.device)
    distances = torch.empty(feats.shape[0], dtype=torch.float64, device=feats.device)
    step = max(1, min(ASSIGN_CHUNK, ASSIGN_BYTES // (4 * centroids.shape[0])))
    buffer = torch.empty(min(step, feats.shape[0]), centroids.shape[0], device=feats.device)
    for start in range(0, feats.shape[0], step):
        chunk = feats[start:start + step].to(torch.float32)
        score = buffer[:len(chunk)]
        torch.mm(chunk, centroids_t, out=score)  # [n, C]
        if metric == "euclidean":
            score.sub_(half_sq_norms)
        best, label = score.max(dim=1)
        labels[start:start + len(chunk)] = label
        if metric == "dot":  # best = v·c: back to v·c - ‖c‖²/2 for the distance below
            best = best - half_sq_norms[label]
        sq = chunk.pow(2).sum(dim=1) - 2 * best  # ‖v‖² - 2(v·c - ‖c‖²/2) = ‖v - c‖²
        distances[start:start + len(chunk)] = sq.clamp_min(0).to(torch.float64)
    return labels, distances


def seed_centroids(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k distinct rows of `points` drawn uniformly as the initial centroids, on the points' device:
    faiss's seeding (faiss/Clustering.cpp `Clustering::train_encoded`, a random permutation of the
    training points), which mmselfsup's InterCLR k-means runs through. O(k) work, against k-means++'s
    k passes over the sample."""
    if not 0 < k <= points.shape[0]:
        raise ValueError(f"cannot seed {k} centroids from {points.shape[0]} points")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(points.shape[0], generator=g)[:k].to(points.device)
    return points[rows].float().clone()


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii) on `points` [n, D]: each next centre drawn with
    probability ∝ squared distance to the nearest chosen one. k sequential passes over the n points
    (cost ∝ n·k·D on one process): for small banks; large ones seed from a random subset
    (`MemoryBank.init_clusters(init="random")`, the default)."""
    n = points.shape[0]
    if k > n:
        raise ValueError(f"k-means++ needs at least k={k} points, got {n}")
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    centres = [int(rng.integers(n))]
    closest = (x - x[centres[0]]).pow(2).sum(dim=1).double()
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: fall back to unchosen points
            remaining = np.setdiff1d(np.arange(n), centres)
            centres.append(int(rng.choice(remaining)))
        else:
            centres.append(int(rng.choice(n, p=(closest / total).numpy())))
        closest = torch.minimum(closest, (x - x[centres[-1]]).pow(2).sum(dim=1).double())
    return points[centres].astype(np.float32)


def split_empty_clusters(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                         eps: float = 1.0 / 1024) -> int:
    """Give every empty cluster half of a large one, as faiss does: pick a cluster with probability
    ∝ (size - 1), copy its centroid with a symmetric perturbation, split its count. In place;
    returns the number of clusters split."""
    split = 0
    for empty in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1, 0).astype(np.float64)
        if weights.sum() == 0:
            break
        donor = int(rng.choice(len(counts), p=weights / weights.sum()))
        sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
        centroids[empty] = centroids[donor] * (1 + sign * eps)
        centroids[donor] = centroids[donor] * (1 - sign * eps)
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]
        split += 1
    return split


def hashed_uniform(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in (0, 1) per global sample id (splitmix64 of id and seed): the same draw whichever
    shard holds the row, so random choices made near the data do not depend on the shard layout."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.uint64) + np.uint64(seed % 2**64) * np.uint64(0xD1B54A32D192ED03)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53


def two_means_sides(feats: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Side (0 or 1) of each row [n, D] in a 2-means split: the nearer of centers [2, D] in
    Euclidean distance, as sklearn's KMeans(2) that mmselfsup splits with; ties go to side 0."""
    x = feats.double()
    c = centers.to(device=x.device, dtype=torch.float64)
    distances = (x[:, None, :] - c[None]).pow(2).sum(dim=2)  # [n, 2]
    return (distances[:, 1] < distances[:, 0]).long()


def normalized_mutual_info(pairs: np.ndarray, pair_counts: np.ndarray) -> float:
    """NMI (arithmetic normalisation, as sklearn's default) from a sparse contingency table given as
    unique (pseudo_label, true_label) rows and their counts."""
    n = pair_counts.sum()
    if n == 0:
        return float("nan")
    _, a_index = np.unique(pairs[:, 0], return_inverse=True)
    _, b_index = np.unique(pairs[:, 1], return_inverse=True)
    a_sizes = np.bincount(a_index, weights=pair_counts)
    b_sizes = np.bincount(b_index, weights=pair_counts)
    p = pair_counts / n
    mutual = float(np.sum(p * (np.log(pair_counts * n) - np.log(a_sizes[a_index] * b_sizes[b_index]))))
    h_a = float(-np.sum((a_sizes / n) * np.log(a_sizes / n)))
    h_b = float(-np.sum((b_sizes / n) * np.log(b_sizes / n)))
    if h_a == 0 and h_b == 0:
        return 1.0
    denominator = (h_a + h_b) / 2
    return max(0.0, mutual / denominator) if denominator > 0 else 0.0
