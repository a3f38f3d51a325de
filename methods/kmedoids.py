"""`kmedoids`: K-Medoids clustering of the patch tokens (Haurum et al., ICCVW 2023), training-free.

Paper: J. B. Haurum, S. Escalera, G. W. Taylor, T. B. Moeslund, "Which Tokens to Use?
Investigating Token Reduction in Vision Transformers", ICCV Workshops 2023.
Official code: https://github.com/JoakimHaurum/TokenReduction (``models/kmedoids.py``),
MIT license.  Read, not copied.

Before each reduction block (blocks 3, 6 and 9 of a 12-block ViT, the official
``--reduction_loc 3 6 9``; the quarter points of other depths), the patch tokens (prefix
tokens stay aside) are clustered into ``int(N0 * keep_rate ** s)`` clusters at stage
``s = 1, 2, 3`` (``N0`` the patch count after the embedding, as the official code counts),
and the sequence continues with the prefix tokens followed by the cluster medoids:

- features: the block's input tokens themselves (the residual stream), Euclidean distance
  (``torch.cdist``) between them;
- token weights: the attention each token *received* in the previous block, summed over
  heads and over all query rows (class token included);
- initialisation: the ``K`` tokens of largest weight (``topk``, in that order), so nothing
  is random;
- ``iters`` (official default ``--cluster_iters 3``) rounds of: assign every token to the
  nearest medoid (first one on ties), then in each cluster choose as new medoid the member
  with the smallest weighted total distance ``w_i * sum_j d(i, j)``.  As in the official
  code the sum runs over *all* tokens, not only the cluster's members, and an empty cluster
  (only possible with identical tokens) gets token 0;
- the cluster tokens are the medoids' own features, unchanged (not averages), in the
  order of the clusters.

Bookkeeping (not in the official code, which tracks nothing): the other tokens are folded
into their final cluster's medoid through ``TokenState.merge`` with zero features
(``mode="sum"``), so the medoid's features stay exactly its own while sizes (patches per
cluster), source maps and positions (the medoid's) stay aligned.  Sizes matter only to
average-pooled models (a medoid is weighted by its cluster's size); no proportional
attention (the official has none).

Deviations and choices:

- the official fine-tunes the whole DeiT with the method inserted; here it runs
  off-the-shelf on pretrained weights (training-free: K-Medoids itself has no parameters);
- only the official default variant (attention-weighted, ``--equal_weight`` off) is
  offered; the equal-weight variant starts from one *random* token index shared by the
  whole batch followed by farthest-point picks, and is left out;
- the previous block's attention matrix is computed beside the fused kernel (one extra
  softmax of the full matrix at blocks 2, 5 and 8): ``info.attn()`` forms the logits as
  ``(q * scale) @ k^T``, the official ``(q @ k^T) * scale`` (float rounding only);
- a stage whose cluster count is not below the current patch count leaves the tokens as
  they are (the official would reorder them into medoid order: no effect on the output);
- FLOPs: the pairwise distances (``torch.cdist``, ``N^2 C`` multiply-adds per site) are
  counted through an fvcore handle of the FLOPs code; the extra attention matrices count as
  matmuls; the comparisons, sums and arg-mins of the iterations are not counted;
- the official computes ``int(N0 * keep_rate ** s)`` per stage independently; so do we,
  capped at the current count and at least 1 (``keep_counts``).
"""

from __future__ import annotations

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of, complement
from tokenbench.backbones.tokens import constant, constant_range, with_prefix
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.methods._staged import keep_counts, staged_schedule
from tokenbench.registry import GridRestore, Method, Param, register

_MASKED = 1000000.0  # the official value written over rows outside a cluster


# --------------------------------------------------------------------------- algorithm

def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """[B, H, N, N] attention -> [B, N]: what each token receives, summed over heads and queries."""
    return attn.sum(dim=1).sum(dim=1)


def nearest_medoid(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """[B, N]: the cluster (position in ``medoids`` [B, K]) of each token; first on ties."""
    b, n, _ = dist.shape
    return dist.gather(2, medoids[:, None, :].expand(b, n, medoids.shape[1])).argmin(dim=-1)


def kmedoids_fit(x: torch.Tensor, k: int, iters: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted K-Medoids of the tokens ``x`` [B, N, C] with token weights ``weight`` [B, N].

    Returns (medoid indices [B, K] into N, the final cluster of every token [B, N]).
    """
    b, n, _ = x.shape
    w = weight[..., None]
    medoids = w.topk(k, dim=1).indices[..., 0]                      # [B, K]: heaviest tokens first
    dist = torch.cdist(x, x)                                          # [B, N, N]
    total = (dist * w).sum(dim=-1)                                    # [B, N]: w_i * sum_j d(i, j)
    # the value of a token outside the cluster (made once per length, dtype and device)
    masked = constant("kmedoids_masked", lambda: dist.new_full((n,), _MASKED).sum(), n, dist.dtype, dist.device)
    clusters = constant_range(0, k, x.device)[None, :, None]
    for _ in range(iters):
        assign = nearest_medoid(dist, medoids)
        member = assign[:, None, :] == clusters                       # [B, K, N]
        medoids = torch.where(member, total[:, None, :], masked).argmin(dim=-1)
    return medoids, nearest_medoid(dist, medoids)


def medoid_merge_indices(medoids: torch.Tensor, assign: torch.Tensor, n_prefix: int):
    """For :meth:`TokenState.merge`: (kept [B, P + K]: prefix then medoids; folded [B, N - K]:
    the other patch tokens; for each of them, its slot in the kept list [B, N - K]), all as
    indices into the whole sequence."""
    others = complement(medoids, assign.shape[1])
    return with_prefix(medoids, n_prefix), others + n_prefix, assign.gather(1, others) + n_prefix


def zero_folded(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """``x`` [B, N, C] with every token outside ``keep_idx`` [B, K] zeroed (folded in, they add nothing)."""
    kept = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device).scatter_(1, keep_idx, 1.0)
    return x * kept[..., None]  # a product: faster than masked_fill's copy and fill


# --------------------------------------------------------------------------- hooks

_KEY = "kmedoids_weight"


def _record_weights(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
    st.extra[_KEY] = attention_received(info.attn())
    return x


def _cluster_hook(k_target: int, iters: int):
    def pre(block, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        npf = st.n_prefix
        weight = st.extra.pop(_KEY)[:, npf:]
        k = min(k_target, x.shape[1] - npf)
        if k >= x.shape[1] - npf:
            return x
        medoids, assign = kmedoids_fit(x[:, npf:], k, iters, weight)
        keep_idx, src_idx, dst = medoid_merge_indices(medoids, assign, npf)
        st.ensure_size(x)
        # the other tokens fold in with zero features: the medoid's own features stay exactly
        return st.merge(zero_folded(x, keep_idx), keep_idx, src_idx, dst, mode="sum")

    return pre


@register
class KMedoids(Method):
    name = "kmedoids"
    version = "1"
    summary = ("K-Medoids of the patch tokens before blocks 3, 6, 9 (attention-weighted, top-k init); "
               "the medoids continue, int(N0 * keep_rate ** s) of them.")
    family = "merging"
    params = (
        keep_rate_param("clusters after stage s: int(N0 * keep_rate ** s) of the N0 patch tokens"),
        Param("iters", "int", 3, "K-Medoids iterations (official --cluster_iters)", min=0, max=50),
    )
    knob = "keep_rate"
    restores_grid = GridRestore.UNMERGE

    def apply(self, model, keep_rate: float = 0.7, iters: int = 3):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        sites = bb.sites("quarters")
        for site, k in zip(sites, keep_counts(bb.num_patches, len(sites), keep_rate)):
            plan.mid[site - 1] = _record_weights      # the previous block's attention: the weights
            plan.needs[site - 1] = ("attn",)
            plan.pre[site] = _cluster_hook(k, int(iters))
        return model

    def expected_tokens(self, model, keep_rate: float = 0.7, iters: int = 3):
        return staged_schedule(backbone_of(model, self.name), keep_rate, "pre")
