"""InterCLR pretraining (003_*.txt): NPIDv2-, MoCov2- or BYOL-InterCLR (`--base`), paper defaults.

    ray job submit --working-dir . -- python jobs/interclr_imagenet.py --preset imagenet --base moco
    python jobs/interclr_imagenet.py --preset demo            # Fashion-MNIST on a local Ray
    python jobs/interclr_imagenet.py --preset imagenet22k --set bank.clusters=100000 --print-config
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(method="interclr", default_preset="imagenet", description=__doc__.splitlines()[0]))
