"""`pitome`: PiToMe (Tran et al., NeurIPS 2024), energy-protected token merging, training-free.

"Accelerating Transformers with Spectrum-Preserving Token Merging" (arXiv 2405.16148).
Official code: https://github.com/hchautran/PiToMe (``algo/pitome/merge.py``:
``pitome_vision``, ``pitome``, ``pitome_bsm``; ``algo/pitome/patch/deit.py`` and
``patch/timm.py``: the DeiT / timm patch used by ``main_ic.py``).  License of the
original: CC BY-NC 4.0 (its LICENSE file).  This file is written anew from the paper and
a reading of that code; nothing is copied.

In every block, between the attention and the MLP, the ``T`` non-prefix tokens are
scored by an *energy*: with ``K`` the attention keys averaged over heads and
``S = normalize(K) @ normalize(K)^T`` (cosine similarities, the diagonal included),
``E_i = mean_j ELU(S_ij - m_l)`` (ELU with alpha 1), where the margin falls linearly with
depth, ``m_l = 0.75 - 0.75 * l / L`` (block ``l`` of ``L``).  The tokens are ranked by
decreasing energy and ``r = floor(T - T * ratio)`` of them are merged away (``ratio`` is
the fraction of tokens a block keeps):

- in the first ``ceil(L / 2)`` blocks (official ``use_bsm_pitome``): bipartite soft
  matching (ToMe's) over *all* ``T`` tokens, the two sets being the even and the odd
  ranks of the energy order; the ``r`` A tokens with the most similar B partners merge;
- in the later blocks: only the ``2r`` highest-energy tokens take part; the others
  (low energy: isolated, informative) are protected.  The even ranks among the ``2r`` are
  A, the odd ranks B, and *every* A token merges into its most similar B token.

Merging is the size-weighted average (ToMe's ``merge_wavg``), through ``TokenState.merge``.
The token order after a merge is the official one: prefix tokens, then (BSM blocks) the
unmerged A tokens in order of decreasing best similarity followed by the B tokens, or
(later blocks) the protected tokens in energy order followed by the B tokens.  Order
only decides ties: every score is order-free.

Faithful to the official DeiT configuration (``patch.deit`` then ``model.ratio = R``):
one ``ratio`` for every block, the margin schedule above, the BSM / PiToMe split at
``ceil(L / 2)``, ELU alpha 1, keys averaged over heads as the metric, and *no*
proportional attention (the official DeiT block calls its attention without the token
sizes, so ``prop_attn`` defaults to False; True adds ``log(size)`` as ToMe does).
Default ``ratio = 0.9125``: ``main_ic.py``'s default (its DeiT sweep runs 0.9 to 0.975).
The same ops as the official code are used in the same order (``F.normalize``,
``F.elu``, ``argsort(descending=True)``, ``max``), so ties resolve the same way.

Choices and deviations:

- every prefix token (class, distillation, registers) is protected: left out of the
  energy and the matching.  The official code removes only the class token (a
  distillation token would be scored and could merge).  With one class token this is
  the official rule; without one (average pooling) nothing is removed, as officially;
- ``r`` is clipped to ``T // 2`` (``ratio`` >= 0.5 never needs it; the official code would
  fail for a smaller ratio in the later blocks) and a block with ``r = 0`` is left as it
  is (the official code reorders such a block's tokens by energy, which changes nothing,
  in the BSM blocks, and fails with an empty ``max`` in the later ones: short sequences
  at low ratios, e.g. 64 patches at ``ratio <= 0.6``);
- the energy's ``T x T`` similarity is a matmul, so fvcore counts it (it is part of the
  method's cost).

Checked against the official code (its ``patch.deit`` on the same random-init timm
weights, run from a scratch copy): equal logits to 1e-6 (float32) and 1e-14 (float64).

Token counts depend on the sequence length only, so the schedule is declared.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.backbones.tokens import with_prefix
from tokenbench.registry import GridRestore, Method, Param, register

ELU_ALPHA = 1.0


# --------------------------------------------------------------------------- algorithm

class Plan(NamedTuple):
    """One block's merge, as indices into the non-prefix tokens."""

    keep: torch.Tensor      # [B, T - r]: tokens that stay, in the official order
    src: torch.Tensor       # [B, r]: tokens merged away
    dst: torch.Tensor       # [B, r]: for each, the position in ``keep`` it merges into


def margins(depth: int) -> list[float]:
    """The official per-block margin: 0.75 at the first block, falling linearly."""
    return [0.75 - 0.75 * (i / depth) for i in range(depth)]


def bsm_blocks(depth: int) -> int:
    """How many leading blocks use bipartite matching over all tokens (official: ceil(L/2))."""
    return math.ceil(depth * 0.5)


def merge_count(n: int, ratio: float) -> int:
    """Tokens merged away of ``n`` (official ``floor(T - T * ratio)``), at most half."""
    if ratio >= 1.0:
        return 0
    return max(0, min(math.floor(n - n * ratio), n // 2))


def energy_order(metric: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(token indices by decreasing energy [B, T], cosine similarities [B, T, T]) of ``metric`` [B, T, C]."""
    unit = F.normalize(metric, p=2, dim=-1)
    sim = unit @ unit.transpose(-1, -2)
    energy = F.elu(sim - margin, alpha=ELU_ALPHA).mean(dim=-1)
    return torch.argsort(energy, descending=True), sim


def _sub_scores(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``sim[b, rows[b]][:, cols[b]]`` for every image: [B, len(rows), len(cols)]."""
    b, t, _ = sim.shape
    s = sim.gather(-1, cols[:, None, :].expand(b, t, cols.shape[-1]))
    return s.gather(-2, rows[:, :, None].expand(b, rows.shape[-1], cols.shape[-1]))


def pitome_plan(metric: torch.Tensor, r: int, margin: float, bsm: bool) -> Plan:
    """The merge of ``r`` of the tokens of ``metric`` [B, T, C] (non-prefix keys) in one block."""
    with torch.no_grad():
        order, sim = energy_order(metric, margin)
        if bsm:
            a_idx, b_idx = order[:, ::2], order[:, 1::2]
            node_max, node_idx = _sub_scores(sim, a_idx, b_idx).max(dim=-1)
            edge = node_max.argsort(dim=-1, descending=True)
            unm, src = edge[:, r:], edge[:, :r]
            keep = torch.cat([a_idx.gather(1, unm), b_idx], dim=1)
            dst = node_idx.gather(1, src) + unm.shape[1]
            return Plan(keep, a_idx.gather(1, src), dst)
        mergeable, protected = order[:, :2 * r], order[:, 2 * r:]
        a_idx, b_idx = mergeable[:, ::2], mergeable[:, 1::2]
        _, dst = _sub_scores(sim, a_idx, b_idx).max(dim=-1)
        return Plan(torch.cat([protected, b_idx], dim=1), a_idx, dst + protected.shape[1])


# --------------------------------------------------------------------------- hook

def _merge_hook(ratio: float, margin: float, bsm: bool):
    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        p = st.n_prefix
        r = merge_count(x.shape[1] - p, ratio)
        if r <= 0:
            return x
        plan = pitome_plan(info.keys[:, p:], r, margin, bsm)
        keep = with_prefix(plan.keep, p)
        return st.merge(x, keep, plan.src + p, plan.dst + p, mode="mean")

    return mid


@register
class PiToMe(Method):
    name = "pitome"
    version = "1"
    summary = "PiToMe: energy-ranked token merging; low-energy (isolated) tokens are protected."
    family = "merging"
    params = (
        Param("ratio", "float", 0.9125,
              "fraction of the non-prefix tokens each block keeps (r = floor(T - T*ratio) merged)",
              min=0.5, max=1.0, identity=1.0),
        Param("prop_attn", "bool", False,
              "proportional attention (log token size on the logits); off in the official DeiT patch"),
    )
    knob = "ratio"
    restores_grid = GridRestore.UNMERGE

    def apply(self, model, ratio=0.9125, prop_attn=False, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        plan.prop_attn = bool(prop_attn)
        if ratio >= 1.0:
            return model
        n_bsm = bsm_blocks(bb.depth)
        for i, m in enumerate(margins(bb.depth)):
            plan.mid[i] = _merge_hook(float(ratio), m, i < n_bsm)
            plan.needs[i] = ("keys",)
        return model

    def expected_tokens(self, model, ratio=0.9125, prop_attn=False, **params):
        bb = backbone_of(model, self.name)
        p, n = bb.n_prefix, bb.num_patches
        tokens, tokens_mlp = [], []
        for _ in range(bb.depth):
            tokens.append(n + p)
            n -= merge_count(n, ratio)
            tokens_mlp.append(n + p)
        return tokens, tokens_mlp
