"""The ConvNeXt backbone: timm's ``ConvNeXt`` (``convnext_*``), the first hierarchical family.

Sites are blocks, numbered through all stages (``depth`` = every block of every stage);
``sites("stage 3")`` names the blocks of the third stage (the 14 x 14 map at 224 px), where
the journal version of DynamicViT sparsifies.  Tokens are the map's positions.

A block is the depthwise 7 x 7 convolution (the mixer, on the full map), then norm, MLP and
layer scale (the FFN, on positions), then the residual; hook kinds are the hierarchical
families' (:mod:`~tokenbench.backbones.hierarchical`).

The shared surgery (:mod:`~tokenbench.backbones.surgery`) patches the blocks, so
``forward_features``, ``forward_intermediates`` and ``features_only`` run reduced and return
the dense model's shapes at every stage.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import UserError
from .base import default_input_config, register_backbone
from .hierarchical import HierarchicalBackbone


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] map -> [B, H * W, C] tokens."""
    return x.flatten(2).transpose(1, 2)


def _map(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, H * W, C] tokens -> [B, C, H, W] map."""
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


def _ffn(block, t: torch.Tensor) -> torch.Tensor:
    """The block's norm, MLP and layer scale on tokens [B, K, C] (the slow path)."""
    if block.use_conv_mlp:  # 1x1 convolutions on a [B, C, K, 1] "map" of the positions
        t = block.mlp(block.norm(t.transpose(1, 2)[..., None]))[..., 0].transpose(1, 2)
    else:
        t = block.mlp(block.norm(t))
    return t if block.gamma is None else t * block.gamma


@register_backbone
class ConvNeXtBackbone(HierarchicalBackbone):
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

    def from_official(self, state: dict) -> dict:
        """facebookresearch/ConvNeXt's layout (``downsample_layers``, ``stages.i.j``, ``dwconv``,
        ``pwconv1/2``, ``norm``, ``head``) in timm's; ``pwconv`` weights [O, I] become the 1x1
        convolutions [O, I, 1, 1] of ``conv_mlp`` models."""
        own = self.model.state_dict()
        out = {}
        for k, v in state.items():
            k2 = k
            m = re.match(r"^downsample_layers\.(\d+)\.(\d+)\.(.+)$", k)
            if m:
                i, j, leaf = m.groups()
                k2 = f"stem.{j}.{leaf}" if i == "0" else f"stages.{i}.downsample.{j}.{leaf}"
            m = re.match(r"^stages\.(\d+)\.(\d+)\.(.+)$", k)
            if m:
                i, j, leaf = m.groups()
                leaf = {"dwconv": "conv_dw", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}.get(
                    leaf.split(".")[0], leaf.split(".")[0]) + leaf[len(leaf.split(".")[0]):]
                k2 = f"stages.{i}.blocks.{j}.{leaf}"
            elif k.startswith("norm."):
                k2 = "head." + k
            elif k in ("head.weight", "head.bias"):
                k2 = "head.fc." + k[5:]
            if k2 in own and v.numel() == own[k2].numel() and v.shape != own[k2].shape:
                v = v.reshape(own[k2].shape)
            out[k2] = v
        return out

    def final_feature_map(self, feats: torch.Tensor) -> torch.Tensor:
        """``forward_features``' map [B, C, H, W] normalised per position by the head's norm (the
        official ``self.norm(x.permute(0, 2, 3, 1))``), as tokens [B, H * W, C]."""
        head_norm = getattr(self.model.head, "norm", None)
        if isinstance(self.model.norm_pre, nn.Identity) and head_norm is not None:
            feats = head_norm(feats)  # timm's LayerNorm2d: per position over channels
        return _tokens(feats)

    def activation_bytes(self, img_size: int, itemsize: int = 4) -> int:
        peak = 0
        for s, blk in self._blocks():
            n = (img_size // self._reduction(s)) ** 2
            c = blk.conv_dw.in_channels
            peak = max(peak, n * c * (4 + 2 * 4) * itemsize)  # map, dwconv, norm and 4x MLP hidden
        return int(peak)

    def check(self, method: str = "this method", need_class_token: bool = False) -> None:
        if need_class_token:
            raise UserError(f"{method} needs a class token; ConvNeXt models have none")

    def blocks(self) -> list[nn.Module]:
        return [blk for _, blk in self._blocks()]

    # ---- the block in three parts (:class:`~tokenbench.backbones.hierarchical.HierarchicalBackbone`)
    to_tokens = staticmethod(_tokens)

    @staticmethod
    def to_map(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _map(t, like.shape[2], like.shape[3])

    @staticmethod
    def mixer(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The depthwise 7 x 7 convolution on the full map."""
        return _tokens(block.conv_dw(x))

    ffn = staticmethod(_ffn)

    @staticmethod
    def finish(block: nn.Module, out: torch.Tensor, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        return block.drop_path(_map(out, x.shape[2], x.shape[3])) + block.shortcut(x)
