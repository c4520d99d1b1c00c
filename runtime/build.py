"""From a config to a method: the one table that maps the method names a user writes in a config
to the classes of models/."""
from __future__ import annotations

import dataclasses

from models import BYOL, CACR, CMC, NPID, InterCLR, MoCo, SimCLR, SplitEncoder, Supervised, build_encoder
from models.method import Method
from runtime.config import JobConfig


def build_backbone(config: JobConfig, in_channels: int = 3):
    m = config.model
    return build_encoder(m.encoder, m.width, m.small_images, in_channels)


def build_method(config: JobConfig, num_classes: int | None = None) -> Method:
    m = config.method
    temperature = {} if m.temperature is None else {"temperature": m.temperature}
    if m.name == "cmc":
        backbone = SplitEncoder(lambda c: build_backbone(config, c), (1, 2))
        return CMC(backbone, num_negatives=m.num_negatives, paradigm=m.paradigm, colorspace=m.colorspace,
                   **temperature)
    backbone = build_backbone(config)
    if m.name == "interclr":
        return InterCLR(backbone, base=m.base, num_negatives=m.num_negatives, strategy=m.strategy,
                        weight=m.weight, inter_margin=m.inter_margin, warmup_epochs=m.warmup_epochs,
                        queue_size=m.queue_size, key_momentum=m.key_momentum, shuffle_bn=config.model.shuffle_bn,
                        bn_splits=config.model.bn_splits, symmetric=m.symmetric,
                        local_crops=config.data.local_crops, **temperature)
    if m.name == "npid":
        return NPID(backbone, num_negatives=m.num_negatives, **temperature)
    if m.name == "moco":
        return MoCo(backbone, queue_size=m.queue_size, key_momentum=m.key_momentum, symmetric=m.symmetric,
                    shuffle_bn=config.model.shuffle_bn, bn_splits=config.model.bn_splits,
                    local_crops=config.data.local_crops, **temperature)
    if m.name == "simclr":
        return SimCLR(backbone, gather=m.gather, loss=m.loss, positives=m.positives,
                      local_crops=config.data.local_crops, **temperature)
    if m.name == "byol":
        return BYOL(backbone, local_crops=config.data.local_crops)
    if m.name == "cacr":
        return CACR(backbone, num_positives=m.positives, queue_size=m.queue_size or None, key_momentum=m.key_momentum,
                    intra_batch=m.intra_batch, detach_weights=m.detach_queue_weights,
                    shuffle_bn=config.model.shuffle_bn, bn_splits=config.model.bn_splits)
    if m.name == "supervised":
        if num_classes is None:
            raise ValueError("supervised training needs the number of classes (from the manifest)")
        return Supervised(backbone, num_classes, samples_per_input=m.imclr)
    raise ValueError(f"unknown method {m.name!r}")


def uses_sync_bn(config: JobConfig) -> bool:
    """Global BN where the paper trains with it (SimCLR Sect. B.9 and BYOL: statistics over the whole
    batch); MoCo-style methods shuffle BN instead, NPID / CMC use per-worker BN. `model.sync_bn` overrides."""
    if config.model.sync_bn is not None:
        return config.model.sync_bn
    m = config.method
    return m.name in ("simclr", "byol") or (m.name == "interclr" and m.base == "byol")


def local_size(config: JobConfig) -> int:
    """data.local_size, or SwAV's 96 px of 224 at data.image_size."""
    d = config.data
    return d.local_size if d.local_size is not None else max(8, round(d.image_size * 96 / 224))


def training_recipe(method: Method, config: JobConfig):
    """The method's views at `data.image_size`, with `data.min_crop_scale` applied to every view,
    then `data.local_crops` local views (SwAV's multi-crop: `data.local_size` px, area
    `data.local_scale`, the same colour pipeline; pipeline.views.multi_crop's layout, globals first)."""
    from pipeline.views import ViewSpec, small_image_blur  # DALI: only where views are made
    d = config.data
    recipe = method.recipe_for(d.image_size)
    views = recipe.views
    if d.min_crop_scale is not None:
        views = tuple(dataclasses.replace(v, scale=(d.min_crop_scale, v.scale[1])) for v in views)
    if d.local_crops:
        size = local_size(config)
        local = ViewSpec(size, scale=tuple(d.local_scale), p_blur=small_image_blur(size))
        views += (local,) * d.local_crops
    return recipe if views == recipe.views else dataclasses.replace(recipe, views=views)
