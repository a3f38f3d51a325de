"""ATC's clustering against the official ``agglomerative_clustering`` (JoakimHaurum/ATC,
``ATC_setup/models/atc.py``, scikit-learn's ``AgglomerativeClustering`` on ``1 - cos``) on the
same key vectors: the same partition of the tokens for each linkage.  The official model
subclasses timm 0.4's ``VisionTransformer`` (a constructor newer timm no longer has), so the
check is at the clustering, which is where ours could differ (the merge is a size-weighted
average, as in every merging method here)."""

import pytest
import torch

from .conftest import clone_of


def canonical(labels: torch.Tensor) -> torch.Tensor:
    """Each token's cluster named by the smallest token index in it (ours' representation)."""
    b, t = labels.shape
    out = torch.empty_like(labels)
    for i in range(b):
        for lab in labels[i].unique():
            members = (labels[i] == lab).nonzero().flatten()
            out[i, members] = members.min()
    return out


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_atc_clusters_equal_the_official(linkage, parity):
    pytest.importorskip("sklearn", reason="the official ATC clusters with scikit-learn")
    from official_code import import_bare, importing_from
    from tokenbench.methods.atc import agglomerative_clusters

    clone = clone_of("JoakimHaurum+ATC")
    with importing_from(clone, "ATC_setup"):
        official = import_bare(clone / "ATC_setup", "models.atc").agglomerative_clustering
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 1 + 48, 16, generator=g)           # a class token and 48 patch tokens
    for k in (24, 10, 3):
        _, _, labels = official(keys, k, linkage, class_token=True)
        theirs = canonical(labels[:, 1:] - 1)
        ours = agglomerative_clusters(keys[:, 1:], k, linkage)
        mismatched = (ours != theirs).any(dim=1).sum().item()
        parity.check(ours.double(), theirs.double(), 0.0, f"{linkage} linkage, {k} clusters ({mismatched} images differ)")
