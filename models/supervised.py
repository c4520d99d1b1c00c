"""Supervised training with soft targets, plain or ImCLR (000_*.txt). Plain: one image per input,
the `supervised` recipe (RandomResizedCrop + flip), the hard label as a one-hot target. ImCLR
(`samples_per_input` n ≥ 2): each input is n images of the batch side by side (`imclr(n)` on the same
recipe) and its target the mean of their one-hot labels. One loss for both,
`soft_target_cross_entropy`; the method, its loss and its hyper-parameters are otherwise unchanged,
as the paper asks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from losses import soft_target_cross_entropy
from models.method import Method, MethodConfig, sgd


class Supervised(Method):
    recipe = "supervised"  # "imclr(n)" with samples_per_input = n
    num_views = 1

    def __init__(self, backbone: torch.nn.Module, num_classes: int, samples_per_input: int = 0):
        super().__init__()
        if samples_per_input == 1 or samples_per_input < 0:
            raise ValueError(f"samples_per_input is 0 (plain supervised) or ImCLR's n >= 2, got {samples_per_input}")
        self.backbone = backbone
        self.classifier = torch.nn.Linear(backbone.dim, num_classes)
        self.num_classes = num_classes
        self.samples_per_input = samples_per_input
        if samples_per_input:
            self.recipe = f"imclr({samples_per_input})"

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        """[B] class ids → one-hot [B, C]; [B, C] soft labels (ImCLR rows) as they are."""
        if label.dim() == 1:
            return F.one_hot(label.long(), self.num_classes).float()
        if label.shape[1] != self.num_classes:
            raise ValueError(f"soft labels have {label.shape[1]} classes, the classifier {self.num_classes}")
        return label.float()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of images [B, 3, H, W'] of any width: ResNet encoders pool globally, so a
        model trained on ImCLR rows (W' = nW) classifies single images (W' = W) with the same weights."""
        return self.classifier(self.backbone(images))

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        logits = self.classify(self.views(batch)[0])
        loss = soft_target_cross_entropy(logits, self.targets(batch["label"]).to(logits.device))
        return {"loss": loss, "cross_entropy": loss.detach()}


@torch.no_grad()
def classifier_top1(method: Supervised, batches, device: str | torch.device = "cpu") -> float:
    """Top-1 of the classifier over `batches` (dicts with "views" [1 × [B, 3, H, W]] and "label"
    [B] class ids), the model in eval mode (BatchNorm running statistics)."""
    method.eval()
    correct = seen = 0
    for batch in batches:
        predicted = method.classify(batch["views"][0].to(device)).argmax(dim=1).cpu()
        correct += int((predicted == batch["label"].long()).sum())
        seen += len(batch["label"])
    if seen == 0:
        raise ValueError("classifier_top1 got no batches")
    return correct / seen


@dataclass
class SupervisedConfig(MethodConfig):
    """Supervised training, plain or ImCLR's."""
    name: str = "supervised"
    imclr: int = 0  # ImCLR's samples per input, side by side (0: one image per input)
    title = "supervised ImCLR"
    paper = "ImCLR: Implicit Contrastive Learning for Image Classification, arXiv:2011.12618"
    # ImCLR (000) changes no hyper-parameter: the usual ImageNet ResNet recipe, lr 0.1 per 256, wd 1e-4
    # (He et al., 2016; Goyal et al., 2017)
    optimizer = sgd(0.1, 1e-4)

    def checks(self, job) -> list[tuple[bool, str]]:
        return [(self.imclr == 0 or self.imclr >= 2,
                 f"method.imclr (--imclr) is 0 (plain supervised) or the samples per input, >= 2; got {self.imclr}")]

    def build(self, job, num_classes: int | None = None) -> Supervised:
        if num_classes is None:
            raise ValueError("supervised training needs the number of classes (from the manifest)")
        return Supervised(self.backbone(job), num_classes, samples_per_input=self.imclr)
