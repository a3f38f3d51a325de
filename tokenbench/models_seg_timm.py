"""A dense model over any timm backbone: a linear head on its feature maps, and rebuilding one
from a trained checkpoint.

The head follows DINOv2's linear probe for segmentation: the backbone's feature maps from
timm's ``forward_intermediates`` (the last block's with ``linear``, the last four
concatenated with ``linear4``), upsampled to the first map's resolution, BatchNorm and a
1 x 1 convolution to the classes; logits bilinearly upsampled to pixels.  By default the
backbone is frozen (the probe); ``frozen=False`` fine-tunes it with the head.

A trained model's architecture is written to ``config.json`` beside its ``model.pt`` (by
``tokenbench train``); :func:`checkpoint_arch` reads it back so that ``tokenbench eval
--checkpoint`` rebuilds the same model before loading the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .models_seg import LinearHead, SegModel

HEADS = {"linear": 1, "linear4": 4}  # decoder name -> how many of the last feature maps it reads


def build_timm_seg(backbone: str, classes: int, head: str = "linear", frozen: bool = True,
                   pretrained: bool = False) -> SegModel:
    """timm model ``backbone`` (no classifier) with a linear head predicting ``classes`` per pixel."""
    import timm

    from .backbones import input_config

    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    if not timm.is_model(backbone):
        from .errors import did_you_mean

        raise UserError(f"unknown model {backbone!r}{did_you_mean(backbone, timm.list_models())}: a dense model "
                        "is default-seg, default-convnext-seg or a timm backbone")
    encoder = timm.create_model(backbone, pretrained=pretrained, num_classes=0)
    if not hasattr(encoder, "forward_intermediates"):
        raise UserError(f"{backbone} has no forward_intermediates in this timm version: its feature maps cannot be "
                        "read for a segmentation head")
    cfg = input_config(encoder)
    c, s = cfg["in_chans"], cfg["img_size"]
    encoder.eval()
    with torch.no_grad():
        maps = encoder.forward_intermediates(torch.zeros(1, c, s, s), indices=HEADS[head], intermediates_only=True)
    channels = sum(m.shape[1] for m in maps)
    arch = {"family": "timm", "backbone": backbone, "classes": classes, "decoder": head, "frozen": frozen,
            "img_size": s, "in_chans": c, "mean": list(cfg["mean"]), "std": list(cfg["std"])}
    return SegModel(encoder, LinearHead(channels, classes), HEADS[head], arch)


def build_dense(model: str, arch: Optional[dict] = None) -> SegModel:
    """A dense model from its architecture: a timm backbone's (``arch["family"] == "timm"``) or an
    embedded dense model's (``arch`` overriding its defaults)."""
    from .models_seg import build_seg_model

    if arch and arch.get("family") == "timm":
        return build_timm_seg(arch["backbone"], int(arch["classes"]), arch.get("decoder", "linear"),
                              bool(arch.get("frozen", True)))
    return build_seg_model(model, arch)


def checkpoint_arch(checkpoint) -> Optional[dict]:
    """The dense model a checkpoint holds, from the ``config.json`` a segmentation training wrote
    beside it: ``{"model": ..., "arch": ...}``, or None (no such file, or another task's run)."""
    cfg_path = Path(checkpoint).parent / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    if cfg.get("task") != "segmentation" or not isinstance(cfg.get("arch"), dict):
        return None
    return {"model": cfg.get("model"), "arch": cfg["arch"]}
