"""ImCLR (000_*.txt): supervised training on N images side by side per input (--imclr N, default 2; 0: plain).

Each input's target is the mean of its N one-hot labels; --imclr 0 is the plain supervised baseline.

Both train `models/supervised.py` with `soft_target_cross_entropy` on the same one-view augmentation
(`supervised`: RandomResizedCrop + flip; ImCLR concatenates N such views) through the shared driver,
and report the classifier's top-1 on the whole val split (centre views, one image each):
summary.json `val_top1` and the line `val top-1: X`.

    python jobs/imclr.py --preset demo --shards data/fashion-mnist-demo --imclr 2
    python jobs/imclr.py --preset demo --shards data/fashion-mnist-demo --imclr 0    # the baseline
    ray job submit --working-dir . -- python jobs/imclr.py --preset imagenet --imclr 2
    python jobs/imclr.py --preset demo --imclr 3 --print-config
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402


def driver_argv(argv: list[str]) -> list[str]:
    """The driver's command line: --imclr N becomes method.imclr=N and the run is named after it
    (supervised-<preset> or imclr<N>-<preset>, so it never resumes another job's `demo` run); the
    user's own flags and --set come last and win. The optimiser is the supervised method's default
    (runtime.optim), the same for both: the paper changes no hyper-parameter."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--imclr", default="2")
    parser.add_argument("--preset", default="imagenet")
    args, rest = parser.parse_known_args(argv)
    name = f"supervised-{args.preset}" if args.imclr == "0" else f"imclr{args.imclr}-{args.preset}"
    return ["--preset", args.preset, "--name", name, "--set", f"method.imclr={args.imclr}", *rest]


if __name__ == "__main__":
    sys.exit(main(driver_argv(sys.argv[1:]), method="supervised", default_preset="imagenet",
                  description=__doc__.splitlines()[0]))
