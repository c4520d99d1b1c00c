"""From a config to a method and its views: the method's own config builds it (models/registry.py
maps `method.name` to it); its recipe at the job's sizes, with the multi-crop views added."""
from __future__ import annotations

import dataclasses

from models.method import Method
from runtime.config import JobConfig


def build_method(config: JobConfig, num_classes: int | None = None) -> Method:
    return config.method.build(config, num_classes)


def uses_sync_bn(config: JobConfig) -> bool:
    """Global BN where the paper trains with it (`MethodConfig.sync_bn`: SimCLR Sect. B.9, BYOL);
    MoCo-style methods shuffle BN instead, NPID / CMC use per-worker BN. `model.sync_bn` overrides."""
    if config.model.sync_bn is not None:
        return config.model.sync_bn
    return config.method.uses_sync_bn()


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
