"""Augmentation recipes as data, and the DALI graph that turns one decoded image into K views.

A `Recipe` is a list of `ViewSpec`s (one per output view) plus an optional colour space. The graph
decodes each image once and runs one branch per view: RandomResizedCrop, colour jitter and
grayscale in one `color_twist` (skipped when neither is drawn), a Gaussian blur gated by its
probability (DALI conditionals: a skipped op costs nothing) whose window follows σ, then flip and
normalise in `crop_mirror_normalize`. Per 224² view on one CPU core (DALI 2.4): crop+resize 1.43
ms, color_twist 1.41 to uint8 but 0.54 to float (+ 0.30 for the clamp; hsv for the grayscale was
another 1.43, now folded in), fn.gaussian_blur 2.03 vs 0.40 for our separable `fn.filter` blur,
crop_mirror_normalize 0.20.

CPU vs GPU is one argument, `device`: it picks the decoder ("cpu" or "mixed") and the device of
every image operator after it; the blur's taps, computed on the CPU from σ, move to the GPU with
the images. `tests/test_views.py` checks that placement on the GPU graph (built, not run).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.pipeline import DataNode

from pipeline import colorspace

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view. Defaults are MoCo-v2 / SimCLR's (InterCLR Sect. 5.1.2, CACR App. C)."""
    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    random: bool = True  # False: resize the shorter side to `size` and centre-crop (evaluation)


@dataclass(frozen=True)
class Recipe:
    name: str
    views: tuple[ViewSpec, ...]
    colorspace: str | None = None  # "lab" / "ydbdr": CMC views, normalised with CMC's constants
    concat: int = 1  # ImCLR: this many samples side by side per input (label = mean of one-hots)

    @property
    def num_views(self) -> int:
        return len(self.views)


def small_image_blur(size: int) -> float:
    """Blur probability: 0.5 (MoCo-v2 / SimCLR on ImageNet), but 0 for views of ≤ 64 px, where a
    σ up to 2 px erases the image (SimCLR's CIFAR-10 recipe drops the blur for the same reason)."""
    return 0.5 if size > 64 else 0.0


def two_crop(size: int = 224) -> Recipe:
    """MoCo-v2 / SimCLR: two views, RandomResizedCrop(scale 0.2–1), jitter p=0.8, gray p=0.2,
    blur σ∈[0.1, 2] p=0.5 (none at ≤ 64 px), flip."""
    spec = ViewSpec(size, p_blur=small_image_blur(size))
    return Recipe("two_crop", (spec, spec))


def one_crop(size: int = 224) -> Recipe:
    """One MoCo-v2 view (NPIDv2)."""
    return Recipe("one_crop", (ViewSpec(size, p_blur=small_image_blur(size)),))


def supervised(size: int = 224) -> Recipe:
    """The standard supervised augmentation, one view: RandomResizedCrop (scale 0.08–1, ratio 3/4–4/3)
    and a horizontal flip, no colour jitter, grayscale or blur (ImCLR's base: the supervised pipeline
    it leaves unchanged)."""
    return Recipe("supervised", (ViewSpec(size, scale=(0.08, 1.0), p_jitter=0.0, p_gray=0.0, p_blur=0.0),))


def k_views(k: int, size: int = 224) -> Recipe:
    """K independent views of the same decoded image (CACR K=4)."""
    if k < 1:
        raise ValueError(f"k_views needs k >= 1, got {k}")
    return Recipe(f"k_views({k})", tuple(ViewSpec(size, p_blur=small_image_blur(size)) for _ in range(k)))


def cmc(space: str, size: int = 224, num_views: int = 1) -> Recipe:
    """CMC (Sect. 4.1): random resized crop and flip, then Lab or YDbDr; the model splits the
    channels as [1, 2] (L | ab, Y | DbDr)."""
    if space not in colorspace.SPACES:
        raise ValueError(f"unknown colour space {space!r} (choose from {', '.join(colorspace.SPACES)})")
    plain = ViewSpec(size, scale=(0.08, 1.0), p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    return Recipe(space, tuple(plain for _ in range(num_views)), colorspace=space)


def multi_crop(global_n: int = 2, global_size: int = 224, local_n: int = 6, local_size: int = 96,
               global_scale: tuple[float, float] = (0.14, 1.0),
               local_scale: tuple[float, float] = (0.05, 0.14)) -> Recipe:
    """Multi-crop (SwAV's defaults): `global_n` large views then `local_n` small ones, grouped by
    resolution, large first; each with the MoCo-v2 colour pipeline."""
    if global_n < 1 or local_n < 0:
        raise ValueError(f"multi_crop needs global_n >= 1 and local_n >= 0, got {global_n}, {local_n}")
    views = tuple(ViewSpec(global_size, scale=global_scale, p_blur=small_image_blur(global_size))
                  for _ in range(global_n))
    views += tuple(ViewSpec(local_size, scale=local_scale, p_blur=small_image_blur(local_size))
                   for _ in range(local_n))
    return Recipe("multi_crop", views)


def imclr(n: int = 2, base: Recipe | None = None) -> Recipe:
    """ImCLR (000_*.txt): each input is `n` distinct samples of the batch, each augmented by `base`
    (default: the supervised one-view recipe at 224 px), side by side along the width (3×H×nW); the
    label is the mean of their n one-hot labels. With a multi-view base, view v of a row concatenates
    view v of each of its samples (one pairing for all views). See `imclr_parts` for the pairing."""
    if n < 2:
        raise ValueError(f"imclr needs n >= 2 samples per input, got {n}")
    base = base or supervised()
    if base.concat != 1:
        raise ValueError(f"imclr's base must be a recipe of single images, got {base.name!r}")
    return replace(base, name=f"imclr({n})", concat=n)


def imclr_parts(n: int, batch_size: int) -> list:
    """ImCLR's pairing as DALI per-sample indices into the batch, one index node per part: the batch
    in a random cyclic order (`fn.batch_permutation`), row k = the n samples from position k on, so
    part j of row k is sample order[(k + j) mod B]. Each part uses every sample once, part j is part
    0 moved along a B-cycle by j (no sample is its own partner), and a row's samples are distinct
    (n ≤ B). Rows come in the random order; part 0 (`order`) lets the loader restore reader order."""
    if not 2 <= n <= batch_size:
        raise ValueError(f"imclr rows of {n} samples need 2 <= n <= batch_size ({batch_size})")
    order = fn.batch_permutation()
    shifted = [fn.permute_batch(order, indices=[(k + j) % batch_size for k in range(batch_size)])
               for j in range(1, n)]
    return [order, *shifted]


def concat_parts(views: list, parts: list) -> list:
    """Each view's rows: the views of the parts' samples, side by side along the width (CHW axis 2)."""
    return [fn.cat(*[fn.permute_batch(view, indices=part) for part in parts], axis=2) for view in views]


def center(size: int = 224, space: str | None = None) -> Recipe:
    """One deterministic view for evaluation (kNN, linear probe, feature extraction): shorter side
    resized to `size`, centre crop, no randomness; `space` for CMC encoders."""
    return Recipe("center" if space is None else f"center_{space}", (ViewSpec(size, random=False),), colorspace=space)


RECIPES = {"two_crop": two_crop, "one_crop": one_crop, "supervised": supervised, "center": center,
           "center_lab": lambda size=224: center(size, "lab"),
           "center_ydbdr": lambda size=224: center(size, "ydbdr"), "lab": lambda size=224: cmc("lab", size),
           "ydbdr": lambda size=224: cmc("ydbdr", size)}


def recipe_by_name(name: str, size: int = 224) -> Recipe:
    """A recipe from its config name: two_crop, one_crop, supervised, center, lab, ydbdr, multi_crop
    (global views at `size`, locals at 96/224 of it), k_views(K), imclr / imclr(N) (N samples per
    input on the supervised recipe; imclr = imclr(2))."""
    if name.startswith("k_views(") and name.endswith(")"):
        return k_views(int(name[len("k_views("):-1]), size)
    if name == "multi_crop":
        return multi_crop(global_size=size, local_size=max(8, round(size * 96 / 224)))
    if name == "imclr" or (name.startswith("imclr(") and name.endswith(")")):
        return imclr(int(name[len("imclr("):-1]) if name != "imclr" else 2, supervised(size))
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)}, multi_crop, k_views(K), "
                         "imclr(N))")
    return RECIPES[name](size)


def augment(image, spec: ViewSpec, device: str, space: str | None, raw: bool = False):
    """One view of a decoded HWC uint8 image node (a DALI graph built with enable_conditionals):
    RandomResizedCrop → colour jitter and grayscale in one op (`jitter_and_gray`) → blur (`blur`,
    gated by its probability) → flip and normalise (`finish`)."""
    if not spec.random:
        view = fn.resize(image, device=device, resize_shorter=spec.size)
        view = fn.crop(view, device=device, crop=[spec.size, spec.size])
        return finish(view, device, space, mirror=0, raw=raw)
    view = fn.random_resized_crop(image, device=device, size=[spec.size, spec.size],
                                  random_area=list(spec.scale), random_aspect_ratio=list(spec.ratio))
    view = jitter_and_gray(view, spec, device)
    if spec.p_blur > 0 and fn.random.coin_flip(probability=spec.p_blur):
        view = blur(view, device, fn.random.uniform(range=list(spec.sigma)), max_sigma=spec.sigma[1])
    return finish(view, device, space, mirror=fn.random.coin_flip() if spec.flip else 0, raw=raw)


def jitter_and_gray(view, spec: ViewSpec, device: str):
    """ColorJitter(b, c, s, h) with probability p_jitter, then RandomGrayscale with p_gray, as one
    DALI color_twist: brightness, contrast (about mid-gray, 128), saturation and hue (a rotation
    of the I/Q plane of YIQ) are one per-sample affine colour map, and grayscale is saturation 0
    of the same map (Y = 0.299 R + 0.587 G + 0.114 B, PIL's and torchvision's luma). A view drawn
    for neither skips the op. Differences from torchvision: fixed order (it shuffles b, c, s, h),
    one clamp to [0, 255] instead of one per step, contrast about 128 instead of the image's mean
    gray, hue in YIQ instead of HSV.

    The result is float HWC in [0, 255] (uint8 views are cast): DALI's CPU float → uint8
    conversion is the slow part of color_twist, and the blur and crop_mirror_normalize after it take
    float as cheaply (timings: docs/benchmarks.md, lab notes). Recipes without jitter or grayscale
    (CMC) keep uint8."""
    if spec.p_jitter <= 0 and spec.p_gray <= 0:
        return view
    b, c, s, h = spec.jitter
    gray = fn.random.coin_flip(probability=spec.p_gray, dtype=types.BOOL)
    if fn.random.coin_flip(probability=spec.p_jitter, dtype=types.BOOL):
        saturation = fn.random.uniform(range=[1 - s, 1 + s]) * (1.0 - fn.cast(gray, dtype=types.FLOAT))
        view = fn.color_twist(view, device=device, brightness=fn.random.uniform(range=[1 - b, 1 + b]),
                              contrast=fn.random.uniform(range=[1 - c, 1 + c]), saturation=saturation,
                              hue=fn.random.uniform(range=[-h * 360, h * 360]), dtype=types.FLOAT)
        view = dmath.min(dmath.max(view, 0.0), 255.0)  # torchvision's images never leave the range
    elif gray:
        view = fn.color_twist(view, device=device, saturation=0.0, dtype=types.FLOAT)
    else:
        view = fn.cast(view, device=device, dtype=types.FLOAT)
    return view


def _node(value):
    """A float as a DALI constant node (the math functions take nodes only); nodes as they are."""
    return value if isinstance(value, DataNode) else types.Constant(float(value), dtype=types.FLOAT, device="cpu")


def blur(view, device: str, sigma, max_sigma: float, truncate: float = 3.0):
    """Gaussian blur of an HWC view: a normalised 1-D kernel exp(−x²/2σ²) over |x| ≤ ⌈3σ⌉ (the window
    follows σ; σ ≤ max_sigma), applied along the width then the height (`fn.filter`, reflect-101
    borders like torchvision's). DALI's gaussian_blur did the same ~5× slower on CPU."""
    radius_max, sigma = int(np.ceil(truncate * max_sigma)), _node(sigma)
    x = types.Constant(np.arange(-radius_max, radius_max + 1, dtype=np.float32))
    taps = dmath.exp(-(x * x) / (2.0 * sigma * sigma))
    radius = fn.cast(dmath.ceil(truncate * sigma), dtype=types.INT32)
    taps = fn.slice(taps, radius_max - radius, 2 * radius + 1, axes=[0],
                    normalized_anchor=False, normalized_shape=False)
    taps = taps / fn.reductions.sum(taps)
    if device == "gpu":  # a GPU operator's regular inputs live on the GPU
        taps = taps.gpu()
    view = fn.filter(view, fn.expand_dims(taps, axes=[0]), device=device)  # along the width
    return fn.filter(view, fn.expand_dims(taps, axes=[1]), device=device)  # along the height


def finish(view, device: str, space: str | None, mirror, raw: bool = False):
    """Flip, convert (CMC colour spaces) and normalise to float CHW; `raw`: flip only, uint8 CHW,
    for `normalize` on the trainer (a quarter of the bytes through the object store)."""
    if raw:  # RGB only: DaliLoader refuses raw colour-space recipes
        return fn.crop_mirror_normalize(view, device=device, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
    if space is None:
        return fn.crop_mirror_normalize(view, device=device, dtype=types.FLOAT, output_layout="CHW",
                                        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), mirror=mirror)
    view = fn.flip(view, device=device, horizontal=mirror)
    converted = colorspace.convert_node(fn.cast(view, device=device, dtype=types.FLOAT) / 255.0, space)
    return colorspace.normalize_node(converted, space)


# nvJPEG's buffers for the "mixed" decoder, padded as in NVIDIA's DALI ResNet-50 example
# (docs/examples/use_cases/pytorch/resnet50/main.py) so that a larger image later in the run does not
# make it reallocate them; the CPU decoder takes no padding.
NVJPEG_DEVICE_PADDING = 211_025_920
NVJPEG_HOST_PADDING = 140_544_512


def decode(encoded, device: str):
    """The only place the device changes the graph: CPU decode, or nvJPEG ("mixed") to the GPU."""
    if device == "gpu":
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                 device_memory_padding=NVJPEG_DEVICE_PADDING, host_memory_padding=NVJPEG_HOST_PADDING)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def views_graph(encoded, recipe: Recipe, device: str, raw: bool = False) -> list:
    image = decode(encoded, device)
    return [augment(image, spec, device, recipe.colorspace, raw) for spec in recipe.views]


def normalize(views_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW RGB views (`raw`) → the float views the graph would have produced:
    (x - ImageNet mean) / std per channel, the arithmetic of `crop_mirror_normalize`."""
    mean = torch.tensor(IMAGENET_MEAN, device=views_uint8.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=views_uint8.device).view(1, 3, 1, 1)
    return views_uint8.float().sub_(mean).mul_(inv_std)
