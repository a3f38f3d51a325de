"""Tests of the `mctf` adapter (Multi-Criteria Token Fusion) against a slow per-image reference."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_counts_declared, deit_s_schedule, peak_weights, random_images, tiny_vit
from tokenbench import registry
from tokenbench.backbones import last_state
from tokenbench.errors import UserError


def make_model(seed: int = 0):
    return peak_weights(tiny_vit(), seed)


# --------------------------------------------------------------------------- the reference

def ref_attention_probs(blk, x, size, prop_attn):
    """[H, N, N] softmax attention of one image's block input, head by head."""
    at = blk.attn
    n = x.shape[0]
    qkv = at.qkv(blk.norm1(x)).reshape(n, 3, at.num_heads, at.head_dim)
    q, k = qkv[:, 0], qkv[:, 1]
    bias = size.log() if prop_attn else torch.zeros(n)
    return torch.stack([torch.softmax((q[:, h] @ k[:, h].T) * at.head_dim ** -0.5 + bias, -1)
                        for h in range(at.num_heads)])


def ref_groups(x, probs, size, have_size, r, taus, bidirection):
    """The official two-step matching on one image, pair by pair: the kept tokens' groups, in order."""
    tau_sim, tau_info, tau_size = taus
    n = x.shape[0]
    recv = probs.mean(dim=(0, 1))
    info = [float(1 / recv[i]) for i in range(n)]
    info = [v / max(info) for v in info]
    inv_size = [float(1 / size[i]) for i in range(n)]
    inv_size = [v / max(inv_size) for v in inv_size]

    unit = x / x.norm(dim=-1, keepdim=True)
    cosine = (unit @ unit.T).tolist()

    def weight(a, b):
        cos = cosine[a][b]
        w = ((cos + 1) / 2) ** (1 / tau_sim) if tau_sim else 1.0
        if tau_info:
            w *= (info[a] * info[b]) ** (1 / tau_info)
        if tau_size and have_size:
            w *= (inv_size[a] * inv_size[b]) ** (1 / tau_size)
        return w

    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    best = {a: max(((weight(a, b), b) for b in b_set), key=lambda t: t[0]) for a in a_set[1:]}
    ranked = sorted(a_set[1:], key=lambda a: -best[a][0])
    src, unm = ranked[:r1], [0] + sorted(ranked[r1:])
    groups = {b: [b] for b in b_set}
    for a in src:
        groups[best[a][1]].append(a)
    a_groups = {a: [a] for a in unm}
    if bidirection:
        back = {b: max(((weight(a, b) if a else float("-inf"), a) for a in unm), key=lambda t: t[0]) for b in b_set}
        ranked_b = sorted(b_set, key=lambda b: -back[b][0])
        for b in ranked_b[:r2]:
            a_groups[back[b][1]] += groups[b]
        b_kept = ranked_b[r2:]
    else:
        b_kept = b_set
    return [a_groups[a] for a in unm] + [groups[b] for b in b_kept]


def ref_forward(model, img, r, taus=(1.0, 20.0, 40.0), bidirection=True, one_step_ahead=1,
                pooling=1, prop_attn=True):
    """The whole model on one image; fusion before the attention of blocks 1..11, as the official block."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    size, have_size = torch.ones(x.shape[0]), False
    for i, blk in enumerate(model.blocks):
        at = blk.attn
        n = x.shape[0]
        rr = r if i > 0 else 0
        rr = min(n - 10 if n - rr < 10 else rr, (n - 1) // 2)
        probs = ref_attention_probs(blk, x, size, prop_attn)
        if rr > 0:
            groups = ref_groups(x, probs, size, have_size, rr, taus, bidirection)
            recv = probs.mean(dim=(0, 1))
            w = {0: size, 1: recv * size / size.max(), 3: torch.ones(n)}[pooling]
            x = torch.stack([sum(w[j] * x[j] for j in g) / sum(w[j] for j in g) for g in groups])
            member = torch.zeros(len(groups), n)                   # member[g, j] = 1: token j is in group g
            for gi, g in enumerate(groups):
                member[gi, g] = 1.0
            # rows: w-weighted mean over the query group; columns: sum over the key group
            new = (member * w) @ probs @ member.T / (member @ w)[:, None]   # [H, K, K]
            size, have_size = torch.stack([sum(size[j] for j in g) for g in groups]), True
            probs = new if one_step_ahead == 1 else ref_attention_probs(blk, x, size, prop_attn)
        v = at.qkv(blk.norm1(x)).reshape(x.shape[0], 3, at.num_heads, at.head_dim)[:, 2]
        out = torch.cat([probs[h] @ v[:, h] for h in range(at.num_heads)], dim=-1)
        x = x + at.proj(out)
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.fc_norm(model.norm(x)[0]))


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("params", [
    dict(r=4),
    dict(r=6, one_step_ahead=2),
    dict(r=5, bidirection=False, pooling=0),
    dict(r=3, pooling=3, tau_sim=2.0, tau_info=0.0, tau_size=10.0),
    dict(r=7, prop_attn=False),
])
def test_matches_reference(params):
    model = make_model()
    imgs = random_images(model, 2, seed=2)
    kw = dict(params)
    r = kw.pop("r")
    taus = (kw.pop("tau_sim", 1.0), kw.pop("tau_info", 20.0), kw.pop("tau_size", 40.0))
    with torch.no_grad():
        want = torch.stack([ref_forward(model, img, r, taus, **kw) for img in imgs])
        registry.apply(model, "mctf", **params)
        got = model(imgs)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("r", [0, 4, 16, 40, [0, 3, 9, 0, 20]])
def test_token_counts(r):
    model = make_model()
    assert_counts_declared(model, "mctf", r=r)


def test_default_schedule_deit_s_geometry():
    """197 tokens, r = 16 in blocks 1..11 (the official DeiT-S evaluation)."""
    tokens, tokens_mlp = deit_s_schedule("mctf")
    assert tokens == tokens_mlp == [197 - 16 * i for i in range(12)]


def test_batch_independent_and_deterministic():
    model = make_model()
    imgs = random_images(model, 4, seed=9)
    registry.apply(model, "mctf", r=5)
    with torch.no_grad():
        full, again = model(imgs), model(imgs)
        alone = torch.cat([model(imgs[i:i + 1]) for i in range(4)])
    assert torch.equal(full, again)
    assert torch.allclose(full, alone, atol=1e-5)


def test_next_attention_is_consumed():
    """The one-step-ahead attention handed to a block is used once and cleared."""
    model = make_model()
    registry.apply(model, "mctf", r=4)
    with torch.no_grad():
        model(random_images(model, 2))
    assert "mctf_ahead" not in last_state(model).extra


def test_ahead_attention_equals_the_fused_matrix():
    """The block's product with the unfused matrix (columns reading their group's value, rows
    pooled after) equals the official fused matrix times the fused values."""
    from tokenbench.methods.mctf import ahead_attention, bidirectional_matching, group_sum

    torch.manual_seed(4)
    b, h, n, hd, r = 2, 3, 17, 5, 5
    attn = torch.randn(b, h, n, n, dtype=torch.float64).softmax(-1)
    scores = torch.randn(b, (n + 1) // 2, n // 2, dtype=torch.float64)
    scores[:, 0] = float("-inf")
    f = bidirectional_matching(scores, r)
    w = torch.rand(b, n, 1, dtype=torch.float64) + 0.1
    norm = group_sum(w, f, dim=1)
    k = f.keep_idx.shape[1]
    v = torch.randn(b, h, k, hd, dtype=torch.float64)
    fused = group_sum(group_sum(attn, f, dim=3) * w[:, None], f, dim=2) / norm[:, None]   # [B, H, K, K]
    want = (fused @ v).transpose(1, 2).reshape(b, k, h * hd)
    given = ahead_attention(attn, f, w, norm)
    v_old = v.gather(2, given.group[:, None, :, None].expand(-1, h, -1, hd))
    got = given.pool((given.attn @ v_old).transpose(1, 2).reshape(b, n, h * hd))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("params", [dict(r=-1), dict(r=[1] * 13), dict(one_step_ahead=0),
                                    dict(pooling=2), dict(tau_info=-1.0)])
def test_bad_params(params):
    with pytest.raises(UserError):
        registry.apply(make_model(), "mctf", **params)


@pytest.mark.parametrize("kw", [dict(class_token=False, global_pool="avg"), dict(reg_tokens=2)])
def test_refuses_other_prefixes(kw):
    with pytest.raises(UserError):
        registry.apply(tiny_vit(**kw), "mctf")
