"""`ppt`: Token Pruning and Pooling (Wu et al., "PPT: Token Pruning and Pooling for Efficient
Vision Transformers", arXiv 2310.01812, 2023), training-free, as in the official code.

Official code: https://github.com/xjwu1024/PPT (``ppt_deit.py``, ``merge.py``), Apache-2.0
(its ``merge.py`` is ToMe's, whose own license is CC BY-NC 4.0).  Read, not copied.

At each site (the official DeiT-S evaluation: ``--pp_loc_list 3 6 9``, our quarter sites), between
the attention and the MLP, ``r`` tokens are removed per image, by one of two policies chosen per
image from the *variance* of its significance scores:

- significance score of patch token j (ATS's): the class token's attention to j, summed over heads,
  times the L2 norm of j's value vector (all heads concatenated), normalised over the patch tokens
  to sum 1;
- variance (unbiased, ``torch.var``) of these scores below ``threshold`` (official ``7e-5``): the
  image's tokens are about equally important, so the duplicates are *pooled*: ToMe's bipartite
  soft matching on the keys averaged over heads, size-weighted average
  (``tokenbench.methods.tome``'s matching, merged through ``TokenState.merge``);
- otherwise the ``r`` lowest-scoring tokens are *pruned*; the others are kept in order of
  decreasing score (the official ``torch.sort(descending=True)`` order, the class token first
  through its score of 2), which the next site's even/odd ToMe split sees.

Both policies remove the same count (``r = min(r, (N - prefix) // 2)``, the official clip), so
token counts are static per block.  The per-image choice runs without Python branching on tensor
values: both selections are computed for the whole batch, the per-image one is picked with
``torch.where``, and one ``TokenState.merge`` call applies it, with ``drop`` True for the pruned
images' removed tokens (discarded, not folded; the kept tokens keep their sizes).  The official
code splits the batch with ``nonzero`` into two sub-batches instead; results are the same up to
float rounding (a pruned token is written back as ``x * size / size``).

Faithful: sites, ``r`` (``--r_tokens 50``; a list gives one value per site, as the official
``parse_r`` list popped once per site), ``threshold``, proportional attention on (``--prop_attn``
defaults to on), scores from the softmax attention with the ``log(size)`` bias, the orders above.
Deviations: models with several prefix tokens (distillation, registers) get all of them protected
(score 2, never merged); the official code protects the distillation token only from merging.
With ``prop_attn`` off the official code forgets token sizes at each site (it re-reads them as
ones) and pools later sites unweighted; here pooling always weights by the true sizes.
"""

from __future__ import annotations

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.methods.tome import as_token_indices, bipartite_soft_matching, clip_r, schedule
from tokenbench.methods._knobs import PROP_ATTN, r_param
from tokenbench.registry import GridRestore, Method, Param, register


# --------------------------------------------------------------------------- algorithm

def significance(cls_attn: torch.Tensor, v: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """ATS significance scores [B, N]: class attention (summed over heads) times value norm,
    normalised over the patch tokens; prefix tokens score 2 (always kept).

    ``cls_attn`` [B, H, N] (the class token's softmax row per head), ``v`` [B, H, N, hd]."""
    b, h, n, hd = v.shape
    v_norm = v.transpose(1, 2).reshape(b, n, h * hd).norm(dim=-1)
    s = (cls_attn.sum(1) * v_norm)[:, n_prefix:]
    s = s / s.sum(dim=1, keepdim=True)
    return torch.cat([s.new_full((b, n_prefix), 2.0), s], dim=1)


def choose_pooling(scores: torch.Tensor, n_prefix: int, threshold: float) -> torch.Tensor:
    """[B] bool: True where the score variance is below ``threshold`` (pool), else prune."""
    return torch.var(scores[:, n_prefix:], dim=1) < threshold


def prune_indices(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept tokens in decreasing score order [B, N - r], pruned tokens [B, r])."""
    order = torch.sort(scores, descending=True, dim=-1)[1]
    n = scores.shape[1]
    return order[:, :n - r], order[:, n - r:]


def ppt_selection(keys: torch.Tensor, scores: torch.Tensor, r: int, n_prefix: int, threshold: float):
    """One PPT step as one merge: (keep_idx [B, K], src_idx [B, r], dst [B, r], drop [B, r]).

    Pooling images: ToMe's bipartite matching; pruning images: the top scores kept, the rest
    dropped (``drop`` True).  ``r`` must already be clipped."""
    b = keys.shape[0]
    pool = choose_pooling(scores, n_prefix, threshold)
    keep_pr, src_pr = prune_indices(scores, r)
    m = bipartite_soft_matching(keys, r, n_prefix)
    keep_po, src_po, dst_po = as_token_indices(m, keys.shape[1])
    sel = pool[:, None]
    keep = torch.where(sel, keep_po, keep_pr)
    src = torch.where(sel, src_po, src_pr)
    dst = torch.where(sel, dst_po, torch.zeros_like(dst_po))
    drop = (~sel).expand(b, r)
    return keep, src, dst, drop


# --------------------------------------------------------------------------- hook

def _ppt_hook(r: int, threshold: float):
    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        p = st.n_prefix
        rr = clip_r(r, x.shape[1], p)
        if rr <= 0:
            return x
        scores = significance(info.cls_attn(per_head=True), info.values, p)
        keep, src, dst, drop = ppt_selection(info.keys, scores, rr, p, threshold)
        return st.merge(x, keep, src, dst, mode="mean", drop=drop)

    return mid


@register
class PPT(Method):
    name = "ppt"
    version = "1"
    summary = ("Token Pruning and Pooling: per image, ToMe pooling when the significance scores' "
               "variance is low, else pruning of the least significant tokens (blocks 3, 6, 9).")
    family = "hybrid"
    params = (
        r_param("tokens removed at each site (blocks 3, 6, 9): one number, or a list (one per site); "
                "at most half the non-prefix tokens", default=50),
        Param("threshold", "float", 7e-5,
              "score-variance threshold: images below it pool (merge), the others prune", min=0.0),
        PROP_ATTN,
    )
    knob = "r"
    restores_grid = GridRestore.FILL_UNMERGE
    needs_class_token = True

    def apply(self, model, r=50, threshold=7e-5, prop_attn=True, **params):
        bb = backbone_of(model, self.name)
        sites = bb.sites("quarters")
        rs = schedule(r, len(sites), self.name, "reduction sites")  # the official parse_r
        plan = bb.prepare(self.name)
        plan.prop_attn = bool(prop_attn)
        for i, ri in zip(sites, rs):
            if ri > 0:
                plan.mid[i] = _ppt_hook(ri, float(threshold))
                plan.needs[i] = ("keys", "cls_attn", "values")
        return model

    def expected_tokens(self, model, r=50, threshold=7e-5, prop_attn=True, **params):
        bb = backbone_of(model, self.name)
        p = bb.n_prefix
        sites = bb.sites("quarters")
        per_site = dict(zip(sites, schedule(r, len(sites), self.name, "reduction sites")))
        n = bb.num_patches + p
        tokens, tokens_mlp = [], []
        for i in range(bb.depth):
            tokens.append(n)
            n -= clip_r(per_site.get(i, 0), n, p)
            tokens_mlp.append(n)
        return tokens, tokens_mlp
