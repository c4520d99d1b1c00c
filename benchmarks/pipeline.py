"""Augmentation throughput: viewbank's DALI CPU graph against a torchvision + PIL DataLoader doing
the same augmentation (built from the same Recipe), same number of workers/threads, same cores,
same images. Prints JSON.

The reference is what MoCo-v2's code (facebookresearch/moco `moco/loader.py`, copied by SimSiam
and many others) runs: torchvision transforms on PIL images with the blur as PIL's
`ImageFilter.GaussianBlur(radius=σ)`. torchvision's own `GaussianBlur(23, σ)` (SimCLR's kernel, 10 %
of 224) is timed as a second reference: it is 5× slower than PIL's per blurred view (10.6 vs 2.0 ms
here), so it flatters any ratio taken against it. `pil_decode_img_per_s_per_core` is the plain
decode rate (PIL, one core) the issue's "≈ 25 % of decode" reading refers to.

    python benchmarks/pipeline.py [--images 512] [--workers 2] [--recipe two_crop|multi_crop]
    python benchmarks/pipeline.py --fashion-mnist   # 28×28 PNG shards, two_crop(28) (no blur)
    python benchmarks/pipeline.py --actors     # + batches/s to one trainer from 1 and 2 loader actors

Images: real photos (skimage.data) cut and resized to 500×375 JPEGs, in the ImageNet folder layout
for torchvision and converted to shards for DALI.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
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


class PILGaussianBlur:
    """MoCo-v2's blur (`moco/loader.py`): σ ~ U(sigma), PIL's ImageFilter.GaussianBlur(radius=σ)."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        from PIL import ImageFilter
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def torchvision_transform(spec, blur: str = "pil"):
    """The torchvision + PIL equivalent of one DALI ViewSpec; `blur`: "pil" (MoCo-v2's code) or
    "torchvision" (T.GaussianBlur(23, σ))."""
    from torchvision import transforms as T
    b, c, sat, h = spec.jitter
    steps = [T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio),
             T.RandomApply([T.ColorJitter(b, c, sat, h)], p=spec.p_jitter), T.RandomGrayscale(p=spec.p_gray)]
    if spec.p_blur > 0:
        kernel = PILGaussianBlur(spec.sigma) if blur == "pil" else T.GaussianBlur(23, sigma=spec.sigma)
        steps.append(T.RandomApply([kernel], p=spec.p_blur))
    if spec.flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def torchvision_loader(root: Path, recipe, batch_size: int, workers: int, blur: str = "pil"):
    from torchvision import datasets as tv_datasets
    transforms = [torchvision_transform(spec, blur) for spec in recipe.views]

    class Views:
        def __call__(self, image):
            image = image.convert("RGB")
            return [t(image) for t in transforms]

    dataset = tv_datasets.ImageFolder(str(root / "train"), transform=Views())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def write_fashion_mnist(root: Path, count: int) -> None:
    """The first `count` Fashion-MNIST training images as PNG class folders (for torchvision)."""
    from pipeline.sources import read_idx
    images = read_idx(str(datasets.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz"))[:count]
    labels = read_idx(str(datasets.FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz"))[:count]
    for n, (image, label) in enumerate(zip(images, labels)):
        folder = root / "train" / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{n}.png")


def images_per_second(loader, epochs: int, skip: int = 2) -> float:
    """Images per second over `epochs` epochs, timed from the `skip`-th batch on: DALI keeps computing
    its next `prefetch_queue_depth` (2) batches while idle, so the first ones of a round come free."""
    count, start, seen = 0, None, 0
    for _ in range(epochs):
        for batch in loader:
            seen += 1
            if seen == skip:
                start = time.perf_counter()
            elif seen > skip:
                count += len((batch["views"] if isinstance(batch, dict) else batch[0])[0])
    return count / (time.perf_counter() - start)


def pil_decode_rate(root: Path) -> float:
    """Plain decode, one core: PIL opens and decodes every image of the set once (bytes in memory)."""
    blobs = [path.read_bytes() for path in sorted((root / "train").glob("*/*"))]
    start = time.perf_counter()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB").load()
    return len(blobs) / (time.perf_counter() - start)


def compare(ours, references: dict, epochs: int, rounds: int) -> dict:
    """All loaders warmed up (worker start, pipeline build, caches), then timed in alternating
    rounds, so a slow spell of a shared machine hits all; a ratio is the median of the rounds'."""
    loaders = {"dali_cpu": ours, **references}
    for loader in loaders.values():
        images_per_second(loader, 1)
    rates = [{name: images_per_second(loader, epochs) for name, loader in loaders.items()} for _ in range(rounds)]
    out = {f"{name}_img_per_s": round(float(np.median([r[name] for r in rates])), 1) for name in loaders}
    for name in references:
        ratios = [r["dali_cpu"] / r[name] for r in rates]
        out[f"ratio_dali_over_{name}"] = round(float(np.median(ratios)), 2)
        out[f"ratio_over_{name}_per_round"] = [round(x, 2) for x in ratios]
    return out


def actor_throughput(shards: Path, batch_size: int, epochs: int) -> dict:
    """Batches/s delivered to this (trainer) process: in-process DALI vs 1 and 2 loader actors,
    each actor one DALI thread on one core; object-store bytes per batch; trainer wait fraction."""
    import ray

    from pipeline.actors import ActorLoader, create_loader_actors
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = {}
    in_process = build_loader(shards, "two_crop", batch_size, num_threads=1)
    for _ in in_process:  # warm-up epoch, as the actors get one
        pass
    start, batches = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in in_process:
            batches += 1
    out["in_process_1_thread_batches_per_s"] = round(batches / (time.perf_counter() - start), 2)
    out["float32_bytes_per_batch"] = sum(v.numel() * 4 for v in batch["views"]) + 16 * len(batch["index"])
    for count in (1, 2):
        actors = create_loader_actors(shards, "two_crop", batch_size, num_loaders=count, num_threads=1)
        loader = ActorLoader(actors, prefetch=2)
        list(loader.epoch(0))  # warm-up: pipelines built, workers started
        if count == 1:  # what an actor puts into the object store per batch (uint8 RGB views)
            ray.get(actors[0].start_epoch.remote(0))
            shipped = ray.get(actors[0].next_batch.remote())
            out["object_store_bytes_per_batch"] = (sum(v.nbytes for v in shipped["views"])
                                                   + shipped["index"].nbytes + shipped["label"].nbytes)
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
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds of both loaders")
    parser.add_argument("--actors", action="store_true", help="also measure loader actors")
    parser.add_argument("--recipe", default="two_crop", choices=["two_crop", "multi_crop"])
    parser.add_argument("--fashion-mnist", action="store_true", help="28×28 Fashion-MNIST instead of photos")
    args = parser.parse_args()
    from pipeline.views import recipe_by_name
    torch.set_num_threads(1)
    size = 28 if args.fashion_mnist else 224
    recipe = recipe_by_name(args.recipe, size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.fashion_mnist:
            write_fashion_mnist(tmp / "src", args.images)
            convert("fashion-mnist", datasets.FASHION_MNIST_DIR, tmp / "shards", "train", limit=args.images,
                    max_count=4096, workers=1, log=lambda m: None)
        else:
            make_photos(tmp / "src", args.images)
            convert("imagenet", tmp / "src", tmp / "shards", "train", max_count=256, workers=1, log=lambda m: None)
        decode_rate = pil_decode_rate(tmp / "src")
        dali = build_loader(tmp / "shards", recipe, args.batch, num_threads=args.workers)
        references = {"moco_v2_reference": torchvision_loader(tmp / "src", recipe, args.batch, args.workers, "pil")}
        if any(spec.p_blur > 0 for spec in recipe.views):
            references["torchvision_blur23"] = torchvision_loader(tmp / "src", recipe, args.batch, args.workers,
                                                                  "torchvision")
        result = compare(dali, references, args.epochs, args.rounds)
        del references  # their workers stop before the actors start
        actors = actor_throughput(tmp / "shards", args.batch, args.epochs) if args.actors else {}
    print(json.dumps({
        "benchmark": f"pipeline_{args.recipe}_" + ("fashion_mnist_28px_png" if args.fashion_mnist else "500x375_jpeg"),
        "images": args.images, "cores": os.cpu_count(), "workers_or_threads": args.workers,
        "views": recipe.num_views, "view_sizes": [spec.size for spec in recipe.views],
        **result, "dali_img_per_s_per_core": round(result["dali_cpu_img_per_s"] / (os.cpu_count() or 1), 1),
        "pil_decode_img_per_s_per_core": round(decode_rate, 1),
        "dali_fraction_of_decode": round(result["dali_cpu_img_per_s"] / (os.cpu_count() or 1) / decode_rate, 3),
        **({"loader_actors": actors} if actors else {}),
    }, indent=1))


if __name__ == "__main__":
    main()
