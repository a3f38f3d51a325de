"""Tests of the `evit` adapter (keep attentive tokens, fuse the rest) against a slow, obvious reference."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import (VIT_SMALL, VIT_TINY, assert_batch_independent, assert_counts_declared,
                      assert_matches_reference, peaked_vit, random_images, ref_attend, ref_embed, ref_head)
import torch
from hypothesis import given, settings, strategies as st

from tokenbench import registry
from tokenbench.errors import UserError
from tokenbench.backbones.vit import quarter_sites
from tokenbench.backbones import backbone_of, last_state, plan_of, set_track_source

TINY, SMALL = VIT_TINY, VIT_SMALL
VARIANTS = ("cls", "distilled", "registers")  # EViT needs a class token
make_model = peaked_vit
images = random_images


# --------------------------------------------------------------------------- the reference

def ref_forward(model, imgs, keep_rate, fuse_token, sites=(3, 6, 9)):
    """The whole model, one image at a time, attention written out per head and query.

    Returns the logits and, per image, the original tokens each final token stands for.
    """
    p = model.num_prefix_tokens
    logits, all_members = [], []
    for img in imgs:
        x = ref_embed(model, img)
        members = [{i} for i in range(x.shape[0])]
        for bi, blk in enumerate(model.blocks):
            n = x.shape[0]
            x, _, cls_attn = ref_attend(blk, x)  # cls_attn: the class token's attention, mean over heads
            if bi in sites:
                keep = math.ceil(keep_rate * (n - p))
                if keep < n - p:
                    ranked = sorted(range(p, n), key=lambda j: -float(cls_attn[j]))
                    kept, dropped = ranked[:keep], sorted(ranked[keep:])
                    order = list(range(p)) + kept
                    new_x = [x[j] for j in order]
                    new_members = [members[j] for j in order]
                    if fuse_token:
                        fused = torch.zeros_like(x[0])
                        for j in dropped:  # raw class attention as weights, not renormalised
                            fused = fused + cls_attn[j] * x[j]
                        new_x.append(fused)
                        new_members.append(set().union(*(members[j] for j in dropped)))
                    x, members = torch.stack(new_x), new_members
            x = x + blk.mlp(blk.norm2(x))
        logits.append(ref_head(model, x))
        all_members.append(members)
    return torch.stack(logits), all_members


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant,keep_rate,fuse_token", [
    ("cls", 0.7, True),
    ("cls", 0.7, False),
    ("cls", 0.5, True),
    ("cls", 0.9, True),
    ("cls", 0.25, False),
    ("distilled", 0.6, True),
    ("registers", 0.7, True),
])
def test_matches_reference(variant, keep_rate, fuse_token):
    assert_matches_reference("evit", lambda m, x: ref_forward(m, x, keep_rate, fuse_token), variant,
                             keep_rate=keep_rate, fuse_token=fuse_token)


def test_matches_reference_float32():
    assert_matches_reference("evit", lambda m, x: ref_forward(m, x, 0.7, True), dtype=torch.float32, n=2)


def test_other_depth_uses_quarter_sites():
    model = make_model("cls", dict(TINY, depth=8)).double()
    imgs = images(model, 2, dtype=torch.float64)
    assert quarter_sites(8) == [2, 4, 6]
    registry.apply(model, "evit", keep_rate=0.6)
    with torch.no_grad():
        out = model(imgs)
        ref, _ = ref_forward(model, imgs, 0.6, True, sites=(2, 4, 6))
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_default_schedule():
    m = registry.get_method("evit")
    assert m.defaults() == {"keep_rate": 0.7, "fuse_token": True}
    assert m.knob == "keep_rate" and m.needs_class_token and not m.learned
    model = make_model("cls", SMALL)  # 1 + 64 tokens
    tokens, mlp = m().expected_tokens(model)
    # 64 -> ceil(44.8) = 45 (+1 fused); the fused token counts as a token next time: ceil(0.7 * 46) = 33 (+1) ...
    assert mlp == [65] * 3 + [47] * 3 + [35] * 3 + [26] * 3
    assert tokens == [65] * 4 + [47] * 3 + [35] * 3 + [26] * 2
    assert m().expected_tokens(model, fuse_token=False)[1][-1] == 1 + 23  # 64 -> 45 -> 32 -> 23


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("keep_rate,fuse_token", [(0.7, True), (0.7, False), (0.05, True), (0.99, True), (1.0, True)])
def test_token_counts(variant, keep_rate, fuse_token):
    model = make_model(variant, TINY)
    assert_counts_declared(model, "evit", keep_rate=keep_rate, fuse_token=fuse_token)


def test_batch_consistency():
    model = make_model("cls")
    registry.apply(model, "evit", keep_rate=0.5)
    assert_batch_independent(model, images(model, 4), deterministic=False)


@pytest.mark.parametrize("fuse_token", [True, False])
def test_keep_rate_one_is_unchanged(fuse_token):
    model = make_model("cls")
    imgs = images(model, 2)
    with torch.no_grad():
        dense = model(imgs)
        registry.apply(model, "evit", keep_rate=1.0, fuse_token=fuse_token)
        out = model(imgs)
    assert torch.equal(out, dense) or torch.allclose(out, dense, atol=1e-6, rtol=1e-6)
    assert last_state(model).tokens_mlp == [65] * 12
    assert not plan_of(model).mid  # nothing installed


@pytest.mark.parametrize("params", [
    {"keep_rate": 0}, {"keep_rate": 1.5}, {"keep_rate": -1}, {"keep_rate": "half"}, {"keep_rate": float("nan")},
    {"fuse_token": "maybe"}, {"r": 4}, {"keep": 0.5},
])
def test_bad_params(params):
    model = make_model("cls", TINY)
    with pytest.raises(UserError):
        registry.apply(model, "evit", **params)


@pytest.mark.parametrize("variant", ["cls", "distilled"])
def test_source_map_partitions_patches(variant):
    model = make_model(variant, TINY)
    registry.apply(model, "evit", keep_rate=0.6)
    set_track_source(model, True)
    with torch.no_grad():
        model(images(model, 3))
    st_ = last_state(model)
    assert [s["block"] for s in st_.stages] == [3, 6, 9] and all(s["kind"] == "fuse" for s in st_.stages)
    p = model.num_prefix_tokens
    n0 = backbone_of(model).num_patches + p
    for j, (s, tm) in enumerate(zip(st_.stages, [st_.tokens_mlp[i] for i in (3, 6, 9)])):
        src = s["source"]
        assert src.shape == (3, tm, n0) and s["fused_last"]
        assert set(src.unique().tolist()) <= {0.0, 1.0}
        assert torch.all(src.sum(1) == 1)  # every original token in exactly one token
        assert torch.all(src.sum(2) >= 1)
        if j == 0:  # first site: the kept tokens are single patches, the fused one stands for the rest
            assert torch.all(src[:, :-1].sum(2) == 1) and torch.all(src[:, -1].sum(1) == n0 - tm + 1)
        assert torch.equal(src[:, :p, :p], torch.eye(p).expand(3, p, p))  # prefix tokens untouched, in front


def test_source_map_without_fusion():
    model = make_model("cls", TINY)
    registry.apply(model, "evit", keep_rate=0.6, fuse_token=False)
    set_track_source(model, True)
    with torch.no_grad():
        model(images(model, 3))
    stages = last_state(model).stages
    assert [s["kind"] for s in stages] == ["prune"] * 3
    kept = [1 + 16]
    for s in stages:
        src = s["source"]
        assert torch.all(src.sum(2) == 1) and torch.all(src.sum(1) <= 1)  # dropped patches are gone
        assert int(src.sum(1)[0].sum()) == src.shape[1] < kept[-1]
        kept.append(src.shape[1])


# ---- the pure functions

def test_complement_and_topk():
    mod = sys.modules[registry.get_method("evit").__module__]
    attn = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.4, 0.0, 0.2, 0.1, 0.3]])
    idx = mod.attentive_tokens(attn, 3)
    assert idx.tolist() == [[1, 3, 0], [0, 4, 2]]  # most attended first
    assert mod.complement(idx, 5).tolist() == [[2, 4], [1, 3]]  # increasing order
    assert mod.complement(torch.tensor([[1, 2]]), 4).tolist() == [[0, 3]]  # 0 dropped
    assert mod.n_kept(0.7, 64) == 45 and mod.n_kept(1.0, 64) == 64


@settings(max_examples=10, deadline=None)
@given(st.floats(0.01, 1.0), st.booleans(), st.sampled_from(["cls", "distilled"]))
def test_keep_rates_property(keep_rate, fuse_token, variant):
    model = make_model(variant, TINY)
    _, tokens_mlp = assert_counts_declared(model, "evit", keep_rate=keep_rate, fuse_token=fuse_token)
    assert all(t >= model.num_prefix_tokens + 1 for t in tokens_mlp)
