"""The method registry: the name a config writes (`method.name`) → the method's config class.

A method is one module of models/: its `Method` subclass and its `MethodConfig` (models/method.py:
its keys with the paper's defaults, the other sections' keys it reads, its optimiser, `build`).
Adding a method = that module, one line in `METHODS`, and its configs/<name>/ file; every job then
runs it with `--config configs/<name>/….yaml` (jobs/pretrain.py) or `--set method.name=<name>`.
"""
from __future__ import annotations

import difflib

from models.byol import BYOLConfig
from models.cacr import CACRConfig
from models.cmc import CMCConfig
from models.interclr import InterCLRConfig
from models.method import MethodConfig
from models.moco import MoCoConfig
from models.npid import NPIDConfig
from models.simclr import SimCLRConfig
from models.supervised import SupervisedConfig

METHODS: dict[str, type[MethodConfig]] = {cls.name: cls for cls in (
    SimCLRConfig, NPIDConfig, MoCoConfig, BYOLConfig, CMCConfig, CACRConfig, InterCLRConfig, SupervisedConfig)}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Add a method from outside models/ (a plugin, a test) under `cls.name`; usable as a decorator."""
    if not cls.name or cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is empty or taken by {METHODS.get(cls.name)}")
    METHODS[cls.name] = cls
    return cls


def method_config(name: str) -> type[MethodConfig]:
    """The config class registered as `name`; KeyError with the choices (the closest first)."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise KeyError(f"unknown method {name!r} ({hint}choose from {', '.join(METHODS)})")
    return METHODS[name]
