"""Every contrastive objective of the papers, as pure functions on embedding tensors."""
from losses.baselines import align_uniform_loss, hard_negative_loss
from losses.byol import byol_loss
from losses.cacr import cacr_loss, cacr_multiview_loss
from losses.cmc import cmc_loss
from losses.infonce import (info_nce, info_nce_from_logits, interclr_loss, multi_positive_nt_xent, nt_xent,
                            nt_xent_global, patch_nce)
from losses.supervised import soft_target_cross_entropy

__all__ = [
    "align_uniform_loss", "byol_loss", "cacr_loss", "cacr_multiview_loss", "cmc_loss",
    "hard_negative_loss", "info_nce", "info_nce_from_logits", "interclr_loss", "multi_positive_nt_xent", "nt_xent",
    "nt_xent_global", "patch_nce", "soft_target_cross_entropy",
]
