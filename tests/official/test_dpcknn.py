"""DPC-KNN's clustering and merge against the official functions (JoakimHaurum/TokenReduction,
``models/dpcknn.py``: ``cluster_dpc_knn``, then ``merge_tokens`` with equal weights, the
``--equal_weight`` variant ours is) on the same tokens and the same tie-breaking noise (the
official draws it with ``torch.rand``; here that call returns the noise ours is given).  The
official model subclasses timm 0.4's ``VisionTransformer`` (a constructor newer timm no longer
has), so the check is at the functions the official model calls at each site."""

from unittest import mock

import pytest
import torch

from .conftest import clone_of


@pytest.mark.parametrize("n_clusters,k_neighbors", [(22, 5), (9, 5), (30, 3)])
def test_dpcknn_clusters_and_merges_as_the_official(n_clusters, k_neighbors, parity):
    from official_code import import_bare, importing_from
    from tokenbench.methods.dpcknn import cluster_scale, dpc_knn

    clone = clone_of("JoakimHaurum+TokenReduction")
    with importing_from(clone):
        official = import_bare(clone, "models.dpcknn")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 48, 16, generator=g)
    noise = torch.rand(6, 48, generator=g)
    with mock.patch.object(official.torch, "rand", lambda *a, **k: noise.clone()):
        cluster_off, centres_off = official.cluster_dpc_knn(x, n_clusters, k_neighbors)
    cluster, centres = dpc_knn(x, n_clusters, k_neighbors, noise)
    assert torch.equal(centres, centres_off) and torch.equal(cluster, cluster_off)
    idx_token = torch.arange(48).expand(6, 48)
    merged_off, _, _ = official.merge_tokens(x, idx_token, x.new_ones(6, 48, 1), cluster_off, n_clusters)
    scale = cluster_scale(cluster, n_clusters, x.dtype)
    merged = torch.zeros(6, n_clusters, 16).scatter_add(1, cluster[..., None].expand(6, 48, 16), x * scale[..., None])
    parity.check(merged, merged_off, 1e-6, f"{n_clusters} clusters, k={k_neighbors}")
