"""Tests of the `tome` adapter (Token Merging) against a slow, obvious reference."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import (VIT_SMALL, VIT_TINY, VIT_VARIANTS, assert_batch_independent, assert_counts_declared,
                      assert_matches_reference, assert_unchanged_by, peaked_vit, random_images, ref_attend,
                      ref_embed, ref_head)
import torch
from hypothesis import given, settings, strategies as st

from tokenbench import registry
from tokenbench.errors import UserError
from tokenbench.backbones import backbone_of, last_state, set_track_source

TINY, SMALL, VARIANTS = VIT_TINY, VIT_SMALL, tuple(VIT_VARIANTS)
make_model = peaked_vit
images = random_images


# --------------------------------------------------------------------------- the reference

def tome_groups(keys, n, r, p):
    """ToMe's matching on one image, token by token: (A tokens that stay, B tokens with the A tokens
    merged into each), prefix tokens left out."""
    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    unit = [keys[i] / keys[i].norm() for i in range(n)]
    best = {}
    for a in a_set:
        if a < p:  # protected: never merged away
            best[a] = (-math.inf, None)
            continue
        cands = [(float(unit[a] @ unit[b]), b) for b in b_set if b >= p]  # nothing merges into prefix tokens
        best[a] = max(cands, key=lambda t: t[0])
    by_score = sorted(a_set, key=lambda a: -best[a][0])
    src, stay = by_score[:r], by_score[r:]
    if p > 0:
        stay = sorted(stay)
    into = {b: [b] for b in b_set}
    for a in src:
        into[best[a][1]].append(a)
    return [a for a in stay if a >= p], [into[b] for b in b_set if b >= p]


def ref_merge(x, size, keys, members, r, p):
    """One ToMe merge on one image, token by token.

    x [N, C], size [N], keys [N, D] (averaged over heads), members: list of sets of
    original tokens.  Returns the new x, size, members.
    """
    n = x.shape[0]
    r = min(r, (n - p) // 2)
    if r <= 0:
        return x, size, members
    stay, merged = tome_groups(keys, n, r, p)
    groups = [[i] for i in range(p)] + [[a] for a in stay] + merged  # prefix tokens first, in their order
    new_x = torch.stack([sum(x[i] * size[i] for i in g) / sum(size[i] for i in g) for g in groups])
    new_size = torch.stack([sum(size[i] for i in g) for g in groups])
    new_members = [set().union(*(members[i] for i in g)) for g in groups]
    return new_x, new_size, new_members


def ref_forward(model, imgs, r_list, prop_attn=True):
    """The whole model, one image at a time, attention written out per head and query."""
    p = model.num_prefix_tokens
    logits, all_members = [], []
    for img in imgs:
        x = ref_embed(model, img)
        n0 = x.shape[0]
        size = torch.ones(n0, dtype=x.dtype)
        members = [{i} for i in range(n0)]
        for blk, r in zip(model.blocks, r_list):
            x, k, _ = ref_attend(blk, x, size.log() if prop_attn else None)
            if r > 0:
                x, size, members = ref_merge(x, size, k.mean(1), members, r, p)
            x = x + blk.mlp(blk.norm2(x))
        logits.append(ref_head(model, x, size))
        all_members.append(members)
    return torch.stack(logits), all_members


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant,r,prop_attn", [
    ("cls", 8, True),
    ("cls", [3, 0, 9, 2, 5], True),
    ("cls", 4, False),
    ("avg", 8, True),
    ("avg", [5, 7, 1], True),
    ("distilled", 6, True),
    ("registers", 6, True),
])
def test_matches_reference(variant, r, prop_attn):
    r_list = r + [0] * (12 - len(r)) if isinstance(r, list) else [r] * 12
    assert_matches_reference("tome", lambda m, x: ref_forward(m, x, r_list, prop_attn), variant, r=r,
                             prop_attn=prop_attn)


def test_matches_reference_float32():
    """The float32 path (fused attention with the size mask) against the float64 reference."""
    assert_matches_reference("tome", lambda m, x: ref_forward(m, x, [8] * 12), dtype=torch.float32, n=2, r=8)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("r", [0, 1, 4, 16, 40, [2, 9, 0, 30]])
def test_token_counts(variant, r):
    model = make_model(variant, TINY)
    want = assert_counts_declared(model, "tome", r=r)
    n = backbone_of(model).num_patches + model.num_prefix_tokens
    assert want[0][0] == n
    for t, tm in zip(*want):  # at most half of the non-prefix tokens merge in a block
        assert t - tm <= (t - model.num_prefix_tokens) // 2


def test_default_and_known_schedule():
    m = registry.get_method("tome")
    assert m.defaults() == {"r": 16, "prop_attn": True}
    assert m.knob == "r" and not m.needs_class_token and not m.learned
    model = make_model("cls", SMALL)  # 65 tokens
    tokens, mlp = m().expected_tokens(model, r=8)
    assert tokens[:4] == [65, 57, 49, 41]
    assert mlp[-1] == 2 and tokens[-1] == 2  # clipped: min(8, (t - 1) // 2)


@pytest.mark.parametrize("variant", ["cls", "avg"])
def test_batch_consistency(variant):
    model = make_model(variant)
    registry.apply(model, "tome", r=[6, 8, 3, 10, 4, 7])
    assert_batch_independent(model, images(model, 4), deterministic=False)


def test_r_zero_is_unchanged():
    model = make_model("cls")
    assert_unchanged_by(model, "tome", 1e-5, r=0)
    assert last_state(model).tokens_mlp == [65] * 12


@pytest.mark.parametrize("params", [
    {"r": -1}, {"r": [2, -3]}, {"r": 1.5}, {"r": "many"}, {"r": list(range(13))},
    {"prop_attn": "sometimes"}, {"keep_rate": 0.5}, {"rr": 3},
])
def test_bad_params(params):
    model = make_model("cls", TINY)
    with pytest.raises(UserError):
        registry.apply(model, "tome", **params)


def test_refuses_non_vit():
    with pytest.raises(UserError):
        registry.apply(torch.nn.Linear(3, 3), "tome")


@pytest.mark.parametrize("variant", ["cls", "avg", "distilled"])
def test_source_map_partitions_patches(variant):
    model = make_model(variant, TINY)
    registry.apply(model, "tome", r=[3, 4, 2, 0, 5, 2])
    set_track_source(model, True)
    with torch.no_grad():
        model(images(model, 3))
    st_ = last_state(model)
    assert [s["block"] for s in st_.stages] == [0, 1, 2, 4, 5] and {s["kind"] for s in st_.stages} == {"merge"}
    p = model.num_prefix_tokens
    n0 = backbone_of(model).num_patches + p
    for s, tm in zip(st_.stages, [st_.tokens_mlp[i] for i in (0, 1, 2, 4, 5)]):
        src = s["source"]
        assert src.shape == (3, tm, n0)
        assert set(src.unique().tolist()) <= {0.0, 1.0}
        assert torch.all(src.sum(1) == 1)  # every original token in exactly one token
        assert torch.all(src.sum(2) >= 1)  # every token stands for something
        assert torch.equal(src[:, :p, :p], torch.eye(p).expand(3, p, p))  # prefix tokens untouched, in front
    torch.testing.assert_close(st_.source.sum(2, keepdim=True), st_.size)


# ---- the pure functions

def test_merge_functions_small_example():
    mod = sys.modules[registry.get_method("tome").__module__]
    bipartite_soft_matching, merge_wavg = mod.bipartite_soft_matching, mod.merge_wavg

    # tokens 0 (class) .. 6; A = {0, 2, 4, 6}, B = {1, 3, 5}
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [1, -1], [0.1, 1], [-1, 0.2], [-1, 0.1]])[None]
    m = bipartite_soft_matching(keys, 2, n_prefix=1)
    x = torch.arange(7.0)[None, :, None]
    out, size = merge_wavg(x, torch.ones_like(x), m)
    # 6 -> 5 and 4 -> 1 are the best pairs; 2 (best 3) stays; class token stays first
    assert out.flatten().tolist() == [0.0, 2.0, 2.5, 3.0, 5.5]
    assert size.flatten().tolist() == [1.0, 1.0, 2.0, 1.0, 2.0]
    assert bipartite_soft_matching(keys, 4, n_prefix=1).src_idx.shape[1] == 3  # clipped to (7 - 1) // 2
    assert bipartite_soft_matching(keys[:, :2], 1, n_prefix=1) is None


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=0, max_size=12), st.sampled_from(["cls", "avg", "distilled"]))
def test_schedules_property(r, variant):
    model = make_model(variant, TINY)
    registry.apply(model, "tome", r=r)
    set_track_source(model, True)
    with torch.no_grad():
        model(images(model, 2))
    st_ = last_state(model)
    assert (st_.tokens, st_.tokens_mlp) == registry.get_method("tome")().expected_tokens(model, r=r)
    if st_.source is not None:
        assert torch.all(st_.source.sum(1) == 1)
        assert st_.source.shape[1] == st_.tokens_mlp[-1]


def test_b_slots_built_once_per_shape_and_device():
    """The B tokens' slots are a tensor cached per (shape, device), equal to the list they replace."""
    from tokenbench.methods import tome

    a = tome.b_slots(1, 10, 12, torch.device("cpu"))
    assert a is tome.b_slots(1, 10, 12, "cpu")                       # cached, not rebuilt
    assert a.tolist() == tome._b_slots(1, 10, 12) and not a.is_inference()
    b = tome.b_slots(3, 10, 12, "cpu")                                 # another shape, another tensor
    assert b is not a and b.tolist() == tome._b_slots(3, 10, 12)
    model = registry.apply(make_model("registers"), "tome", r=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        first = model(x)
    n = len(tome._B_SLOTS)
    with torch.inference_mode():
        assert torch.equal(model(x), first)
    assert len(tome._B_SLOTS) == n                                     # a second forward builds none
