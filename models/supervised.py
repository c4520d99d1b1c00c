"""Supervised training with soft targets: the ImCLR path (000_*.txt). With the `imclr` recipe each
input is n images side by side and its label the mean of their one-hot labels; the loss is
`soft_target_cross_entropy` (for hard labels, their one-hot vectors)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses import soft_target_cross_entropy
from models.method import Method


class Supervised(Method):
    recipe = "one_crop"  # or any recipe whose first view it trains on (ImCLR views: soft labels)
    num_views = 1

    def __init__(self, backbone: torch.nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = torch.nn.Linear(backbone.dim, num_classes)
        self.num_classes = num_classes

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        if label.dim() == 1:
            return F.one_hot(label.long(), self.num_classes).float()
        if label.shape[1] != self.num_classes:
            raise ValueError(f"soft labels have {label.shape[1]} classes, the classifier {self.num_classes}")
        return label.float()

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        logits = self.classifier(self.backbone(self.views(batch)[0]))
        loss = soft_target_cross_entropy(logits, self.targets(batch["label"]).to(logits.device))
        return {"loss": loss, "cross_entropy": loss.detach()}
