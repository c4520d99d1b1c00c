"""Checks a job passes before it takes any Ray resource: the data against the config (a request the
trainer would fail on after minutes of setup) and the whole resource request against the cluster
(an infeasible request is not refused by Ray Train: it waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
and FailureConfig retries it). Each check raises a one-line `ConfigError` naming its numbers.

Ray Train 2.60's own TrainController actor asks for num_cpus=0 (ray/train/v2/api/
data_parallel_trainer.py), as do its state and sync actors: only its workers count here.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import placement
from runtime.config import ConfigError, JobConfig


def steps_per_epoch(num_samples: int, world: int, loaders_per_rank: int, batch_size: int) -> int:
    """DDP steps of one epoch: every loader stream (world × loaders_per_rank of them) gets an equal
    share of the samples and serves full batches only, so every rank runs the same number of steps."""
    per_stream = num_samples // (world * loaders_per_rank)
    return (per_stream // batch_size) * loaders_per_rank


def check_data(config: JobConfig, method, num_samples: int) -> None:
    """The training split (`num_samples`) must fill what the config asks of it: a full batch per
    loader stream, the clusters, the MoCo queue within the first epoch, the bank's negatives, the
    kNN neighbours. `method` is the built method (`runtime.build.build_method`)."""
    d, world = config.data, config.train.num_workers
    loaders_per_rank = d.loaders or 1  # 0 loader actors: one DALI loader inside each worker
    steps = steps_per_epoch(num_samples, world, loaders_per_rank, d.batch_size)
    if steps == 0:
        streams = world * loaders_per_rank
        per_stream = num_samples // streams
        fix = (f"lower data.batch_size to at most {per_stream}" if per_stream
               else "use fewer train.num_workers or data.loaders")
        raise ConfigError(f"{num_samples} training samples make no full batch of data.batch_size={d.batch_size}: "
                          f"each of the {streams} loader streams ({_count(world, 'Train worker')} × "
                          f"{loaders_per_rank}) gets {per_stream} ({fix})")
    requests = method.bank_requests()
    if any(r.clusters for r in requests) and config.bank.clusters > num_samples:
        raise ConfigError(f"bank.clusters={config.bank.clusters} exceeds the {num_samples} training samples "
                          f"(k-means needs a sample per cluster: lower bank.clusters)")
    queue = getattr(method, "queue", None)
    if queue is not None:
        size, keys_per_step = len(queue.keys), d.batch_size * world
        needed = -(-size // keys_per_step)  # the batches runtime.train.prime_queue pulls from the first epoch
        if needed > steps:
            raise ConfigError(f"method.queue_size={size} needs {needed} batches of {d.batch_size} × "
                              f"{_count(world, 'Train worker')} to fill but an epoch of {num_samples} samples has "
                              f"{steps} (lower method.queue_size to at most {steps * keys_per_step})")
    negatives = _bank_negatives(method)
    if requests and negatives >= num_samples:
        raise ConfigError(f"method.num_negatives={negatives} must be below the {num_samples} samples in the bank "
                          f"(a query's negatives are the other samples: lower method.num_negatives)")
    e = config.eval
    limited = e.knn_train_samples is not None and e.knn_train_samples < num_samples
    memory, source = (e.knn_train_samples, "eval.knn_train_samples") if limited else (num_samples, "the training split")
    if not 1 <= e.knn_k <= memory:
        raise ConfigError(f"eval.knn_k={e.knn_k} must be between 1 and the kNN memory of {memory} train samples "
                          f"({source})")
    per_cluster, floor = num_samples / max(1, config.bank.clusters), config.bank.min_cluster
    if any(r.clusters for r in requests) and floor > 0 and per_cluster < 2 * floor:
        # at a mean of min_cluster samples per cluster about half the clusters sit below it after every
        # update and upkeep refills them all, every step (docs/bank.md)
        raise ConfigError(f"bank.min_cluster={floor} with {num_samples} samples in {config.bank.clusters} clusters "
                          f"({per_cluster:.0f} per cluster): upkeep needs at least {2 * floor} per cluster "
                          f"(lower bank.clusters to at most {num_samples // (2 * floor)}, or bank.min_cluster; "
                          "0 turns upkeep off)")


def _bank_negatives(method) -> int:
    """Negatives a step draws from the bank: InterCLR's inter query (0 on a BYOL base); NPID's and
    CMC's `num_negatives`; 0 for a method without them."""
    if hasattr(method, "inter_query"):
        return method.inter_query().num_negatives
    return getattr(method, "num_negatives", 0)


def check_resources(config: JobConfig, resources: dict, nodes: list[dict], num_banks: int) -> None:
    """The job's whole request against the cluster: the total against `resources`
    (`ray.cluster_resources()`), and each single actor against the alive `nodes` (`ray.nodes()`),
    since one actor or Train worker runs on one node. `num_banks`: the method's bank requests."""
    check_devices(config)
    t, d, b = config.train, config.data, config.bank
    # (name, how many, the key that sets how many, one actor's {resource: (amount, the key that sets it)})
    parts = [("Train worker", t.num_workers, "train.num_workers",  # ScalingConfig's bundle
              {"CPU": (t.cpus_per_worker, "train.cpus_per_worker"),
               "GPU": (t.gpus_per_worker * t.use_gpu, "train.gpus_per_worker")}),
             ("loader actor", d.loaders * t.num_workers, "data.loaders",
              {"CPU": (d.loader_cpus, "data.loader_cpus"),
               "GPU": (d.loader_gpus if d.device == "gpu" else 0.0, "data.loader_gpus")}),
             ("bank shard", num_banks * b.shards, "bank.shards",  # bank shards take num_cpus=0
              {"GPU": (b.gpus_per_shard, "bank.gpus_per_shard")})]
    short = []
    for resource in ("CPU", "GPU"):
        used = [(name, count, f"{count_key} or {one[resource][1]}", one[resource][0])
                for name, count, count_key, one in parts if count and one.get(resource, (0.0,))[0]]
        need, have = sum(count * amount for _, count, _, amount in used), float(resources.get(resource, 0.0))
        if need > have + 1e-6:
            shares = ", ".join(f"{_count(count, name)} × {amount:g}" for name, count, _, amount in used)
            lower = ", ".join(keys for _, _, keys, _ in used)
            short.append(f"the job needs {_amount(need)} {resource}s ({shares}) but the cluster has {_amount(have)} "
                         f"(lower {lower}, or add nodes)")
    if short:
        raise ConfigError("; ".join(short))
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    for name, count, _, one in parts:
        request = {resource: amount for resource, (amount, _) in one.items() if amount}
        if not count or not request or any(_fits(request, node) for node in alive):
            continue
        largest = {k: max((float(node.get(k, 0.0)) for node in alive), default=0.0) for k in request}
        too_big = [k for k, amount in request.items() if amount > largest[k] + 1e-6]
        wanted = " and ".join(f"{_amount(amount)} {k}s" for k, amount in request.items())
        where = (" and ".join(f"the largest node has {_amount(largest[k])} {k}s" for k in too_big) if too_big
                 else "no single node has all of it")
        lower = " or ".join(one[k][1] for k in too_big or request)
        raise ConfigError(f"one {name} needs {wanted} on one node but {where} (lower {lower})")
    check_gpu_packing(config, nodes, num_banks)


def check_devices(config: JobConfig) -> None:
    """No process touches CUDA without a GPU resource: Ray hides every GPU from an actor that asks for
    none, so DALI on the GPU needs a GPU Train worker (data.loaders=0) or a GPU share per loader actor."""
    t, d = config.train, config.data
    if d.device != "gpu":
        return
    if d.loaders == 0 and not t.use_gpu:
        raise ConfigError("data.device=gpu with data.loaders=0 runs DALI inside each Train worker, which holds no "
                          "GPU (train.use_gpu=false): set train.use_gpu=true, or data.device=cpu")
    if d.loaders > 0 and d.loader_gpus <= 0:
        raise ConfigError(f"data.device=gpu with data.loaders={d.loaders} starts loader actors that decode on a GPU "
                          f"but ask Ray for none (data.loader_gpus=0): set data.loaders=0 (DALI inside each Train "
                          f"worker, on its GPU), or data.loader_gpus to the share of its worker's GPU each loader "
                          f"actor takes (e.g. 0.05), or data.device=cpu")


def gpu_slots(config: JobConfig, num_banks: int) -> list[placement.GpuSlot]:
    """The job's GPUs and what shares each (`pipeline.placement.gpu_slots`): the Train workers, their
    GPU loader actors and the `num_banks` banks' shards."""
    t, d, b = config.train, config.data, config.bank
    gpu_loaders = d.device == "gpu" and d.loaders > 0
    return placement.gpu_slots(t.num_workers, t.gpus_per_worker if t.use_gpu else 0.0, t.cpus_per_worker,
                               d.loaders if gpu_loaders else 0, d.loader_gpus if gpu_loaders else 0.0, d.loader_cpus,
                               num_banks * b.shards, b.gpus_per_shard if num_banks else 0.0)


def check_gpu_packing(config: JobConfig, nodes: list[dict], num_banks: int) -> list[placement.GpuSlot]:
    """Per GPU, not in total: what shares one GPU must fit in it, no two Train workers or bank shards
    share one, and every GPU of the plan (with its CPUs) must find a node (`pipeline.placement.assign_nodes`).
    Returns the slots, their nodes set."""
    t, d = config.train, config.data
    if t.use_gpu and t.num_workers > 1 and t.gpus_per_worker <= 0.5:
        # the tightest fit puts two such workers on one GPU, and NCCL refuses two ranks on one device
        # ("Duplicate GPU detected", ray-project/ray#48012)
        raise ConfigError(f"train.gpus_per_worker={t.gpus_per_worker:g} lets Ray put two of the "
                          f"{t.num_workers} Train workers on one GPU, which NCCL refuses: give each more than "
                          f"half a GPU (the presets: 0.75, with a 0.25 bank shard beside it)")
    slots = gpu_slots(config, num_banks)
    crowded = next((slot for slot in slots if slot.used > 1 + 1e-6), None)
    if crowded is not None:
        keys = (["train.gpus_per_worker"] if crowded.worker else []) + ["data.loader_gpus", "data.loaders"]
        raise ConfigError(f"one GPU would hold {crowded.describe()} = {crowded.used:g} of a GPU "
                          f"(lower {' or '.join(keys)})")
    unplaced = placement.assign_nodes(slots, nodes)
    if unplaced:
        alive = [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]
        have = _tally(f"{int(float(r.get('GPU', 0.0)))} GPUs, {float(r.get('CPU', 0.0)):g} CPUs" for r in alive)
        raise ConfigError(f"the job's GPUs do not fit the nodes: it needs {_count(len(slots), 'GPU')} "
                          f"({_tally(slot.describe() for slot in slots)}, each slot with its CPUs), and "
                          f"{_tally(slot.describe() for slot in unplaced)} find no node with a free GPU and "
                          f"CPUs (nodes: {have}) (add GPU nodes, or lower train.num_workers or bank.shards; a "
                          f"shard sits beside a worker when train.gpus_per_worker + data.loaders × "
                          f"data.loader_gpus + bank.gpus_per_shard <= 1)")
    return slots


def check_shared_storage(directory: Path, nodes: list[dict], read=None, timeout: float = 60.0) -> list[str]:
    """On a cluster of several nodes `directory` (the run's folder in `storage`: Ray Train's
    checkpoints, the workers' eval.json, the bank snapshots) must be the same folder on every node: a
    marker the driver writes there is read back by a zero-CPU task pinned to each alive node. A node
    that does not see it is a one-line ConfigError naming the node. Returns the alive nodes' ids.
    `read(path, node_ids, timeout) -> {node id: text}` is `pipeline.placement.read_on_nodes`."""
    import secrets
    alive = [node for node in nodes if node.get("Alive", True)]
    if len(alive) < 2:
        return [node["NodeID"] for node in alive]
    token = secrets.token_hex(16)
    marker = Path(directory) / f".storage-check-{token}"
    marker.write_text(token)
    try:
        seen = (read or placement.read_on_nodes)(str(marker), [node["NodeID"] for node in alive], timeout)
    finally:
        marker.unlink(missing_ok=True)
    for node in alive:
        if seen.get(node["NodeID"]) != token:
            how = "cannot see it" if node["NodeID"] in seen else f"did not answer within {timeout:.0f} s"
            raise ConfigError(f"storage is not shared: node {node['NodeID']} ({node.get('NodeManagerAddress', '?')}) "
                              f"{how}: the driver wrote {marker} there (Ray Train's checkpoints, eval.json and the "
                              f"bank snapshots are written by one node and read by another: give --storage a "
                              f"folder every node mounts at the same path, e.g. NFS)")
    return [node["NodeID"] for node in alive]


def _tally(texts) -> str:
    """'4 × a, 2 × b' in order of first appearance."""
    counts = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"{n} × [{text}]" for text, n in counts.items())


def _fits(request: dict, node: dict) -> bool:
    return all(amount <= float(node.get(resource, 0.0)) + 1e-6 for resource, amount in request.items())


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _amount(value: float) -> str:
    """4.0, 1.5, 0.25: resources as Ray prints them, always with a decimal point."""
    text = f"{value:g}"
    return text if "." in text or "e" in text else f"{text}.0"


def placement_plan(config: JobConfig, bank_dims: list[int], num_samples: int | None) -> list[str]:
    """What each component asks of the cluster (`--print-config`): CPUs and GPUs per Train worker,
    loader actor and bank shard, and a bank shard's memory for `num_samples` rows (its feature
    matrix, labels and member index, and the replicas of the cluster sums, counts and centroids)."""
    t, d, b = config.train, config.data, config.bank
    gpus = f", {t.gpus_per_worker:g} GPU" if t.use_gpu else ""
    loader_share = d.loader_gpus if d.device == "gpu" else 0.0
    loader_gpus = f", {loader_share:g} GPU" if loader_share else ""
    lines = ["placement plan:",
             f"  Train workers: {t.num_workers} × ({t.cpus_per_worker:g} CPU{gpus})",
             f"  loader actors: {d.loaders * t.num_workers} × ({d.loader_cpus:g} CPU{loader_gpus}) ({d.loaders} per "
             f"worker, DALI on {d.device})" if d.loaders else f"  loaders: DALI inside each Train worker (on {d.device})"]
    num_banks = len(bank_dims)
    if num_banks:
        place = f"{b.gpus_per_shard:g} GPU" if b.gpus_per_shard else "CPU memory, no CPU reserved"
        if num_samples is None:
            size = "memory: rows × dim × dtype per shard (the shards are not converted yet)"
        else:
            rows, dim, clusters = -(-num_samples // b.shards), max(bank_dims), b.clusters
            feature_bytes = {"float32": 4, "float16": 2}[b.dtype]
            total = rows * (dim * feature_bytes + 3 * 8) + clusters * dim * (8 + 4) + b.shards * clusters * 8
            size = f"≈ {total / 2**20:,.0f} MiB per shard ({rows:,} rows × {dim} {b.dtype}, {clusters:,} clusters)"
        lines.append(f"  bank shards: {num_banks * b.shards} × ({place}); {size}")
    total_cpu = t.num_workers * t.cpus_per_worker + d.loaders * t.num_workers * d.loader_cpus
    total_gpu = (t.num_workers * t.gpus_per_worker * t.use_gpu + d.loaders * t.num_workers * loader_share
                 + num_banks * b.shards * b.gpus_per_shard)
    lines.append(f"  total: {total_cpu:g} CPU, {total_gpu:g} GPU")
    slots = gpu_slots(config, num_banks)
    if slots:
        lines.append(f"  GPUs: {_tally(slot.describe() for slot in slots)}")
    return lines
