"""The official DynamicViT (raoyongming/DynamicViT): ``VisionTransformerDiffPruning`` with our
weights, the prediction modules included."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from . import importing_from, load_same_weights
from ._geometry import vit_geometry

SITES = [3, 6, 9]  # the official DeiT pruning_loc


def build(dense: nn.Module, ours: nn.Module, clone: Path, keep_rate=0.7) -> nn.Module:
    """The official model at ``token_ratio = [k, k^2, k^3]`` (as its ``main.py``), loading
    ``ours``' state dict (backbone and ``score_predictor.*``).  The official forward counts
    14 x 14 patches: a 224-px, patch-16 model only."""
    g = vit_geometry(dense)
    if (g["img_size"] // g["patch_size"]) ** 2 != 196:
        raise ValueError("the official DynamicViT hard-codes 14 x 14 patches (224 px, patch 16)")
    with importing_from(clone):
        from models.dyvit import VisionTransformerDiffPruning

        net = VisionTransformerDiffPruning(pruning_loc=SITES, token_ratio=[keep_rate, keep_rate ** 2, keep_rate ** 3],
                                           distill=True, **g)
    load_same_weights(net, ours.state_dict())
    return net.eval()
