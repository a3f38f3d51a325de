"""The Swin backbone: timm's ``SwinTransformer`` (``swin_*_patch4_window7_224``), the second
hierarchical family.

Sites are blocks, numbered through all stages (``depth`` = every block of every stage);
``sites("stage 3")`` names the blocks of the third stage (the 14 x 14 map at 224 px), where
the journal version of DynamicViT sparsifies.  Tokens are the map's positions.  Swin is built
for one input size (``img_size`` of ``timm.create_model``; the attention masks of the shifted
windows are computed for it), so the input configuration is the size it was built for.

A block is norm1, the shifted-window attention and its residual (the mixer, on the full map,
so the windows and their masks are untouched), then norm2 and the MLP (the FFN, on
positions), then the FFN's residual; hook kinds are the hierarchical families'
(:mod:`~tokenbench.backbones.hierarchical`).

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
from .base import default_input_config, register_backbone
from .hierarchical import HierarchicalBackbone


def _ffn(block, t: torch.Tensor) -> torch.Tensor:
    """The block's norm2 and MLP on tokens [B, K, C] (the slow path)."""
    return block.mlp(block.norm2(t))


@register_backbone
class SwinBackbone(HierarchicalBackbone):
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

    # ---- the block in three parts (:class:`~tokenbench.backbones.hierarchical.HierarchicalBackbone`)
    @staticmethod
    def to_tokens(x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c)

    @staticmethod
    def to_map(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = like.shape
        return t.reshape(b, h, w, -1)

    @staticmethod
    def mixer(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """norm1, the shifted-window attention (with its masks) and its residual, on the full map."""
        b, h, w, c = x.shape
        return (x + block.drop_path1(block._attn(block.norm1(x)))).reshape(b, h * w, c)

    ffn = staticmethod(_ffn)

    @staticmethod
    def finish(block: nn.Module, out: torch.Tensor, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        return (mixed + block.drop_path2(out)).reshape(x.shape)


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
