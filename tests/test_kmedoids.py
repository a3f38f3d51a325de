"""kmedoids: against a per-image loop reference, schedules, bookkeeping, parameters."""

import copy
import sys

import pytest
import torch

from conftest import (assert_batch_independent, assert_counts_declared, assert_unchanged_by, peak_weights,
                      random_images, tiny_vit, tracked_state)
from tokenbench import registry
from tokenbench.backbones import backbone_of, last_state
from tokenbench.errors import UserError


def module():
    return sys.modules[registry.get_method("kmedoids").__module__]


# --------------------------------------------------------------------------- slow reference

def loop_kmedoids(t: torch.Tensor, k: int, iters: int, w: torch.Tensor) -> list[int]:
    """One image's tokens t [N, C], weights w [N]: the medoids, written as plain loops."""
    n = t.shape[0]
    d = torch.cdist(t[None], t[None])[0]
    total = [float((d[i] * w[i]).sum()) for i in range(n)]
    medoids = sorted(range(n), key=lambda i: -float(w[i]))[:k]

    def nearest(i):
        ds = [float(d[i, m]) for m in medoids]
        return ds.index(min(ds))

    for _ in range(iters):
        assign = [nearest(i) for i in range(n)]
        new = []
        for c in range(k):
            members = [i for i in range(n) if assign[i] == c]
            new.append(min(members, key=lambda i: total[i]) if members else 0)
        medoids = new
    return medoids


def received(blk, t: torch.Tensor) -> torch.Tensor:
    """Attention received by each token of t [N, C] in block ``blk``, summed over heads and queries."""
    a = blk.attn
    h = a.num_heads
    qkv = a.qkv(blk.norm1(t)).reshape(t.shape[0], 3, h, -1).permute(1, 2, 0, 3)
    attn = ((qkv[0] @ qkv[1].transpose(-1, -2)) * a.scale).softmax(-1)
    return attn.sum(0).sum(0)


def reference_forward(model, img: torch.Tensor, keep_rate: float, iters: int) -> torch.Tensor:
    """One image through the plain timm blocks, the tokens replaced by their medoids before
    the quarter blocks."""
    npf = model.num_prefix_tokens
    n0 = model.patch_embed.num_patches
    sites = [3, 6, 9]
    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    weight = None
    for i, blk in enumerate(model.blocks):
        if i in sites:
            k = int(n0 * keep_rate ** (sites.index(i) + 1))
            medoids = loop_kmedoids(x[npf:], k, iters, weight[npf:])
            x = torch.cat([x[:npf], x[npf:][medoids]])
        if i + 1 in sites:
            weight = received(blk, x)
        x = blk(x[None])[0]
    return model.forward_head(model.norm(x[None]))[0]


@pytest.mark.parametrize("keep_rate,iters", [(0.7, 3), (0.5, 1), (0.3, 0)])
def test_matches_reference(keep_rate, iters):
    model = peak_weights(tiny_vit())
    ref_model = copy.deepcopy(model)
    imgs = random_images(model, 3)
    registry.apply(model, "kmedoids", keep_rate=keep_rate, iters=iters)
    with torch.no_grad():
        got = model(imgs)
        want = torch.stack([reference_forward(ref_model, im, keep_rate, iters) for im in imgs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fit_matches_loop():
    fit = module().kmedoids_fit
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 30, 6, generator=g)
    w = torch.rand(4, 30, generator=g)
    medoids, assign = fit(x, 7, 3, w)
    for b in range(4):
        assert medoids[b].tolist() == loop_kmedoids(x[b], 7, 3, w[b])
        d = torch.cdist(x[b:b + 1], x[b:b + 1])[0][:, medoids[b]]
        assert assign[b].tolist() == d.argmin(1).tolist()


# --------------------------------------------------------------------------- schedule and bookkeeping

@pytest.mark.parametrize("keep_rate", [0.9, 0.7, 0.4, 0.1])
def test_token_counts(keep_rate):
    model = tiny_vit()
    want = assert_counts_declared(model, "kmedoids", keep_rate=keep_rate)
    n0 = backbone_of(model).num_patches
    assert want[0][3] == 1 + int(n0 * keep_rate)  # the official count rule at the first site


def test_medoids_keep_their_features_and_sizes_add_up():
    st = tracked_state(peak_weights(tiny_vit()), "kmedoids", keep_rate=0.6)
    assert torch.equal(st.size[:, 1:, 0].sum(1), torch.full((3,), 64.0))
    cover = st.source[:, 1:, 1:]                    # patch tokens x original patches
    assert torch.equal(cover.sum(1), torch.ones(3, 64))  # every patch in exactly one cluster
    assert torch.equal(cover.sum(2), st.size[:, 1:, 0])
    # each token stands at its medoid's position, which is one of the patches it covers
    pos = st.pos[:, 1:]
    assert bool((cover.gather(2, pos[..., None])[..., 0] == 1).all())


def test_batch_independent_and_deterministic():
    model = peak_weights(tiny_vit())
    registry.apply(model, "kmedoids", keep_rate=0.5)
    assert_batch_independent(model, random_images(model, 4))


def test_keep_rate_one_is_dense():
    model = tiny_vit()
    assert_unchanged_by(model, "kmedoids", 1e-6, keep_rate=1.0)
    assert not registry.get_method("kmedoids").reduces({"keep_rate": 1.0, "iters": 3})


def test_without_class_token():
    model = tiny_vit(class_token=False, global_pool="avg")
    registry.apply(model, "kmedoids", keep_rate=0.5)
    with torch.no_grad():
        out = model(random_images(model, 2))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert last_state(model).tokens[-1] == int(64 * 0.5 ** 3)


@pytest.mark.parametrize("params", [
    {"keep_rate": 0}, {"keep_rate": 1.5}, {"keep_rate": "half"}, {"iters": -1}, {"k_neighbors": 5},
])
def test_bad_params(params):
    with pytest.raises(UserError):
        registry.apply(tiny_vit(), "kmedoids", **params)
