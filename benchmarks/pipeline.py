"""Augmentation throughput: viewbank's DALI CPU graph (`two_crop`) against a torchvision + PIL
DataLoader doing the same MoCo-v2 augmentation, same number of workers/threads, same cores, same
images. Prints JSON.

    python benchmarks/pipeline.py [--images 512] [--workers 2]
    python benchmarks/pipeline.py --actors     # + batches/s to one trainer from 1 and 2 loader actors

Images: real photos (skimage.data) cut and resized to 500×375 JPEGs, in the ImageNet folder layout
for torchvision and converted to shards for DALI.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.convert import convert  # noqa: E402
from pipeline.loader import build_loader  # noqa: E402
from tests import datasets  # noqa: E402


def make_photos(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    photos = datasets.photos()
    for n in range(count):
        photo = photos[n % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        image = Image.fromarray(photo[y:y + ch, x:x + cw]).convert("RGB").resize((500, 375))
        folder = root / "train" / datasets.WNIDS[n % len(datasets.WNIDS)]
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (folder / f"{n}.JPEG").write_bytes(buffer.getvalue())


def torchvision_loader(root: Path, batch_size: int, workers: int):
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T
    moco_v2 = T.Compose([
        T.RandomResizedCrop(224, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])

    class TwoCrop:
        def __call__(self, image):
            return [moco_v2(image), moco_v2(image)]

    dataset = tv_datasets.ImageFolder(str(root / "train"), transform=TwoCrop())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def images_per_second(loader, epochs: int) -> float:
    for _ in loader:  # warm-up epoch (worker start, pipeline build, caches)
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            views = batch["views"] if isinstance(batch, dict) else batch[0]
            count += len(views[0])
    return count / (time.perf_counter() - start)


def actor_throughput(shards: Path, batch_size: int, epochs: int) -> dict:
    """Batches/s delivered to this (trainer) process: in-process DALI vs 1 and 2 loader actors,
    each actor one DALI thread on one core; object-store bytes per batch; trainer wait fraction."""
    import ray

    from pipeline.actors import ActorLoader, create_loader_actors
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = {}
    in_process = build_loader(shards, "two_crop", batch_size, num_threads=1)
    start, batches = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in in_process:
            batches += 1
    out["in_process_1_thread_batches_per_s"] = round(batches / (time.perf_counter() - start), 2)
    out["bytes_per_batch"] = sum(v.numel() * 4 for v in batch["views"]) + 16 * len(batch["index"])
    for count in (1, 2):
        actors = create_loader_actors(shards, "two_crop", batch_size, num_loaders=count, num_threads=1)
        loader = ActorLoader(actors, prefetch=2)
        list(loader.epoch(0))  # warm-up: pipelines built, workers started
        loader.wait_seconds = 0.0
        start, batches = time.perf_counter(), 0
        for epoch in range(1, epochs + 1):
            for _ in loader.epoch(epoch):
                batches += 1
        seconds = time.perf_counter() - start
        out[f"{count}_actors_batches_per_s"] = round(batches / seconds, 2)
        out[f"{count}_actors_trainer_wait_fraction"] = round(loader.wait_seconds / seconds, 3)
        for actor in actors:
            ray.kill(actor)
    ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--actors", action="store_true", help="also measure loader actors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "src", args.images)
        convert("imagenet", tmp / "src", tmp / "shards", "train", max_count=256, workers=1, log=lambda m: None)
        dali = build_loader(tmp / "shards", "two_crop", args.batch, num_threads=args.workers)
        ours = images_per_second(dali, args.epochs)
        reference = images_per_second(torchvision_loader(tmp / "src", args.batch, args.workers), args.epochs)
        actors = actor_throughput(tmp / "shards", args.batch, args.epochs) if args.actors else {}
    print(json.dumps({
        "benchmark": "pipeline_two_crop_500x375_jpeg", "images": args.images, "cores": os.cpu_count(),
        "workers_or_threads": args.workers, "views": 2, "view_size": 224,
        "dali_cpu_img_per_s": round(ours, 1), "torchvision_pil_img_per_s": round(reference, 1),
        "ratio_dali_over_torchvision": round(ours / reference, 2),
        "dali_img_per_s_per_core": round(ours / (os.cpu_count() or 1), 1),
        **({"loader_actors": actors} if actors else {}),
    }, indent=1))


if __name__ == "__main__":
    main()
