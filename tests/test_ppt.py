"""Tests of the `ppt` adapter (Token Pruning and Pooling) against a slow per-image reference."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from conftest import assert_counts_declared, deit_s_schedule, peak_weights, random_images, tiny_vit
from tokenbench import registry
from tokenbench.backbones import TokenState
from tokenbench.errors import UserError


def make_model(seed: int = 0):
    return peak_weights(tiny_vit(), seed)


# --------------------------------------------------------------------------- the reference

def ref_attention(blk, x, size):
    """One image's attention, written out: (output [N, C], probabilities [H, N, N], keys, values)."""
    at = blk.attn
    n = x.shape[0]
    qkv = at.qkv(blk.norm1(x)).reshape(n, 3, at.num_heads, at.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, D]
    probs = torch.stack([torch.softmax((q[:, h] @ k[:, h].T) * at.head_dim ** -0.5 + size.log(), -1)
                         for h in range(at.num_heads)])
    out = torch.cat([probs[h] @ v[:, h] for h in range(at.num_heads)], dim=-1)
    return at.proj(out), probs, k.mean(1), v


def ref_tome(x, size, keys, r):
    """ToMe's bipartite merge of one image (class token protected), token by token."""
    n = x.shape[0]
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    best = {0: (-math.inf, None)}
    for a in a_set[1:]:
        best[a] = max(((float(unit[a] @ unit[b]), b) for b in b_set), key=lambda t: t[0])
    by_score = sorted(a_set, key=lambda a: -best[a][0])
    src, unm = by_score[:r], sorted(by_score[r:])
    groups = {b: [b] for b in b_set}
    for a in src:
        groups[best[a][1]].append(a)
    order = [[a] for a in unm] + [groups[b] for b in b_set]
    new_x = torch.stack([sum(x[i] * size[i] for i in g) / sum(size[i] for i in g) for g in order])
    return new_x, torch.stack([sum(size[i] for i in g) for g in order])


def ref_ppt_step(x, size, probs, keys, v, r, threshold, variances):
    """One PPT site on one image: the significance scores, then pool (ToMe) or prune."""
    n, heads = x.shape[0], probs.shape[0]
    raw = [sum(float(probs[h, 0, j]) for h in range(heads)) * float(v[j].reshape(-1).norm()) for j in range(1, n)]
    scores = [s / sum(raw) for s in raw]
    var = statistics.variance(scores)
    variances.append(var)
    if var < threshold:
        return ref_tome(x, size, keys, r)
    ranked = [0] + sorted(range(1, n), key=lambda j: -scores[j - 1])   # class token first, then by score
    keep = ranked[:n - r]
    return x[keep], size[keep]


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("r", [8, 16, [20, 4, 9]])
def test_matches_reference_mixed_batch(r):
    """Some images pool and some prune in one batch (the threshold splits the first site's variances)."""
    model = make_model()
    imgs = random_images(model, 6, seed=3)
    rs = r if isinstance(r, list) else [r] * 3
    with torch.no_grad():
        site3 = sorted(_ref_sites(model, img[None], [rs[0], 0, 0], 0.0)[1][0] for img in imgs)
        threshold = math.sqrt(site3[2] * site3[3])             # three images pool, three prune
        want, variances = [], []
        for img in imgs:  # the reference at per-site r
            w, v = _ref_sites(model, img[None], rs, threshold)
            want.append(w)
            variances += v
        registry.apply(model, "ppt", r=r, threshold=threshold)
        got = model(imgs)
    pooled = sum(v < threshold for v in variances)
    assert 0 < pooled < len(variances)                           # both policies ran
    assert torch.allclose(got, torch.cat(want), atol=1e-4, rtol=1e-4), (got - torch.cat(want)).abs().max()


def _ref_sites(model, img, rs, threshold):
    """The reference with one r per site (3, 6, 9)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))[0]
    size, variances = torch.ones(x.shape[0]), []
    for i, blk in enumerate(model.blocks):
        out, probs, keys, v = ref_attention(blk, x, size)
        x = x + out
        if i in (3, 6, 9):
            rr = min(rs[(3, 6, 9).index(i)], (x.shape[0] - 1) // 2)
            if rr > 0:
                x, size = ref_ppt_step(x, size, probs, keys, v, rr, threshold, variances)
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.fc_norm(model.norm(x)[0]))[None], variances


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_all_prune_and_all_pool(threshold):
    """threshold 0: every image prunes; 1: every image pools (ToMe at the three sites)."""
    model = make_model(1)
    imgs = random_images(model, 3, seed=5)
    with torch.no_grad():
        want = torch.cat([_ref_sites(model, img[None], [12, 12, 12], threshold)[0] for img in imgs])
        registry.apply(model, "ppt", r=12, threshold=threshold)
        got = model(imgs)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("r", [0, 5, 50, [10, 0, 30]])
def test_token_counts(r):
    model = make_model()
    assert_counts_declared(model, "ppt", r=r)


def test_default_schedule_deit_s_geometry():
    """197 tokens, r = 50 at blocks 3, 6, 9: 147, 97, then 49 (clipped to half)."""
    tokens, tokens_mlp = deit_s_schedule("ppt")
    assert tokens == [197] * 4 + [147] * 3 + [97] * 3 + [49] * 2
    assert tokens_mlp == [197] * 3 + [147] * 3 + [97] * 3 + [49] * 3


def test_batch_independent_and_deterministic():
    """An image's prediction does not depend on its batch (the choice is per image)."""
    model = make_model()
    imgs = random_images(model, 5, seed=7)
    registry.apply(model, "ppt", r=10, threshold=2e-4)
    with torch.no_grad():
        full = model(imgs)
        again = model(imgs)
        alone = torch.cat([model(imgs[i:i + 1]) for i in range(5)])
    assert torch.equal(full, again)
    assert torch.allclose(full, alone, atol=1e-5)


@pytest.mark.parametrize("params", [dict(r=-1), dict(r=[1, 2, 3, 4]), dict(threshold=-1.0)])
def test_bad_params(params):
    with pytest.raises(UserError):
        registry.apply(make_model(), "ppt", **params)


def test_merge_drop_is_keep():
    """``TokenState.merge(..., drop=all True)`` is pruning: the same tokens and sizes as ``keep``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, generator=g)
    size = torch.rand(2, 7, 1, generator=g) + 1
    keep = torch.tensor([[0, 3, 1, 5], [0, 2, 6, 4]])
    src = torch.tensor([[2, 4, 6], [1, 3, 5]])
    a, b = TokenState(1), TokenState(1)
    a.size, b.size = size.clone(), size.clone()
    got = a.merge(x, keep, src, torch.zeros_like(src), drop=torch.ones_like(src, dtype=torch.bool))
    want = b.keep(x, keep)
    assert torch.allclose(got, want, atol=1e-6) and torch.equal(a.size, b.size)
