"""SimCLR (001_*.txt): two views, encoder + 2-layer MLP head, NT-Xent over the 2N embeddings of the
global batch (every worker's), as SimCLR's `tpu_cross_replica_concat` and solo-learn's `gather` do.

The same two-view model trains with CACR's CL baselines in place of NT-Xent (`loss`, 004 Sect. 5 and
App. C.1, the study's settings): "align_uniform" (AU-CL, Wang & Isola: t = 2; their loss has no τ),
"hard_negative" (HN-CL, Robinson et al.: τ⁺ 0.1, β 1.0, τ from `temperature`, 004 uses 0.5), and
"cmc" — multi-view CL on augmentation views, 004's "CMC (K = 4)": `positives` + 1 views of each
sample, `losses.cmc_loss` over their head outputs as the full graph (002 Eq. 8), in-batch negatives
(004 App. C.2: τ 0.07, Eq. 8). The three baselines contrast each worker's own batch (no gather).
Multi-crop (`local_crops`, SwAV's views applied to SimCLR): the two global and the local views of a
sample are each other's positives, the other samples' views the negatives (`multi_positive_nt_xent`
over the global batch)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from losses import align_uniform_loss, cmc_loss, hard_negative_loss, multi_positive_nt_xent, nt_xent, nt_xent_global
from models.heads import ProjectionHead
from models.method import LOCAL_CROPS, Method, MethodConfig, lars
from models.momentum import all_gather_with_grad

LOSSES = ("nt_xent", "align_uniform", "hard_negative", "cmc")


class SimCLR(Method):
    recipe = "two_crop"

    def __init__(self, backbone: torch.nn.Module, embed_dim: int = 128, hidden_dim: int = 2048,
                 temperature: float = 0.5, gather: bool = True, loss: str = "nt_xent", positives: int = 1,
                 local_crops: int = 0):
        super().__init__()
        if local_crops and (loss != "nt_xent" or positives != 1):
            raise ValueError(f"SimCLR's multi-crop is multi-positive NT-Xent on two global views; got loss={loss!r}, "
                             f"positives={positives}")
        self.local_crops = local_crops
        if loss not in LOSSES:
            raise ValueError(f"SimCLR loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if positives < 1 or (positives > 1 and loss != "cmc"):
            raise ValueError(f"SimCLR takes more than one positive with the multi-view loss (cmc) only; "
                             f"got positives={positives} with {loss!r}")
        self.backbone = backbone
        self.head = ProjectionHead(backbone.dim, embed_dim, hidden_dim, batch_norm=True)
        self.temperature = temperature
        self.gather = gather  # False: each worker contrasts only its own batch (2n-2 negatives)
        self.loss = loss
        self.num_views = positives + 1
        self.recipe = "two_crop" if positives == 1 else f"k_views({self.num_views})"

    def training_step(self, batch: dict, progress: float = 0.0, epoch: int = 0) -> dict:
        views = self.views(batch)[:self.num_views]
        z = [self.head(self.backbone(v)) for v in views]
        if self.local_crops:
            z += [self.head(self.backbone(v)) for v in self.local_views(batch)]
            stacked = torch.stack(z, dim=1)  # [n, 2 + locals, D]
            everyone, offset = all_gather_with_grad(stacked) if self.gather else (stacked, 0)
            loss = multi_positive_nt_xent(stacked, everyone, offset, self.temperature)
        elif self.loss == "cmc":
            loss = cmc_loss(z, self.temperature, paradigm="full")
        elif self.loss == "align_uniform":
            loss = align_uniform_loss(z[0], z[1], t=2.0)
        elif self.loss == "hard_negative":
            loss = hard_negative_loss(z[0], z[1], self.temperature, tau_plus=0.1, beta=1.0)
        elif self.gather:
            both, offset = all_gather_with_grad(torch.stack(z, dim=1))  # [N, 2, D], one collective
            loss = nt_xent_global(z[0], z[1], both[:, 0], both[:, 1], offset, self.temperature)
        else:
            loss = nt_xent(z[0], z[1], self.temperature)
        return {"loss": loss, self.loss: loss.detach()}


@dataclass
class SimCLRConfig(MethodConfig):
    """SimCLR's keys. τ 0.5 (SimCLR Table 5's best at batch 256 is 0.5; 004 App. C.1's CL uses 0.19
    on CIFAR: the fidelity study sets it)."""
    name: str = "simclr"
    temperature: float = 0.5
    gather: bool = True  # NT-Xent over the global batch (every worker's embeddings)
    loss: str = "nt_xent"  # nt_xent | align_uniform (AU-CL) | hard_negative (HN-CL) | cmc (multi-view CL)
    positives: int = 1  # loss=cmc: views per sample - 1 (004's "CMC (K = 4)")
    title = "SimCLR"
    paper = "A Simple Framework for Contrastive Learning of Visual Representations, arXiv:2002.05709"
    reads = LOCAL_CROPS
    # LARS, lr 0.3 × batch/256, wd 1e-6, 10 warm-up epochs (001; mmselfsup
    # configs/selfsup/simclr/simclr_resnet50_8xb32-coslr-200e_in1k.py, bn and bias decay_mult 0 + lars_exclude)
    optimizer = lars(0.3, 1e-6)
    sync_bn = True  # global BN (001 Sect. B.9)

    def checks(self, job) -> list[tuple[bool, str]]:
        return [
            (self.loss in LOSSES, f"method.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.positives == 1 or self.loss == "cmc",
             f"method.positives={self.positives}: more than one positive is SimCLR's with method.loss=cmc "
             f"(multi-view CL)"),
            (job.data.local_crops == 0 or (self.loss == "nt_xent" and self.positives == 1),
             f"data.local_crops: SimCLR's multi-crop is multi-positive NT-Xent on two global views; got "
             f"method.loss={self.loss}, method.positives={self.positives}"),
        ]

    def build(self, job, num_classes: int | None = None) -> SimCLR:
        return SimCLR(self.backbone(job), temperature=self.temperature, gather=self.gather, loss=self.loss,
                      positives=self.positives, local_crops=job.data.local_crops)
