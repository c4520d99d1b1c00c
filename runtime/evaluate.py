"""Evaluation of a trained backbone: features through the deterministic `center` view, weighted
kNN (NPID's protocol: k = 20, τ = 0.07, cosine), and the pictures of InterCLR Figs. 10–12.

On the Ray Train workers (`evaluate_on_workers`, the end of `runtime.train.train_loop_per_worker`):
every rank extracts, on its device, the features of its share of the kNN memory (train) and of
val, for the trained backbone and the same architecture at random init. Only val crosses ranks
(all-gathered, V × D); each rank searches its own memory share for every val query, and rank 0
merges the per-rank k nearest (V × k per rank) into the global k nearest and votes. Nothing of the
memory's size is gathered anywhere. Rank 0 writes `eval.json` (the numbers) and `eval-pictures.npz`
(what the pictures need: val features for t-SNE, the retrieval queries' neighbours); the driver
reads them and runs no model.
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.loader import build_loader, shard_list
from pipeline.manifest import Manifest
from pipeline.views import center
from runtime.knn import knn_top1, merge_nearest, nearest, vote_top1

EVAL_FILE = "eval.json"  # rank 0's numbers, read by runtime.driver.evaluate
PICTURES_FILE = "eval-pictures.npz"  # what the pictures need, at most TSNE_POINTS val features
TSNE_POINTS, RETRIEVAL_QUERIES, RETRIEVAL_NEIGHBOURS = 2000, 8, 8
PROGRESS_SECONDS = 10.0


@torch.no_grad()
def features_of(backbone: torch.nn.Module, batches, limit: int | None = None, device="cpu", normalize: bool = True,
                progress=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, D], L2-normalised unless `normalize=False`, labels [N], ids [N]) of the first
    `limit` rows of `batches`, each id once (a loader that skipped undecodable samples repeats rows
    to keep its epoch length; the repeats are dropped)."""
    backbone.eval()
    feats, labels, ids = [], [], []
    seen = 0
    for batch in batches:
        out = backbone(batch["views"][0].to(device)).float()
        feats.append((torch.nn.functional.normalize(out, dim=1) if normalize else out).cpu())
        labels.append(batch["label"])
        ids.append(batch["index"])
        rows = len(batch["index"]) if limit is None else min(len(batch["index"]), limit - seen)
        seen += len(batch["index"])
        if progress is not None:
            progress.update(rows)
        if limit is not None and seen >= limit:
            break
    take = slice(0, limit)
    feats, labels, ids = (torch.cat(feats)[take].numpy(), torch.cat(labels)[take].numpy(), torch.cat(ids)[take].numpy())
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        keep = np.sort(first)
        feats, labels, ids = feats[keep], labels[keep], ids[keep]
    return feats, labels, ids


def extract_features(backbone: torch.nn.Module, root, split: str, size: int, colorspace: str | None = None,
                     batch_size: int = 256, limit: int | None = None, device: str = "cpu",
                     num_threads: int = 2, normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`features_of` the first `limit` samples of a split in shard order (the shards are already
    globally shuffled), in this process on one CPU loader."""
    loader = build_loader(root, center(size, colorspace), batch_size, shuffle=False, split=split,
                          num_threads=num_threads, initial_fill=1)
    return features_of(backbone, loader, limit, device, normalize)


def pixel_knn_top1(root, train_split: str, val_split: str, size: int, colorspace: str | None = None, k: int = 20,
                   temperature: float = 0.07, limit: int | None = None) -> float:
    """The no-model baseline: the same weighted kNN on the centre views' pixels, centred by the train
    split's mean image (cosine of raw pixels is dominated by the shared mean; centring is the
    fairer, stronger baseline: Fashion-MNIST 20k/10k 0.838 centred vs 0.819 raw)."""
    flat = torch.nn.Flatten()
    train_x, train_y, _ = extract_features(flat, root, train_split, size, colorspace, limit=limit, normalize=False)
    val_x, val_y, _ = extract_features(flat, root, val_split, size, colorspace, normalize=False)
    mean = train_x.mean(axis=0)

    def centred(x: np.ndarray) -> np.ndarray:
        return torch.nn.functional.normalize(torch.from_numpy(x - mean), dim=1).numpy()
    return knn_top1(centred(train_x), train_y, centred(val_x), val_y, k, temperature)


def memory_share(count: int, limit: int | None, rank: int, world: int) -> int | None:
    """How many of its samples rank `rank` puts in the kNN memory, from the start of its range: all
    (None) without `eval.knn_train_samples` or when it covers the split, else its part of the limit L,
    ⌊L(r+1)/w⌋ − ⌊Lr/w⌋ (the shards are globally shuffled: a uniform subset; one worker takes the
    first L, as `extract_features` does)."""
    if limit is None or limit >= count:
        return None
    return limit * (rank + 1) // world - limit * rank // world


def _all_gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _to_rank0(obj, rank: int, world: int) -> list | None:
    if world == 1:
        return [obj]
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def _rank0_weights(module: torch.nn.Module, world: int) -> None:
    """Rank 0's parameters and buffers on every rank: the checkpoint is rank 0's, and DDP keeps the
    parameters equal but not the BatchNorm running statistics (forward_sync_buffers=False)."""
    if world > 1:
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


def _counting(batches, rows: list):
    """`batches` as they are, each one's row count appended to `rows`."""
    for batch in batches:
        rows.append(len(batch["label"]))
        yield batch


@torch.no_grad()
def evaluate_on_workers(method, config, rank: int, world: int, device: torch.device, run_dir: Path,
                        num_classes: int | None, step: int) -> dict | None:
    """Every rank of a Ray Train run, after the last step: kNN top-1 of the trained backbone and of
    the same architecture at random init (seeded as the driver seeded it: `train.seed`, then the
    first `build_method`), over this rank's share of the memory and of val (DALI's rank split, the
    short last batch unpadded: every id once); a supervised method's classifier top-1 on val. Rank 0
    writes run_dir/eval.json and, with `eval.pictures`, eval-pictures.npz, and returns the numbers."""
    from models.supervised import Supervised, classifier_top1
    from runtime.build import build_method
    started = time.perf_counter()
    d, e = config.data, config.eval
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives on NCCL use the current device
    _rank0_weights(method, world)
    torch.manual_seed(config.train.seed)
    random_init = build_method(config, num_classes).to(device)
    space = method.recipe_for(d.image_size).colorspace  # CMC encoders see Lab / YDbDr
    results, pictures = {"step": step, "colorspace": space}, {}
    for key, name, model in (("knn_top1", "trained", method), ("knn_top1_random_init", "random init", random_init)):
        found = knn_on_workers(model.backbone, config, space, rank, world, device, e.knn_train_samples, name)
        if rank != 0:
            continue
        top1, merged, (val_feats, val_labels, val_ids), memory_ids, memory_size = found
        results[key] = top1
        results.update(eval_memory_samples=memory_size, eval_val_samples=len(val_ids))
        if name == "trained":
            results["feature_std"] = float(val_feats.std(axis=0).mean())
            pictures = {"tsne_feats": val_feats[:TSNE_POINTS], "tsne_labels": val_labels[:TSNE_POINTS],
                        "query_ids": val_ids[:RETRIEVAL_QUERIES],
                        "neighbour_ids": merged.ids[:RETRIEVAL_QUERIES, :RETRIEVAL_NEIGHBOURS].numpy(),
                        "anchor_ids": memory_ids[:1],
                        "clustered_banks": np.array([i for i, r in enumerate(method.bank_requests()) if r.clusters],
                                                    dtype=np.int64)}
    if isinstance(method, Supervised):
        # ImCLR at test time: the poster (000_*.txt) adds no test-time construction ("no change to the
        # existing pipeline"), so val images go in as the baseline's do: one centre view each, never
        # concatenated (the ResNet pools globally: the weights trained on nW-wide rows take W-wide images)
        rows = []
        val = centre_view_loader(config, space, rank, world, d.val_split)
        top1 = classifier_top1(method, _counting(val, rows), device)
        counts = _to_rank0((top1 * sum(rows), sum(rows)), rank, world)
        if rank == 0:
            results["val_top1"] = sum(c for c, _ in counts) / sum(n for _, n in counts)
            print(f"val top-1: {results['val_top1']:.4f}", flush=True)
    if rank != 0:
        return None
    results["eval_seconds"] = time.perf_counter() - started
    (run_dir / EVAL_FILE).write_text(json.dumps(results, indent=1))
    if e.pictures:
        np.savez(run_dir / PICTURES_FILE, **pictures)
    return results


def centre_view_loader(config, space: str | None, rank: int, world: int, split: str):
    """This rank's share of `split` in centre views, unshuffled, the short last batch unpadded."""
    d = config.data
    return build_loader(d.root, center(d.image_size, space), 256, device=d.device, rank=rank, world_size=world,
                        shuffle=False, split=split, num_threads=d.loader_threads, initial_fill=1,
                        keep_on_gpu=d.device == "gpu")


def knn_on_workers(backbone: torch.nn.Module, config, space: str | None, rank: int, world: int, device: torch.device,
                   memory_limit: int | None, name: str):
    """Weighted kNN top-1 of `backbone`, every rank of a Ray Train run together: each extracts its
    share of the memory (the first `memory_limit` train samples; None: all) and of val; val features
    are all-gathered, each rank finds every val image's k nearest in its memory share, rank 0 merges
    them and votes. Rank 0 gets (top1, merged neighbours, (val feats, labels, ids), its memory ids,
    the memory's size); the other ranks None. The backbone is left in eval mode."""
    from pipeline.progress import Progress
    d, e = config.data, config.eval

    def features(split: str):
        batches = centre_view_loader(config, space, rank, world, split)
        share = None if split != d.train_split else \
            memory_share(shard_list(d.root, split)[2], memory_limit, rank, world)
        total = batches.samples if share is None else min(share, batches.samples)
        progress = Progress(total, f"eval {name} {split}, rank 0's share of {world}", log_every=PROGRESS_SECONDS) \
            if rank == 0 else None
        out = features_of(backbone, batches, share, device, progress=progress)
        if progress is not None:
            progress.close()
        return out

    memory_feats, memory_labels, memory_ids = features(d.train_split)
    val_feats, val_labels, val_ids = (np.concatenate(part) for part in zip(*_all_gather(features(d.val_split), world)))
    found = nearest(torch.from_numpy(memory_feats).to(device), torch.from_numpy(memory_labels.astype(np.int64)),
                    torch.from_numpy(memory_ids), torch.from_numpy(val_feats).to(device), e.knn_k)
    parts = _to_rank0((found, len(memory_ids)), rank, world)
    if rank != 0:
        return None
    merged = merge_nearest([p[0] for p in parts], e.knn_k)
    top1 = vote_top1(merged, val_labels, e.knn_temperature)
    memory_size = sum(p[1] for p in parts)
    print(f"kNN ({name}): {top1:.4f} on {len(val_ids)} val images, {memory_size} train as the memory, "
          f"{world} worker(s)", flush=True)
    return top1, merged, (val_feats, val_labels, val_ids), memory_ids, memory_size


def read_worker_results(run_dir: Path, step: int) -> dict:
    """The numbers `evaluate_on_workers` wrote for the checkpoint of `step`."""
    path = Path(run_dir) / EVAL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the Train workers evaluate after the last step "
                                f"(runtime.train.train_loop_per_worker); check the workers' log")
    results = json.loads(path.read_text())
    if results["step"] != step:
        raise ValueError(f"{path} is from step {results['step']}, the last checkpoint is step {step}: "
                         f"submit the run again to evaluate it")
    return results


def read_image(manifest: Manifest, sample_id: int) -> np.ndarray:
    """The decoded image of one sample, read from its shard at the manifest's offset."""
    from PIL import Image
    location = manifest.locate(int(sample_id))
    with open(location.shard, "rb") as f:
        f.seek(location.offset)
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1] in ("jpg", "png", "jpeg"):
                    return np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    raise ValueError(f"sample {sample_id} has no image member in {location.shard}")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _grid(path: Path, rows: list[list[np.ndarray]], row_titles: list[str], col_titles: list[str] | None = None) -> None:
    """Rows of images, the first of each row titled; `col_titles` label the first row's others."""
    plt = _pyplot()
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c], cmap="gray")
                if c == 0:
                    ax.set_title(row_titles[r], fontsize=7, loc="left")
                elif col_titles and r == 0:
                    ax.set_title(col_titles[c], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retrieval_grid(path: Path, query_ids: np.ndarray, neighbour_ids: np.ndarray, train_manifest: Manifest,
                   val_manifest: Manifest) -> None:
    """InterCLR Fig. 12: each val query (first column) and its nearest train images by cosine,
    nearest first (`neighbour_ids` [queries, neighbours]). The query images come from the val
    shards, so both manifests are used."""
    rows = [[read_image(val_manifest, query)] + [read_image(train_manifest, j) for j in neighbours]
            for query, neighbours in zip(query_ids, neighbour_ids)]
    _grid(path, rows, ["query"] * len(rows))


def tsne_plot(path: Path, feats: np.ndarray, labels: np.ndarray, classes: list[str], points: int = 2000,
              seed: int = 0) -> None:
    """InterCLR Fig. 10: t-SNE of the embeddings coloured by true class."""
    plt = _pyplot()
    from sklearn.manifold import TSNE
    n = min(points, len(feats))
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, n - 1)).fit_transform(feats[:n])
    fig, ax = plt.subplots(figsize=(6, 5))
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels[:n], cmap="tab10" if len(classes) <= 10 else "tab20", s=3)
    if len(classes) <= 20:
        ax.legend(scatter.legend_elements()[0], classes, fontsize=6, loc="best", markerscale=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curves(path: Path, metrics_path: Path) -> None:
    plt = _pyplot()
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    if not records:
        return
    keys = [k for k in ("loss", "intra", "inter", "nt_xent", "align_uniform", "hard_negative", "cmc", "cacr",
                                     "cross_entropy") if k in records[-1]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label=key, lw=1)
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def negatives_figure(path: Path, bank, feats_of_queries: torch.Tensor, query_ids: np.ndarray,
                     manifest: Manifest, per_strategy: int = 6, seed: int = 0) -> None:
    """InterCLR Fig. 11: for one anchor, the cluster positive and the negatives each strategy samples."""
    strategies = ["hard", "semi_hard", "random", "semi_easy"]
    rows = []
    for strategy in strategies:
        positive, negatives = bank.sample_inter(feats_of_queries[:1], query_ids[:1], per_strategy, strategy, seed=seed)
        ids = [int(query_ids[0]), int(positive[0]), *[int(i) for i in negatives[0][:per_strategy]]]
        rows.append([read_image(manifest, i) for i in ids])
    _grid(path, rows, strategies, col_titles=["anchor", "positive"] + ["negative"] * per_strategy)
