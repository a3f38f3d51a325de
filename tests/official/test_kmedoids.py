"""K-Medoids against the official functions (JoakimHaurum/TokenReduction, ``models/kmedoids.py``:
token weights = attention received summed over heads and queries, then ``k_medoids_fit``) on the
same tokens and attention: the same medoids and the same assignment.  The official model
subclasses timm 0.4's ``VisionTransformer`` (a constructor newer timm no longer has), so the
check is at the functions it calls at each site (its output there is the medoids' features)."""

import pytest
import torch

from .conftest import clone_of


@pytest.mark.parametrize("n_clusters,iters", [(22, 3), (9, 3), (30, 0), (12, 6)])
def test_kmedoids_fits_as_the_official(n_clusters, iters, parity):
    from official_code import import_bare, importing_from
    from tokenbench.methods.kmedoids import attention_received, kmedoids_fit

    clone = clone_of("JoakimHaurum+TokenReduction")
    with importing_from(clone):
        official = import_bare(clone, "models.kmedoids")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 48, 16, generator=g)
    attn = torch.randn(6, 2, 49, 49, generator=g).softmax(dim=-1)   # 2 heads, a class token and 48 patches
    weight_off = attn.sum(dim=1).sum(dim=1)[:, 1:].unsqueeze(2)      # the official forward's token weights
    weight = attention_received(attn)[:, 1:]
    parity.check(weight, weight_off[..., 0], 1e-5, "attention received")
    centres_off, medoids_off, assign_off = official.k_medoids_fit(x, n_clusters, iters, weight_off)
    medoids, assign = kmedoids_fit(x, n_clusters, iters, weight)
    assert torch.equal(medoids, medoids_off) and torch.equal(assign, assign_off)
    centres = x.gather(1, medoids[..., None].expand(6, n_clusters, 16))
    parity.check(centres, centres_off, 0.0, f"{n_clusters} medoids, {iters} iterations")
