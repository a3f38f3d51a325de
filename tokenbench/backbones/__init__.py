"""The backbone layer: the only code that knows a model family's insides.

The harness asks :func:`backbone_of` (depth, sites, tokens, grid, input configuration,
analytic cost) and the functions below (install and remove the surgery, read the last
forward's token state); methods resolve their sites through it and change tokens only
through :class:`TokenState`'s primitives.  One block-level surgery serves every family
(``surgery``; ``hierarchical`` for the block forward ConvNeXt and Swin share), so every entry
point of a reduced model runs reduced.  One file per model family: ``vit`` (timm's
VisionTransformer), ``convnext`` and ``swin`` (the slow / fast path split of hierarchical models).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..errors import UserError

from . import vit as _vit  # noqa: F401  (registers the ViT backbone)
from . import convnext as _convnext  # noqa: F401,I001  (registers the ConvNeXt backbone, after the ViT's)
from . import swin as _swin  # noqa: F401,I001  (registers the Swin backbone)
from .base import (Backbone, Plan, backbone_of, complement, default_input_config, known_backbones, register_backbone,
                   run_on_subset)
from .surgery import Surgery, image_ids, surgery_of
from .tokens import AttnInfo, TokenState, gather_tokens

__all__ = ["AttnInfo", "Backbone", "Plan", "TokenState", "add_module", "added_modules", "applied_method",
           "backbone_of", "complement", "gather_tokens", "image_ids", "input_config", "is_prepared", "known_backbones",
           "last_state", "plan_of", "plan_settings", "prepare", "register_backbone", "restore", "run_on_subset", "set_track_source"]


def prepare(model: nn.Module, method: str = "method", need_class_token: bool = False,
            track_source: bool = False) -> Plan:
    """Install the reducing forward on ``model`` (in place) and return its empty :class:`Plan`."""
    return backbone_of(model, method).prepare(method, need_class_token, track_source)


def restore(model: nn.Module) -> nn.Module:
    """The plain timm model again (a method's added modules removed); a plain model is returned as is."""
    if surgery_of(model) is None:
        return model
    return backbone_of(model).restore()


def is_prepared(model: nn.Module) -> bool:
    return surgery_of(model) is not None


def last_state(model: nn.Module) -> Optional[TokenState]:
    """The token bookkeeping of the model's last forward (None before the first, or if plain)."""
    s = surgery_of(model)
    return None if s is None else s.state


def set_track_source(model: nn.Module, on: bool = True) -> None:
    """Keep a source map and per-stage snapshots in the state of the next forwards."""
    if surgery_of(model) is None:
        prepare(model, "none")
    surgery_of(model).track_source = on


def add_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Attach a method's learned module (removed again by :func:`restore`)."""
    s = surgery_of(model)
    if s is None:
        raise RuntimeError("add_module: prepare the model first")
    model.add_module(name, module)
    if name not in s.added:
        s.added.append(name)


def added_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules a method attached (their weights belong to the method)."""
    s = surgery_of(model)
    return () if s is None else tuple(s.added)


def applied_method(model: nn.Module) -> dict:
    """``{"name", "params"}`` of the method applied to ``model`` ({} for a plain model)."""
    s = surgery_of(model)
    return {} if s is None else dict(s.method)


def plan_of(model: nn.Module) -> Optional[Plan]:
    """The plan (hooks per block) of the method applied to ``model``; None for a plain model."""
    s = surgery_of(model)
    return None if s is None else s.plan


def plan_settings(model: nn.Module) -> dict:
    """The applied method's plan settings: values its training hooks change between steps."""
    s = surgery_of(model)
    if s is None:
        raise RuntimeError("plan_settings: no method is applied to this model")
    return s.plan.settings


def input_config(model: Optional[nn.Module]) -> dict:
    """img_size, in_chans, mean, std, patch_size, num_classes of ``model`` (ImageNet's for None)."""
    if model is None:
        return default_input_config()
    try:
        return backbone_of(model).input_config()
    except UserError:  # a family without a backbone (refused where a method needs one): timm's config
        out = default_input_config()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" in cfg:
            out["in_chans"], out["img_size"] = int(cfg["input_size"][0]), int(cfg["input_size"][-1])
        if "mean" in cfg:
            out["mean"], out["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
        out["num_classes"] = getattr(model, "num_classes", None)
        return out
