"""Linear evaluation of a run: a linear classifier on its frozen backbone, val top-1.

The features are extracted and the classifier trained by Ray Train workers, each on its device and
its share of the data, the classifier with DDP (runtime/linear_probe.py: the two protocols, their
settings and references). The result goes to <run>/linear_eval.json, the head to
<run>/linear_head_<protocol>.pt.

    python jobs/linear_eval.py runs/demo                                  # fast probe, 100 epochs
    python jobs/linear_eval.py runs/demo --protocol standard              # MoCo's protocol: 100 epochs, lr 30
    python jobs/linear_eval.py runs/demo --protocol both --epochs 10      # both, on the same workers
    ray job submit --working-dir . -- python jobs/linear_eval.py /shared/runs/imagenet --workers 8 --device cuda

RUN is the run folder runs/<name> (config.json and Ray Train's checkpoint_*/model.pt), which is
also Ray's `Result.path` (RunConfig(storage_path, name)); every worker reads it, so on a cluster it
is on storage every node mounts. The checkpoint of the highest step is evaluated; the classes are
those of the train split's manifest; the checkpoint is loaded strictly into the method its config
builds. Without --address (or RAY_ADDRESS) a local Ray starts for the job.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.linear_probe import FAST, HEAD_FILE, RESULT_FILE, STANDARD  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (runs/<name>), also Ray's Result.path")
    parser.add_argument("--protocol", choices=("fast", "standard", "both"), default="fast",
                        help="fast: cached centre-crop features (default); standard: MoCo's linear evaluation; "
                             "both: one then the other on the same workers")
    parser.add_argument("--lr", type=float, help=f"default: fast {FAST['lr']}, standard {STANDARD['lr']}")
    parser.add_argument("--epochs", type=int, default=100, help="of each protocol")
    parser.add_argument("--batch-size", type=int, default=256, help="over all workers together, split evenly (MoCo main_lincls.py: batch // workers each)")
    parser.add_argument("--head-bn", action="store_true",
                        help="standard: a BatchNorm1d without affine parameters before the linear layer")
    parser.add_argument("--workers", type=int, help="Ray Train workers (default: the run's train.num_workers)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="the workers' device, one GPU each with cuda (default: cuda if the run trained on GPUs)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--loader-threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="DALI threads per worker's loader")
    parser.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)

    from runtime.config import ConfigError
    from runtime.driver import check_inputs
    from runtime.runs import RunError, load_run
    try:
        config, checkpoint, state, _, _ = load_run(args.run)
        check_inputs(config)  # both splits' shards and the manifest are there
        workers = config.train.num_workers if args.workers is None else args.workers
        if workers < 1 or args.batch_size < workers or args.epochs < 1:
            raise ConfigError(f"--workers {workers}, --batch-size {args.batch_size}, --epochs {args.epochs}: "
                              "need at least one worker, a batch of at least one row per worker and one epoch")
    except (RunError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    use_gpu = (args.device or ("cuda" if config.train.use_gpu else "cpu")) == "cuda"
    protocols = ["fast", "standard"] if args.protocol == "both" else [args.protocol]
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from runtime.driver import init_ray
    from runtime.linear_probe import linear_eval_loop
    run_dir = args.run.resolve()
    init_ray(args.address)
    available = ray.cluster_resources()
    short = [f"{need * workers:g} {kind} ({available.get(kind, 0):g} in the cluster)"
             for kind, need in resources.items() if need * workers > available.get(kind, 0)]
    if short:
        print(f"error: {workers} worker(s) need {' and '.join(short)}: pass fewer --workers"
              f"{' or --device cpu' if use_gpu else ''}", file=sys.stderr)
        return 2
    print(f"linear eval ({args.protocol}): {checkpoint} (step {state['step']}), {args.epochs} epochs on "
          f"{workers} worker(s), {'a GPU' if use_gpu else 'CPUs'} each", flush=True)
    trainer = TorchTrainer(
        linear_eval_loop,
        train_loop_config={"run_dir": str(run_dir), "protocols": protocols, "epochs": args.epochs, "lr": args.lr,
                           "batch_size": args.batch_size, "head_bn": args.head_bn, "use_gpu": use_gpu,
                           "loader_device": config.data.device if use_gpu else "cpu",
                           "loader_threads": args.loader_threads},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"linear_eval_{args.protocol}", storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:  # the worker's traceback is in the log above
        print(f"error: linear evaluation failed on the workers: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    path = run_dir / RESULT_FILE
    result = json.loads(path.read_text())
    for protocol in protocols:
        top1 = result["linear_top1" if protocol == "fast" else "linear_top1_standard"]
        print(f"linear top-1 ({protocol}): {top1:.4f} (checkpoint step {state['step']}); wrote {path} and "
              f"{run_dir / HEAD_FILE.format(protocol=protocol)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
