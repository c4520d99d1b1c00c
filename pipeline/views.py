"""Augmentation recipes as data, and the DALI graph that turns one decoded image into K views.

A `Recipe` is a list of `ViewSpec`s (one per output view) plus an optional colour space. The graph
decodes each image once and runs one branch per view; random ops are gated by their probability
with DALI conditionals, so a skipped op costs nothing (a straight port that always blurs is ~2.5×
slower on CPU), and the blur window follows σ (DALI sizes it from the per-sample sigma).

CPU vs GPU is one argument, `device`: it picks the decoder ("cpu" or "mixed") and the device of
every op after it. Nothing else differs between the two graphs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from nvidia.dali import fn, types

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
    """One MoCo-v2 view (NPIDv2, supervised training)."""
    return Recipe("one_crop", (ViewSpec(size, p_blur=small_image_blur(size)),))


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
    """ImCLR (000_*.txt): each input is `n` samples, each augmented by `base` (default two_crop),
    concatenated along the width (3×H×nW); the label is the mean of their one-hot labels. View v
    of a row concatenates view v of each of its samples."""
    if n < 2:
        raise ValueError(f"imclr needs n >= 2 samples per input, got {n}")
    base = base or two_crop()
    return replace(base, name=f"imclr({n})", concat=n)


def center(size: int = 224, space: str | None = None) -> Recipe:
    """One deterministic view for evaluation (kNN, linear probe, feature extraction): shorter side
    resized to `size`, centre crop, no randomness; `space` for CMC encoders."""
    return Recipe("center" if space is None else f"center_{space}", (ViewSpec(size, random=False),), colorspace=space)


RECIPES = {"two_crop": two_crop, "one_crop": one_crop, "center": center, "center_lab": lambda size=224: center(size, "lab"),
           "center_ydbdr": lambda size=224: center(size, "ydbdr"), "lab": lambda size=224: cmc("lab", size),
           "ydbdr": lambda size=224: cmc("ydbdr", size)}


def recipe_by_name(name: str, size: int = 224) -> Recipe:
    """A recipe from its config name: two_crop, one_crop, center, lab, ydbdr, multi_crop (global
    views at `size`, locals at 96/224 of it), k_views(K), imclr / imclr(N) (on two_crop)."""
    if name.startswith("k_views(") and name.endswith(")"):
        return k_views(int(name[len("k_views("):-1]), size)
    if name == "multi_crop":
        return multi_crop(global_size=size, local_size=max(8, round(size * 96 / 224)))
    if name == "imclr" or (name.startswith("imclr(") and name.endswith(")")):
        return imclr(int(name[len("imclr("):-1]) if name != "imclr" else 2, two_crop(size))
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)}, multi_crop, k_views(K), "
                         "imclr(N))")
    return RECIPES[name](size)


def augment(image, spec: ViewSpec, device: str, space: str | None, raw: bool = False):
    """One view of a decoded HWC uint8 image node (a DALI graph built with enable_conditionals)."""
    if not spec.random:
        view = fn.resize(image, device=device, resize_shorter=spec.size)
        view = fn.crop(view, device=device, crop=[spec.size, spec.size])
        return finish(view, device, space, mirror=0, raw=raw)
    view = fn.random_resized_crop(image, device=device, size=[spec.size, spec.size],
                                  random_area=list(spec.scale), random_aspect_ratio=list(spec.ratio))
    if spec.p_jitter > 0 and fn.random.coin_flip(probability=spec.p_jitter):
        b, c, s, h = spec.jitter
        view = fn.color_twist(view, device=device,
                              brightness=fn.random.uniform(range=[1 - b, 1 + b]),
                              contrast=fn.random.uniform(range=[1 - c, 1 + c]),
                              saturation=fn.random.uniform(range=[1 - s, 1 + s]),
                              hue=fn.random.uniform(range=[-h * 360, h * 360]))
    if spec.p_gray > 0 and fn.random.coin_flip(probability=spec.p_gray):
        view = fn.hsv(view, device=device, saturation=0.0)
    if spec.p_blur > 0 and fn.random.coin_flip(probability=spec.p_blur):
        view = fn.gaussian_blur(view, device=device, sigma=fn.random.uniform(range=list(spec.sigma)))
    return finish(view, device, space, mirror=fn.random.coin_flip() if spec.flip else 0, raw=raw)


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


def decode(encoded, device: str):
    """The only place the device changes the graph: CPU decode, or nvJPEG ("mixed") to the GPU."""
    return fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def views_graph(encoded, recipe: Recipe, device: str, raw: bool = False) -> list:
    image = decode(encoded, device)
    return [augment(image, spec, device, recipe.colorspace, raw) for spec in recipe.views]


def normalize(views_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW RGB views (`raw`) → the float views the graph would have produced:
    (x - ImageNet mean) / std per channel, the arithmetic of `crop_mirror_normalize`."""
    mean = torch.tensor(IMAGENET_MEAN, device=views_uint8.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=views_uint8.device).view(1, 3, 1, 1)
    return views_uint8.float().sub_(mean).mul_(inv_std)
