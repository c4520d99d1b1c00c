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
    python jobs/imclr.py --config configs/supervised/fashion_mnist.yaml --imclr 2 --name imclr2-fmnist
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402


def driver_argv(argv: list[str]) -> list[str]:
    """The driver's command line: --imclr N becomes method.imclr=N and the run is named after it
    (supervised-<preset> or imclr<N>-<preset>, so it never resumes another job's `demo` run); the
    user's own flags and --set come last and win. With --config the file names the run and says N,
    unless --imclr is given. The optimiser is the supervised method's default (runtime.optim), the
    same for both: the paper changes no hyper-parameter."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--imclr")
    parser.add_argument("--preset")
    parser.add_argument("--config")
    args, rest = parser.parse_known_args(argv)
    if args.config is not None:
        preset = [] if args.preset is None else ["--preset", args.preset]  # the driver refuses both
        imclr = [] if args.imclr is None else ["--set", f"method.imclr={args.imclr}"]
        return ["--config", args.config, *preset, *imclr, *rest]
    imclr = "2" if args.imclr is None else args.imclr
    preset = "imagenet" if args.preset is None else args.preset
    name = f"supervised-{preset}" if imclr == "0" else f"imclr{imclr}-{preset}"
    return ["--preset", preset, "--name", name, "--set", f"method.imclr={imclr}", *rest]


if __name__ == "__main__":
    sys.exit(main(driver_argv(sys.argv[1:]), method="supervised", default_preset="imagenet",
                  description=__doc__.splitlines()[0]))
