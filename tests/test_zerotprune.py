"""Tests of the `zerotprune` adapter (WPR importance + similarity pruning) against a slow, per-image reference."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_deterministic, assert_refused, assert_unchanged_by, random_images, tiny_vit
from tokenbench import registry
from tokenbench.backbones import last_state
from tokenbench.methods.zerotprune import iterations, split_r, zero_tprune_keep


# --------------------------------------------------------------------------- the reference, one image at a time

def ref_scores(attn, tokens, iters, cls_init, eir, vhf, var_min, var_max, p):
    """WPR on the sub-graph ``tokens`` (list of sequence positions) of ``attn`` [H, N, N], heads
    aggregated; returns {position: importance} of the non-prefix tokens."""
    h = attn.shape[0]
    per_head = []
    for hh in range(h):
        sub = attn[hh].double()[tokens][:, tokens]
        sub = sub / sub.sum(1, keepdim=True)
        n = len(tokens)
        s = [1.0] * n
        if cls_init:
            s[0] = math.sqrt(n)
        total = sum(s)
        s = torch.tensor([v / total for v in s], dtype=torch.float64)
        for _ in range(iters):
            s = sub.T @ s                               # s_i <- sum_j A[j, i] s_j
        per_head.append(s[p:])
    keep_heads = list(range(h))
    if vhf:
        good = []
        for hh in range(h):
            rel = per_head[hh] / per_head[hh].mean()
            var = ((rel - rel.mean()) ** 2).mean()
            if var_min <= var <= var_max:
                good.append(hh)
        keep_heads = good or keep_heads
    out = {}
    for t, pos in enumerate(tokens[p:]):
        vals = [float(per_head[hh][t]) for hh in keep_heads]
        out[pos] = math.sqrt(sum(v * v for v in vals) / len(vals)) if eir else sum(vals) / len(vals)
    return out


def ref_keep(attn, keys, p, r_s, r_i, iters, cls_init=True, eir=True, vhf=True, var_min=0.01, var_max=0.7):
    """One pruning layer for one image: attn [H, N, N], keys [N, C]; the kept positions."""
    n_all = attn.shape[-1]
    tokens = list(range(n_all))
    if r_s:
        pre = ref_scores(attn, tokens, 1, cls_init, eir, vhf, var_min, var_max, p)
        order = sorted(pre, key=lambda t: (pre[t], t))
        half = (n_all - p) // 2
        group_a, group_b = order[:half], order[half:]
        best = {}
        for a in group_a:
            ka = keys[a] / keys[a].norm()
            best[a] = max(float(ka @ (keys[b] / keys[b].norm())) for b in group_b)
        pruned = sorted(group_a, key=lambda a: -best[a])[:r_s]
        tokens = [t for t in tokens if t not in pruned]
    if r_i:
        imp = ref_scores(attn, tokens, iters, cls_init, eir, vhf, var_min, var_max, p)
        kept = sorted(imp, key=lambda t: -imp[t])[:len(imp) - r_i]
        tokens = tokens[:p] + sorted(kept)
    return tokens


def test_one_layer_matches_reference():
    torch.manual_seed(3)
    b, h, n, p = 3, 2, 21, 1
    logits = torch.randn(b, h, n, n) * 2
    attn = logits.softmax(-1)
    keys = torch.randn(b, n, 6)
    for r_s, r_i, iters in [(0, 5, 30), (4, 0, 5), (3, 4, 5), (10, 1, 1)]:
        for opts in [dict(), dict(eir=False, vhf=False), dict(cls_init=False, var_min=0.0, var_max=0.3)]:
            got = zero_tprune_keep(attn, keys, p, r_s, r_i, iters, None if opts.get("cls_init") is False else 0,
                                   **{k: v for k, v in opts.items() if k != "cls_init"})
            for i in range(b):
                want = ref_keep(attn[i], keys[i], p, r_s, r_i, iters, **opts)
                assert got[i].tolist() == want, (r_s, r_i, iters, opts, i)


def test_wpr_converges_to_the_stationary_distribution():
    # A^T s = s at convergence: the eigenvector of A^T for eigenvalue 1 (paper, Sec. 3.1)
    from tokenbench.methods.zerotprune import weighted_pagerank, wpr_init

    torch.manual_seed(0)
    attn = torch.randn(1, 1, 9, 9, dtype=torch.float64).softmax(-1)
    s = weighted_pagerank(attn, wpr_init(1, 1, 9, 0, "cpu", torch.float64), 200)
    torch.testing.assert_close((s[0, 0] @ attn[0, 0]), s[0, 0])
    assert abs(float(s.sum()) - 1) < 1e-12


# --------------------------------------------------------------------------- the model

@pytest.mark.parametrize("params", [{}, {"r": 3, "s_share": 0.0}, {"r": 5, "s_share": 1.0, "cls_init": False},
                                    {"r": 40}, {"r": [7, 7, 6, 0, 6]}])
def test_declared_schedule_is_real(params):
    m = registry.apply(tiny_vit(), "zerotprune", **params)
    with torch.no_grad():
        m(random_images(m, 2))
    st = last_state(m)
    assert (st.tokens, st.tokens_mlp) == registry.get_method("zerotprune")().expected_tokens(m, **params)
    assert st.tokens_mlp[-1] >= 2  # at least one patch token beside the class token


def test_model_keeps_what_the_reference_keeps():
    # the first block of the tiny model, by hand: the kept tokens are the reference's
    m = registry.apply(tiny_vit(), "zerotprune", r=6)
    ref = tiny_vit()
    x = random_images(m, 2)
    with torch.no_grad():
        m(x)
        t = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        blk = ref.blocks[0]
        at = blk.attn
        y = blk.norm1(t)
        bsz, n, _ = y.shape
        qkv = at.qkv(y).reshape(bsz, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        attn = ((q * at.scale) @ k.transpose(-2, -1)).softmax(-1)
        kept = [ref_keep(attn[i], k[i].mean(0), 1, *split_r(6, 64, 0.5), iterations(0, 12, 30, 5, 1))
                for i in range(bsz)]
    assert last_state(m).tokens_mlp[0] == len(kept[0])
    # same kept positions: the state's grid positions after block 0 are the kept patches
    m2 = registry.apply(tiny_vit(), "zerotprune", r=6)
    m2.blocks = m2.blocks[:1]
    with torch.no_grad():
        m2(x)
    pos = last_state(m2).pos
    for i in range(bsz):
        assert pos[i, 1:].tolist() == [t - 1 for t in kept[i][1:]]


def test_bad_parameters_and_determinism_and_identity():
    assert_refused("zerotprune", {"r": -1}, {"s_share": 1.5}, {"iters_first": 0}, {"var_min": -1}, {"rr": 3})
    assert_deterministic(registry.apply(tiny_vit(), "zerotprune"))
    assert_unchanged_by(tiny_vit(), "zerotprune", r=0)
    assert not registry.get_method("zerotprune").reduces({"r": 0})


def test_a_per_block_r_lets_the_search_land_between_constants(tmp_path):
    """A list r prunes that many tokens in each block; the matched-FLOPs search's candidates
    then include r + 1 over the first blocks and r after, so it lands closer than a constant."""
    from tokenbench.sweep import FlopsSearch

    m = registry.apply(tiny_vit(), "zerotprune", r=[4, 4, 3])
    with torch.no_grad():
        m(random_images(m, 2))
    st = last_state(m)
    assert st.tokens_mlp[:4] == [65 - 4, 65 - 8, 65 - 11, 65 - 11]
    s = FlopsSearch(tmp_path / "cache.json")
    cls = registry.get_method("zerotprune")
    from conftest import register_tiny_timm

    name = register_tiny_timm("tb_ztp_tiny_vit")
    res = s.search(name, None, cls, {}, "r", 0.7, tolerance=0.01)
    consts = [s.count(name, None, "zerotprune", {"r": r}) / s.dense(name, None) for r in range(1, 6)]
    assert abs(res.ratio - 0.7) <= min(abs(c - 0.7) for c in consts) + 1e-12
    assert isinstance(res.value, list) or abs(res.ratio - 0.7) <= 0.01
