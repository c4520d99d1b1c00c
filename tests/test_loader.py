"""pipeline.build_loader: DALI CPU graphs over converted shards — shapes, ids and labels from the
shards, rank sharding, a fresh order and partition every epoch, resume at an offset, determinism,
errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.convert import convert
from pipeline.loader import LoaderError, build_loader, epoch_order, host_to_device
from pipeline.manifest import Manifest
from pipeline.views import ViewSpec, Recipe
from tests import datasets

SMALL = 64  # view size for speed; the recipes default to 224


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    datasets.make_imagenet(root / "src", per_class=10)  # 50 real photos, 5 classes
    convert("imagenet", root / "src", root / "out", "train", max_count=12, workers=1, log=lambda m: None)
    return root / "out"


def small(recipe_views: int = 2, space=None) -> Recipe:
    return Recipe("small", tuple(ViewSpec(SMALL) for _ in range(recipe_views)), colorspace=space)


def epoch(loader):
    return list(loader)


def test_views_have_declared_shapes_and_differ(shards):
    batches = epoch(build_loader(shards, small(3), batch_size=16))
    for batch in batches:
        assert len(batch["views"]) == 3
        for view in batch["views"]:
            assert view.shape == (len(batch["index"]), 3, SMALL, SMALL) and view.dtype == torch.float32
        assert not torch.allclose(batch["views"][0], batch["views"][1])


def test_default_recipes_are_224(shards):
    batch = next(iter(build_loader(shards, "two_crop", batch_size=4)))
    assert [tuple(v.shape) for v in batch["views"]] == [(4, 3, 224, 224)] * 2


def test_index_and_label_come_from_the_shards(shards):
    manifest = Manifest(shards)
    seen = []
    for batch in build_loader(shards, small(), batch_size=16):
        for sample_id, label in zip(batch["index"].tolist(), batch["label"].tolist()):
            assert manifest.label(sample_id) == label
            seen.append(sample_id)
    assert sorted(seen) == list(range(50))  # one epoch, every sample once


def test_two_ranks_see_disjoint_ids_whose_union_is_the_epoch(shards):
    ids = [torch.cat([b["index"] for b in build_loader(shards, small(), 8, rank=r, world_size=2)]).tolist()
           for r in range(2)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(50))
    assert len(ids[0]) == 25 and len(build_loader(shards, small(), 8, rank=0, world_size=2)) == 4


def test_epoch_length_and_drop_last(shards):
    keep = build_loader(shards, small(), batch_size=16)
    drop = build_loader(shards, small(), batch_size=16, drop_last=True)
    assert len(keep) == 4 and len(drop) == 3
    assert [len(b["index"]) for b in keep] == [16, 16, 16, 2]
    for _ in range(2):  # the next epoch starts on a boundary, every sample once again
        ids = torch.cat([b["index"] for b in drop]).tolist()
        assert len(ids) == 48 and len(set(ids)) == 48


def test_pad_last_fills_the_final_batch_with_its_last_row(shards):
    pad = build_loader(shards, small(), batch_size=16, pad_last=True)
    assert len(pad) == 4 and pad.padded == 14
    for _ in range(2):  # every epoch: four full batches, every sample once plus 14 repeats of the last row
        batches = list(pad)
        assert [len(b["index"]) for b in batches] == [16] * 4
        last = batches[-1]
        assert torch.equal(last["index"][2:], last["index"][1].repeat(14))
        assert torch.equal(last["views"][0][2:], last["views"][0][1:2].expand(14, -1, -1, -1))
        ids = torch.cat([b["index"] for b in batches])[:50].tolist()
        assert sorted(ids) == list(range(50))
    with pytest.raises(LoaderError, match="exclusive"):
        build_loader(shards, small(), batch_size=16, pad_last=True, drop_last=True)


def test_epoch_order_is_a_fresh_partition_every_epoch_with_every_sample_once():
    """The plan alone (numpy), where chance would show: 23 tars, ~5,000 samples, 6 streams."""
    counts = np.random.default_rng(1).integers(100, 330, 23)
    total, streams = int(counts.sum()), 6
    plans = {e: [epoch_order(counts, s, streams, seed=7, epoch=e, run_length=16) for s in range(streams)]
             for e in (0, 1)}
    for plan in plans.values():
        assert np.array_equal(np.sort(np.concatenate(plan)), np.arange(total))  # every sample once
        assert [len(p) for p in plan] == [total * (s + 1) // streams - total * s // streams for s in range(streams)]
    shard = lambda positions: np.searchsorted(np.cumsum(counts), positions, side="right")
    for s in range(streams):
        assert np.array_equal(epoch_order(counts, s, streams, seed=7, epoch=1, run_length=16), plans[1][s])
        kept = len(np.intersect1d(plans[0][s], plans[1][s])) / len(plans[0][s])
        assert kept < 0.3  # a fresh partition: 1/6 of a share stays by chance (a fixed split keeps all)
        for start in range(0, len(plans[0][s]) - 127, 128):  # a batch of 8 runs of 16 mixes tars
            assert len(np.unique(shard(plans[0][s][start:start + 128]))) >= 4
    fixed = [epoch_order(counts, 1, streams, 7, e, shuffle=False) for e in (0, 1)]
    assert all(np.array_equal(f, np.arange(total // streams, 2 * total // streams)) for f in fixed)


def test_every_epoch_repartitions_the_samples_across_two_ranks_each_id_once(shards):
    for option, per_rank in (("drop_last", 24), ("pad_last", 25)):
        loaders = [build_loader(shards, small(), 8, rank=r, world_size=2, **{option: True}) for r in (0, 1)]
        ids, batches = [], []
        for _ in range(2):  # iter(): the next epoch
            epoch = [[b["index"].tolist() for b in loader] for loader in loaders]
            served = [[i for b in rank for i in b][:per_rank] for rank in epoch]  # pad_last's repeats cut
            assert len(set(served[0] + served[1])) == 2 * per_rank  # each id at most once across the ranks
            if option == "pad_last":
                assert sorted(served[0] + served[1]) == list(range(50))
            ids.append(served)
            batches.append({frozenset(b) for b in epoch[0]})
        assert set(ids[0][0]) != set(ids[1][0])  # rank 0 holds other samples in the second epoch
        assert not batches[0] & batches[1]  # and no batch of the first epoch again


def test_a_resumed_epoch_serves_the_uninterrupted_epochs_remaining_batches(shards):
    make = lambda: build_loader(shards, small(), 8, rank=1, world_size=2, seed=5, pad_last=True)
    full = [(b["index"].tolist(), b["label"].tolist()) for b in make().epoch(2)]
    for skip in (1, 3, len(full)):
        resumed = make()  # a new worker's loader, as after a restart
        assert [(b["index"].tolist(), b["label"].tolist()) for b in resumed.epoch(2, skip=skip)] == full[skip:]
    with pytest.raises(LoaderError, match="cannot skip 5 batches of an epoch of 4"):
        make().epoch(2, skip=5)


def test_a_resumed_epoch_reads_nothing_before_its_offset(shards, tmp_path):
    """A corrupt sample in the batches a resumed epoch skips is never decoded: the reader starts past it."""
    root, bad_id = corrupt_one_sample(shards, tmp_path)
    clean = build_loader(shards, small(), 8, seed=1)
    for epoch in range(4):  # an epoch where the corrupt sample is not in the last batch
        full = [b["index"].tolist() for b in clean.epoch(epoch)]
        hit = next(k for k, batch in enumerate(full) if bad_id in batch)
        if hit < len(full) - 1:
            break
    resumed = build_loader(root, small(), 8, seed=1)
    assert [b["index"].tolist() for b in resumed.epoch(epoch, skip=hit + 1)] == full[hit + 1:]
    assert resumed.skipped == {} and resumed.duplicates == 0


def test_host_to_device_on_the_cpu_is_one_copy_torch_owns():
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    array.setflags(write=False)  # as `ray.get` returns numpy
    out = host_to_device(array, torch.device("cpu"))
    assert out.dtype == torch.uint8 and out.tolist() == array.tolist()
    out[0] = 7
    assert array[0, 0, 0] == 0  # its own memory


def test_same_seed_gives_identical_batches_and_another_seed_does_not(shards):
    a, b, c = (epoch(build_loader(shards, small(), 16, seed=s)) for s in (3, 3, 4))
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"])
        assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))
    assert not all(torch.equal(x["views"][0], z["views"][0]) for x, z in zip(a, c))


def test_lab_views_are_cmc_normalised(shards):
    batch = next(iter(build_loader(shards, small(1, "lab"), batch_size=16)))
    lightness = batch["views"][0][:, 0]
    assert lightness.min() >= -1.0 - 1e-4 and lightness.max() <= 1.0 + 1e-4  # (L - 50) / 50, L in [0, 100]


def test_missing_shard_or_index_is_a_one_line_error(shards, tmp_path):
    with pytest.raises(LoaderError, match="convert the dataset first"):
        build_loader(tmp_path, "two_crop", 4)
    copy = tmp_path / "copy"
    copy.mkdir()
    summary = json.loads((shards / "train.json").read_text())
    (copy / "train.json").write_text(json.dumps(summary))
    with pytest.raises(LoaderError, match="listed in .* but missing"):
        build_loader(copy, "two_crop", 4)


def test_bad_arguments(shards):
    with pytest.raises(ValueError, match="unknown recipe"):
        build_loader(shards, "three_crop", 4)
    with pytest.raises(LoaderError, match="rank 2 outside a world of 2"):
        build_loader(shards, "two_crop", 4, rank=2, world_size=2)


def test_different_ranks_and_epochs_get_different_augmentation_streams(shards):
    """Ranks read different samples, so compare what decides the stream: the seed of the pipeline an
    epoch builds, from (seed, epoch, rank) (that a different seed gives other augmentations is the
    test above)."""
    loaders = [build_loader(shards, small(), 4, rank=r, world_size=2, seed=3) for r in (0, 1)]
    seeds = {(r, e): (loaders[r].epoch(e), loaders[r].pipe.seed)[1] for r in (0, 1) for e in (0, 1)}
    assert len(set(seeds.values())) == 4
    again = build_loader(shards, small(), 4, rank=0, world_size=2, seed=3)
    again.epoch(1)
    assert again.pipe.seed == seeds[(0, 1)]


def test_multi_crop_views_are_grouped_by_resolution_large_first(shards):
    from pipeline.views import multi_crop
    recipe = multi_crop(global_n=2, global_size=64, local_n=3, local_size=32)
    views = next(iter(build_loader(shards, recipe, 4)))["views"]
    assert [tuple(v.shape) for v in views] == [(4, 3, 64, 64)] * 2 + [(4, 3, 32, 32)] * 3
    assert not torch.equal(views[2], views[3])


def test_local_crops_of_a_job_config_reach_the_batch_at_their_sizes(shards):
    """data.local_crops through the job's recipe (runtime.build.training_recipe) and DALI: 2 global
    views at data.image_size, then the local ones at data.local_size, each drawn separately."""
    from runtime.build import build_method, training_recipe
    from runtime.config import parse_args
    config, _ = parse_args(["--preset", "demo", "--set", "data.image_size=32", "--set", "data.local_crops=3",
                            "--set", "data.local_size=12"], method="byol")
    views = next(iter(build_loader(shards, training_recipe(build_method(config), config), 4)))["views"]
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 12, 12)] * 3
    assert not torch.equal(views[2], views[3]) and not torch.equal(views[3], views[4])


def test_imclr_rows_are_two_named_samples_side_by_side_with_mean_labels(shards):
    from pipeline.views import imclr
    deterministic = Recipe("center", (ViewSpec(SMALL, random=False),))
    reference = {}
    for batch in build_loader(shards, deterministic, 8, shuffle=False):
        for i, sample_id in enumerate(batch["index"].tolist()):
            reference[sample_id] = batch["views"][0][i]
    labels = Manifest(shards).labels()
    batch = next(iter(build_loader(shards, imclr(2, deterministic), 8, seed=1)))
    (view,) = batch["views"]
    assert view.shape == (8, 3, SMALL, 2 * SMALL)
    assert batch["index"].shape == (8, 2) and batch["label"].shape == (8, len(Manifest(shards).classes))
    torch.testing.assert_close(batch["label"].sum(dim=1), torch.ones(8))
    for row, (first, second) in enumerate(batch["index"].tolist()):
        assert first != second
        torch.testing.assert_close(view[row, :, :, :SMALL], reference[first])
        torch.testing.assert_close(view[row, :, :, SMALL:], reference[second])
        expected = torch.zeros(batch["label"].shape[1])
        expected[labels[first]] += 0.5
        expected[labels[second]] += 0.5
        torch.testing.assert_close(batch["label"][row], expected)


def corrupt_one_sample(shards, tmp_path) -> tuple[object, int]:
    """A copy of the shards with one JPEG's entropy-coded data overwritten in place (offsets and
    index files stay valid, as when a disk or a hand-written shard goes bad); returns (root, id)."""
    import shutil
    import tarfile
    copy = tmp_path / "corrupt"
    shutil.copytree(shards, copy)
    shard = sorted(copy.glob("train-*.tar"))[1]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
        image = [m for m in members if m.name.endswith(".jpg")][3]
        key = image.name.rsplit(".", 1)[0]
        bad_id = int(tar.extractfile(next(m for m in members if m.name == f"{key}.id")).read())
    with open(shard, "r+b") as f:
        f.seek(image.offset_data + image.size // 3)
        f.write(b"\x00garbage" * (image.size // 24))
    return copy, bad_id


def test_undecodable_sample_is_skipped_and_counted_and_the_epoch_keeps_its_length(shards, tmp_path):
    root, bad_id = corrupt_one_sample(shards, tmp_path)
    loader = build_loader(root, small(), batch_size=8)
    for n in (1, 2):  # the failing epoch and the next (which reads the private index files)
        batches = epoch(loader)
        ids = torch.cat([b["index"] for b in batches]).tolist()
        assert [len(b["index"]) for b in batches] == [8] * 6 + [2]  # the length the trainer planned
        assert set(ids) == set(range(50)) - {bad_id}  # every other sample, none lost
        assert len(ids) - len(set(ids)) == 1 and loader.duplicates == n  # the gap is filled once
        assert list(loader.skipped) == [bad_id] and "decoder rejects it: nvImageCodec" in loader.skipped[bad_id]
        labels = Manifest(root).labels()
        assert all(labels[i] == y for b in batches for i, y in zip(b["index"].tolist(), b["label"].tolist()))
    # two ranks: the rank holding the bad sample skips it; disjoint, union = every decodable sample
    ranks = [torch.cat([b["index"] for b in build_loader(root, small(), 8, rank=r, world_size=2)]).tolist()
             for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert set(ranks[0]) | set(ranks[1]) == set(range(50)) - {bad_id}
    assert len(ranks[0]) == len(ranks[1]) == 25
    # a later loader of the same range starts without it (no second scan); drop_last keeps boundaries
    drop = build_loader(root, small(), 8, drop_last=True)
    assert list(drop.skipped) == [bad_id]
    for _ in range(2):
        ids = torch.cat([b["index"] for b in drop]).tolist()
        assert len(ids) == len(set(ids)) == 48 and bad_id not in ids


def test_keep_on_gpu_needs_the_gpu_pipeline(shards):
    with pytest.raises(LoaderError, match="keep_on_gpu needs device='gpu'"):
        build_loader(shards, small(), 4, keep_on_gpu=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (DALI's GPU graph)")
CENTER = Recipe("center", (ViewSpec(SMALL, random=False),) * 2)  # deterministic: CPU and GPU graphs comparable
GREY_LEVEL = {torch.uint8: 1.0, torch.float32: 1 / (255 * 0.229)}  # one 8-bit step in each dtype's units


@needs_cuda
def test_gpu_views_stay_on_the_gpu_with_the_cpu_graphs_shapes_and_dtypes(shards):
    from runtime.train import to_device
    for raw in (False, True):  # float views, and the uint8 views `pipeline.views.normalize` finishes
        cpu = next(iter(build_loader(shards, CENTER, 16, shuffle=False, raw=raw)))
        gpu = next(iter(build_loader(shards, CENTER, 16, device="gpu", shuffle=False, raw=raw, keep_on_gpu=True)))
        assert torch.equal(gpu["index"], cpu["index"]) and gpu["index"].device.type == "cpu"
        for on_cpu, on_gpu in zip(cpu["views"], gpu["views"]):
            assert on_gpu.device == torch.device("cuda", 0)
            assert on_gpu.shape == on_cpu.shape and on_gpu.dtype == on_cpu.dtype
            # nvJPEG and the CPU decoder differ by a grey level or so; unsynchronised or stale memory by far more
            difference = (on_gpu.cpu().float() - on_cpu.float()).abs().mean() / GREY_LEVEL[on_cpu.dtype]
            assert difference < 4
        moved = to_device(gpu, torch.device("cuda", 0))  # the train loop adds no copy
        assert [v.data_ptr() for v in moved["views"]] == [v.data_ptr() for v in gpu["views"]]


@needs_cuda
def test_gpu_loader_serves_every_id_once_per_epoch(shards):
    loader = build_loader(shards, small(), 16, device="gpu", keep_on_gpu=True)
    for _ in range(2):
        batches = epoch(loader)
        assert [len(b["index"]) for b in batches] == [16, 16, 16, 2]
        assert all(v.device == torch.device("cuda", 0) for b in batches for v in b["views"])
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(50))


@needs_cuda
def test_gpu_views_held_across_later_runs_keep_their_values(shards):
    """The views are torch's own memory: DALI's later runs do not overwrite a batch still held."""
    held = epoch(build_loader(shards, CENTER, 8, device="gpu", shuffle=False, keep_on_gpu=True))
    for kept, fresh in zip(held, build_loader(shards, CENTER, 8, device="gpu", shuffle=False, keep_on_gpu=True)):
        assert torch.equal(kept["index"], fresh["index"])
        for a, b in zip(kept["views"], fresh["views"]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_cuda
def test_gpu_imclr_rows_stay_on_the_gpu_and_start_with_every_sample_once(shards):
    from pipeline.views import imclr
    batches = epoch(build_loader(shards, imclr(2, small(1)), 8, device="gpu", keep_on_gpu=True))
    assert [len(b["index"]) for b in batches] == [8] * 6 + [2]  # the last batch is cut from a padded one
    for batch in batches:
        (view,) = batch["views"]
        assert view.device == torch.device("cuda", 0) and view.shape[1:] == (3, SMALL, 2 * SMALL)
    assert sorted(torch.cat([b["index"][:, 0] for b in batches]).tolist()) == list(range(50))


@needs_cuda
def test_pinned_copies_reach_the_gpu_with_their_values(shards):
    array = np.random.default_rng(0).integers(0, 255, (4, 3, 8, 8), dtype=np.uint8)
    out = host_to_device(array, torch.device("cuda", 0))
    assert out.device == torch.device("cuda", 0) and torch.equal(out.cpu(), torch.from_numpy(array))
    pinned = next(iter(build_loader(shards, small(), 8, pin_memory=True, shuffle=False)))
    plain = next(iter(build_loader(shards, small(), 8, shuffle=False)))
    assert all(v.is_pinned() for v in pinned["views"]) and pinned["label"].is_pinned()
    assert all(torch.equal(a, b) for a, b in zip(pinned["views"], plain["views"]))
