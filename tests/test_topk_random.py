"""topk and random pruning: against slow references, schedules, seeds, parameters."""

import sys

import pytest
import torch

from conftest import lin, ln, ref_attention, ref_mlp, small_vit
from tokenbench import registry
from tokenbench.errors import UserError
from tokenbench.backbones import backbone_of, image_ids, last_state, set_track_source


tiny = small_vit


# --------------------------------------------------------------------------- slow reference

@torch.no_grad()
def ref_forward(model, images, keep_rate, choose):
    """Prune inside blocks depth_sites (between attention and MLP) to int(N0 * keep_rate ** s) patch
    tokens; ``choose(b, stage, cls_row_of_patches, k)`` gives the kept patch positions."""
    npf = model.num_prefix_tokens
    n0 = model.patch_embed.num_patches
    sites = backbone_of(model).sites("quarters")
    out = []
    for b, img in enumerate(images):  # one image at a time
        t = model._pos_embed(model.patch_embed(img[None]))[0]
        for i, blk in enumerate(model.blocks):
            att, cls_row = ref_attention(blk, t)
            t = t + att
            if i in sites:
                s = sites.index(i)
                k = int(n0 * keep_rate ** (s + 1))
                kept = sorted(choose(b, s, cls_row[npf:], k))  # original order
                t = torch.cat([t[:npf], t[npf:][kept]], dim=0)
            t = t + ref_mlp(blk, t)
        if isinstance(model.norm, torch.nn.LayerNorm):
            t = ln(t, model.norm)
        if model.global_pool == "token":
            feat = t[0]
        else:  # average pooling (timm then normalises with fc_norm)
            feat = t[npf:].mean(0)
            if isinstance(model.fc_norm, torch.nn.LayerNorm):
                feat = ln(feat, model.fc_norm)
        out.append(lin(feat, model.head))
    return torch.stack(out)


def top_by_attention(b, s, row, k):
    return sorted(range(len(row)), key=lambda j: -float(row[j]))[:k]


# --------------------------------------------------------------------------- topk

@pytest.mark.parametrize("keep_rate", [0.7, 0.4])
def test_topk_matches_reference(keep_rate):
    m = registry.apply(tiny(), "topk", keep_rate=keep_rate)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
    ref = ref_forward(m, x, keep_rate, top_by_attention)
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()


def test_topk_keeps_original_order():
    m = registry.apply(tiny(), "topk", keep_rate=0.6)
    set_track_source(m)
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64))
    stages = last_state(m).stages
    assert len(stages) == 3
    for st in stages:
        pos = st["source"].argmax(-1)  # original position of each kept token
        assert (pos[:, 0] == 0).all()  # the class token first
        assert (pos[:, 1:].diff(dim=1) > 0).all()


@pytest.mark.parametrize("name", ["topk", "random"])
def test_token_counts_match_expected(name):
    m = registry.apply(tiny(), name, keep_rate=0.55)
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64))
    exp = registry.get_method(name)().expected_tokens(m, keep_rate=0.55)
    assert (last_state(m).tokens, last_state(m).tokens_mlp) == exp


@pytest.mark.parametrize("name", ["topk", "random"])
def test_deit_s_schedule(name):
    m = registry.apply(tiny(img=224, patch=16), name, keep_rate=0.7)
    tokens, tokens_mlp = registry.get_method(name)().expected_tokens(m, keep_rate=0.7)
    assert tokens == [197] * 4 + [138] * 3 + [97] * 3 + [68] * 2
    assert tokens_mlp == [197] * 3 + [138] * 3 + [97] * 3 + [68] * 3
    with torch.no_grad():
        m(torch.randn(1, 3, 224, 224))
    assert (last_state(m).tokens, last_state(m).tokens_mlp) == (tokens, tokens_mlp)


def test_topk_batch_consistency():
    m = registry.apply(tiny(), "topk", keep_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        for i in range(4):
            assert torch.allclose(y[i:i + 1], m(x[i:i + 1]), atol=1e-5)


@pytest.mark.parametrize("name", ["topk", "random"])
def test_keep_rate_one_is_dense(name):
    dense = tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y0 = dense(x)
        m = registry.apply(dense, name, keep_rate=1.0)
        y1 = m(x)
    assert last_state(m).tokens == [65] * 12 and last_state(m).tokens_mlp == [65] * 12
    assert torch.allclose(y0, y1, atol=1e-5)


@pytest.mark.parametrize("name", ["topk", "random"])
def test_traceable(name):
    m = registry.apply(tiny(), name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        tr = torch.jit.trace(m, x, check_trace=False)
        yt = tr(x)
    assert yt.shape == y.shape
    if name == "topk":
        assert torch.allclose(yt, y, atol=1e-6)


@pytest.mark.parametrize("name", ["topk", "random"])
def test_bad_parameters_rejected(name):
    for bad in ({"keep_rate": 0}, {"keep_rate": 1.5}, {"keep_rate": -1}, {"keep_ratio": 0.5}):
        with pytest.raises(UserError):
            registry.apply(tiny(), name, **bad)
    if name == "random":
        with pytest.raises(UserError):
            registry.apply(tiny(), name, seed=1.5)


def test_topk_refuses_model_without_class_token():
    with pytest.raises(UserError):
        registry.apply(tiny(class_token=False, global_pool="avg"), "topk")


# --------------------------------------------------------------------------- random

def seeded_choice(seed, image_ids=None):
    """The adapter's draw, one image and one token at a time with Python integers: token j of
    image i at stage s scores hash(seed, s, i, j), and each image keeps its k best tokens."""
    registry.load_methods()
    rnd = sys.modules["tokenbench.methods.random"]
    m32 = 0xFFFFFFFF

    def choose(b, s, row, k):
        i = b if image_ids is None else image_ids[b]
        h = rnd.mix32(rnd.mix32((i & m32) ^ rnd.stage_key(seed, s)) ^ ((i >> 32) & m32))
        score = [rnd.mix32((h + j * 0x9E3779B9) & m32) * 65536 + j for j in range(len(row))]
        return sorted(range(len(row)), key=lambda j: -score[j])[:k]

    return choose


@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg"}])
def test_random_matches_reference(kw):
    m = registry.apply(tiny(**kw), "random", keep_rate=0.6, seed=5)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
    ref = ref_forward(m, x, 0.6, seeded_choice(5))
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()
    assert last_state(m).tokens_mlp[-1] == int(64 * 0.6 ** 3) + m.num_prefix_tokens


def test_random_follows_image_ids():
    """Ids set by the evaluation loop (large ones included) pick each image's stream."""
    m = registry.apply(tiny(), "random", keep_rate=0.6, seed=-7)
    x = torch.randn(3, 3, 64, 64)
    ids = [5, 2 ** 33 + 1, 0]
    with torch.no_grad(), image_ids(m, torch.tensor(ids)):
        y = m(x)
    ref = ref_forward(m, x, 0.6, seeded_choice(-7, ids))
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()
    with torch.no_grad():  # outside the block: ids 0..B-1 again
        assert torch.allclose(m(x), ref_forward(m, x, 0.6, seeded_choice(-7)), atol=1e-4, rtol=1e-4)


def kept_sets(m, x):
    set_track_source(m)
    with torch.no_grad():
        y = m(x)
    return y, [st["source"].argmax(-1) for st in last_state(m).stages]


def test_random_seed_reproducible_and_varies():
    x = torch.randn(2, 3, 64, 64)
    m = registry.apply(tiny(), "random", keep_rate=0.5, seed=3)
    y1, k1 = kept_sets(m, x)
    y2, k2 = kept_sets(m, x)  # a function of the seed and the image
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(k1, k2))
    m2 = registry.apply(tiny(), "random", keep_rate=0.5, seed=4)
    y3, k3 = kept_sets(m2, x)
    assert not torch.equal(k1[0], k3[0])
    assert not torch.allclose(y1, y3)
    for ks in k1:  # original order, prefix first
        assert (ks[:, 0] == 0).all() and (ks[:, 1:].diff(dim=1) > 0).all()


def test_random_differs_per_image():
    x = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1).contiguous()
    m = registry.apply(tiny(), "random", keep_rate=0.5, seed=0)
    _, ks = kept_sets(m, x)
    assert not torch.equal(ks[0][0], ks[0][1])


def test_declarations():
    r, t = registry.get_method("random"), registry.get_method("topk")
    assert not r.deterministic and not r.needs_class_token and not r.learned
    assert t.deterministic and t.needs_class_token and not t.learned
    assert r.knob == t.knob == "keep_rate"
    assert r.defaults() == {"keep_rate": 0.7, "seed": 0} and t.defaults() == {"keep_rate": 0.7}
