"""MoCo-v2: momentum key encoder, 65,536-key queue, τ 0.2.

    ray job submit --working-dir . -- python jobs/moco.py --preset imagenet
    python jobs/moco.py --preset demo --print-config
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(method="moco", default_preset="imagenet", description=__doc__.splitlines()[0]))
