"""pipeline.views: the augmentation ops against torchvision on real photos, and the GPU graph's op
placement (built as a graph only: no GPU here)."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from nvidia.dali import fn, pipeline_def, types

from pipeline import views
from tests import datasets


def run_on(image: np.ndarray, body) -> np.ndarray:
    """`body` applied by a DALI CPU pipeline to one HWC uint8 image."""
    @pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0, enable_conditionals=True)
    def graph():
        return body(fn.external_source(source=lambda: [image], batch=True, layout="HWC", dtype=types.UINT8))

    pipe = graph()
    pipe.build()
    return np.array(pipe.run()[0][0])


def as_float_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.0])
def test_blur_matches_torchvision_gaussian_blur_within_one_level(sigma):
    """Our window ⌈3σ⌉ against torchvision's GaussianBlur(23, σ) (SimCLR's kernel, 10 % of 224),
    reflect borders: the taps past 3σ hold < 0.3 % of the weight, so the two differ by rounding only."""
    for photo in datasets.photos()[:3]:
        ours = run_on(photo, lambda x: views.blur(x, "cpu", sigma, max_sigma=2.0)).astype(np.float64)
        reference = (F.gaussian_blur(as_float_chw(photo), 23, sigma) * 255).permute(1, 2, 0).numpy()
        assert ours.shape == photo.shape
        assert np.abs(ours - reference).max() <= 1.0
        assert np.abs(ours - photo).mean() > 0.5  # it did blur


def test_grayscale_draw_gives_torchvision_luma():
    spec = views.ViewSpec(p_jitter=0.0, p_gray=1.0)
    for photo in datasets.photos()[:3]:
        ours = run_on(photo, lambda x: views.jitter_and_gray(x, spec, "cpu")).astype(np.float64)
        reference = (F.rgb_to_grayscale(as_float_chw(photo), 3) * 255).permute(1, 2, 0).numpy()
        assert np.abs(ours - ours[..., :1]).max() <= 1  # R = G = B up to DALI's YIQ round trip
        assert np.abs(ours - reference).max() <= 1.5


def test_jitter_draw_changes_colour_and_none_leaves_the_view():
    photo = datasets.photos()[1]
    jittered = run_on(photo, lambda x: views.jitter_and_gray(x, views.ViewSpec(p_jitter=1.0, p_gray=0.0), "cpu"))
    assert np.abs(jittered.astype(float) - photo).mean() > 2
    untouched = run_on(photo, lambda x: views.jitter_and_gray(x, views.ViewSpec(p_jitter=0.0, p_gray=0.0), "cpu"))
    assert np.array_equal(untouched, photo)


def op_devices(device: str, recipe) -> collections.Counter:
    """(device, operator) counts of the loader's graph for `device`, built as a graph only (DALI's
    Python graph builder; no executor, so no GPU is needed to inspect the GPU graph)."""
    @pipeline_def(batch_size=2, num_threads=1, device_id=0 if device == "gpu" else None, enable_conditionals=True)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        return tuple(views.views_graph(encoded, recipe, device))

    pipe = graph()
    pipe._build_graph()  # private in DALI 2.4 (pinned); the public build() needs a GPU for GPU ops
    return collections.Counter((op._op.device, getattr(op._op, "schema_name", type(op._op).__name__)) for op in pipe._ops)


IMAGE_OPS = {"RandomResizedCrop", "ColorTwist", "Filter", "CropMirrorNormalize", "Resize", "Crop"}


@pytest.mark.parametrize("recipe", [views.two_crop(), views.center()], ids=["two_crop", "center"])
def test_gpu_graph_differs_only_in_decode_and_op_devices(recipe):
    cpu, gpu = op_devices("cpu", recipe), op_devices("gpu", recipe)
    assert gpu[("mixed", "decoders__Image")] == 1 and cpu[("cpu", "decoders__Image")] == 1
    image_ops = {name for _, name in gpu} & IMAGE_OPS
    assert image_ops and all(device == "gpu" for device, name in gpu if name in image_ops)
    assert all(device == "cpu" for device, _ in cpu)
    strip = lambda counts: sum((collections.Counter({name: n}) for (_, name), n in counts.items()), collections.Counter())
    extra = strip(gpu) - strip(cpu)  # the same operators, plus moving the blur's taps to the GPU
    assert set(extra) <= {"MakeContiguous"}, extra
    assert not strip(cpu) - strip(gpu)


def decoder_args(device: str) -> dict:
    """The image decoder's arguments in the loader's graph for `device` (built as a graph only)."""
    @pipeline_def(batch_size=2, num_threads=1, device_id=0 if device == "gpu" else None, enable_conditionals=True)
    def graph():
        return tuple(views.views_graph(fn.external_source(name="encoded", dtype=types.UINT8), views.center(), device))

    pipe = graph()
    pipe._build_graph()  # private in DALI 2.4 (pinned); the public build() needs a GPU for GPU ops
    (decoder,) = [op._op for op in pipe._ops if getattr(op._op, "schema_name", "") == "decoders__Image"]
    return decoder._init_args


def test_gpu_decoder_pads_nvjpeg_buffers_as_nvidias_resnet50_example():
    gpu, cpu = decoder_args("gpu"), decoder_args("cpu")
    assert gpu["device_memory_padding"] == 211_025_920 and gpu["host_memory_padding"] == 140_544_512
    assert "device_memory_padding" not in cpu and "host_memory_padding" not in cpu


@pytest.mark.parametrize("n", [2, 3, 4])
def test_imclr_parts_are_one_random_cyclic_order_shifted_by_the_part(n):
    """Part j of row k is sample order[(k + j) mod B]: every part a permutation of the batch, part j
    ≠ part 0 in every row (a single B-cycle has no fixed point), n distinct samples per row."""
    batch = 8

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=n)
    def graph():
        return tuple(views.imclr_parts(n, batch))

    pipe = graph()
    pipe.build()
    for _ in range(3):
        parts = np.stack([np.array(p.as_array()).reshape(-1) for p in pipe.run()])  # [n, B]
        assert sorted(parts[0]) == list(range(batch))
        for j in range(1, n):
            assert np.array_equal(parts[j], np.roll(parts[0], -j))
        assert all(len(set(parts[:, k])) == n for k in range(batch))
    with pytest.raises(ValueError, match="batch_size"):
        views.imclr_parts(5, 4)


def test_gpu_graph_builds_imclr_rows_on_the_gpu_from_cpu_indices():
    """Built as a graph only: the views' PermuteBatch and Cat run on the GPU; the pairing
    (BatchPermutation and its shifted copies) stays on the CPU, as argument inputs must."""
    @pipeline_def(batch_size=8, num_threads=1, device_id=0, enable_conditionals=True)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        parts = views.imclr_parts(3, 8)
        return (*views.concat_parts(views.views_graph(encoded, views.imclr(3, views.supervised(28)), "gpu"), parts),
                parts[0])

    pipe = graph()
    pipe._build_graph()  # private in DALI 2.4 (pinned); the public build() needs a GPU for GPU ops
    ops = collections.Counter((op._op.device, getattr(op._op, "schema_name", type(op._op).__name__))
                              for op in pipe._ops)
    assert ops[("gpu", "Cat")] == 1 and ops[("gpu", "PermuteBatch")] == 3  # one view, three parts
    assert ops[("cpu", "BatchPermutation")] == 1 and ops[("cpu", "PermuteBatch")] == 2
