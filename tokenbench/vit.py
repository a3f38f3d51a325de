"""Deprecated location of the ViT surgery: kept so that method plugins written for 0.1 still import.

New code imports from :mod:`tokenbench.backbones` (``backbone_of(model)``, ``TokenState``,
``AttnInfo``, ``prepare`` / ``restore``, ``last_state``).  Nothing in tokenbench itself
imports this module.
"""

from __future__ import annotations

import torch.nn as nn

from .backbones import (AttnInfo, Plan, TokenState, add_module, backbone_of, image_ids, last_state,  # noqa: F401
                        prepare, restore, set_track_source)
from .backbones.vit import attention as _attention, quarter_sites as depth_sites  # noqa: F401
from .methods._policy import softmax_with_policy  # noqa: F401
from .methods._staged import keep_counts, staged_schedule as _staged_schedule  # noqa: F401


def check_vit(model: nn.Module, method: str = "this method", need_class_token: bool = False) -> None:
    backbone_of(model, method).check(method, need_class_token)


def num_patches(model: nn.Module) -> int:
    return backbone_of(model).num_patches


def staged_schedule(model: nn.Module, keep_rate: float, where: str = "mid"):
    return _staged_schedule(backbone_of(model), keep_rate, where)


def attention(mod: nn.Module, x, state, need_keys: bool = False, need_attn: bool = False):
    """The 0.1 signature of :func:`tokenbench.backbones.vit.attention`."""
    needs = (("keys",) if need_keys else ()) + (("cls_attn",) if need_attn else ())
    return _attention(mod, x, state, needs, policy_softmax=softmax_with_policy)
