"""The official EViT (youweiliang/evit): its ``EViT`` model with our weights."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from . import importing_from, load_same_weights
from ._geometry import vit_geometry

SITES = (3, 6, 9)  # the official DeiT-S drop_loc, as ours (the quarter points of 12 blocks)


def build(dense: nn.Module, ours: nn.Module, clone: Path, keep_rate=0.7, fuse_token: bool = True) -> nn.Module:
    """``evit.EViT`` shaped like ``dense`` (12 blocks), ``keep_rate`` at blocks 3, 6, 9."""
    g = vit_geometry(dense)
    if g["depth"] != 12:
        raise ValueError("the official EViT sites (3, 6, 9) are for 12 blocks")
    with importing_from(clone):
        from evit import EViT

        rates = [1.0] * g["depth"]
        for i in SITES:
            rates[i] = keep_rate
        net = EViT(keep_rate=tuple(rates), fuse_token=fuse_token, **g)
    load_same_weights(net, dense.state_dict())
    return net.eval()
