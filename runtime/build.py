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
                        bn_splits=config.model.bn_splits, symmetric=m.symmetric, **temperature)
    if m.name == "npid":
        return NPID(backbone, num_negatives=m.num_negatives, **temperature)
    if m.name == "moco":
        return MoCo(backbone, queue_size=m.queue_size, key_momentum=m.key_momentum, symmetric=m.symmetric,
                    shuffle_bn=config.model.shuffle_bn, bn_splits=config.model.bn_splits, **temperature)
    if m.name == "simclr":
        return SimCLR(backbone, gather=m.gather, loss=m.loss, positives=m.positives, **temperature)
    if m.name == "byol":
        return BYOL(backbone)
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


def training_recipe(method: Method, config: JobConfig):
    """The method's views at `data.image_size`, with `data.min_crop_scale` applied to every view."""
    recipe = method.recipe_for(config.data.image_size)
    low = config.data.min_crop_scale
    if low is None:
        return recipe
    return dataclasses.replace(recipe, views=tuple(dataclasses.replace(v, scale=(low, v.scale[1]))
                                                   for v in recipe.views))
