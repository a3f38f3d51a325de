"""The Swin backbone: timm's ``SwinTransformer`` (``swin_*_patch4_window7_224``), the second
hierarchical family.

Sites are blocks, numbered through all stages (``depth`` = every block of every stage);
``sites("stage 3")`` names the blocks of the third stage (the 14 x 14 map at 224 px), where
the journal version of DynamicViT sparsifies.  Tokens are the map's positions.  Swin is built
for one input size (``img_size`` of ``timm.create_model``; the attention masks of the shifted
windows are computed for it), so the input configuration is the size it was built for.

Hook kinds (the contract of the hierarchical backbones, as ``convnext``):

- ``plan.subset[i] = fn(block, tokens, st) -> (idx, fast)``.  Block ``i`` runs its mixer on
  the full map (norm1, the shifted-window attention with its masks, the residual), so the
  windows and every later layer are untouched; then its FFN (norm2 and MLP) only on the
  positions ``idx`` [B, K] (the slow path) and ``fast`` (a module on [B, M, C] tokens, or None
  for nothing) on the N - K others, both scattered back into the full map before the FFN's
  residual (:func:`~tokenbench.backbones.base.run_on_subset`).  ``tokens`` [B, N, C]: the map
  after the attention residual.
- ``plan.pre[i] = fn(block, tokens, st) -> None``: observes block ``i``'s input map as tokens
  [B, N, C] (where DynamicViT's journal version runs its predictors); it cannot change it.
- ``plan.streams[i] = fn(block, tokens, st) -> (mask, fast)``, training mode only: the
  official two-stream ``AdaSwinTransformerBlock`` (:func:`~tokenbench.backbones.base.run_two_streams`):
  the streams mixed with ``mask`` [B, N, 1] before the attention, the attention and its
  residual on the mixed map, the FFN on stream 1 and ``fast`` (on [B, N, C]) on stream 2,
  each added to the attention's output; the block returns the merged map and keeps the pair
  in the state for the next block.  ``tokens``: the input map, as ``pre`` sees it.  In eval
  mode the block uses ``subset``.

``plan.on_start`` hooks run at the first block of each forward, as ``fn(model, x, st)`` with
the patch embedding's map ``x`` [B, H, W, C].  Blocks without a hook run timm's operations
exactly.

Deviation from the official ``models/dyswin.py``: its ``BasicLayer`` merges the two streams at
the end of the stage with ``if len(x) == 2``, which in eval mode is also true of a batch of two
images (the map, not a pair of streams) and then fails; here every block hands the merged map
on (the pair rides in the token state), so nothing tests the batch size.

The shared surgery (:mod:`~tokenbench.backbones.surgery`) patches the blocks, so
``forward_features``, ``forward_intermediates`` and ``features_only`` run reduced and return
the dense model's shapes at every stage.

:func:`official_to_timm` maps a state dict in the key layout of Microsoft's Swin code (the
layout of the official Swin and DynamicSwin checkpoints) to timm's.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .base import (Backbone, default_input_config, enter_streams, leave_streams,
                   mix_streams, register_backbone, run_on_subset, run_two_streams)
from .surgery import begin_forward, block_surgery
from .tokens import TokenState


def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``SwinTransformerBlock.forward`` ([B, H, W, C] in and out) with the plan's hooks at
    this block: ``pre`` (observes the input map), ``subset`` (the slow / fast split of the FFN)
    or, in training mode, ``streams`` (the two-stream form)."""
    s, i = block_surgery(self)
    st = begin_forward(s, i, x)
    b, h, w, c = x.shape
    pre = s.plan.pre.get(i)
    if pre is not None:
        pre(self, x.reshape(b, h * w, c), st)
    if self.training and i in s.plan.streams:
        return _two_stream_forward(self, x, st, s.plan.streams[i])
    hook = s.plan.subset.get(i)
    x = x + self.drop_path1(self._attn(self.norm1(x)))                  # the mixer, on the full map
    tokens = x.reshape(b, h * w, c)                                      # [B, N, C]
    if st.record:
        st.tokens.append(h * w)
    if hook is None:
        out = _ffn(self, tokens)
        if st.record:
            st.tokens_mlp.append(h * w)
    else:
        idx, fast = hook(self, tokens, st)
        if st.record:
            st.tokens_mlp.append(int(idx.shape[1]))
        out = run_on_subset(lambda t: _ffn(self, t), tokens, idx, fast)
    return (tokens + self.drop_path2(out)).reshape(b, h, w, c)


def _two_stream_forward(self, x: torch.Tensor, st: TokenState, hook) -> torch.Tensor:
    """The official ``AdaSwinTransformerBlock`` in training: mix the streams with the hook's
    mask, the attention and its residual on the mixed map, FFN on stream 1, ``fast`` on stream
    2, each added to the attention's output; returns the merged map (the pair stays in the
    state)."""
    b, h, w, c = x.shape
    mask, fast = hook(self, x.reshape(b, h * w, c), st)                 # [B, N, 1]
    x1, x2 = enter_streams(st, x)
    m = mask.reshape(b, h, w, 1)
    x0 = mix_streams(x1, x2, m)
    mixed = (x0 + self.drop_path1(self._attn(self.norm1(x0)))).reshape(b, h * w, c)
    if st.record:
        st.tokens.append(h * w)
        st.tokens_mlp.append(h * w)
    slow, quick = run_two_streams(lambda t: _ffn(self, t), fast, mixed, x1.reshape(b, h * w, c),
                                  x2.reshape(b, h * w, c), mask)
    y1 = (mixed + self.drop_path2(slow)).reshape(b, h, w, c)
    y2 = (mixed + self.drop_path2(quick)).reshape(b, h, w, c)
    return leave_streams(st, y1, y2, m)


def _ffn(block, t: torch.Tensor) -> torch.Tensor:
    """The block's norm2 and MLP on tokens [B, K, C] (the slow path)."""
    return block.mlp(block.norm2(t))


@register_backbone
class SwinBackbone(Backbone):
    name = "swin"
    describes = "timm Swin Transformers (swin_*_patch4_window7_224)"
    site_names = ("stage 1", "stage 2", "stage 3", "stage 4", "every")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    def _blocks(self) -> list[tuple[int, nn.Module]]:
        """(stage index, block) of every block, in order."""
        return [(s, blk) for s, stage in enumerate(self.model.layers) for blk in stage.blocks]

    def _stage_map(self, stage: int) -> tuple[int, int]:
        """(rows, columns) of a stage's map at the size the model was built for."""
        h, w = self.model.layers[stage].output_resolution
        return int(h), int(w)

    @property
    def depth(self) -> int:
        return len(self._blocks())

    @property
    def grid(self) -> tuple[int, int]:
        """The third stage's map (where DynamicViT's journal version acts)."""
        return self._stage_map(min(2, len(self.model.layers) - 1))

    @property
    def num_patches(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def width(self) -> int:
        return int(self.model.layers[min(2, len(self.model.layers) - 1)].blocks[0].dim)

    def dense_tokens(self) -> list[int]:
        out = []
        for s, _ in self._blocks():
            h, w = self._stage_map(s)
            out.append(h * w)
        return out

    def sites(self, where: str) -> list[int]:
        if where == "every":
            return list(range(self.depth))
        if where.startswith("stage ") and where[6:].isdigit():
            k = int(where[6:]) - 1
            return [i for i, (s, _) in enumerate(self._blocks()) if s == k]
        return super().sites(where)

    def input_config(self) -> dict:
        out = default_input_config()
        pe = self.model.patch_embed
        out["img_size"] = int(pe.img_size[0])      # the size its window masks were built for
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if "mean" in cfg:
            out["mean"], out["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
        out["in_chans"] = int(pe.proj.in_channels)
        out["patch_size"] = int(pe.patch_size[0])
        out["num_classes"] = getattr(self.model, "num_classes", None)
        return out

    def block_cost(self, tokens: list, tokens_mlp: list) -> Optional[float]:
        """Multiply-adds per image of the blocks: qkv and projection on every position,
        window attention (each position against its window), the MLP on ``tokens_mlp`` positions
        and a fast path (one Linear(C, C), as DynamicViT's) on the others."""
        cost = 0.0
        for (_, blk), n, m in zip(self._blocks(), tokens, tokens_mlp):
            c, hidden = blk.dim, blk.mlp.fc1.out_features
            area = blk.window_size[0] * blk.window_size[1]
            cost += 4 * n * c * c + 2 * n * area * c + 2 * m * c * hidden + (n - m) * c * c
        return float(cost)

    def from_official(self, state: dict) -> dict:
        """microsoft/Swin-Transformer's layout (:func:`official_to_timm`) in timm's; a state dict
        already in timm's layout passes unchanged."""
        return official_to_timm(state) if is_official_layout(state) else state

    def final_feature_map(self, feats: torch.Tensor) -> torch.Tensor:
        """``forward_features``' map [B, H, W, C], already normalised by the model's final norm
        (the official ``featmap = self.norm(x)``), as tokens [B, H * W, C]."""
        return feats.reshape(feats.shape[0], -1, feats.shape[-1])

    def activation_bytes(self, img_size: int, itemsize: int = 4) -> int:
        peak = 0
        scale = img_size / self.input_config()["img_size"]
        for s, blk in self._blocks():
            h, w = self._stage_map(s)
            n = int(h * scale) * int(w * scale)
            area = blk.window_size[0] * blk.window_size[1]
            heads = blk.attn.num_heads
            # map, norm, q/k/v, attention output, 4x MLP hidden; one fp32 window matrix per head
            peak = max(peak, n * blk.dim * (6 + 2 * 4) * itemsize + heads * n * area * 4)
        return int(peak)

    # ---- surgery
    def check(self, method: str = "this method", need_class_token: bool = False) -> None:
        if need_class_token:
            raise UserError(f"{method} needs a class token; Swin Transformers have none")

    def blocks(self) -> list[nn.Module]:
        return [blk for _, blk in self._blocks()]

    block_forward = _block_forward


# --------------------------------------------------------------------------- official key layout

_OFFICIAL_BUFFERS = ("relative_position_index", "attn_mask")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def is_official_layout(state_dict: dict) -> bool:
    """Whether a Swin state dict is in the layout of Microsoft's code: its first stage ends
    with a downsampling layer (timm's first stage has none) or its head is a bare Linear."""
    return any(k.startswith("layers.0.downsample.") for k in state_dict) or "head.weight" in state_dict


def official_to_timm(state_dict: dict) -> dict:
    """A Swin state dict in the layout of Microsoft's code (the official Swin and DynamicSwin
    checkpoints; ``{"model": ...}`` is unwrapped) with timm's keys.

    Differences: the official code downsamples at the end of stage ``i`` (``layers.i.downsample``),
    timm at the start of stage ``i + 1``; the official head is a Linear (``head.weight``), timm's
    a ``ClassifierHead`` (``head.fc.weight``); the official stores its ``relative_position_index``
    and ``attn_mask`` buffers, which timm computes (dropped).  The patch merging concatenates
    the 2 x 2 neighbours in the same order in both, so no weight is permuted.  Keys the dense
    model does not have (DynamicSwin's ``score_predictor`` and ``fastmlp``) pass through
    unchanged, for the method to map.
    """
    sd = state_dict.get("model", state_dict)
    out = {}
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in _OFFICIAL_BUFFERS:
            continue
        k = _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        if k.startswith("head.") and not k.startswith("head.fc."):
            k = "head.fc." + k[5:]
        out[k] = v
    return out
