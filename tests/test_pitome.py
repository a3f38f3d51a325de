"""Tests of the `pitome` adapter (PiToMe) against a slow, obvious per-image reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (VIT_SMALL as SMALL, VIT_TINY as TINY, assert_batch_independent, assert_counts_declared,
                      assert_matches_reference, assert_unchanged_by, peaked_vit as make_model,
                      random_images as images, ref_attend, ref_embed, ref_head)
from tokenbench import registry
from tokenbench.backbones import last_state, set_track_source
from tokenbench.errors import UserError


# --------------------------------------------------------------------------- the reference

def ref_forward(model, imgs, reduce, prop_attn):
    """The whole model, one image at a time, attention written out per head.

    ``reduce(i, x, size, keys, members, p)`` changes the tokens of one image in block ``i``
    (between attention and MLP) and returns ``(x, size, members)``.
    """
    p = model.num_prefix_tokens
    logits, all_members = [], []
    for img in imgs:
        x = ref_embed(model, img)
        size = torch.ones(x.shape[0], dtype=x.dtype)
        members = [{i} for i in range(x.shape[0])]
        for i, blk in enumerate(model.blocks):
            x, k, _ = ref_attend(blk, x, size.log() if prop_attn else None)
            x, size, members = reduce(i, x, size, k.mean(1), members, p)
            x = x + blk.mlp(blk.norm2(x))
        logits.append(ref_head(model, x, size))
        all_members.append(members)
    return torch.stack(logits), all_members


def apply_groups(x, size, members, p, groups):
    """Prefix tokens first, then each group (a list of token indices) averaged by size."""
    groups = [[j] for j in range(p)] + groups
    new_x = torch.stack([sum(x[j] * size[j] for j in g) / sum(size[j] for j in g) for g in groups])
    new_size = torch.stack([sum(size[j] for j in g) for g in groups])
    new_members = [set().union(*(members[j] for j in g)) for g in groups]
    return new_x, new_size, new_members


def ref_pitome(ratio, depth):
    def reduce(i, x, size, keys, members, p):
        toks = list(range(p, x.shape[0]))
        t = len(toks)
        r = min(math.floor(t - t * ratio), t // 2) if ratio < 1 else 0
        if r <= 0:
            return x, size, members
        margin = 0.75 - 0.75 * i / depth
        unit = {j: keys[j] / keys[j].norm() for j in toks}
        cos = lambda a, b: float(unit[a] @ unit[b])
        energy = {a: sum(F.elu(torch.tensor(cos(a, b) - margin)).item() for b in toks) / t for a in toks}
        order = sorted(toks, key=lambda j: -energy[j])
        if i < math.ceil(depth / 2):  # bipartite matching over every token, split by energy rank
            a_set, b_set = order[0::2], order[1::2]
            best = {a: max(b_set, key=lambda b: cos(a, b)) for a in a_set}
            by_score = sorted(a_set, key=lambda a: -cos(a, best[a]))
            src, stay = by_score[:r], by_score[r:]
        else:  # only the 2r highest-energy tokens merge; every A token merges
            a_set, b_set = order[0:2 * r:2], order[1:2 * r:2]
            best = {a: max(b_set, key=lambda b: cos(a, b)) for a in a_set}
            src, stay = a_set, order[2 * r:]
        into = {b: [b] for b in b_set}
        for a in src:
            into[best[a]].append(a)
        return apply_groups(x, size, members, p, [[j] for j in stay] + [into[b] for b in b_set])

    return reduce


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant,ratio,prop_attn", [
    ("cls", 0.9125, False),
    ("cls", 0.7, True),
    ("cls", 0.5, False),
    ("avg", 0.8, False),
    ("distilled", 0.85, False),
    ("registers", 0.75, True),
])
def test_matches_reference(variant, ratio, prop_attn):
    assert_matches_reference("pitome", lambda m, x: ref_forward(m, x, ref_pitome(ratio, 12), prop_attn), variant,
                             1e-6, ratio=ratio, prop_attn=prop_attn)


def test_float32_matches_reference():
    assert_matches_reference("pitome", lambda m, x: ref_forward(m, x, ref_pitome(0.8, 12), False),
                             dtype=torch.float32, n=2, ratio=0.8)


@pytest.mark.parametrize("variant", ["cls", "avg", "distilled", "registers"])
@pytest.mark.parametrize("ratio", [0.5, 0.77, 0.9125, 0.99, 1.0])
def test_token_counts(variant, ratio):
    model = make_model(variant, SMALL)
    want = assert_counts_declared(model, "pitome", ratio=ratio)
    p = model.num_prefix_tokens
    assert want[1][0] == want[0][0] - math.floor(64 - 64 * ratio)


def test_declaration_and_schedule():
    m = registry.get_method("pitome")
    assert m.defaults() == {"ratio": 0.9125, "prop_attn": False}
    assert m.knob == "ratio" and m.family == "merging" and not m.learned and m.deterministic
    model = make_model("cls", SMALL)  # 64 patches + class token
    tokens, mlp = m().expected_tokens(model, ratio=0.9125)
    assert tokens[:4] == [65, 60, 55, 51]  # floor(64 * 0.0875) = 5, floor(59 * 0.0875) = 5, ...
    assert not m.reduces({"ratio": 1.0, "prop_attn": False}) and m.reduces({"ratio": 0.9, "prop_attn": False})


def test_ratio_one_is_unchanged():
    model = make_model("cls", TINY)
    assert_unchanged_by(model, "pitome", 1e-5, ratio=1.0)


def test_batch_consistency_and_determinism():
    model = make_model("cls")
    registry.apply(model, "pitome", ratio=0.7)
    assert_batch_independent(model, images(model, 4))


@pytest.mark.parametrize("params", [
    {"ratio": 0.4}, {"ratio": 1.5}, {"ratio": "most"}, {"prop_attn": "maybe"}, {"r": 3},
])
def test_bad_params(params):
    with pytest.raises(UserError):
        registry.apply(make_model("cls", TINY), "pitome", **params)


def test_source_map_partitions_patches():
    model = make_model("distilled", SMALL)
    registry.apply(model, "pitome", ratio=0.8)
    set_track_source(model, True)
    with torch.no_grad():
        model(images(model, 3))
    st_ = last_state(model)
    assert torch.all(st_.source.sum(1) == 1)
    assert torch.equal(st_.source[:, :2, :2], torch.eye(2).expand(3, 2, 2))  # prefix tokens untouched
    torch.testing.assert_close(st_.source.sum(2, keepdim=True), st_.size)


def test_pure_function_small_example():
    from tokenbench.methods.pitome import pitome_plan

    # 6 tokens: 0, 1, 2 near-parallel (a high-energy cluster), 3, 4, 5 spread out
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.0, 1.0], [-1.0, 0.3], [-0.2, -1.0]])[None]
    plan = pitome_plan(keys, 1, margin=0.0, bsm=False)
    # the two highest-energy tokens are in the cluster: one merges into the other; the rest stay
    merged = {plan.src.item(), plan.keep[0, plan.dst.item()].item()}
    assert merged <= {0, 1, 2}
    assert sorted(plan.keep[0].tolist() + plan.src[0].tolist()) == list(range(6))
