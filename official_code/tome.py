"""The official ToMe (facebookresearch/ToMe): its ``tome.patch.timm`` on a copy of our dense timm model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn as nn

from . import importing_from


def build(dense: nn.Module, ours: nn.Module, clone: Path, r=16, prop_attn: bool = True) -> nn.Module:
    """The official patch applied to a copy of ``dense`` (a timm VisionTransformer), with
    ``model.r = r``.  ToMe has no weights of its own: ``ours`` is not read."""
    net = copy.deepcopy(dense).eval()
    with importing_from(clone):
        import tome

        tome.patch.timm(net, prop_attn=prop_attn)
    net.r = list(r) if isinstance(r, (list, tuple)) else r
    return net
