"""`diffrate`: DiffRate (Chen et al., ICCV 2023), prune then merge by searched per-block counts.

Paper: M. Chen, W. Shao, P. Xu, M. Lin, K. Zhang, F. Chao, R. Ji, Y. Qiao, P. Luo,
"DiffRate: Differentiable Compression Rate for Efficient Vision Transformers", ICCV 2023.
Official code: https://github.com/OpenGVLab/DiffRate (``DiffRate/patch/deit.py``,
``DiffRate/merge.py``, ``DiffRate/ddp.py``, searched schedules in ``compression_rate.json``).
License of the original: the repository has no license file (no license granted); its
files derived from ToMe keep Meta's header (ToMe is CC BY-NC 4.0).  Nothing is copied here.

Inference (what this adapter does; training-free with a searched schedule, so
``learned = False``): in every block, between the attention residual and the MLP,

1. the patch tokens are ranked by the class token's attention (its softmax row, with the
   proportional-attention bias, averaged over heads), most attended first;
2. **prune**: only the ``prune[i]`` first tokens (class token included) stay;
3. **merge**: of those, the ``merge[i]`` first stay and every other one folds into the
   kept token it is most similar to (cosine similarity of the hidden states ``x`` after
   the attention residual; never into the class token).  A kept token becomes the plain
   (unweighted) mean of itself and the tokens folded into it (``scatter_reduce`` mean),
   and its size grows by the folded tokens' sizes *times their similarity* to it (the
   official "proportional attention considering similarity"; no clamp at inference, so a
   negative similarity can shrink a size, as in the official code).
   Sizes enter the next blocks' attention as ``log(size)`` (proportional attention).

The counts are the official ones (``prune_kept_num`` / ``merge_kept_num`` of
``compression_rate.json``: tokens kept *including the class token*, 197 = all of a
224-px /16 model).  Defaults: the official DeiT-S schedule searched for 2.9 GFLOPs
(:data:`SCHEDULES`, which also holds the other shipped DeiT-S targets; pass one with
``--set prune=[...] merge=[...]``).  As in the official forward, a count above the
tokens present keeps them all, and merging happens only where ``merge[i] < prune[i]``.

Choices and deviations:

- **Other grids**: a count ``k`` means the fraction ``(k - 1) / 196`` of the patch tokens;
  a model with ``n0`` patches keeps ``ceil(n0 * ((k - 1) / 196) ** power)`` (at least one),
  which is exactly ``k - 1`` for 196 patches and ``power = 1``.
- **The budget knob** ``power`` (not in the paper): every kept fraction is raised to this
  power, i.e. each block's own keep ratio is scaled in log space.  ``1`` is the schedule
  as searched, ``0`` the dense model, ``> 1`` more reduction; FLOPs fall monotonically
  with it, so a matched-FLOPs search moves it (the shipped schedules exist only for a few
  DeiT targets; re-running the differentiable search per target is a training job).
- Ranking is skipped in a block that neither prunes nor merges (the official code sorts the
  tokens there too; token order does not change the result beyond float rounding).
- Every prefix token (class, distillation, registers) is protected: kept in front, never
  ranked, never a merge destination.  The official code handles one class token only.
- The schedule lists need one entry per block (as the official ``set_kept_num``).

The ranking, pruning and matching are pure functions (:func:`rank_tokens`,
:func:`match_to_kept`); the hook changes tokens only through ``TokenState.keep`` and
``TokenState.merge`` (``mode="avg"`` with ``size_weights``).  Counts depend on shapes
alone, so the method compiles as one graph (tests/test_compile.py).  Needs a class token.

Checked against the official code (its ``DiffRate/patch/deit.py`` run on the same random
weights, timm 1.0.31): logits equal to float32 rounding for DeiT-S at 224 px (all five
shipped schedules) and a 64-patch ViT.  fvcore counts 2.916 GFLOPs for DeiT-S at the
default schedule (the official analytic count: 2.905; the difference is the layer norms
and the class-attention and similarity products, which the official formula leaves out).

Not implemented here: the differentiable rate search itself (training the per-block
kept-count distributions of ``ddp.py`` to a FLOPs target with the ViT frozen); ``tokenbench
train --method diffrate`` fine-tunes the ViT under the fixed schedule instead.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.errors import UserError
from tokenbench.registry import Method, Param, register

REF_TOKENS = 197  # the official counts are for 196 patches + the class token

# The official searched schedules for DeiT-S (compression_rate.json, "ViT-S-DeiT"), by GFLOPs target.
SCHEDULES = {
    "2.3": ([197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3],
            [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3]),
    "2.5": ([197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3],
            [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]),
    "2.7": ([197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3],
            [197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3]),
    "2.9": ([197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3],
            [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]),
    "3.1": ([197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3],
            [197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3]),
}
DEFAULT_PRUNE, DEFAULT_MERGE = SCHEDULES["2.9"]


# --------------------------------------------------------------------------- algorithm

def kept_patches(count: int, n0: int, power: float = 1.0) -> int:
    """Patch tokens a schedule entry ``count`` (official, class token included) keeps of ``n0``."""
    frac = (count - 1) / (REF_TOKENS - 1)
    if frac >= 1 or power == 0:
        return n0
    return max(1, math.ceil(n0 * frac ** power - 1e-6))


def block_counts(prune, merge, depth: int, n0: int, power: float = 1.0) -> list[tuple[int, int]]:
    """Per block, the patch tokens (kept by pruning, kept by merging), before clipping to what is present."""
    out = []
    for name, v in (("prune", prune), ("merge", merge)):
        if isinstance(v, (list, tuple)) and len(v) != depth:
            raise UserError(f"diffrate: {name} has {len(v)} entries but the model has {depth} blocks "
                            f"(give one kept-token count per block)")
    ps = list(prune) if isinstance(prune, (list, tuple)) else [prune] * depth
    ms = list(merge) if isinstance(merge, (list, tuple)) else [merge] * depth
    for p, m in zip(ps, ms):
        kp = kept_patches(p, n0, power)
        # official: merge only where merge_kept_num < prune_kept_num
        km = kept_patches(m, n0, power) if m < p else kp
        out.append((kp, min(kp, km)))
    return out


def rank_tokens(cls_attn: torch.Tensor) -> torch.Tensor:
    """Patch indices [B, n] by decreasing class attention ``cls_attn`` [B, n] (official ``torch.sort``)."""
    return torch.sort(cls_attn, dim=1, descending=True)[1]


def match_to_kept(x: torch.Tensor, n_kept: int, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of ``x`` [B, N, C] from ``n_kept`` on, the most similar of the first
    ``n_kept`` (cosine similarity; never a prefix token): (its index [B, N - n_kept], the similarity)."""
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        sim = metric[:, n_kept:] @ metric[:, :n_kept].transpose(-1, -2)
        sim[..., :n_prefix] = -math.inf
        node_max, node_idx = sim.max(dim=-1)
    return node_idx, node_max


# --------------------------------------------------------------------------- hook

def _diffrate_hook(n_prune: int, n_merge: int):
    """Prune to ``n_prune`` patch tokens, then merge down to ``n_merge`` (both clipped to those present)."""

    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        p = st.n_prefix
        n = x.shape[1] - p
        kp = min(n, n_prune)
        km = min(kp, n_merge)
        if kp == n and km == kp:
            return x
        order = rank_tokens(info.cls_attn()[:, p:])[:, :kp] + p
        prefix = torch.arange(p, device=x.device, dtype=order.dtype).expand(x.shape[0], p)
        x = st.keep(x, torch.cat([prefix, order], dim=1))      # ranked, pruned
        if km == kp:
            return x
        node_idx, node_max = match_to_kept(x.detach(), p + km, p)
        keep_idx = torch.arange(p + km, device=x.device).expand(x.shape[0], -1)
        src_idx = torch.arange(p + km, p + kp, device=x.device).expand(x.shape[0], -1)
        return st.merge(x, keep_idx, src_idx, node_idx, mode="avg", size_weights=node_max)

    return mid


def _counts(model, name, prune, merge, power):
    bb = backbone_of(model, name)
    return bb, block_counts(prune, merge, bb.depth, bb.num_patches, float(power))


@register
class DiffRate(Method):
    name = "diffrate"
    family = "hybrid"
    version = "1"
    summary = ("DiffRate: per block, prune by class attention, then merge the least attended kept "
               "tokens into their most similar ones, by searched counts (DeiT-S 2.9 GFLOPs).")
    params = (
        Param("prune", "int_or_list", DEFAULT_PRUNE,
              "tokens kept by pruning in each block, class token included, on the official 197-token "
              "scale (one per block; default: the official DeiT-S 2.9 GFLOPs search)", min=2, max=REF_TOKENS),
        Param("merge", "int_or_list", DEFAULT_MERGE,
              "tokens kept by merging in each block, class token included, on the official 197-token "
              "scale (one per block; default: the official DeiT-S 2.9 GFLOPs search)", min=2, max=REF_TOKENS),
        Param("power", "float", 1.0,
              "kept fractions raised to this power: 1 = the schedule as given, 0 = dense, >1 = fewer "
              "tokens (the matched-FLOPs knob)", min=0.0, max=4.0),
        Param("prop_attn", "bool", True, "proportional attention: add log(token size) to the attention logits"),
    )
    knob = "power"
    seed_param = None
    learned = False
    needs_class_token = True
    deterministic = True

    def apply(self, model, prune=DEFAULT_PRUNE, merge=DEFAULT_MERGE, power=1.0, prop_attn=True, **params):
        bb, counts = _counts(model, self.name, prune, merge, power)
        plan = bb.prepare(self.name, need_class_token=True)
        plan.prop_attn = bool(prop_attn)
        n = bb.num_patches
        for i, (kp, km) in enumerate(counts):
            if min(n, kp, km) < n:  # a block that cannot reduce gets no hook
                plan.mid[i] = _diffrate_hook(kp, km)
                plan.needs[i] = ("cls_attn",)
            n = min(n, km)
        return model

    @classmethod
    def reduces(cls, params):
        if params.get("power", 1.0) == 0:
            return False
        vals = [v for k in ("prune", "merge")
                for v in (params[k] if isinstance(params[k], list) else [params[k]])]
        return min(vals) < REF_TOKENS

    def expected_tokens(self, model, prune=DEFAULT_PRUNE, merge=DEFAULT_MERGE, power=1.0, prop_attn=True,
                        **params):
        bb, counts = _counts(model, self.name, prune, merge, power)
        p, n = bb.n_prefix, bb.num_patches
        tokens, tokens_mlp = [], []
        for kp, km in counts:
            tokens.append(n + p)
            n = min(n, kp, km)
            tokens_mlp.append(n + p)
        return tokens, tokens_mlp
