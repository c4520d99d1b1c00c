"""Conversion throughput: `pipeline.convert imagenet22k` against a plain `webdataset.ShardWriter` loop
over the same per-synset tars, on the same cores. Prints JSON.

    python benchmarks/convert.py [--per-class 1000] [--workers N]

The plain loop is what users write by hand: iterate each tar with `tarfile`, write image + label.
It does no shuffle, no decode check, no ids, no index files and no manifest; ours does all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.convert import convert  # noqa: E402
from tests import datasets  # noqa: E402


def plain_webdataset(src: Path, out: Path, max_count: int) -> int:
    import webdataset as wds
    out.mkdir(parents=True)
    count = 0
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=max_count, verbose=0) as sink:
        for label, tar_path in enumerate(sorted(src.glob("n*.tar"))):
            with tarfile.open(tar_path) as archive:
                for member in archive:
                    data = archive.extractfile(member).read()
                    sink.write({"__key__": f"{count:010d}", "jpg": data, "cls": label})
                    count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-class", type=int, default=1000, help="images per synset (5 synsets)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets.make_imagenet22k(tmp / "src", per_class=args.per_class)
        images = args.per_class * len(datasets.WNIDS)
        source_bytes = sum(p.stat().st_size for p in (tmp / "src").glob("*.tar"))
        max_count = 1000

        start = time.perf_counter()
        plain_webdataset(tmp / "src", tmp / "plain", max_count)
        plain_s = time.perf_counter() - start

        start = time.perf_counter()
        convert("imagenet22k", tmp / "src", tmp / "ours", max_count=max_count, workers=args.workers,
                log=lambda m: None)
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        convert("imagenet22k", tmp / "src", tmp / "ours1", max_count=max_count, workers=1, log=lambda m: None)
        ours_1_s = time.perf_counter() - start

    print(json.dumps({
        "benchmark": "convert_imagenet22k",
        "images": images,
        "source_mb": round(source_bytes / 1e6, 1),
        "cores": os.cpu_count(),
        "plain_webdataset_img_per_s": round(images / plain_s, 1),
        "viewbank_img_per_s": round(images / ours_s, 1),
        "viewbank_workers": args.workers,
        "viewbank_1_worker_img_per_s": round(images / ours_1_s, 1),
        "ratio_viewbank_over_plain": round(plain_s / ours_s, 3),
        "note": "viewbank also shuffles globally, decode-checks every image, writes DALI index files, "
                "dense ids and the LMDB manifest; the plain loop does none of these",
    }, indent=1))


if __name__ == "__main__":
    main()
