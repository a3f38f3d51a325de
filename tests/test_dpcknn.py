"""dpcknn: against a per-image loop reference, schedules, bookkeeping, seeds, parameters."""

import copy
import math
import sys

import pytest
import torch

from conftest import (assert_counts_declared, assert_unchanged_by, peak_weights, random_images, tiny_vit,
                      tracked_state)
from tokenbench import registry
from tokenbench.backbones import image_ids
from tokenbench.errors import UserError


def module():
    return sys.modules[registry.get_method("dpcknn").__module__]


# --------------------------------------------------------------------------- slow reference

def loop_dpc_knn(t: torch.Tensor, n_clusters: int, k: int, noise: torch.Tensor):
    """One image's tokens t [N, C]: (cluster of each token, centres), written as plain loops."""
    n, c = t.shape
    d = torch.cdist(t[None], t[None])[0] / math.sqrt(c)
    density = []   # float32 scalars, as the model computes (the noise is below float64's need)
    for i in range(n):
        near = d[i].sort().values[:k]
        density.append((-(near ** 2).mean()).exp() + noise[i] * 1e-6)
    dmax = d.max()
    score = []
    for i in range(n):
        higher = [d[i, j] for j in range(n) if density[j] > density[i]]
        score.append(float((min(higher) if higher else dmax) * density[i]))
    centres = sorted(range(n), key=lambda i: -score[i])[:n_clusters]
    cluster = []
    for i in range(n):
        ds = [float(d[m, i]) for m in centres]
        cluster.append(ds.index(min(ds)))
    for j, m in enumerate(centres):
        cluster[m] = j
    return cluster, centres


def reference_forward(model, img, image_id: int, keep_rate: float, k: int, seed: int) -> torch.Tensor:
    """One image through the plain timm blocks, each cluster averaged before the quarter blocks."""
    mod = module()
    npf = model.num_prefix_tokens
    n0 = model.patch_embed.num_patches
    sites = [3, 6, 9]
    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    for i, blk in enumerate(model.blocks):
        if i in sites:
            s = sites.index(i)
            n_clusters = int(n0 * keep_rate ** (s + 1))
            p = x[npf:]
            noise = mod.density_noise(seed, s, torch.tensor([image_id]), p.shape[0], p.dtype)[0]
            cluster, _ = loop_dpc_knn(p, n_clusters, k, noise)
            merged = []
            for j in range(n_clusters):
                members = [m for m in range(p.shape[0]) if cluster[m] == j]
                merged.append(p[members].sum(0) / len(members))
            x = torch.cat([x[:npf], torch.stack(merged)])
        x = blk(x[None])[0]
    return model.forward_head(model.norm(x[None]))[0]


@pytest.mark.parametrize("keep_rate,k,seed", [(0.7, 5, 0), (0.5, 3, 7), (0.6, 2, 1)])  # k = 1: every density is 1 + noise, ties everywhere
def test_matches_reference(keep_rate, k, seed):
    model = peak_weights(tiny_vit())
    ref_model = copy.deepcopy(model)
    imgs = random_images(model, 3)
    registry.apply(model, "dpcknn", keep_rate=keep_rate, k_neighbors=k, seed=seed)
    with torch.no_grad():
        got = model(imgs)
        want = torch.stack([reference_forward(ref_model, im, i, keep_rate, k, seed) for i, im in enumerate(imgs)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_clustering_matches_loop():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 8, generator=g)
    noise = torch.rand(3, 40, generator=g)
    cluster, centres = module().dpc_knn(x, 9, 5, noise)
    for b in range(3):
        want_cluster, want_centres = loop_dpc_knn(x[b], 9, 5, noise[b])
        assert centres[b].tolist() == want_centres
        assert cluster[b].tolist() == want_cluster


# --------------------------------------------------------------------------- schedule and bookkeeping

@pytest.mark.parametrize("keep_rate", [0.9, 0.7, 0.4, 0.1])
def test_token_counts(keep_rate):
    model = tiny_vit()
    want = assert_counts_declared(model, "dpcknn", keep_rate=keep_rate)
    assert want[0][3] == 1 + int(64 * keep_rate)  # the official count rule at the first site


def test_clusters_partition_the_patches():
    st = tracked_state(peak_weights(tiny_vit()), "dpcknn", keep_rate=0.6)
    cover = st.source[:, 1:, 1:]
    assert torch.equal(cover.sum(1), torch.ones(3, 64))
    assert torch.equal(cover.sum(2), st.size[:, 1:, 0])
    assert bool((cover.gather(2, st.pos[:, 1:, None])[..., 0] == 1).all())  # at its centre's patch


def test_image_result_independent_of_batch():
    model = peak_weights(tiny_vit())
    registry.apply(model, "dpcknn", keep_rate=0.5, seed=3)
    imgs = random_images(model, 4)
    with torch.no_grad(), image_ids(model, torch.arange(10, 14)):
        full = model(imgs)
        again = model(imgs)
    with torch.no_grad():
        parts = []
        for i in range(4):
            with image_ids(model, torch.tensor([10 + i])):
                parts.append(model(imgs[i:i + 1]))
    assert torch.equal(full, again)
    torch.testing.assert_close(full, torch.cat(parts), atol=1e-5, rtol=1e-5)


def test_noise_depends_on_seed_stage_and_image_only():
    noise = module().density_noise
    ids = torch.tensor([4, 9])
    a = noise(0, 0, ids, 20, torch.float32)
    assert a.shape == (2, 20) and bool(((a >= 0) & (a < 1)).all())
    assert torch.equal(a[1:], noise(0, 0, ids[1:], 20, torch.float32))
    assert not torch.equal(a, noise(1, 0, ids, 20, torch.float32))
    assert not torch.equal(a, noise(0, 1, ids, 20, torch.float32))


def test_keep_rate_one_is_dense():
    model = tiny_vit()
    assert_unchanged_by(model, "dpcknn", 1e-6, keep_rate=1.0)
    assert not registry.get_method("dpcknn").reduces({"keep_rate": 1.0, "k_neighbors": 5, "seed": 0})


def test_few_tokens_caps_neighbours():
    """At keep_rate 0.1 the last stage clusters 1 token out of 2 with k = 5 neighbours (the
    official topk would fail on fewer than k tokens)."""
    model = tiny_vit()
    registry.apply(model, "dpcknn", keep_rate=0.2)
    with torch.no_grad():
        out = model(random_images(model, 2))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("params", [
    {"keep_rate": 0}, {"keep_rate": 1.5}, {"keep_rate": "half"}, {"k_neighbors": 0}, {"seed": "x"},
    {"iters": 3},
])
def test_bad_params(params):
    with pytest.raises(UserError):
        registry.apply(tiny_vit(), "dpcknn", **params)
