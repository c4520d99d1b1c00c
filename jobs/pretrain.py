"""Pre-train any registered method from its config file (models/registry.py; `method.name` in the file).

    python jobs/pretrain.py --config configs/moco/fashion_mnist.yaml --print-config
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/byol/imagenet.yaml
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(method="interclr", default_preset="imagenet", description=__doc__.splitlines()[0]))
