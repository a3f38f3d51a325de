"""`atc`: Agglomerative Token Clustering (Haurum et al., ECCV 2024), training-free merging.

Paper: "Agglomerative Token Clustering" (arXiv 2409.11923).  Official code:
https://github.com/JoakimHaurum/ATC (``ATC_setup/models/atc.py``, ``Block_ATC`` and
``agglomerative_clustering``), MIT License.  Our code is our own.

Inside blocks 3, 6 and 9 of a 12-block ViT (the quarter points of other depths; the
official ``--reduction_loc 3 6 9``), between the attention residual and the MLP, the patch
tokens are clustered bottom-up into ``int(N0 * keep_rate ** s)`` clusters at stage ``s``
(1, 2, 3; ``N0`` the original patch count: the official ``token_ratio`` schedule), and each
cluster becomes one token, the average of its members.

Faithful to the official code:

- the metric is the block's keys averaged over heads (``k.mean(1)``), L2-normalised; the
  distance is ``1 - cosine similarity`` (float32, as the official), read from the upper
  triangle as scikit-learn's ``AgglomerativeClustering(metric="precomputed")`` does;
- clustering is hierarchical with the ``linkage`` given (``average``, the official
  default; ``complete``; ``single``), merging the closest pair first and updating the
  distances by that linkage (Lance-Williams, in float64 as SciPy), until the cluster
  count is reached; the class token is never clustered;
- merging: with ``prop_attn`` (the official ``--proportional_attn``, used in every DeiT
  command of the official README) a cluster is the size-weighted average of its members,
  sizes add up, and ``log(size)`` is added to the attention logits of later blocks;
  without it the official code resets the sizes after every block, so a cluster is the
  plain mean of the tokens entering the block (``mode="avg"``) and no size is carried.

Deviations (none changes a logit):

- clusters are ordered by their smallest token index (the official order is
  scikit-learn's label order); the class token stays first, and the logits do not depend
  on the order;
- every prefix token (class, distillation, registers) is protected; the official code
  protects the class token only;
- at least one cluster per stage (the official skips a stage whose count is 0);
- exact distance ties may be broken differently from SciPy's nearest-neighbour chain
  (here: the first pair in row-major order).

The clustering is a Python loop of ``n - k`` merge steps per site, each on the whole batch
(``[B, n, n]`` distances): static shapes, so the method compiles as one graph, unrolled.
"""

from __future__ import annotations

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.methods._staged import staged_schedule
from tokenbench.registry import GridRestore, Method, Param, register

LINKAGES = ("average", "complete", "single")


# --------------------------------------------------------------------------- algorithm

def cosine_distances(metric: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` [B, T, T] of ``metric`` [B, T, C] (float32 as the official), symmetric from its
    upper triangle (what a precomputed matrix gives scikit-learn), in float64, diagonal inf."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    d = (1 - m @ m.transpose(-1, -2)).double()
    up = torch.triu(d, diagonal=1)
    d = up + up.transpose(-1, -2)
    t = d.shape[-1]
    return d.masked_fill(torch.eye(t, dtype=torch.bool, device=d.device), float("inf"))


def agglomerative_clusters(metric: torch.Tensor, num_clusters: int, linkage: str = "average") -> torch.Tensor:
    """Bottom-up clustering of the T tokens of ``metric`` [B, T, C] into ``num_clusters``.

    Returns ``rep`` [B, T] (int64): for each token, the smallest token index of its cluster.
    Each step merges, in every image, the pair of clusters at the smallest linkage distance;
    the merged cluster's distances follow ``linkage``.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, not {linkage!r}")
    b, t, _ = metric.shape
    k = max(1, min(num_clusters, t))
    with torch.no_grad():
        d = cosine_distances(metric)
        size = torch.ones(b, t, dtype=d.dtype, device=d.device)
        rep = torch.arange(t, device=d.device).expand(b, t).clone()
        rows = torch.arange(b, device=d.device)
        inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        for _ in range(t - k):
            flat = d.reshape(b, t * t).argmin(dim=1)
            i, j = flat // t, flat % t
            lo, hi = torch.minimum(i, j), torch.maximum(i, j)          # hi folds into lo
            d_lo, d_hi = d[rows, lo], d[rows, hi]                       # [B, T]
            n_lo, n_hi = size[rows, lo][:, None], size[rows, hi][:, None]
            if linkage == "average":
                new = (n_lo * d_lo + n_hi * d_hi) / (n_lo + n_hi)
            elif linkage == "complete":
                new = torch.maximum(d_lo, d_hi)
            else:
                new = torch.minimum(d_lo, d_hi)
            new = torch.where(torch.isinf(d_lo) | torch.isinf(d_hi), inf, new)  # gone clusters stay gone
            new[rows, lo] = inf
            d[rows, lo] = new
            d[rows, :, lo] = new
            d[rows, hi] = inf
            d[rows, :, hi] = inf
            size[rows, lo] = size[rows, lo] + size[rows, hi]
            rep = torch.where(rep == hi[:, None], lo[:, None], rep)
    return rep


def cluster_merge_indices(rep: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``rep`` [B, T] (each token's cluster representative, the cluster's smallest index):
    (kept [B, K] representatives in increasing order, merged [B, T - K] the other tokens,
    dst [B, T - K] the position in ``kept`` of each merged token's cluster)."""
    b, t = rep.shape
    ar = torch.arange(t, device=rep.device).expand(b, t)
    is_rep = rep == ar
    order = torch.argsort((~is_rep).to(torch.int8), dim=1, stable=True)
    kept, merged = order[:, :num_clusters], order[:, num_clusters:]
    slot = torch.cumsum(is_rep.to(torch.int64), dim=1) - 1           # [B, T]: a representative's slot
    dst = slot.gather(1, rep.gather(1, merged))
    return kept, merged, dst


def atc_merge(x: torch.Tensor, st: TokenState, keys: torch.Tensor, num_clusters: int, linkage: str,
              prop_attn: bool) -> torch.Tensor:
    """One ATC step on ``x`` [B, N, C] (prefix tokens first), ``keys`` [B, N, d] the metric."""
    p = st.n_prefix
    n = x.shape[1] - p
    k = max(1, min(num_clusters, n))
    if k >= n:
        return x
    rep = agglomerative_clusters(keys[:, p:], k, linkage)
    kept, merged, dst = cluster_merge_indices(rep, k)
    b = x.shape[0]
    prefix = torch.arange(p, device=x.device).expand(b, p)
    keep_idx = torch.cat([prefix, kept + p], dim=1)
    return st.merge(x, keep_idx, merged + p, dst + p, mode="mean" if prop_attn else "avg")


# --------------------------------------------------------------------------- adapter

def cluster_counts(num_patches: int, stages: int, keep_rate: float) -> list[int]:
    """Clusters at each stage: the official ``int(num_patches * keep_rate ** (s + 1))``, at least 1."""
    return [max(1, int(num_patches * keep_rate ** (s + 1))) for s in range(stages)]


@register
class ATC(Method):
    name = "atc"
    version = "1"
    summary = ("ATC: agglomerative (hierarchical) clustering of the tokens on their keys in blocks 3, 6, 9, "
               "int(N * keep_rate ** s) clusters, each averaged into one token.")
    family = "merging"
    params = (
        keep_rate_param("clusters at stage s (1, 2, 3) as a fraction keep_rate ** s of the "
                        "original patch tokens"),
        Param("linkage", "str", "average", "linkage of the clustering (official default: average)",
              choices=LINKAGES),
        Param("prop_attn", "bool", True, "size-weighted clusters and proportional attention (the official "
                                         "--proportional_attn); off: plain means, no sizes carried"),
    )
    knob = "keep_rate"
    restores_grid = GridRestore.UNMERGE
    compile_note = "static token counts: fullgraph (the clustering loop unrolls, n - k steps per site)"

    def apply(self, model, keep_rate: float = 0.7, linkage: str = "average", prop_attn: bool = True, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        plan.prop_attn = bool(prop_attn)
        sites = bb.sites("quarters")
        counts = cluster_counts(bb.num_patches, len(sites), float(keep_rate))
        for i, k in zip(sites, counts):
            def mid(block, x, st: TokenState, info: AttnInfo, k=k):
                return atc_merge(x, st, info.keys, k, linkage, bool(prop_attn))
            plan.mid[i] = mid
            plan.needs[i] = ("keys",)
        return model

    def expected_tokens(self, model, keep_rate: float = 0.7, **params):
        return staged_schedule(backbone_of(model, self.name), keep_rate, "mid")
