"""Tests of the `tofu` adapter (Token Fusion) against a slow, obvious per-image reference."""

from __future__ import annotations


import pytest
import torch

from test_pitome import ref_forward
from test_tome import tome_groups
from conftest import (VIT_SMALL as SMALL, VIT_TINY as TINY, assert_batch_independent, assert_counts_declared,
                      assert_matches_reference, assert_unchanged_by, peaked_vit as make_model,
                      random_images as images)
from tokenbench import registry
from tokenbench.backbones import last_state, set_track_source
from tokenbench.errors import UserError


# --------------------------------------------------------------------------- the reference

def ref_tofu(rs, merge_from, size_weighted=False):
    def reduce(i, x, size, keys, members, p):
        n = x.shape[0]
        r = min(rs[i], (n - p) // 2)
        if r <= 0:
            return x, size, members
        stay, groups = tome_groups(keys, n, r, p)
        order = list(range(p)) + stay
        if i < merge_from:  # prune: the merged-away A tokens vanish, their partners stay as they were
            order += [g[0] for g in groups]
            return x[order], size[order], [members[j] for j in order]
        rows, sizes, mems = [x[j] for j in order], [size[j] for j in order], [members[j] for j in order]
        for g in groups:
            total = sum(size[j] for j in g)
            if size_weighted:
                avg = sum(x[j] * size[j] for j in g) / total
            else:  # the paper's plain mean
                avg = sum(x[j] for j in g) / len(g)
            if len(g) > 1:  # MLERP: the average's direction, the largest norm of the group
                avg = avg / avg.norm() * max(x[j].norm() for j in g)
            rows.append(avg)
            sizes.append(total)
            mems.append(set().union(*(members[j] for j in g)))
        return torch.stack(rows), torch.stack(sizes), mems

    return reduce


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("variant,r,merge_from,prop_attn,size_weighted", [
    ("cls", 6, 7, True, False),
    ("cls", 6, 7, True, True),
    ("cls", 6, -1, True, False),
    ("cls", [3, 0, 9, 2, 5, 4, 8, 8, 1], 4, True, False),
    ("cls", [3, 0, 9, 2, 5, 4, 8, 8, 1], 4, True, True),
    ("cls", 5, 0, False, False),
    ("cls", 5, 12, True, False),
    ("avg", 6, 7, True, False),
    ("distilled", 5, 6, True, True),
    ("registers", 5, 3, True, False),
])
def test_matches_reference(variant, r, merge_from, prop_attn, size_weighted):
    rs = r + [0] * (12 - len(r)) if isinstance(r, list) else [r] * 12
    start = 6 if merge_from == -1 else merge_from  # -1: half the depth (12 // 2)
    reference = lambda m, x: ref_forward(m, x, ref_tofu(rs, start, size_weighted), prop_attn)  # noqa: E731
    assert_matches_reference("tofu", reference, variant, 1e-6, r=r, merge_from=merge_from, prop_attn=prop_attn,
                             size_weighted=size_weighted)


def test_float32_matches_reference():
    assert_matches_reference("tofu", lambda m, x: ref_forward(m, x, ref_tofu([6] * 12, 6), True), dtype=torch.float32,
                             n=2, r=6)


def test_mlerp_keeps_the_largest_norm():
    from tokenbench.methods.tofu import group_max_norm, mlerp_rescale

    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # tokens 0 and 1 merge; 2 stays
    keep, src, dst = torch.tensor([[0, 2]]), torch.tensor([[1]]), torch.tensor([[0]])
    max_norm, touched = group_max_norm(x, keep, src, dst)
    torch.testing.assert_close(max_norm, torch.tensor([[3.0, 50 ** 0.5]]))
    assert touched.tolist() == [[True, False]]
    merged = torch.tensor([[[1.5, 0.5], [5.0, 5.0]]])  # the plain average, and the untouched token
    out = mlerp_rescale(merged, max_norm, touched)
    torch.testing.assert_close(out[0, 0].norm(), torch.tensor(3.0))
    torch.testing.assert_close(out[0, 0] / 3.0, merged[0, 0] / merged[0, 0].norm())
    assert torch.equal(out[0, 1], merged[0, 1])


@pytest.mark.parametrize("variant", ["cls", "avg", "distilled", "registers"])
@pytest.mark.parametrize("r", [0, 1, 4, 40, [2, 9, 0, 30]])
def test_token_counts(variant, r):
    model = make_model(variant, TINY)
    want = assert_counts_declared(model, "tofu", r=r, merge_from=3)
    assert want == registry.get_method("tome")().expected_tokens(model, r=r)  # ToMe's schedule


def test_declaration():
    m = registry.get_method("tofu")
    assert m.defaults() == {"r": 16, "merge_from": -1, "size_weighted": False, "prop_attn": True}
    assert m.knob == "r" and m.family == "hybrid" and not m.learned and m.deterministic
    assert not m.reduces({"r": 0, "merge_from": -1, "size_weighted": False, "prop_attn": True})
    from tokenbench.methods.tofu import merge_start

    assert [merge_start(-1, d) for d in (12, 24, 4)] == [6, 12, 2] and merge_start(7, 12) == 7


def test_r_zero_is_unchanged():
    model = make_model("cls", TINY)
    assert_unchanged_by(model, "tofu", 1e-5, r=0)


def test_batch_consistency_and_determinism():
    model = make_model("cls")
    registry.apply(model, "tofu", r=[6, 8, 3, 10, 4, 7, 5, 5], merge_from=4)
    assert_batch_independent(model, images(model, 4))


@pytest.mark.parametrize("params", [
    {"r": -1}, {"r": [2, -3]}, {"r": list(range(13))}, {"merge_from": -2}, {"merge_from": 1.5},
    {"prop_attn": "maybe"}, {"ratio": 0.9},
])
def test_bad_params(params):
    with pytest.raises(UserError):
        registry.apply(make_model("cls", TINY), "tofu", **params)


def test_pruned_blocks_drop_patches_merged_blocks_keep_them():
    model = make_model("cls", SMALL)
    registry.apply(model, "tofu", r=4, merge_from=2)
    set_track_source(model, True)
    with torch.no_grad():
        model(images(model, 2))
    stages = last_state(model).stages
    assert [s["kind"] for s in stages[:3]] == ["prune", "prune", "merge"]
    covered = [int(s["source"][0].sum().item()) for s in stages]
    assert covered[:3] == [61, 57, 57]  # 65 tokens: 4 patches pruned per pruning block, none lost after
    assert covered[-1] == 57


def test_schedule_is_tomes():
    """ToFu removes what ToMe merges: the same declared schedule, from ToMe's function."""
    model = make_model("cls", TINY)
    for r in (0, 3, [8, 4, 2], 40):
        assert registry.get_method("tofu")().expected_tokens(model, r=r) == \
            registry.get_method("tome")().expected_tokens(model, r=r)
