"""Dense measurements: mIoU, pixel accuracy and per-class IoU with their intervals, a paired test
on per-image IoU, and the FLOPs of encoder and decoder.

mIoU follows the usual protocol: one confusion matrix accumulated over every scored pixel of
the set (pixels labelled :data:`~tokenbench.data_scenes.IGNORE` are not scored), IoU per class
= TP / (TP + FP + FN), mIoU the mean over the classes present in the labels or the
predictions.  The 95% interval is a percentile bootstrap over images (each resample sums the
per-image confusion matrices of the drawn images), seeded so a figure is reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..data_scenes import IGNORE
from ..errors import UserError

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-image confusion matrices int64 [B, K, K] (row: label, column: prediction) of
    ``pred`` and ``target`` [B, H, W]; :data:`IGNORE` pixels are left out."""
    b = pred.shape[0]
    scored = target != IGNORE
    flat = (target.clamp(0, classes - 1) * classes + pred).reshape(b, -1)
    flat = flat + torch.arange(b, device=flat.device)[:, None] * classes * classes
    flat = flat[scored.reshape(b, -1)]
    return torch.bincount(flat, minlength=b * classes * classes).reshape(b, classes, classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU of each class from a confusion matrix [..., K, K]; NaN where a class is absent from
    both labels and predictions."""
    cm = cm.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-1) + cm.sum(-2) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(cm: torch.Tensor) -> torch.Tensor:
    return iou_per_class(cm).nanmean(-1)


def pixel_accuracy(cm: torch.Tensor) -> torch.Tensor:
    cm = cm.double()
    return cm.diagonal(dim1=-2, dim2=-1).sum(-1) / cm.sum((-2, -1)).clamp(min=1)


def bootstrap_counts(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> torch.Tensor:
    """How often each of ``n`` images is drawn in each of ``samples`` resamples [samples, n]."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (samples, n), generator=g)
    return torch.zeros(samples, n, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def bootstrap_interval(per_image_cm: torch.Tensor, statistic=mean_iou, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """95% percentile bootstrap interval over images of ``statistic`` of the summed confusion matrix."""
    n, k, _ = per_image_cm.shape
    if n == 0:
        return (float("nan"), float("nan"))
    counts = bootstrap_counts(n, samples, seed)
    sums = (counts @ per_image_cm.reshape(n, k * k).double()).reshape(samples, k, k)
    vals = statistic(sums)
    lo, hi = torch.quantile(vals, torch.tensor([0.025, 0.975], dtype=vals.dtype)).tolist()
    return (lo, hi)


def per_image_iou(per_image_cm: torch.Tensor) -> list[float]:
    """Each image's mean IoU over the classes in its labels or predictions."""
    return [float(v) for v in mean_iou(per_image_cm)]


def paired_iou_test(a: Sequence[float], b: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Paired comparison of two settings on the same images' IoU: the mean difference (a - b),
    its 95% bootstrap interval over images, and the two-sided Wilcoxon signed-rank p-value."""
    if len(a) != len(b):
        raise UserError(f"a paired test needs the same images: {len(a)} against {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    d = d[~torch.isnan(d)]
    if len(d) == 0:
        return {"n": 0, "mean_diff": float("nan"), "diff_ci95": [float("nan")] * 2, "p_value": 1.0}
    means = (bootstrap_counts(len(d), samples, seed) @ d) / len(d)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    if bool((d == 0).all()):
        p = 1.0
    else:
        from scipy.stats import wilcoxon

        p = float(wilcoxon(d.numpy(), zero_method="wilcox").pvalue)
    return {"n": len(d), "mean_diff": float(d.mean()), "diff_ci95": [lo, hi], "p_value": p}


def evaluate_dense(model: nn.Module, dataset, classes: int, batch_size: int = 64, device: str = "cpu",
                   precision: str = "fp32", progress: bool = False) -> dict[str, Any]:
    """mIoU and pixel accuracy in percent with 95% bootstrap intervals, per-class IoU and per-image IoU.

    Logits are resized to the label's size when the model predicts at another resolution."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from .env import resolve_device
    from .forward import eval_mode, precision_context

    dev = resolve_device(device)
    ctx, note = precision_context(dev, precision)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    model.to(dev)
    cms: list[torch.Tensor] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    prog = None
    if progress:
        from rich.progress import Progress

        prog = Progress(transient=True)
        prog.start()
        task = prog.add_task("eval", total=len(dataset))
    try:
        with eval_mode(model), torch.inference_mode():
            for x, y in loader:
                x, y = x.to(dev), y.to(dev)
                with ctx:
                    logits = model(x)
                logits = logits.float()
                if logits.dim() != 4 or logits.shape[1] != classes:
                    raise UserError(f"the model gives outputs of shape {tuple(logits.shape)}, not per-pixel scores "
                                    f"for {classes} classes [B, {classes}, H, W]")
                if not torch.isfinite(logits).all():
                    raise UserError("the model produced NaN or infinite logits; mIoU would be meaningless")
                if logits.shape[-2:] != y.shape[-2:]:
                    logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
                cms.append(confusion(logits.argmax(1), y, classes).cpu())
                if prog:
                    prog.update(task, advance=len(y))
    finally:
        if prog:
            prog.stop()
    if not cms:
        raise UserError("the evaluation set is empty")
    per_image = torch.cat(cms)
    total = per_image.sum(0)
    ious = iou_per_class(total)
    out = {
        "miou": 100.0 * float(ious.nanmean()),
        "miou_ci95": [100.0 * v for v in bootstrap_interval(per_image)],
        "pixel_accuracy": 100.0 * float(pixel_accuracy(total)),
        "pixel_accuracy_ci95": [100.0 * v for v in bootstrap_interval(per_image, pixel_accuracy)],
        "per_class_iou": [None if math.isnan(v) else 100.0 * v for v in ious.tolist()],
        "n": len(per_image),
        "pixels": int(total.sum()),
        "per_image_iou": per_image_iou(per_image),
    }
    if note:
        out["precision_note"] = note
    return out


class _Encoder(nn.Module):
    """The encoder's part of a dense model's forward (its feature maps), for counting apart."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.features(x))


def dense_flops(model: nn.Module, img_size: Optional[int] = None, inputs: Optional[torch.Tensor] = None
                ) -> dict[str, Any]:
    """GFLOPs per image (fvcore, multiply-add = 1) of the whole dense model, its encoder and its
    decoder (the difference: the decoder's head and the upsampling to pixels).

    ``inputs`` (real images, for a method whose token count depends on the image): the encoder is
    counted on each (:func:`tokenbench.measure.flop_count.flops`, the mean) and the decoder, which
    always sees the whole feature map, once; ``flops_images`` says how many were counted."""
    from .flop_count import flops, fvcore_count
    from .forward import eval_mode, example_input

    dev = next(model.parameters()).device
    x = example_input(model, 1, img_size, device=dev)
    with eval_mode(model), torch.no_grad():
        total, _ = fvcore_count(model, x)
        enc, _ = fvcore_count(_Encoder(model), x)
    out = {"gflops": total / 1e9, "gflops_backbone": enc / 1e9, "gflops_decoder": (total - enc) / 1e9,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if inputs is not None:
        per = flops(_Encoder(model), img_size=img_size, inputs=inputs, max_images=len(inputs))
        out.update(gflops_backbone=per["gflops"], gflops=per["gflops"] + out["gflops_decoder"],
                   flops_images=per["flops_images"])
        if "gflops_per_image" in per:
            out["gflops_backbone_per_image"] = per["gflops_per_image"]
    return out
