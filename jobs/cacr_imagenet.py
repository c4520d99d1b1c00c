"""CACR (004_*.txt): contrastive attraction and repulsion; --set method.positives=4 for K=4, method.queue_size=0 for the mini-batch form.

    ray job submit --working-dir . -- python jobs/cacr_imagenet.py --preset imagenet
    python jobs/cacr_imagenet.py --preset demo --print-config
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(method="cacr", default_preset="imagenet", description=__doc__.splitlines()[0]))
