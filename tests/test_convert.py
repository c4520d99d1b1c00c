"""pipeline.convert: every source image exactly once, labels from the layout, a real global shuffle,
DALI and webdataset read the shards, kill + --resume, rejects and one-line errors."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from pipeline.convert import convert
from pipeline.manifest import Manifest
from tests import datasets

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline.convert", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def read_split(out: Path, split: str) -> list[dict]:
    """Independent reader: walk every tar listed in {split}.json with tarfile, group members by key."""
    summary = json.loads((out / f"{split}.json").read_text())
    samples = []
    for entry in summary["shardlist"]:
        groups = defaultdict(dict)
        with tarfile.open(out / entry["url"]) as archive:
            for member in archive:
                key, ext = member.name.split(".", 1)
                groups[key][ext] = archive.extractfile(member).read()
        assert len(groups) == entry["nsamples"]
        for key, members in groups.items():
            image_ext = "jpg" if "jpg" in members else "png"
            samples.append({
                "key": key, "shard": entry["url"], "image": members[image_ext], "ext": image_ext,
                "label": int(members["cls"]), "id": int(members["id"]), "meta": json.loads(members["json"]),
            })
    return samples


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_exactly_once(samples, expected: dict):
    """ids dense 0..N-1, count = source count, bytes hash = source file, label = layout label."""
    assert sorted(s["id"] for s in samples) == list(range(len(expected)))
    by_source = {s["meta"]["source"]: s for s in samples}
    assert len(by_source) == len(samples) == len(expected)
    for source, (data, label, *_) in expected.items():
        sample = by_source[source]
        assert sha(sample["image"]) == sha(data), source
        assert sample["ext"] == "jpg"
        assert sample["label"] == label, source


def test_imagenet_folders_every_image_once_with_sorted_wnid_labels(tmp_path):
    expected = datasets.make_imagenet(tmp_path / "src", per_class=12)
    out = tmp_path / "out"
    summary = convert("imagenet", tmp_path / "src", out, "train", max_count=16, workers=2, log=lambda m: None)
    samples = read_split(out, "train")
    assert_exactly_once(samples, expected)
    assert summary["classes"] == sorted(datasets.WNIDS)
    assert all(s["meta"]["class"] == datasets.WNIDS[s["label"]] for s in samples)


def test_imagenet_list_file_labels_come_from_the_list(tmp_path):
    expected = datasets.make_imagenet(tmp_path / "src", per_class=4, split="val")
    # A val list as distributed: relpath and the class index, here reversed to prove it is used.
    relabelled = {rel: (data, len(datasets.WNIDS) - 1 - label) for rel, (data, label) in expected.items()}
    (tmp_path / "val.txt").write_text("".join(f"{rel} {label}\n" for rel, (_, label) in relabelled.items()))
    convert("imagenet", tmp_path / "src", tmp_path / "out", "val", list_file=tmp_path / "val.txt",
            workers=1, log=lambda m: None)
    assert_exactly_once(read_split(tmp_path / "out", "val"), relabelled)


def test_imagenet22k_tars_every_member_once_read_by_offset(tmp_path):
    expected = datasets.make_imagenet22k(tmp_path / "src", per_class=10)
    out = tmp_path / "out"
    convert("imagenet22k", tmp_path / "src", out, max_count=12, workers=2, log=lambda m: None)
    assert_exactly_once(read_split(out, "train"), expected)
    assert not any(p.suffix == ".JPEG" for p in out.rglob("*")), "nothing is extracted to disk"


def test_webvision_train_merges_google_and_flickr_and_keeps_origin(tmp_path):
    expected = datasets.make_webvision(tmp_path / "src", per_class=5)
    convert("webvision", tmp_path / "src", tmp_path / "out", "train", max_count=10, workers=2, log=lambda m: None)
    samples = read_split(tmp_path / "out", "train")
    assert_exactly_once(samples, expected["train"])
    for s in samples:
        assert s["meta"]["origin"] == expected["train"][s["meta"]["source"]][2]
    assert Counter(s["meta"]["origin"] for s in samples) == {"google": 20, "flickr": 20}

    convert("webvision", tmp_path / "src", tmp_path / "out", "val", workers=1, log=lambda m: None)
    assert_exactly_once(read_split(tmp_path / "out", "val"), expected["val"])


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_png_pixels_equal_the_idx_file(tmp_path):
    from io import BytesIO

    from PIL import Image

    from pipeline.sources import read_idx
    out = tmp_path / "out"
    convert("fashion-mnist", datasets.FASHION_MNIST_DIR, out, "val", max_count=2500, workers=2, log=lambda m: None)
    images = read_idx(str(datasets.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(str(datasets.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"))
    samples = read_split(out, "val")
    assert sorted(s["id"] for s in samples) == list(range(10_000))
    sources = sorted(int(s["meta"]["source"].split("#")[1]) for s in samples)
    assert sources == list(range(10_000))
    for s in samples[::97]:
        index = int(s["meta"]["source"].split("#")[1])
        assert s["ext"] == "png"
        np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(s["image"]))), images[index])
        assert s["label"] == labels[index]


def test_global_shuffle_mixes_classes_and_same_seed_gives_identical_bytes(tmp_path):
    datasets.make_imagenet(tmp_path / "src", per_class=20)
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        convert("imagenet", tmp_path / "src", tmp_path / name, "train", max_count=20, seed=seed,
                workers=2, log=lambda m: None)
    samples = read_split(tmp_path / "a", "train")
    per_shard = defaultdict(set)
    for s in samples:
        per_shard[s["shard"]].add(s["label"])
    assert len(per_shard) == 5
    assert all(len(labels) > 1 for labels in per_shard.values())
    shards = sorted(p.name for p in (tmp_path / "a").glob("train-*.tar"))
    for name in shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert any((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes() for n in shards)


def test_manifest_locates_every_id_in_its_shard(tmp_path):
    expected = datasets.make_imagenet22k(tmp_path / "src", per_class=6)
    out = tmp_path / "out"
    convert("imagenet22k", tmp_path / "src", out, max_count=7, workers=1, log=lambda m: None)
    manifest = Manifest(out, "train")
    assert len(manifest) == len(expected)
    assert manifest.classes == sorted(datasets.WNIDS)
    by_id = {s["id"]: s for s in read_split(out, "train")}
    labels = manifest.labels()
    for sample_id in range(len(manifest)):
        location = manifest.locate(sample_id)
        with open(location.shard, "rb") as f:
            f.seek(location.offset)
            header = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "strict")
        assert header.name.split(".")[0] == location.key == by_id[sample_id]["key"]
        assert manifest.label(sample_id) == by_id[sample_id]["label"] == labels[sample_id]
    with pytest.raises(IndexError, match="out of range"):
        manifest.label(len(manifest))


def test_dali_reads_shards_with_index_files_every_sample_once_per_epoch(tmp_path):
    from nvidia.dali import fn, pipeline_def
    expected = datasets.make_imagenet(tmp_path / "src", per_class=9)
    out = tmp_path / "out"
    summary = convert("imagenet", tmp_path / "src", out, "train", max_count=10, workers=2, log=lambda m: None)
    paths = [str(out / s["url"]) for s in summary["shardlist"]]
    index_paths = [str(out / s["index"]) for s in summary["shardlist"]]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def read():
        image, label, sample_id = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=["jpg;png", "cls", "id"], name="reader",
            missing_component_behavior="error")
        return fn.decoders.image(image, device="cpu"), label, sample_id

    pipe = read()
    pipe.build()
    epoch = pipe.reader_meta("reader")["epoch_size"]
    assert epoch == len(expected)
    seen = []
    while len(seen) < epoch:
        images, labels, ids = pipe.run()
        seen += [int(np.array(ids[i]).tobytes()) for i in range(len(ids))]
        assert np.array(images[0]).ndim == 3
    assert sorted(seen[:epoch]) == list(range(epoch))


def test_webdataset_library_reads_the_shards(tmp_path):
    import webdataset as wds
    expected = datasets.make_webvision(tmp_path / "src", per_class=3)
    out = tmp_path / "out"
    summary = convert("webvision", tmp_path / "src", out, "train", max_count=5, workers=1, log=lambda m: None)
    urls = [str(out / s["url"]) for s in summary["shardlist"]]
    ids = [int(sample["id"]) for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(ids) == list(range(len(expected["train"])))


def test_kill_mid_run_then_resume_completes_without_duplicates(tmp_path):
    expected = datasets.make_imagenet(tmp_path / "src", per_class=120)
    out = tmp_path / "out"
    args = ["imagenet", tmp_path / "src", out, "--split", "train", "--max-count", "6", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.convert", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / ".convert").glob("train-0000*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((out / ".convert").glob("train-0*.json")))
    assert 0 < written < 100, f"kill landed after {written} of 100 shards"
    assert not (out / "train.json").exists()

    rerun_without_resume = run_cli(*args)
    assert rerun_without_resume.returncode == 2 and "--resume" in rerun_without_resume.stderr

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resume:" in resumed.stderr
    assert_exactly_once(read_split(out, "train"), expected)
    assert not list(out.rglob("*.partial"))


def test_resume_with_different_options_is_refused(tmp_path):
    datasets.make_imagenet(tmp_path / "src", per_class=3)
    out = tmp_path / "out"
    assert run_cli("imagenet", tmp_path / "src", out, "--seed", "1").returncode == 0
    result = run_cli("imagenet", tmp_path / "src", out, "--seed", "2", "--resume")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --resume: seed differ from the run that wrote "
                                                  f"{out} (rerun with the same options, or choose another OUT)"]


def test_bad_images_are_rejected_with_reasons_and_the_run_completes(tmp_path):
    src = tmp_path / "src"
    expected = datasets.make_imagenet(src, per_class=5)
    wnid = datasets.WNIDS[0]
    (src / "train" / wnid / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    good = next(iter(expected.values()))[0]
    (src / "train" / wnid / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (src / "train" / "n09999999").mkdir()  # an empty class folder
    out = tmp_path / "out"
    result = run_cli("imagenet", src, out, "--max-count", "8")
    assert result.returncode == 0, result.stderr
    assert "warning: 3 images rejected" in result.stderr
    rejected = dict(line.split("\t") for line in (out / "train-rejected.txt").read_text().splitlines())
    assert set(rejected) == {f"train/{wnid}/corrupt.JPEG", f"train/{wnid}/truncated.JPEG", "train/n09999999/"}
    assert rejected["train/n09999999/"] == "empty class folder"
    assert "not a decodable image" in rejected[f"train/{wnid}/truncated.JPEG"]
    assert_exactly_once(read_split(out, "train"), expected)


def test_truncated_synset_tar_member_is_rejected(tmp_path):
    src = tmp_path / "src"
    expected = datasets.make_imagenet22k(src, per_class=4)
    wnid = datasets.WNIDS[-1]
    tar_path = src / f"{wnid}.tar"
    with tarfile.open(tar_path) as archive:
        last = archive.getmembers()[-1]
    with open(tar_path, "r+b") as f:  # cut the archive in the middle of its last member's data
        f.truncate(last.offset_data + last.size // 2)
    del expected[f"{wnid}.tar/{last.name}"]
    result = run_cli("imagenet22k", src, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rejected = (tmp_path / "out" / "train-rejected.txt").read_text()
    assert f"{wnid}.tar/{last.name}\ttruncated tar member" in rejected
    assert_exactly_once(read_split(tmp_path / "out", "train"), expected)


def test_missing_webvision_file_is_rejected(tmp_path):
    src = tmp_path / "src"
    expected = datasets.make_webvision(src, per_class=3)
    gone = "flickr/q0002/00000001.jpg"
    (src / gone).unlink()
    del expected["train"][gone]
    result = run_cli("webvision", src, tmp_path / "out", "--split", "train")
    assert result.returncode == 0 and "warning: 1 images rejected" in result.stderr
    assert (tmp_path / "out" / "train-rejected.txt").read_text() == f"{gone}\tfile listed but missing\n"
    assert_exactly_once(read_split(tmp_path / "out", "train"), expected["train"])


@pytest.mark.parametrize("fmt, layout, message", [
    ("imagenet", None, "does not exist"),
    ("imagenet", "empty", "expected the ImageNet layout"),
    ("imagenet22k", "empty", "no per-synset tars"),
    ("webvision", "empty", "not a WebVision 1.0 layout"),
    ("fashion-mnist", "empty", "expected the Fashion-MNIST idx files"),
])
def test_missing_source_or_unknown_layout_is_a_one_line_error(tmp_path, fmt, layout, message):
    src = tmp_path / "src"
    if layout == "empty":
        src.mkdir()
    result = run_cli(fmt, src, tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.parametrize("rule", ["linear", "exponential"])
def test_imbalanced_conversion_keeps_each_class_by_its_rule(tmp_path, rule):
    from pipeline.convert import class_fractions
    datasets.make_imagenet(tmp_path / "src", per_class=10)  # 5 classes × 10 photos
    convert("imagenet", tmp_path / "src", tmp_path / "out", "train", imbalance=rule, workers=1, log=lambda m: None)
    counts = np.bincount(Manifest(tmp_path / "out").labels(), minlength=5)
    expected = np.maximum(1, np.round(10 * class_fractions(rule, 5))).astype(int)
    assert counts.tolist() == expected.tolist()
    assert rule != "linear" or counts.tolist() == [2, 4, 6, 8, 10]


class FailingFile:
    """A shard's file whose writes fail with `code` once `after` bytes are written (a disk that fills
    up, storage remounted read-only); everything else goes to the real file."""

    def __init__(self, real, code: int, after: int):
        self.real, self.code, self.left = real, code, after

    def write(self, data):
        if len(data) > self.left:
            raise OSError(self.code, os.strerror(self.code))
        self.left -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("code,reason", [(errno.ENOSPC, "No space left on device (ENOSPC)"),
                                         (errno.EROFS, "Read-only file system (EROFS)")])
def test_a_write_failing_at_shard_k_is_one_error_lists_nothing_and_resume_completes(
        tmp_path, monkeypatch, capsys, code, reason):
    import pipeline.convert as convert_module
    from pipeline.shards import ShardWriter
    expected = datasets.make_imagenet(tmp_path / "src", per_class=9)  # 90 images: 15 shards of 6
    out = tmp_path / "out"
    args = ["imagenet", str(tmp_path / "src"), str(out), "--split", "train", "--max-count", "6", "--workers", "2"]

    class FailingAtShard4(ShardWriter):
        def __init__(self, path):
            super().__init__(path)
            if os.path.basename(path) == "train-000004.tar.partial":
                self._tar.fileobj = FailingFile(self._file, code, after=3000)  # inside the first image

    monkeypatch.setattr(convert_module, "ShardWriter", FailingAtShard4)
    assert convert_module.main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert f"cannot write {out / 'train-000004.tar.partial'}: {reason}" in errors[0]
    assert "rerun with --resume" in errors[0]
    # nothing half-written is listed: no shard list, no manifest, no record or file of shard 4
    assert not (out / "train.json").exists() and not (out / "manifest.lmdb").exists()
    assert not (out / ".convert" / "train-000004.json").exists() and not (out / "train-000004.tar").exists()
    assert not list(out.rglob("*.partial"))

    monkeypatch.setattr(convert_module, "ShardWriter", ShardWriter)  # the disk has space again
    assert convert_module.main([*args, "--resume"]) == 0
    assert "resume:" in capsys.readouterr().err
    assert_exactly_once(read_split(out, "train"), expected)
    clean = tmp_path / "clean"
    assert convert_module.main([*args[:2], str(clean), *args[3:]]) == 0
    for tar in sorted(clean.glob("train-*.tar")):  # the same bytes as a run that never failed
        assert (out / tar.name).read_bytes() == tar.read_bytes(), tar.name
