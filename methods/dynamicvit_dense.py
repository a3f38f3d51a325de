"""DynamicViT's training losses for a dense model (segmentation): the classification recipe's
terms with their per-pixel analogues.

The official repository trains DynamicViT for classification only; its losses become, for a
dense model whose encoder carries the method:

- the task loss: the per-pixel cross-entropy (in place of the class cross-entropy), at ``clf_weight``;
- the ratio loss: unchanged, on the training-time decisions of the predictors (ViT: kept fraction
  of stage ``s`` against ``keep_rate ** s``; ConvNeXt / Swin: against the journal's ratios);
- the logit distillation: KL(teacher || student) of the dense teacher's per-pixel class
  distribution, averaged over pixels (the class-logit KL applied at every pixel);
- the token distillation: squared error between the student's and the teacher's last feature
  map, over the positions the student keeps (ViT, as the official ``mse_token``) or over every
  position (ConvNeXt / Swin, whose map stays whole, as the journal's feature-map loss).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.backbones import last_state
from tokenbench.errors import UserError
from tokenbench.methods import dynamicvit_hierarchical as hier


def pixel_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions at each pixel, summed over classes and
    averaged over images and pixels."""
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                  reduction="none", log_target=True)
    return kl.sum(1).mean()


def map_distill_loss(fmap: torch.Tensor, teacher_fmap: torch.Tensor, kept: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error of two feature maps [B, C, H, W], over the positions ``kept`` marks
    ([B, H * W], > 0.5; None: all) and channels; 0 where no position is kept."""
    if kept is None:
        return ((fmap - teacher_fmap) ** 2).mean()
    b, c = fmap.shape[:2]
    m = (kept.reshape(b, 1, *fmap.shape[-2:]) > 0.5).to(fmap.dtype)
    n = m.sum()
    sq = ((fmap - teacher_fmap) ** 2 * m).sum()
    return torch.where(n < 0.1, sq * 0.0, sq / (n.clamp(min=1.0) * c))


def dense_loss(vit: bool, keep_rate: float, weights: dict, ratio_loss):
    """The :data:`~tokenbench.registry.DenseLossFn` of DynamicViT with loss ``weights``;
    ``ratio_loss(decisions, keep_rate)`` is the family's ratio loss."""
    w = weights

    def loss_fn(encoder: nn.Module, out):
        extra = last_state(encoder).extra
        decisions = list(extra.get("dvit_decisions" if vit else "hier_decisions", []))
        kept = extra.get("dvit_prev_decision") if vit else None
        t_logits, t_maps = out.teacher()
        rl = ratio_loss(decisions, keep_rate) if decisions else out.logits.new_zeros(())
        kl = pixel_distill_loss(out.logits, t_logits)
        mse = map_distill_loss(out.maps[-1], t_maps[-1], None if kept is None else kept.detach())
        loss = w["clf_weight"] * out.pixel_loss + w["ratio_weight"] * rl + w["distill_weight"] * (kl + mse)
        metrics = {"pixel_loss": float(out.pixel_loss.detach()), "ratio_loss": float(rl.detach()),
                   "pixel_kl": float(kl.detach()), "map_mse": float(mse.detach())}
        for s, d in enumerate(decisions):
            metrics[f"keep_frac_s{s + 1}"] = float(d.detach().mean())
        return loss, metrics

    return loss_fn


def check_weights(defaults: dict, given: Optional[dict]) -> dict:
    """``defaults`` with the user's loss weights ``given`` (label smoothing has no per-pixel use)."""
    w = {k: v for k, v in defaults.items() if k != "label_smoothing"}
    for k, v in (given or {}).items():
        if k not in w:
            raise UserError(f"dynamicvit: unknown loss weight {k!r} for a dense model (known: {', '.join(w)})")
        w[k] = float(v)
    return w


def hierarchical_stages(keep_rate: float) -> int:
    return len(hier.keep_ratios(keep_rate))
