"""Encoders, heads and the methods of the papers: one file per method, its `Method` and its
`MethodConfig` (see models/method.py for what each provides; models/registry.py for the names)."""
from models.byol import BYOL
from models.cacr import CACR
from models.cmc import CMC
from models.encoders import ResNetEncoder, SmallAlexNet, SplitEncoder, build_encoder, resnet
from models.heads import ProjectionHead, byol_mlp
from models.interclr import InterCLR
from models.method import BankRequest, Method, MethodConfig
from models.moco import MoCo
from models.momentum import MoCoQueue, byol_decay, ema_update, momentum_copy
from models.npid import NPID
from models.simclr import SimCLR
from models.supervised import Supervised

__all__ = ["BYOL", "CACR", "CMC", "InterCLR", "MoCo", "NPID", "SimCLR", "Supervised", "BankRequest", "Method", "MethodConfig",
           "ResNetEncoder", "SmallAlexNet", "SplitEncoder", "build_encoder", "resnet", "ProjectionHead", "byol_mlp",
           "MoCoQueue", "byol_decay", "ema_update", "momentum_copy"]
