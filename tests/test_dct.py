"""Tests of the `dct` adapter (truncated-DCT resampling of the patch tokens) against obvious references."""

from __future__ import annotations

import math

import pytest
import scipy.fft
import torch

from conftest import assert_deterministic, assert_refused, random_images, tiny_vit
from tokenbench import registry
from tokenbench.backbones import last_state
from tokenbench.methods.dct import dct_compress, n_kept, resampler


def ref_compress(x: torch.Tensor, n_prefix: int, k: int, rescale: bool = True) -> torch.Tensor:
    """scipy's orthonormal DCT-II over the tokens, keep k coefficients, scipy's inverse of length k."""
    out = []
    for img in x.double().numpy():
        patches = img[n_prefix:]
        coef = scipy.fft.dct(patches, type=2, norm="ortho", axis=0)[:k]
        back = scipy.fft.idct(coef, type=2, norm="ortho", axis=0)
        if rescale:
            back = back * math.sqrt(k / patches.shape[0])
        out.append(torch.cat([torch.from_numpy(img[:n_prefix]), torch.from_numpy(back)], 0))
    return torch.stack(out).to(x.dtype)


@pytest.mark.parametrize("n,k,p,rescale", [(64, 45, 1, True), (45, 32, 1, False), (17, 5, 3, True), (10, 10, 0, True)])
def test_compress_matches_scipy(n, k, p, rescale):
    torch.manual_seed(n + k)
    x = torch.randn(3, p + n, 8, dtype=torch.float64)
    torch.testing.assert_close(dct_compress(x, p, k, rescale), ref_compress(x, p, k, rescale), rtol=1e-10, atol=1e-10)


def test_constant_sequence_is_kept_and_full_rate_is_identity():
    x = torch.ones(1, 20, 4, dtype=torch.float64) * torch.arange(4.0, dtype=torch.float64)
    torch.testing.assert_close(dct_compress(x, 0, 7)[:, :], x[:, :7])
    torch.testing.assert_close(resampler(12, 12, True, torch.float64), torch.eye(12, dtype=torch.float64))


def ref_model(model, imgs, keep_rate, rescale=True, sites=(3, 6, 9)):
    """The whole model by hand: timm's blocks, the compression before the sites (scipy)."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(imgs)))
    for i, blk in enumerate(model.blocks):
        if i in sites:
            n = x.shape[1] - p
            x = ref_compress(x, p, n_kept(keep_rate, n), rescale)
        x = blk(x)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("keep_rate,rescale", [(0.7, True), (0.5, False)])
def test_model_matches_reference(keep_rate, rescale):
    ref = tiny_vit()
    m = registry.apply(tiny_vit(), "dct", keep_rate=keep_rate, rescale=rescale)
    x = random_images(m, 3)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref_model(ref, x, keep_rate, rescale), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_rate", [0.3, 0.7, 0.95, 1.0])
def test_declared_schedule_is_real(keep_rate):
    m = registry.apply(tiny_vit(), "dct", keep_rate=keep_rate)
    with torch.no_grad():
        m(random_images(m, 2))
    st = last_state(m)
    exp = registry.get_method("dct")().expected_tokens(m, keep_rate=keep_rate)
    assert (st.tokens, st.tokens_mlp) == exp
    if keep_rate < 1:
        assert st.tokens[3] == 1 + n_kept(keep_rate, 64) and st.tokens[2] == 65


def test_sources_partition_the_patches():
    from tokenbench.backbones import set_track_source

    m = registry.apply(tiny_vit(), "dct", keep_rate=0.5)
    set_track_source(m, True)
    with torch.no_grad():
        m(random_images(m, 2))
    st = last_state(m)
    assert st.stages and all(s["kind"] == "mix" for s in st.stages)
    for s in st.stages:
        covered = (s["source"][:, 1:, 1:] > 0).sum(1)        # patches: covered by exactly one token
        assert bool((covered == 1).all())


def test_bad_parameters_and_determinism():
    assert_refused("dct", {"keep_rate": 0}, {"keep_rate": 1.5}, {"rescale": "maybe"}, {"keep": 0.5})
    assert_deterministic(registry.apply(tiny_vit(), "dct"))
