"""Weighted kNN on features (NPID's protocol: k = 20, τ = 0.07, cosine), torch alone: the evaluation
(runtime.evaluate) and the GPU check (benchmarks/device.py) share it. Runs in float32 on the features'
device, outside any autocast."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Neighbours:
    """Each query's k nearest memory samples by cosine, nearest first: sims [Q, k] float, labels
    [Q, k] and ids [Q, k] int64 (CPU tensors)."""
    sims: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


@torch.no_grad()
def nearest(memory: torch.Tensor, memory_labels: torch.Tensor, memory_ids: torch.Tensor, queries: torch.Tensor,
            k: int, sims_per_chunk: int = 1 << 26) -> Neighbours:
    """The k nearest rows of `memory` [M, D] for each of `queries` [Q, D] (both L2-normalised, on
    one device), as many queries at a time as keep the similarity block under `sims_per_chunk`
    entries (256 MB of fp32). A memory of M < k rows gives its M."""
    k = min(k, len(memory))
    chunk = max(1, sims_per_chunk // max(1, len(memory)))
    sims, rows = [], []
    for start in range(0, len(queries), chunk):
        s, r = (queries[start:start + chunk] @ memory.T).topk(k, dim=1)  # [q, k]
        sims.append(s.cpu())
        rows.append(r.cpu())
    sims = torch.cat(sims) if sims else torch.zeros(0, k)
    rows = torch.cat(rows) if rows else torch.zeros(0, k, dtype=torch.int64)
    return Neighbours(sims, memory_labels.cpu()[rows], memory_ids.cpu()[rows])


def merge_nearest(parts: list[Neighbours], k: int) -> Neighbours:
    """The k nearest over the union of disjoint memories, from each memory's own k nearest (the
    global k nearest are among them)."""
    sims = torch.cat([p.sims for p in parts], dim=1)
    labels, ids = torch.cat([p.labels for p in parts], dim=1), torch.cat([p.ids for p in parts], dim=1)
    sims, order = sims.topk(min(k, sims.shape[1]), dim=1)
    return Neighbours(sims, labels.gather(1, order), ids.gather(1, order))


def vote_top1(found: Neighbours, query_labels: np.ndarray, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (Wu et al. 2018, as InterCLR evaluates): each of the k nearest votes for
    its class with weight exp(cos/τ)."""
    num_classes = int(max(found.labels.max(), query_labels.max())) + 1
    correct = 0
    for start in range(0, len(query_labels), chunk):
        labels, sims = found.labels[start:start + chunk], found.sims[start:start + chunk]
        votes = torch.zeros(len(labels), num_classes).scatter_add_(1, labels, (sims / temperature).exp())
        correct += int((votes.argmax(1).numpy() == query_labels[start:start + chunk]).sum())
    return correct / len(query_labels)


def knn_top1(train_feats: np.ndarray, train_labels: np.ndarray, val_feats: np.ndarray, val_labels: np.ndarray,
             k: int = 20, temperature: float = 0.07) -> float:
    """Weighted kNN top-1 of val against the train memory, in this process."""
    labels = torch.from_numpy(train_labels.astype(np.int64))
    found = nearest(torch.from_numpy(train_feats), labels, torch.arange(len(labels)), torch.from_numpy(val_feats), k)
    return vote_top1(found, val_labels, temperature)
