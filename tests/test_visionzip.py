"""Tests of the `visionzip` adapter against a slow, per-image reference.

The reference runs timm's blocks one image at a time, attention written out per head; after
block ``layer`` it picks the dominant tokens by the class row summed over heads, walks the
remaining tokens in a Python loop to find each one's most similar target, and builds every
contextual token as ``target + mean(assigned)``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tokenbench import backbones
from tokenbench.errors import UserError
from tokenbench.registry import apply


@torch.no_grad()
def ref_forward(net, img: torch.Tensor, layer: int, dominant: int, contextual: int) -> torch.Tensor:
    x = net.norm_pre(net._pos_embed(net.patch_embed(img[None])))[0]
    for bi, blk in enumerate(net.blocks):
        at, n = blk.attn, x.shape[0]
        qkv = at.qkv(blk.norm1(x)).reshape(n, 3, at.num_heads, at.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        heads, cls_row = [], torch.zeros(n)
        for h in range(at.num_heads):
            a = ((q[:, h] * at.scale) @ k[:, h].T).softmax(-1)
            heads.append(a @ v[:, h])
            cls_row = cls_row + a[0]
        x = x + at.proj(torch.cat(heads, -1))
        x = x + blk.mlp(blk.norm2(x))
        if bi == layer:
            top = sorted(torch.topk(cls_row[1:], dominant).indices.tolist())
            keep = [x[0]] + [x[j + 1] for j in top]
            rest = [j for j in range(n - 1) if j not in top]
            if contextual:
                metric = k.mean(1)[1:]
                step = max(1, len(rest) // contextual)
                targets = list(range(0, len(rest), step))[:contextual]
                groups = {t: [] for t in targets}
                for i in range(len(rest)):
                    if i in targets:
                        continue
                    m = metric[rest[i]] / metric[rest[i]].norm()
                    sims = [float(m @ (metric[rest[t]] / metric[rest[t]].norm())) for t in targets]
                    groups[targets[sims.index(max(sims))]].append(rest[i])
                for t in targets:
                    extra = torch.stack([x[j + 1] for j in groups[t]]).mean(0) if groups[t] else 0
                    keep.append(x[rest[t] + 1] + extra)
            x = torch.stack(keep)
    return net.head(net.norm(x)[0])


@pytest.mark.parametrize("params,dominant,contextual", [
    ({"keep_rate": 0.5, "contextual": 5, "layer": 3}, 27, 5),
    ({"keep_rate": 0.25, "contextual": -1, "layer": -2}, 14, 2),    # the official share: round(16 * 10 / 64)
    ({"keep_rate": 0.4, "contextual": 0, "layer": 5}, 25, 0),       # FasterVLM
])
def test_batched_model_equals_per_image_reference(params, dominant, contextual):
    net = tiny_vit()
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layer = params["layer"] % 12
    ref = torch.stack([ref_forward(net, img, layer, dominant, contextual) for img in imgs])
    apply(net, "visionzip", **params)
    with torch.no_grad():
        got = net(imgs)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    tokens = backbones.last_state(net).tokens
    assert tokens[layer] == 65 and tokens[layer + 1] == 1 + dominant + contextual


def test_a_layer_outside_the_model_is_refused():
    with pytest.raises(UserError, match="layer=12 is out of range"):
        apply(tiny_vit(), "visionzip", layer=12)
