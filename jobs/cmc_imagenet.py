"""CMC (002_*.txt): L|ab split ResNets (or CMC's AlexNet), memory-bank negatives, τ 0.07, ω 0.5, 16,384 negatives.

    ray job submit --working-dir . -- python jobs/cmc_imagenet.py --preset imagenet
    python jobs/cmc_imagenet.py --preset demo --print-config
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(method="cmc", default_preset="imagenet", description=__doc__.splitlines()[0]))
