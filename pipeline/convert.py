"""Convert datasets to shuffled WebDataset shards with dense global ids and an LMDB manifest.

    python -m pipeline.convert imagenet      SRC OUT --split train|val [--list FILE]
    python -m pipeline.convert imagenet22k   SRC OUT
    python -m pipeline.convert webvision     SRC OUT --split train|val
    python -m pipeline.convert fashion-mnist SRC OUT --split train|val
    python -m pipeline.convert imagenet22k   SRC OUT --ray auto   # shard writers on a Ray cluster

How it runs (and why it survives a kill):
1. List the source (cheap: paths, tar headers, sizes) and make a seeded global permutation; cut
   it into shards by `--shard-size` bytes and/or `--max-count` samples. The plan is saved to
   `OUT/.convert/<split>-plan.json`; `--resume` refuses a plan that differs.
2. Workers write shards in parallel. A shard is written to `.partial`, fsynced and renamed, then a
   per-shard record (`OUT/.convert/<split>-NNNNNN.json`) marks it done. Images that do not decode
   are rejected there with a reason. A kill loses at most the shards in flight; `--resume` redoes
   exactly those. With `--ray ADDRESS` the writers are Ray tasks spread over the cluster's nodes
   (the same `write_shard`, so the same bytes); SRC and OUT must be the same paths on every node.
3. Finalize: ids are assigned densely in plan order over the accepted samples, written into the
   shards in place (`shards.patch_ids`), then the manifest, `OUT/<split>.json` and
   `OUT/<split>-rejected.txt`. Finalize is idempotent.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline import manifest as manifest_lib
from pipeline import sources
from pipeline.shards import ImageRejected, ShardWriter, patch_ids, prepare_image, write_atomic
from pipeline.progress import Progress

DEFAULT_SHARD_SIZE = 1_000_000_000
TAR_OVERHEAD_PER_SAMPLE = 4 * 512 + 3 * 512  # four headers plus padding of the small members


class ConversionError(Exception):
    """A problem the user must fix (missing SRC, unknown layout, conflicting rerun)."""


def list_source(fmt: str, src: Path, split: str, list_file: Path | None) -> sources.SourceListing:
    if fmt == "imagenet":
        return sources.list_imagenet(src, split, list_file)
    if fmt == "imagenet22k":
        return sources.list_imagenet22k(src)
    if fmt == "webvision":
        return sources.list_webvision(src, split)
    if fmt == "fashion-mnist":
        return sources.list_fashion_mnist(src, split)
    raise ConversionError(f"unknown format {fmt!r}")


IMBALANCE_RULES = ("linear", "exponential")


def class_fractions(rule: str, num_classes: int) -> np.ndarray:
    """Fraction of class c kept (CACR Sect. 5.1, after Kim et al. 2020): linear (c+1)/C,
    exponential exp(c+1)/exp(C), c = 0..C-1."""
    c = np.arange(num_classes)
    if rule == "linear":
        return (c + 1) / num_classes
    if rule == "exponential":
        return np.exp(c + 1 - num_classes)
    raise ConversionError(f"unknown imbalance rule {rule!r} (choose from {', '.join(IMBALANCE_RULES)})")


def keep_imbalanced(order: np.ndarray, labels: np.ndarray, rule: str) -> np.ndarray:
    """The first round(n_c · fraction_c) items of each class in the (seeded) permutation `order`,
    at least one per class, order preserved."""
    num_classes = int(labels.max()) + 1
    keep_counts = np.maximum(1, np.round(np.bincount(labels, minlength=num_classes)
                                         * class_fractions(rule, num_classes))).astype(np.int64)
    ordered_labels = labels[order]
    rank_in_class = np.zeros(len(order), dtype=np.int64)
    for c in range(num_classes):
        members = ordered_labels == c
        rank_in_class[members] = np.arange(members.sum())
    return order[rank_in_class < keep_counts[ordered_labels]]


def plan_shards(items: list[sources.SourceItem], seed: int, limit: int | None,
                shard_size: int | None, max_count: int | None, imbalance: str | None = None) -> list[np.ndarray]:
    """A seeded global permutation (optionally thinned per class by an imbalance rule) cut into
    shards; each shard is an array of item indices in plan order. The position of an item in the
    concatenated plan is its key."""
    order = np.random.default_rng(seed).permutation(len(items))
    if imbalance is not None:
        labels = np.array([item.label for item in items])
        if (labels < 0).any():
            raise ConversionError("--imbalance needs labelled images")
        order = keep_imbalanced(order, labels, imbalance)
    if limit is not None:
        order = order[:limit]
    shards, start, size = [], 0, 0
    for pos, item_index in enumerate(order):
        item_bytes = items[item_index].size + TAR_OVERHEAD_PER_SAMPLE
        count = pos - start
        full_by_size = shard_size is not None and count > 0 and size + item_bytes > shard_size
        full_by_count = max_count is not None and count >= max_count
        if full_by_size or full_by_count:
            shards.append(order[start:pos])
            start, size = pos, 0
        size += item_bytes
    if start < len(order):
        shards.append(order[start:])
    return shards


def fingerprint(items: list[sources.SourceItem]) -> str:
    digest = hashlib.sha1()
    for item in items:
        digest.update(f"{item.source}\t{item.label}\t{item.size}\n".encode())
    return digest.hexdigest()


# --- worker side -------------------------------------------------------------------------------

_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def write_shard(out: str, split: str, shard_number: int, first_position: int,
                items: list[sources.SourceItem], node: dict | None = None) -> dict:
    """Write one shard and its DALI index; return (and persist) the record finalize needs.

    `node` ({"ip", "id"}) is the Ray node writing it, None for local workers. There a source file that
    does not exist is an error, not a rejected image: the driver listed it, so the node sees other storage."""
    name = f"{split}-{shard_number:06d}"
    tar_path = os.path.join(out, f"{name}.tar")
    try:
        return _write_shard(out, name, tar_path, first_position, items, node)
    except OSError as exc:  # the source's read errors are rejects inside; this is OUT failing
        try:
            os.unlink(tar_path + ".partial")  # frees the space on ENOSPC; on EROFS it was never there
        except OSError:
            pass
        raise ConversionError(write_error(exc, tar_path + ".partial")) from None


def write_error(exc: Exception, path: str) -> str:
    """One line for a write to OUT that failed (full disk, read-only or unwritable storage): an
    OSError by its errno, an LMDB error by its message."""
    strerror = getattr(exc, "strerror", None)
    reason = f"{strerror} ({errno.errorcode.get(exc.errno, '')})" if strerror else str(exc)
    return (f"cannot write {getattr(exc, 'filename', None) or path}: {reason}; shards already written are "
            "kept: free space or make OUT writable, then rerun with --resume")


def _write_shard(out: str, name: str, tar_path: str, first_position: int,
                 items: list[sources.SourceItem], node: dict | None) -> dict:
    writer = ShardWriter(tar_path + ".partial")
    rejected, pending = [], 0
    for position, item in enumerate(items, start=first_position):
        try:
            ext, data = prepare_image(sources.read_item(item.locator))
        except ImageRejected as exc:
            rejected.append((item.source, str(exc)))
        except FileNotFoundError as exc:
            if node is not None:
                raise ConversionError(f"{describe(node)} cannot read {exc.filename or item.locator[1]}, which the "
                                      "driver listed: SRC must be on storage every node mounts at the same path")
            rejected.append((item.source, f"unreadable: {exc}"))
        except OSError as exc:
            rejected.append((item.source, f"unreadable: {exc}"))
        else:
            meta = {"source": item.source, "class": item.class_name, **item.extra}
            writer.add_sample(position, ext, data, item.label, meta)
        pending += 1
        if _progress_counter is not None and pending == 64:
            with _progress_counter.get_lock():
                _progress_counter.value += pending
            pending = 0
    writer.close()
    os.replace(tar_path + ".partial", tar_path)
    writer.write_dali_index(os.path.join(out, "index", f"{name}.idx"))
    if _progress_counter is not None and pending:
        with _progress_counter.get_lock():
            _progress_counter.value += pending
    record = {
        "shard": f"{name}.tar",
        "planned": len(items),
        "samples": [[s.position, s.sample_offset, s.id_offset, s.label] for s in writer.samples],
        "rejected": rejected,
        "node": node,
    }
    write_atomic(os.path.join(out, ".convert", f"{name}.json"), json.dumps(record).encode())
    return record


def write_shard_on_node(out: str, split: str, shard_number: int, first_position: int,
                        items: list[sources.SourceItem]) -> dict:
    """`write_shard` as a Ray task, on whichever node Ray chose; the record names that node."""
    import ray
    node = {"ip": ray.util.get_node_ip_address(), "id": ray.get_runtime_context().get_node_id()}
    plan_path = os.path.join(out, ".convert", f"{split}-plan.json")
    if not os.path.isfile(plan_path):  # written by the driver before any task
        raise ConversionError(f"{describe(node)} cannot see {plan_path}: OUT must be on storage every node "
                              "mounts at the same path")
    return write_shard(out, split, shard_number, first_position, items, node=node)


def describe(node: dict) -> str:
    return f"node {node['ip']} (Ray node id {node['id']})"


# --- driver side -------------------------------------------------------------------------------

def convert(fmt: str, src: Path, out: Path, split: str = "train", *, list_file: Path | None = None,
            shard_size: int | None = DEFAULT_SHARD_SIZE, max_count: int | None = None, seed: int = 0,
            workers: int | None = None, limit: int | None = None, resume: bool = False,
            imbalance: str | None = None, ray_address: str | None = None, log=print) -> dict:
    """Run a conversion; returns the summary written to `OUT/<split>.json`. With `ray_address`
    ("auto", "HOST:6379") the shard writers run as Ray tasks on that cluster, `workers` at a time
    (default: its CPUs); the plan and the manifest stay here."""
    src, out = src.absolute(), out.absolute()  # Ray tasks and forked workers may run elsewhere
    listing = list_source(fmt, src, split, list_file)
    if not listing.items:
        raise ConversionError(f"{src} holds no images for split {split!r}")
    state = out / ".convert"
    plan_path = state / f"{split}-plan.json"
    plan_info = {
        "format": fmt, "src": str(src.resolve()), "split": split, "seed": seed, "limit": limit,
        "shard_size": shard_size, "max_count": max_count, "items": len(listing.items),
        "fingerprint": fingerprint(listing.items),
    }
    if imbalance is not None:
        plan_info["imbalance"] = imbalance
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if not resume:
            raise ConversionError(f"{out} already holds split {split!r} (pass --resume to finish or "
                                  "reuse it, or choose another OUT)")
        if previous != plan_info:
            changed = [k for k in plan_info if previous.get(k) != plan_info[k]]
            raise ConversionError(f"--resume: {', '.join(changed)} differ from the run that wrote {out} "
                                  "(rerun with the same options, or choose another OUT)")
    elif any(out.glob(f"{split}-*.tar")):
        raise ConversionError(f"{out} holds {split} shards from another tool or run; choose another OUT")
    try:
        (out / "index").mkdir(parents=True, exist_ok=True)
        state.mkdir(exist_ok=True)
        write_atomic(str(plan_path), json.dumps(plan_info, indent=1).encode())
    except OSError as exc:
        raise ConversionError(write_error(exc, str(plan_path))) from None

    shards = plan_shards(listing.items, seed, limit, shard_size, max_count, imbalance)
    starts = np.cumsum([0] + [len(s) for s in shards])
    written = set(os.listdir(state))  # one listing, not a lookup per shard (cheaper on network storage)
    todo = [n for n in range(len(shards)) if f"{split}-{n:06d}.json" not in written]
    total = int(starts[-1])
    done_before = total - sum(len(shards[n]) for n in todo)
    if done_before:
        log(f"resume: {len(shards) - len(todo)} of {len(shards)} shards already written")
    jobs = [(str(out), split, n, int(starts[n]), [listing.items[i] for i in shards[n]]) for n in todo]
    started = time.monotonic()
    if ray_address is None or not todo:
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
        log(f"converting {fmt} {split}: {total} images into {len(shards)} shards with {workers} workers")
        progress = Progress(total, f"convert {split}", initial=done_before)
        _write_all(jobs, workers, progress)
    else:
        with _ray_connection(ray_address) as ray:
            workers = max(1, min(workers or int(ray.cluster_resources().get("CPU", 1)), len(todo) or 1))
            log(f"converting {fmt} {split}: {total} images into {len(shards)} shards with Ray tasks, "
                f"{workers} at a time, on a cluster of {sum(node['Alive'] for node in ray.nodes())} nodes")
            progress = Progress(total, f"convert {split}", initial=done_before)
            nodes = _write_all_on_ray(jobs, workers, progress)
    progress.update(total - progress.done)
    progress.close()
    if ray_address is not None and todo:
        log(f"ray: {len(todo)} shards written on {len(nodes)} nodes")
    try:  # the shard list (OUT/<split>.json) is written last: a failed finalize lists nothing
        summary = finalize(out, split, len(shards), listing.classes, listing.rejected)
    except OSError as exc:
        raise ConversionError(write_error(exc, str(out))) from None
    except manifest_lib.lmdb.Error as exc:
        raise ConversionError(write_error(exc, str(out / "manifest.lmdb"))) from None
    seconds = time.monotonic() - started
    summary_rate = (total - done_before) / seconds if seconds > 0 else 0.0
    log(f"done: {summary['count']} samples in {len(summary['shards'])} shards "
        f"({summary_rate:.0f} img/s) → {out}")
    if summary["rejected"]:
        log(f"warning: {summary['rejected']} images rejected, listed in {out / f'{split}-rejected.txt'}")
    return summary


def _write_all(jobs, workers, progress) -> None:
    if workers == 1:
        for job in jobs:
            write_shard(*job)
            progress.update(len(job[4]))
        return
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    done_before = progress.done
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
        pending = {pool.submit(write_shard, *job) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()  # re-raise a worker failure here
                progress.update(done_before + counter.value - progress.done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the shards in flight finish, no new ones start
            raise


@contextmanager
def _ray_connection(address: str):
    """Connect to the cluster at `address` unless this process already is (a `ray job`, whose own
    runtime env carries the code); disconnect only what was connected here. Yields the `ray` module.
    The code (pipeline/) travels with the connection; its Python packages (Pillow, numpy, lmdb,
    tqdm) must be installed on every node."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    code = [str(Path(__file__).parent)]
    try:
        ray.init(address=address, configure_logging=False, runtime_env={"py_modules": code})
    except ConnectionError as exc:
        raise ConversionError(f"--ray {address}: {exc} (start the cluster with RAY_AUTH_MODE=token exported, "
                              "or pass its HEAD:6379)") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _write_all_on_ray(jobs, workers, progress) -> set[str]:
    """One Ray task per shard (num_cpus=1), at most `workers` in flight so the item lists of a 14M-image
    plan are not all in the object store at once. The slots are dealt over the alive nodes, one per
    CPU (pipeline.placement: every node writes, a node that dies hands its shards on); a slot whose
    shard is written takes the next one. Returns the ids of the nodes that wrote them."""
    import ray

    from pipeline.placement import deal, node_capacity, pinned
    task = ray.remote(write_shard_on_node)
    slots = deal(node_capacity(ray.nodes(), "CPU"), workers)
    if not slots:
        raise ConversionError("--ray: the cluster has no node with a CPU to write shards on")
    waiting, in_flight, nodes = list(reversed(jobs)), {}, set()
    free = list(reversed(range(len(slots))))  # the slots without a task, first slot on top
    try:
        while waiting or in_flight:
            while waiting and free:
                slot = free.pop()
                options = {"num_cpus": 1, "scheduling_strategy": pinned(slots[slot], soft=True)}
                in_flight[task.options(**options).remote(*waiting.pop())] = slot
            (finished,), _ = ray.wait(list(in_flight), num_returns=1)
            free.append(in_flight.pop(finished))
            record = _get_task_result(ray, finished)
            nodes.add(record["node"]["id"])
            progress.update(record["planned"])
    finally:
        for ref in in_flight:  # after a failure: stop the shards still in flight (--resume redoes them)
            ray.cancel(ref)
    return nodes


def _get_task_result(ray, ref) -> dict:
    """The task's record, or its ConversionError as one (a task's errors arrive wrapped)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ConversionError):
            raise ConversionError(str(exc.cause)) from None
        raise


def finalize(out: Path, split: str, num_shards: int, classes: list[str],
             listing_rejected: list[tuple[str, str]]) -> dict:
    """Dense ids in plan order, patched into the shards; manifest; shard list; rejected list."""
    state = out / ".convert"
    next_id, shard_entries, rejected, manifest_rows = 0, [], list(listing_rejected), []
    for n in range(num_shards):
        record = json.loads((state / f"{split}-{n:06d}.json").read_text())
        rejected += [tuple(r) for r in record["rejected"]]
        samples = record["samples"]
        tar_path = out / record["shard"]
        if not samples:  # every image of this shard was rejected
            tar_path.unlink(missing_ok=True)
            (out / "index" / f"{tar_path.stem}.idx").unlink(missing_ok=True)
            continue
        ids = list(range(next_id, next_id + len(samples)))
        patch_ids(str(tar_path), [s[2] for s in samples], ids)
        shard_number = len(shard_entries)
        for sample_id, (position, sample_offset, _, label) in zip(ids, samples):
            manifest_rows.append((sample_id, f"{position:010d}", label, shard_number, sample_offset))
        shard_entries.append({"url": record["shard"], "index": f"index/{tar_path.stem}.idx",
                              "nsamples": len(samples), "planned": record["planned"]})
        next_id += len(samples)
    shard_names = [s["url"] for s in shard_entries]
    manifest_lib.write_split(out, split, classes, shard_names, iter(manifest_rows))
    rejected.sort()
    (out / f"{split}-rejected.txt").write_text("".join(f"{src}\t{reason}\n" for src, reason in rejected))
    summary = {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split, "split": split,
        "count": next_id, "rejected": len(rejected), "classes": classes, "shardlist": shard_entries,
        "shards": shard_names,
    }
    write_atomic(str(out / f"{split}.json"), json.dumps(summary, indent=1).encode())
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, help_text, has_split in [
        ("imagenet", "ImageNet-1K class folders SRC/<split>/<wnid>/*.JPEG (or --list)", True),
        ("imagenet22k", "ImageNet-22K per-synset tars SRC/<wnid>.tar (winter21_whole)", False),
        ("webvision", "WebVision 1.0 (info/*_filelist*.txt)", True),
        ("fashion-mnist", "Fashion-MNIST idx .gz files", True),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src", type=Path, metavar="SRC")
        p.add_argument("out", type=Path, metavar="OUT")
        if has_split:
            p.add_argument("--split", choices=["train", "val"], default="train")
        else:
            p.set_defaults(split="train")
        if name == "imagenet":
            p.add_argument("--list", dest="list_file", type=Path, help="'relpath label' lines, relpath relative to SRC")
        p.add_argument("--shard-size", type=_size, default=DEFAULT_SHARD_SIZE,
                       help="approximate bytes per shard (default 1G; accepts K/M/G suffixes)")
        p.add_argument("--max-count", type=_positive, help="at most this many samples per shard")
        p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
        p.add_argument("--workers", type=_positive,
                       help="parallel shard writers (default: all cores; with --ray, the cluster's CPUs)")
        p.add_argument("--limit", type=_positive, help="convert only the first N images after the shuffle")
        p.add_argument("--imbalance", choices=IMBALANCE_RULES,
                       help="keep a fraction of each class c: linear (c+1)/C or exponential exp(c+1)/exp(C) "
                            "(CACR's label-imbalanced sets), seeded by --seed")
        p.add_argument("--resume", action="store_true", help="finish an interrupted conversion into OUT")
        p.add_argument("--ray", dest="ray_address", metavar="ADDRESS",
                       help="write the shards as Ray tasks on this cluster ('auto' or HEAD:6379); SRC and "
                            "OUT must be shared storage, the same paths on every node")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = text.strip().upper().rstrip("B")
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1G, 500M, 1000000)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("shard size must be positive")
    return int(value)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        convert(args.format, args.src, args.out, args.split, list_file=getattr(args, "list_file", None),
                shard_size=args.shard_size, max_count=args.max_count, seed=args.seed,
                workers=args.workers, limit=args.limit, resume=args.resume, imbalance=args.imbalance,
                ray_address=args.ray_address, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ConversionError, sources.LayoutError, manifest_lib.ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
