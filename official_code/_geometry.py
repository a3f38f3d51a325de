"""The shape of a timm VisionTransformer, as the official model constructors take it."""

from __future__ import annotations

import torch.nn as nn


def vit_geometry(model: nn.Module) -> dict:
    """img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, num_classes."""
    pe = model.patch_embed
    block = model.blocks[0]
    dim = model.embed_dim
    img = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else pe.img_size
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
    return dict(img_size=img, patch_size=patch, embed_dim=dim, depth=len(model.blocks),
                num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / dim,
                qkv_bias=block.attn.qkv.bias is not None, num_classes=model.head.out_features)
