"""SimCLR (001_*.txt): two views, NT-Xent.

    ray job submit --working-dir . -- python jobs/simclr.py --preset imagenet
    python jobs/simclr.py --preset demo --print-config
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(method="simclr", default_preset="imagenet", description=__doc__.splitlines()[0]))
