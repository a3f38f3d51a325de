"""`dpcknn`: DPC-KNN clustering of the patch tokens (Haurum et al., ICCVW 2023), training-free.

The clustering is TCFormer's (W. Zeng et al., "Not All Tokens Are Equal: Human-centric
Visual Analysis via Token Clustering Transformer", CVPR 2022), as used by J. B. Haurum et
al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers", ICCV
Workshops 2023.  Official code: https://github.com/JoakimHaurum/TokenReduction
(``models/dpcknn.py``: ``cluster_dpc_knn``, ``merge_tokens``), MIT license; it follows
https://github.com/zengwang430521/TCFormer (Apache-2.0).  Read, not copied.

Before each reduction block (blocks 3, 6 and 9 of a 12-block ViT, the official
``--reduction_loc 3 6 9``; the quarter points of other depths), the patch tokens (prefix
tokens stay aside) are clustered into ``int(N0 * keep_rate ** s)`` clusters at stage
``s = 1, 2, 3`` (``N0`` the patch count after the embedding, as the official counts):

- distances: Euclidean between the block's input tokens, divided by ``sqrt(C)``;
- local density: ``exp(-mean of the squared distances to the k nearest neighbours)``, the
  token itself included (official default ``--k_neighbors 5``), plus a uniform noise of at
  most ``1e-6`` that breaks ties;
- distance indicator: the distance to the nearest token of higher density (the largest
  distance of the image for the densest token);
- centres: the ``K`` tokens with the largest ``density * distance indicator``, in that
  order; every token joins its nearest centre (first on ties), each centre its own cluster;
- each cluster becomes the plain average of its members, ``sum x_i / (n_k + 1e-6)`` as the
  official ``merge_tokens`` with equal token weights: members are *not* weighted by the
  patches they already stand for (the official tracks them but does not use them).

The merge goes through ``TokenState.merge`` (``mode="sum"`` on tokens pre-scaled by
``1 / (n_k + 1e-6)``, the official arithmetic), so sizes, source maps and positions (the
centre's) stay aligned; no proportional attention (the official has none); sizes weight
average pooling only.

Deviations and choices:

- the official fine-tunes DeiT with the method inserted and, by default, weights the
  members by a *learned* score (``exp(Linear(x))``, ``--equal_weight`` off); off-the-shelf
  there is no trained score, so this is the official ``--equal_weight`` variant (plain
  averages), with no learned part;
- the tie-breaking noise is the official's ``torch.rand * 1e-6``, drawn instead from a hash
  of (``seed``, stage, image id, token) as ``random`` does, so an image's result depends on
  the seed and the image alone, never on its batch; it only breaks exact ties (on 5,000
  Fashion-MNIST images three seeds gave bit-identical predictions), so the method declares
  ``seed_breaks_ties`` and a sweep measures it at one seed;
- a stage whose cluster count is not below the current patch count leaves the tokens as
  they are (the official would reorder them: no effect on the output);
- FLOPs: the pairwise distances (``torch.cdist``) are counted through an fvcore handle
  (``N^2 C`` multiply-adds per site, among the counting rules of the FLOPs code); the density, top-k and
  averaging are not counted;
- cluster counts: ``int(N0 * keep_rate ** s)`` as the official, capped at the current
  count and at least 1 (``keep_counts``); ``k`` neighbours capped at the token count.
"""

from __future__ import annotations

import torch

from tokenbench.backbones import TokenState, backbone_of
from tokenbench.backbones.tokens import constant, constant_range, gather_tokens
from tokenbench.methods._staged import keep_counts, staged_schedule
from tokenbench.methods.kmedoids import medoid_merge_indices
from tokenbench.methods.random import stage_key, token_scores
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.registry import GridRestore, Method, Param, register

_EPS = 1e-6    # the official's noise scale and its guard in the cluster sizes


# --------------------------------------------------------------------------- algorithm

def dpc_knn(x: torch.Tensor, n_clusters: int, k: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peaks clustering of the tokens ``x`` [B, N, C]; ``noise`` [B, N] (uniform in
    [0, 1), scaled by 1e-6) breaks density ties.  Returns (cluster of every token [B, N], centre indices [B, K])."""
    b, n, c = x.shape
    dist = torch.cdist(x, x) / (c ** 0.5)
    nearest = dist.topk(min(k, n), dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp() + noise * _EPS
    higher = density[:, None, :] > density[:, :, None]                  # [i, j]: j denser than i
    far = dist.flatten(1).max(dim=-1).values[:, None, None]
    # the official dist * mask + far * (1 - mask), as one selection: the same values, one pass over N x N
    delta = torch.where(higher, dist, far).min(dim=-1).values
    centres = (delta * density).topk(n_clusters, dim=-1).indices      # [B, K]
    to_centre = gather_tokens(dist, centres)                          # [B, K, N]: the centres' rows
    cluster = to_centre.argmin(dim=1)
    cluster = cluster.scatter(1, centres, constant_range(0, n_clusters, x.device).expand(b, n_clusters))
    return cluster, centres


def cluster_scale(cluster: torch.Tensor, n_clusters: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, N]: ``1 / (n_k + 1e-6)`` for each token's cluster ``k`` (the official's equal-weight normaliser)."""
    counts = torch.zeros(cluster.shape[0], n_clusters, dtype=dtype, device=cluster.device)
    counts = counts.scatter_add(1, cluster, torch.ones_like(cluster, dtype=dtype))
    return 1.0 / (counts + _EPS).gather(1, cluster)


def density_noise(seed: int, stage: int, image_ids: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, n] uniform noise in [0, 1): a function of (seed, stage, image id, token) only."""
    return _unit(token_scores(stage_key(seed, stage), image_ids, n), dtype)


def stages_noise(keys: torch.Tensor, image_ids: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[S, B, n]: :func:`density_noise` of every stage at once (``keys`` [S, 1]: the stages'
    :func:`stage_key`), one hash for all of them; a stage with fewer tokens reads the first of its row."""
    return _unit(token_scores(keys, image_ids, n), dtype)


def _unit(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The hash bits of :func:`token_scores` as uniform values in [0, 1)."""
    return ((scores >> 16).to(torch.float64) / 2.0 ** 32).to(dtype)     # [0, 2**32) / 2**32


# --------------------------------------------------------------------------- hook

_NOISE = "dpcknn_noise"


def _cluster_hook(stage: int, k_target: int, k_neighbors: int, keys: tuple[int, ...]):
    def pre(block, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        npf = st.n_prefix
        n = x.shape[1] - npf
        k = min(k_target, n)
        if k >= n:
            return x
        patches = x[:, npf:]
        if _NOISE not in st.extra:  # every stage's noise with the first stage that clusters (the most tokens)
            key_col = constant("dpcknn_keys", lambda: torch.tensor(keys, device=x.device)[:, None], keys, x.device)
            st.extra[_NOISE] = stages_noise(key_col, st.image_ids.to(x.device), n, x.dtype)
        noise = st.extra[_NOISE][stage, :, :n]
        cluster, centres = dpc_knn(patches, k, k_neighbors, noise)
        scale = cluster_scale(cluster, k, x.dtype)
        scale = torch.cat([scale.new_ones(x.shape[0], npf), scale], dim=1)
        keep_idx, src_idx, dst = medoid_merge_indices(centres, cluster, npf)  # a centre is its cluster's medoid
        st.ensure_size(x)
        return st.merge(x * scale[..., None], keep_idx, src_idx, dst, mode="sum")

    return pre


@register
class DPCKNN(Method):
    name = "dpcknn"
    version = "1"
    summary = ("DPC-KNN (density peaks, k nearest neighbours) clustering of the patch tokens before "
               "blocks 3, 6, 9; each cluster averaged, int(N0 * keep_rate ** s) of them.")
    family = "merging"
    params = (
        keep_rate_param("clusters after stage s: int(N0 * keep_rate ** s) of the N0 patch tokens"),
        Param("k_neighbors", "int", 5, "nearest neighbours of the local density (official --k_neighbors)", min=1),
        Param("seed", "int", 0, "seed of the density tie-breaking noise (per image, as the official torch.rand * 1e-6)"),
    )
    knob = "keep_rate"
    restores_grid = GridRestore.UNMERGE
    seed_param = "seed"
    seed_breaks_ties = True  # noise at 1e-6 of a density: no seed changed a prediction on 5,000 images
    deterministic = False

    def apply(self, model, keep_rate: float = 0.7, k_neighbors: int = 5, seed: int = 0):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        sites = bb.sites("quarters")
        keys = tuple(stage_key(int(seed), s) for s in range(len(sites)))
        for s, (site, k) in enumerate(zip(sites, keep_counts(bb.num_patches, len(sites), keep_rate))):
            plan.pre[site] = _cluster_hook(s, k, int(k_neighbors), keys)
        return model

    def expected_tokens(self, model, keep_rate: float = 0.7, k_neighbors: int = 5, seed: int = 0):
        return staged_schedule(backbone_of(model, self.name), keep_rate, "pre")
