"""The ConvNeXt backbone: timm's ``ConvNeXt`` (``convnext_*``), the first hierarchical family.

Sites are blocks, numbered through all stages (``depth`` = every block of every stage);
``sites("stage 3")`` names the blocks of the third stage (the 14 x 14 map at 224 px), where
the journal version of DynamicViT sparsifies.  Tokens are the map's positions.

Hook kind: ``plan.subset[i] = fn(block, tokens, st) -> (idx, fast)``.  Block ``i`` runs its
depthwise 7 x 7 convolution on the full map (so the map and every later layer are untouched),
then its expensive part (norm, MLP, layer scale) only on the positions ``idx`` [B, K] (the
slow path) and ``fast`` (a module on [B, N, C] tokens, or None for nothing) on all the others,
and scatters both back into the full map before the residual
(:func:`~tokenbench.backbones.base.run_on_subset`).

The surgery swaps the class of the hooked blocks only (parameters and state-dict keys
untouched), so ``forward_features``, ``forward_intermediates`` and ``features_only`` keep
working and return the dense model's shapes at every stage.  The token state of one forward
starts at the first hooked block that sees a block index not above the previous one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .base import SURGERY_ATTR, Backbone, Plan, Surgery, default_input_config, register_backbone, run_on_subset, surgery_of
from .tokens import TokenState


def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``ConvNeXtBlock.forward`` with the plan's slow / fast split at this block."""
    s: Surgery = self._tb_surgery
    i = self._tb_index
    st = s.state
    if st is None or i <= st.block:  # a new forward
        st = TokenState(0, track_source=s.track_source)
        st.settings = s.plan.settings
        st.image_ids = s.image_ids if s.image_ids is not None else torch.arange(x.shape[0])
        s.state = st
    st.block = i
    hook = s.plan.subset.get(i)
    shortcut = x
    x = self.conv_dw(x)
    b, c, h, w = x.shape
    if st.record:
        st.tokens.append(h * w)
    tokens = x.flatten(2).transpose(1, 2)                               # [B, N, C]

    def slow(t: torch.Tensor) -> torch.Tensor:
        if self.use_conv_mlp:  # 1x1 convolutions on a [B, C, K, 1] "map" of the selected positions
            t = self.mlp(self.norm(t.transpose(1, 2)[..., None]))[..., 0].transpose(1, 2)
        else:
            t = self.mlp(self.norm(t))
        return t if self.gamma is None else t * self.gamma

    if hook is None:
        out = slow(tokens)
        if st.record:
            st.tokens_mlp.append(h * w)
    else:
        idx, fast = hook(self, tokens, st)
        if st.record:
            st.tokens_mlp.append(int(idx.shape[1]))
        out = run_on_subset(slow, tokens, idx, fast)
    out = out.transpose(1, 2).reshape(b, -1, h, w)
    return self.drop_path(out) + self.shortcut(shortcut)


_BLOCK_CLASSES: dict[type, type] = {}


def _reducing_block_class(base: type) -> type:
    if base not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[base] = type(f"Reducing{base.__name__}", (base,), {"forward": _block_forward})
    return _BLOCK_CLASSES[base]


@register_backbone
class ConvNeXtBackbone(Backbone):
    name = "convnext"
    describes = "timm ConvNeXt models (convnext_*)"
    site_names = ("stage 1", "stage 2", "stage 3", "stage 4", "every")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.convnext import ConvNeXt

        return isinstance(model, ConvNeXt)

    def _blocks(self) -> list[tuple[int, nn.Module]]:
        """(stage index, block) of every block, in order."""
        return [(s, blk) for s, stage in enumerate(self.model.stages) for blk in stage.blocks]

    @property
    def depth(self) -> int:
        return len(self._blocks())

    def _reduction(self, stage: int) -> int:
        """The stride of a stage's map relative to the input."""
        info = getattr(self.model, "feature_info", None) or []
        return int(info[stage]["reduction"]) if stage < len(info) else 4 * 2 ** stage

    @property
    def grid(self) -> tuple[int, int]:
        """The third stage's map (where DynamicViT's journal version acts)."""
        side = self.input_config()["img_size"] // self._reduction(2)
        return side, side

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def width(self) -> int:
        return int(self.model.stages[2].blocks[0].conv_dw.in_channels)

    def dense_tokens(self) -> list[int]:
        s = self.input_config()["img_size"]
        return [(s // self._reduction(st)) ** 2 for st, _ in self._blocks()]

    def sites(self, where: str) -> list[int]:
        if where == "every":
            return list(range(self.depth))
        if where.startswith("stage ") and where[6:].isdigit():
            k = int(where[6:]) - 1
            return [i for i, (s, _) in enumerate(self._blocks()) if s == k]
        return super().sites(where)

    def input_config(self) -> dict:
        out = default_input_config()
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if "input_size" in cfg:
            out["img_size"] = int(cfg["input_size"][-1])
        if "mean" in cfg:
            out["mean"], out["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
        stem = next(m for m in self.model.stem.modules() if isinstance(m, nn.Conv2d))
        out["in_chans"] = int(stem.in_channels)
        out["num_classes"] = getattr(self.model, "num_classes", None)
        return out

    def activation_bytes(self, img_size: int, itemsize: int = 4) -> int:
        peak = 0
        for s, blk in self._blocks():
            n = (img_size // self._reduction(s)) ** 2
            c = blk.conv_dw.in_channels
            peak = max(peak, n * c * (4 + 2 * 4) * itemsize)  # map, dwconv, norm and 4x MLP hidden
        return int(peak)

    def prepare(self, method: str = "method", need_class_token: bool = False,
                track_source: bool = False) -> Plan:
        if need_class_token:
            raise UserError(f"{method} needs a class token; ConvNeXt models have none")
        model = self.model
        plan = Plan(self.depth, method)
        s = surgery_of(model)
        if s is None:
            s = Surgery(model.__class__, plan, track_source)
            model.__dict__[SURGERY_ATTR] = s
        else:
            s.plan, s.track_source = plan, track_source
        for i, (_, blk) in enumerate(self._blocks()):
            if not hasattr(blk, "_tb_index"):
                blk.__class__ = _reducing_block_class(blk.__class__)
            object.__setattr__(blk, "_tb_index", i)
            object.__setattr__(blk, "_tb_surgery", s)
        return plan

    def restore(self) -> nn.Module:
        model = self.model
        s = surgery_of(model)
        if s is None:
            return model
        for _, blk in self._blocks():
            if hasattr(blk, "_tb_index"):
                blk.__class__ = blk.__class__.__mro__[1]
                for a in ("_tb_index", "_tb_surgery"):
                    blk.__dict__.pop(a, None)
        for name in s.added:
            if name in model._modules:
                del model._modules[name]
        del model.__dict__[SURGERY_ATTR]
        return model

    def last_state(self) -> Optional[TokenState]:
        s = surgery_of(self.model)
        return None if s is None else s.state
