"""What the hierarchical families (ConvNeXt, Swin) share: one block forward over a block in
three parts, which each family names (:class:`HierarchicalBackbone`).

A hierarchical block is a *mixer* on the full map (ConvNeXt's depthwise convolution, Swin's
shifted-window attention with its residual), an *FFN* on positions (norm, MLP, layer scale)
and a *finish* that adds the FFN's output to its residual and returns the map.  Because the
mixer always sees the full map, a method can run the FFN on some positions only and a fast
path on the others (:func:`~tokenbench.backbones.base.run_on_subset`): the map keeps its
shape, so every later layer (and a detection or segmentation head) sees the usual map.

Hook kinds of a hierarchical block ``i``, in order:

- ``plan.pre[i] = fn(block, tokens, st) -> None``: observes the block's input map as tokens
  [B, N, C] (where DynamicViT's journal version runs its predictors); it cannot change it;
- ``plan.block[i] = fn(block, x, st) -> map or None``: replaces the block's forward when it
  returns a map (a method's own form of the block, built from the family's parts, e.g.
  DynamicViT's two-stream training); None: the usual forward;
- ``plan.subset[i] = fn(block, tokens, st) -> (idx, fast)``: the FFN on the positions ``idx``
  [B, K] only and ``fast`` (a module on [B, M, C] tokens, or None for nothing) on the others;
  ``tokens``: the mixer's output [B, N, C].

``plan.on_start`` hooks run at the first block of each forward, as ``fn(model, x, st)`` with
the first block's input map ``x``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import Backbone, run_on_subset
from .surgery import begin_forward, block_surgery


class HierarchicalBackbone(Backbone):
    """A family whose blocks split into mixer, FFN and finish (the five functions below)."""

    @staticmethod
    def to_tokens(x: torch.Tensor) -> torch.Tensor:
        """A block's map -> tokens [B, N, C]."""
        raise NotImplementedError

    @staticmethod
    def to_map(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, C'] -> a map laid out as the block map ``like`` (any channel count)."""
        raise NotImplementedError

    @staticmethod
    def mixer(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block's mixer on its input map ``x``, as tokens [B, N, C]."""
        raise NotImplementedError

    @staticmethod
    def ffn(block: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The block's FFN on tokens [B, K, C] (the slow path)."""
        raise NotImplementedError

    @staticmethod
    def finish(block: nn.Module, out: torch.Tensor, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The block's output map from the FFN's output tokens ``out``, its input map ``x`` and
        the mixer's output tokens ``mixed`` (each family's residuals)."""
        raise NotImplementedError

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.block_forward = staticmethod(_block_forward_of(cls))


_FORWARDS: dict[type, object] = {}


def _block_forward_of(family: type[HierarchicalBackbone]):
    if family in _FORWARDS:
        return _FORWARDS[family]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The family's block forward with the plan's hooks at this block (``pre``, ``block``,
        ``subset``)."""
        s, i = block_surgery(self)
        st = begin_forward(s, i, x)
        plan = s.plan
        pre = plan.pre.get(i)
        if pre is not None:
            pre(self, family.to_tokens(x), st)
        replace = plan.block.get(i)
        if replace is not None:
            out = replace(self, x, st)
            if out is not None:
                return out
        mixed = family.mixer(self, x)                                  # [B, N, C], the full map
        n = mixed.shape[1]
        if st.record:
            st.tokens.append(n)
        hook = plan.subset.get(i)
        if hook is None:
            out = family.ffn(self, mixed)
            if st.record:
                st.tokens_mlp.append(n)
        else:
            idx, fast = hook(self, mixed, st)
            if st.record:
                st.tokens_mlp.append(int(idx.shape[1]))
            out = run_on_subset(lambda t: family.ffn(self, t), mixed, idx, fast)
        return family.finish(self, out, x, mixed)

    forward.__name__ = f"{family.__name__}_block_forward"
    _FORWARDS[family] = forward
    return forward
