"""Faults under load: the InterCLR-MoCo job on Fashion-MNIST with a seeded killer that SIGKILLs a
loader actor, a bank shard or a Train worker, or stops the whole job (`ray job stop`, then the same
run name submitted again), again and again; then the accounting of what the run trained, against a
fault-free run of the same config and seed.

    python benchmarks/chaos.py            # ≈ 12 min: 11 faults (3 of each kill, 2 job stops); benchmarks/results/chaos.json
    python benchmarks/chaos.py --quick    # ≈ 6 min: 4 faults (each kind once); prints the JSON only

Every run is the real job submitted as a user submits it (`ray job submit` of
`jobs/interclr_imagenet.py`, through the Ray Jobs API) to a Ray head this script starts
(`ray.cluster_utils.Cluster` with its dashboard's job server, token authentication) and stops: 2
Train workers (DDP over gloo), a loader actor each, 2 bank shards, `train.log_ids` on. The killer
reads the cluster's actor table and SIGKILLs by pid, or stops the job and waits for it to end; the
run's submissions continue until one ends on its own. One fault after each new checkpoint (plus a
seeded delay), so every restart has progress to resume from.

What must hold (exit status 1 otherwise, the failures named in the JSON): the run finishes; in every
epoch of the final model's history (per rank, the last try of each step: a step rolled back by a
restart and trained again counts once) every sample of the epoch's full batches exactly once; no
update applied twice or lost (the bank's update count = workers × steps, the lr schedule's step =
the model's); the trained kNN within noise of the fault-free run's; no process of this head left.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.fidelity import FASHION_MNIST_DIR, require_fashion_mnist, write_json_atomic  # noqa: E402

JOB = REPO / "jobs" / "interclr_imagenet.py"
DATA = REPO / "data" / "chaos"  # fashion-mnist-<train images>: gitignored
RUNS = REPO / "runs" / "chaos"
OUT = REPO / "benchmarks" / "results" / "chaos.json"
KINDS = {"loader": "LoaderActor", "bank": "BankShard", "worker": "RayTrainWorker", "job": None}  # None: ray job stop
WORKERS, BATCH = 2, 64
# kNN on 1,000 val images: s.e. of a top-1 near 0.75 is √(0.75·0.25/1000) ≈ 0.014; two runs differ by
# up to ≈ 2.8 s.e. of their difference (√2 · 0.014 · 2) ≈ 0.04 by chance
KNN_NOISE = 0.04
BANK_NOTE = ("the runs are not bitwise repeatable: the two Train workers' asynchronous bank updates reach "
             "the shards in arrival order, and each client draws its negatives from its own stream, which a "
             "restart reseeds; fault_free_vs_fault_free (the full run) is the same config and seed twice "
             "without faults, the bound the chaos run's difference is read against")
PLANS = {  # train images, epochs, kills per actor kind, job stops
    "full": {"train": 6000, "epochs": 6, "kills": 3, "job_stops": 2},
    "quick": {"train": 3000, "epochs": 6, "kills": 1, "job_stops": 1},
}


def job_args(name: str, data: Path, plan: dict, kills: int) -> list[str]:
    """The demo preset, small: InterCLR-MoCo from its first step (no warm-up), 2 workers, checkpoints
    every 5 steps, Ray Train restarts enough for every kill."""
    sets = {"bank.clusters": 20, "bank.shards": 2, "method.num_negatives": 256, "method.queue_size": 1024,
            "method.warmup_epochs": 0, "data.batch_size": BATCH, "data.loader_cpus": 0.25,
            "train.cpus_per_worker": 1, "train.torch_threads": 1, "train.checkpoint_every": 5,
            "train.max_failures": kills + 2, "train.log_ids": "true", "train.seed": 0,
            "eval.pictures": "false", "eval.pixel_baseline": "false"}
    args = ["--preset", "demo", "--shards", str(data), "--storage", str(RUNS), "--name", name,
            "--workers", str(WORKERS), "--epochs", str(plan["epochs"])]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def prepare_data(plan: dict) -> Path:
    from pipeline.convert import convert
    require_fashion_mnist()
    root = DATA / f"fashion-mnist-{plan['train']}"
    if not (root / "train.json").exists():
        convert("fashion-mnist", FASHION_MNIST_DIR, root, "train", limit=plan["train"], workers=2, log=lambda m: None)
    if not (root / "val.json").exists():
        convert("fashion-mnist", FASHION_MNIST_DIR, root, "val", limit=1000, workers=2, log=lambda m: None)
    return root


class Killer(threading.Thread):
    """One fault of each kind in `schedule`, in order: each after the run has written a checkpoint
    newer than the last fault's, plus a seeded 0-8 s. An actor kind: SIGKILL one of them, chosen by
    the seed; "job": `jobs.stop()` (ray job stop, waited for). Records (kind, pid, time, step)."""

    def __init__(self, run_dir: Path, schedule: list[str], seed: int, jobs: "Submissions"):
        super().__init__(daemon=True)
        self.run_dir, self.schedule, self.rng, self.jobs = run_dir, list(schedule), np.random.default_rng(seed), jobs
        self.kills: list[dict] = []
        self.stop = threading.Event()

    def last_checkpoint(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines()
                 if line.strip() and '"checkpoint"' in line]
        return max(steps, default=0)

    def run(self) -> None:
        from ray._private import state
        seen = 0
        for kind in self.schedule:
            while not self.stop.is_set() and self.last_checkpoint() <= seen:
                time.sleep(0.5)
            if self.stop.wait(float(self.rng.uniform(0, 8))):
                return
            if kind == "job":
                step, stopped = last_logged_step(self.run_dir), time.time()
                if not self.jobs.stop():
                    continue
                self.kills.append({"kind": kind, "pid": None, "time": stopped, "step": step})
                print(f"chaos: stopped the job (ray job stop) at step {step}", flush=True)
                seen = self.last_checkpoint()
                continue
            alive = [info for info in state.actors().values()
                     if info["ActorClassName"] == KINDS[kind] and info["State"] == "ALIVE" and info.get("Pid")]
            if not alive:
                continue
            victim = alive[int(self.rng.integers(len(alive)))]
            step = last_logged_step(self.run_dir)
            try:
                os.kill(victim["Pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append({"kind": kind, "pid": victim["Pid"], "time": time.time(), "step": step})
            print(f"chaos: killed a {kind} (pid {victim['Pid']}) at step {step}", flush=True)
            seen = self.last_checkpoint()


def read_ids(run_dir: Path) -> dict[int, list[dict]]:
    """Every step each rank logged, in order (tries of the same step included)."""
    logs = {}
    for path in sorted((run_dir / "ids").glob("rank-*.jsonl")):
        logs[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return logs


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "ids" / "rank-0.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def accounting(run_dir: Path, final_step: int, steps_per_epoch: int) -> dict:
    """The final model's history from the id logs: per rank, the last try of steps 1..final_step."""
    logs = read_ids(run_dir)
    history = {rank: {entry["step"]: entry for entry in entries} for rank, entries in logs.items()}
    missing_steps = sum(1 for rank in history for s in range(1, final_step + 1) if s not in history[rank])
    lost = duplicated = 0
    for epoch in range(-(-final_step // steps_per_epoch)):
        steps = range(epoch * steps_per_epoch + 1, min(final_step, (epoch + 1) * steps_per_epoch) + 1)
        ids = np.concatenate([np.asarray(history[rank][s]["ids"]) for rank in history for s in steps
                              if s in history[rank]] or [np.zeros(0, np.int64)])
        counts = np.bincount(ids) if len(ids) else np.zeros(0, np.int64)
        duplicated += int((counts[counts > 1] - 1).sum())
        lost += len(steps) * WORKERS * BATCH - int((counts > 0).sum())  # the epoch's full batches
    tried = sum(len(entries) for entries in logs.values())
    # a step tried twice: trained, rolled back by a restart from an older checkpoint, trained again
    return {"samples_lost": lost, "samples_duplicated": duplicated, "steps_missing": missing_steps,
            "steps_rolled_back": (tried - len(logs) * final_step) // max(1, len(logs))}


def recovery_seconds(run_dir: Path, kills: list[dict]) -> dict:
    """Wall time each kill cost: from the kill to the step after the one it was at, as the final
    model's history trained it (its last try: a step tried before the failure was noticed and then
    rolled back does not count), less one median step (what that step would have taken anyway)."""
    entries = read_ids(run_dir).get(0, [])
    final = {e["step"]: e["time"] for e in entries}  # the last try of each step
    times = sorted(final.values())
    median_step = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    lost = []
    for kill in kills:
        done = final.get(kill["step"] + 1)
        kill["seconds_lost"] = None if done is None else round(max(0.0, done - kill["time"] - median_step), 1)
        if kill["seconds_lost"] is not None:
            lost.append(kill["seconds_lost"])
    by_kind = {kind: [k["seconds_lost"] for k in kills if k["kind"] == kind and k["seconds_lost"] is not None]
               for kind in KINDS}
    if not lost:
        return {"p50": None, "p95": None, "max": None, "mean_by_kind": {}}
    return {"p50": round(float(np.percentile(lost, 50)), 1), "p95": round(float(np.percentile(lost, 95)), 1),
            "max": round(max(lost), 1),
            "mean_by_kind": {kind: round(float(np.mean(v)), 1) for kind, v in by_kind.items() if v}}


def final_state(run_dir: Path) -> dict:
    """The last checkpoint's step and lr-schedule step, and its bank snapshot (features, labels,
    centroids of every shard)."""
    import torch

    from runtime import runs
    checkpoint = runs.latest_checkpoint(run_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    snapshot = Path(state["bank_snapshots"][0])
    shards = [torch.load(path, map_location="cpu") for path in sorted(snapshot.glob("shard-*.pt"))]
    return {"step": state["step"], "schedule_step": state["schedule"]["last_epoch"],
            "bank_step": max(s["step"] for s in shards),  # every shard counts every update
            "feats": [s["feats"].float() for s in shards],
            "labels": [s["labels"] for s in shards], "centroids": shards[0]["centroids"].float()}


def compare_banks(a: dict, b: dict) -> dict:
    """Row by row (shard s's rows in the same order in both): the features' cosine, and how alike the
    two pseudo-labellings are (NMI: cluster ids are arbitrary), the centroids' largest difference."""
    import torch

    from bank.kmeans import normalized_mutual_info
    feats_a, feats_b = torch.cat(a["feats"]), torch.cat(b["feats"])
    labels = np.stack([torch.cat(a["labels"]).numpy(), torch.cat(b["labels"]).numpy()], 1)
    pairs, counts = np.unique(labels, axis=0, return_counts=True)
    return {"feature_cosine_mean": round(float((feats_a * feats_b).sum(1).mean()), 4),
            "feature_cosine_min": round(float((feats_a * feats_b).sum(1).min()), 4),
            "labels_nmi": round(normalized_mutual_info(pairs, counts), 4),
            "centroid_max_abs_diff": round(float((a["centroids"] - b["centroids"]).abs().max()), 4)}


class Submissions:
    """The submissions of one run name through the Ray Jobs API (`JobSubmissionClient`, what
    `ray job submit` / `ray job stop` call): `run` submits the job and, each time `stop` has stopped
    it, submits the same run name again, until a submission ends on its own."""

    def __init__(self, client, name: str, data: Path, plan: dict, faults: int, log):
        self.client, self.name, self.log = client, name, log
        self.entrypoint = " ".join([sys.executable, str(JOB), *job_args(name, data, plan, faults)])
        self.current, self.stops, self.lock = None, 0, threading.Lock()

    def stop(self) -> bool:
        """`ray job stop` the running submission and wait until it has ended; False if none ran."""
        from ray.job_submission import JobStatus
        with self.lock:
            current = self.current
            if current is None or self.client.get_job_status(current).is_terminal():
                return False
            self.stops += 1
        self.client.stop_job(current)
        while self.client.get_job_status(current) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
            time.sleep(0.5)
        return True

    def run(self) -> tuple[int, float]:
        """(0 if the last submission succeeded else 1, wall seconds over all submissions)."""
        from ray.job_submission import JobStatus
        started = time.time()
        for attempt in range(1000):
            with self.lock:
                stops = self.stops
                self.current = self.client.submit_job(
                    entrypoint=self.entrypoint, submission_id=f"{self.name}-{attempt}-{secrets.token_hex(3)}",
                    runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
            while not (status := self.client.get_job_status(self.current)).is_terminal():
                time.sleep(1)
            self.log.write(f"\n=== {self.name}, submission {attempt}: {status}\n{self.client.get_job_logs(self.current)}")
            self.log.flush()
            with self.lock:
                if status != JobStatus.STOPPED or self.stops == stops:  # ended on its own
                    self.current = None
                    return (0 if status == JobStatus.SUCCEEDED else 1), time.time() - started
        raise RuntimeError("a thousand submissions")


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jobs_client(client_class, address: str, timeout: float = 60):
    """The Jobs API client once the head's job agent answers (it comes up seconds after the head)."""
    deadline = time.time() + timeout
    while True:
        try:
            client = client_class(address)
            client.list_jobs()
            return client
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def own_processes(mark: str) -> list[int]:
    """Processes (other than this one) whose environment holds `mark`: what the head started."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if mark.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                    if stat[0] != "Z":
                        found.append(int(proc.name))
            except OSError:
                pass
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 faults, each kind once (≈ 6 min)")
    parser.add_argument("--seed", type=int, default=0, help="the killer's schedule and delays")
    parser.add_argument("--out", type=Path, help=f"write the JSON here too (default for the full run: {OUT})")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the head still goes (finally)
    plan = PLANS["quick" if args.quick else "full"]
    data = prepare_data(plan)
    rng = np.random.default_rng(args.seed)
    schedule = [kind for kind in KINDS for _ in range(plan["job_stops"] if kind == "job" else plan["kills"])]
    schedule = [schedule[i] for i in rng.permutation(len(schedule))]
    mark = f"VIEWBANK_CHAOS={secrets.token_hex(8)}"
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                       mark.split("=")[0]: mark.split("=")[1], "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"})
    import ray
    from ray.cluster_utils import Cluster
    for name in ("fault-free", "fault-free-2", "chaos"):
        shutil.rmtree(RUNS / name, ignore_errors=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    log = open(RUNS / "chaos.log", "w")
    started = time.time()
    dashboard_port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True,
                                                            "dashboard_port": dashboard_port})
    killer = Killer(RUNS / "chaos", schedule, args.seed, None)
    try:
        from ray.job_submission import JobSubmissionClient
        ray.init(address=cluster.address, log_to_driver=False)
        client = jobs_client(JobSubmissionClient, f"http://127.0.0.1:{dashboard_port}")
        print(f"chaos: Ray head {cluster.address}, jobs at http://127.0.0.1:{dashboard_port}; job logs in "
              f"{RUNS / 'chaos.log'}", flush=True)
        rc_free, free_seconds = Submissions(client, "fault-free", data, plan, len(schedule), log).run()
        print(f"chaos: fault-free run exited {rc_free} after {free_seconds:.0f} s", flush=True)
        if not args.quick:  # the same run again: how far two fault-free runs of one seed end apart
            Submissions(client, "fault-free-2", data, plan, len(schedule), log).run()
        jobs = Submissions(client, "chaos", data, plan, len(schedule), log)
        killer = Killer(RUNS / "chaos", schedule, args.seed, jobs)
        killer.start()
        rc, chaos_seconds = jobs.run()
        killer.stop.set()
        killer.join(timeout=30)
        print(f"chaos: run with {len(killer.kills)} faults ({jobs.stops} job stops) exited {rc} after "
              f"{chaos_seconds:.0f} s", flush=True)
        ray.shutdown()
    finally:
        cluster.shutdown()
        log.close()
    deadline = time.time() + 20
    while own_processes(mark) and time.time() < deadline:
        time.sleep(0.5)
    left = own_processes(mark)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return report(args, plan, schedule, killer.kills, rc, rc_free, chaos_seconds, free_seconds, left, started)


def report(args, plan, schedule, kills, rc, rc_free, chaos_seconds, free_seconds, left, started) -> int:
    summary = {}
    for name in ("chaos", "fault-free"):
        path = RUNS / name / "summary.json"
        summary[name] = json.loads(path.read_text()) if path.exists() else {}
    finished = rc == 0 and summary["chaos"].get("step") is not None
    steps_per_epoch = plan["train"] // (WORKERS * BATCH)
    final_step = summary["chaos"].get("step") or last_logged_step(RUNS / "chaos")
    counted = accounting(RUNS / "chaos", final_step, steps_per_epoch)
    out = {"benchmark": "chaos", "quick": args.quick, "seed": args.seed, "machine": f"{os.cpu_count()}-core CPU",
           "finished": finished, "kills": len(kills),
           "kill_kinds": {kind: sum(k["kind"] == kind for k in kills) for kind in KINDS},
           **{key: counted[key] for key in ("samples_lost", "samples_duplicated", "steps_rolled_back")},
           "recovery_seconds": recovery_seconds(RUNS / "chaos", kills),
           "steps": final_step, "expected_steps": steps_per_epoch * plan["epochs"],
           "wall_seconds": round(chaos_seconds), "fault_free_wall_seconds": round(free_seconds),
           "knn_trained": summary["chaos"].get("knn_top1"),
           "knn_trained_fault_free": summary["fault-free"].get("knn_top1"),
           "knn_random_init": summary["chaos"].get("knn_top1_random_init"), "processes_left": len(left)}
    failures = []
    if finished and rc_free == 0:
        chaos_state, free_state = final_state(RUNS / "chaos"), final_state(RUNS / "fault-free")
        out["steps_repeated"] = chaos_state["bank_step"] // WORKERS - chaos_state["step"]
        out["bank_updates"] = {"counted": chaos_state["bank_step"], "expected": WORKERS * chaos_state["step"]}
        out["schedule_step"] = chaos_state["schedule_step"]
        out["bank_vs_fault_free"] = compare_banks(chaos_state, free_state)
        if (RUNS / "fault-free-2" / "summary.json").exists():
            out["fault_free_vs_fault_free"] = compare_banks(final_state(RUNS / "fault-free-2"), free_state)
            second = json.loads((RUNS / "fault-free-2" / "summary.json").read_text())
            out["knn_trained_fault_free_2"] = second["knn_top1"]
        out["bank_note"] = BANK_NOTE
        if chaos_state["bank_step"] != WORKERS * chaos_state["step"]:
            failures.append(f"bank updates {chaos_state['bank_step']} != {WORKERS} × {chaos_state['step']} steps")
        if chaos_state["schedule_step"] != chaos_state["step"]:
            failures.append(f"lr schedule at step {chaos_state['schedule_step']}, model at {chaos_state['step']}")
        if abs(out["knn_trained"] - out["knn_trained_fault_free"]) > KNN_NOISE:
            failures.append(f"kNN {out['knn_trained']:.3f} vs fault-free {out['knn_trained_fault_free']:.3f}")
    else:
        failures.append(f"run exited {rc}, fault-free run {rc_free}")
    if final_step != out["expected_steps"]:
        failures.append(f"{final_step} steps of {out['expected_steps']}")
    if counted["samples_lost"] or counted["samples_duplicated"] or counted["steps_missing"]:
        failures.append(f"{counted['samples_lost']} samples lost, {counted['samples_duplicated']} duplicated, "
                        f"{counted['steps_missing']} steps without a log")
    if len(kills) < len(schedule):
        failures.append(f"{len(kills)} of {len(schedule)} planned kills (the run ended first)")
    if left:
        failures.append(f"{len(left)} processes of this head were left running (killed)")
    out["failures"] = failures
    out["kills_detail"] = [{"kind": k["kind"], "step": k["step"], "seconds_lost": k["seconds_lost"],
                            "seconds_after_start": round(k["time"] - started, 1)} for k in kills]
    out["total_minutes"] = round((time.time() - started) / 60, 1)
    print(json.dumps(out, indent=1))
    target = args.out or (None if args.quick else OUT)
    if target is not None:
        write_json_atomic(target, out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
