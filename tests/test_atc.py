"""Tests of the `atc` adapter (Agglomerative Token Clustering) against a slow, obvious reference.

The reference clusters one image at a time with Python sets, computing each linkage from its
definition on the original distances (average: mean of all member pairs; complete: the
largest; single: the smallest), not by the batched Lance-Williams updates; then runs the
whole model one image at a time with the clusters averaged by hand.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tokenbench import backbones
from tokenbench.methods.atc import agglomerative_clusters
from tokenbench.registry import apply

SITES = (3, 6, 9)


def ref_clusters(metric: torch.Tensor, k: int, linkage: str) -> list[set[int]]:
    """Clusters of the T tokens of ``metric`` [T, C], merged pair by pair."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    sim = m @ m.T
    t = len(m)
    dist = [[1.0 - float(sim[min(i, j), max(i, j)]) for j in range(t)] for i in range(t)]
    clusters = [{i} for i in range(t)]

    def link(a: set[int], b: set[int]) -> float:
        ds = [dist[i][j] for i in a for j in b]
        return {"average": sum(ds) / len(ds), "complete": max(ds), "single": min(ds)}[linkage]

    while len(clusters) > k:
        best = None
        for x in range(len(clusters)):
            for y in range(x + 1, len(clusters)):
                d = link(clusters[x], clusters[y])
                if best is None or d < best[0]:
                    best = (d, x, y)
        _, x, y = best
        clusters[x] = clusters[x] | clusters[y]
        del clusters[y]
    return clusters


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_clustering_equals_the_definition(linkage):
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(3, 20, 8, generator=g)
    rep = agglomerative_clusters(metric, 7, linkage)
    for b in range(3):
        got = {}
        for i, r in enumerate(rep[b].tolist()):
            got.setdefault(r, set()).add(i)
        want = ref_clusters(metric[b], 7, linkage)
        assert sorted(map(sorted, got.values())) == sorted(map(sorted, want))
        assert all(r == min(c) for r, c in got.items())       # the representative is the smallest index


@torch.no_grad()
def ref_forward(net, img: torch.Tensor, keep_rate: float, linkage: str, prop_attn: bool) -> torch.Tensor:
    """Logits of one image: timm's blocks written out, the clusters of the reference averaged by hand."""
    x = net.norm_pre(net._pos_embed(net.patch_embed(img[None])))[0]
    size = torch.ones(x.shape[0])
    n0 = x.shape[0] - 1
    for bi, blk in enumerate(net.blocks):
        at, n = blk.attn, x.shape[0]
        qkv = at.qkv(blk.norm1(x)).reshape(n, 3, at.num_heads, at.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        heads = []
        for h in range(at.num_heads):
            logits = (q[:, h] * at.scale) @ k[:, h].T
            if prop_attn:
                logits = logits + size.log()[None]
            heads.append(logits.softmax(-1) @ v[:, h])
        x = x + at.proj(torch.cat(heads, -1))
        if bi in SITES:
            clusters = int(n0 * keep_rate ** (SITES.index(bi) + 1))
            groups = sorted(ref_clusters(k.mean(1)[1:], clusters, linkage), key=min)
            rows, sizes = [x[0]], [size[0]]
            for grp in groups:
                idx = [j + 1 for j in sorted(grp)]
                w = size[idx] if prop_attn else torch.ones(len(idx))
                rows.append((x[idx] * w[:, None]).sum(0) / w.sum())
                sizes.append(size[idx].sum())
            x, size = torch.stack(rows), torch.stack(sizes)
            if not prop_attn:
                size = torch.ones(x.shape[0])
        x = x + blk.mlp(blk.norm2(x))
    return net.head(net.norm(x)[0])


@pytest.mark.parametrize("linkage,prop_attn", [("average", True), ("complete", False), ("single", True)])
def test_batched_model_equals_per_image_reference(linkage, prop_attn):
    net = tiny_vit()
    ref = [ref_forward(net, img, 0.6, linkage, prop_attn) for img in torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))]
    apply(net, "atc", keep_rate=0.6, linkage=linkage, prop_attn=prop_attn)
    with torch.no_grad():
        got = net(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
        tokens = backbones.last_state(net).tokens
    torch.testing.assert_close(got, torch.stack(ref).detach(), rtol=1e-4, atol=1e-4)
    assert tokens[3] == 65 and tokens[4] == 1 + int(64 * 0.6) and tokens[-1] == 1 + int(64 * 0.6 ** 3)


def test_keep_rate_one_is_the_dense_model():
    plain, net = tiny_vit(), apply(tiny_vit(), "atc", keep_rate=1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))
