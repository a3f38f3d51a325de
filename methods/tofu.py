"""`tofu`: Token Fusion (Kim et al., WACV 2024), prune early, merge with MLERP later, training-free.

"Token Fusion: Bridging the Gap between Token Pruning and Token Merging" (arXiv 2312.01026).
There is no official code.  This file follows the paper, with the choices it leaves open
taken from the one public reimplementation we know, the ToFu baseline in the PiToMe
repository (https://github.com/hchautran/PiToMe, ``algo/tofu/merge.py`` and
``algo/tofu/patch/deit.py``; CC BY-NC 4.0); nothing is copied from it.

Every block, between the attention and the MLP, runs ToMe's bipartite soft matching
(``tokenbench.methods.tome.bipartite_soft_matching``: keys averaged over heads, alternate
A / B split, the ``r`` A tokens with the most similar B partners are reduced, at most half
the non-prefix tokens, prefix tokens protected).  What happens to the ``r`` matched A
tokens depends on the block (the paper's Token Fusion: pruning where the model responds
non-linearly to interpolated inputs, i.e. the early blocks, merging where it is close to
linear, the later blocks):

- blocks ``< merge_from`` (**prune**): the matched A tokens are dropped; their B partners
  stay as they are (the paper's "prune" variant of bipartite matching);
- blocks ``>= merge_from`` (**MLERP merge**): each B token and the A tokens matched to it
  become one token whose direction is their average and whose norm is the largest norm
  among them: ``MLERP(x_1..x_k) = (x_bar / ||x_bar||) * max_i ||x_i||`` with ``x_bar``
  the plain average (the paper's norm-preserving extension of SLERP to several tokens).

Choices:

- the layer split: ``merge_from`` defaults to half the depth (``depth // 2``: prune in
  blocks 0..5 and merge in 6..11 of 12), where the paper's ablation of the switch point puts
  it for 12 blocks; ``merge_from = 0`` merges everywhere, ``merge_from >= depth`` prunes
  everywhere.  The PiToMe reimplementation prunes one block more (``'prune' if i <= L // 2``:
  merging from block 7);
- ``x_bar`` is the plain mean of the group, as in the paper; ``size_weighted=true`` takes
  the size-weighted average instead (ToMe's ``merge_wavg``, so a token standing for more
  patches weighs more), a departure from the paper offered for comparison.  The max norm is
  over the tokens before merging;
- a B token that receives nothing is left exactly as it is (MLERP of one token is the
  token itself);
- token sizes: merging adds them (as ToMe); pruning drops the pruned tokens' sizes (their
  patches are gone).  ``prop_attn`` (default True, as ToMe, on which ToFu is built) adds
  ``log(size)`` to the attention logits; only merged tokens have sizes above one;
- ``r`` is ToMe's knob: one number for every block or a per-block list (padded with
  zeros), at most half the non-prefix tokens per block; the token order after a block is
  ToMe's.

Differences from the PiToMe repository's reimplementation: it switches to merging one
block later (above); its MLERP step takes the plain mean (as ours by default) but rescales
it by ``max_norm / ||x_b||`` (the B token's norm before merging) rather than by
``max_norm / ||mean||``, so its merged tokens do not have the group's largest norm, which the
paper's MLERP is for; it carries no token sizes (so no proportional attention); its knob is
a keep ratio (``r = floor(N - N * ratio)``, class token counted), not ``r``.  Its pruning blocks equal ours exactly (checked on the same
random weights with ``prop_attn=False`` and the same per-block ``r``).

Token counts depend on the sequence length only, so the schedule is declared (it is
ToMe's).
"""

from __future__ import annotations

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.backbones.tokens import gather_tokens
from tokenbench.methods.tome import (as_token_indices, bipartite_soft_matching, install_per_block, kept_indices,
                                    merged_schedule)
from tokenbench.methods._knobs import PROP_ATTN, r_param
from tokenbench.registry import GridRestore, Method, Param, register

# merge_from's default: half the depth (the paper's switch point, 6 of 12 blocks)
HALF_DEPTH = -1


def merge_start(merge_from: int, depth: int) -> int:
    """The first merging block: ``merge_from``, or half the depth for :data:`HALF_DEPTH`."""
    return depth // 2 if merge_from == HALF_DEPTH else int(merge_from)


# --------------------------------------------------------------------------- algorithm

def group_max_norm(x: torch.Tensor, keep_idx: torch.Tensor, src_idx: torch.Tensor,
                   dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the largest norm in each kept token's group [B, K], which kept tokens receive a merge [B, K])."""
    norms = x.norm(dim=-1)
    group = gather_tokens(norms, keep_idx).scatter_reduce(1, dst, gather_tokens(norms, src_idx), reduce="amax")
    touched = torch.zeros_like(keep_idx, dtype=torch.bool).scatter(1, dst, 1)
    return group, touched


def mlerp_rescale(merged: torch.Tensor, max_norm: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
    """MLERP: the merged tokens keep their direction and take their group's largest norm."""
    rescaled = merged / merged.norm(dim=-1, keepdim=True) * max_norm[..., None]
    return torch.where(touched[..., None], rescaled, merged)


# --------------------------------------------------------------------------- hook

def _hook(r: int, prune: bool, size_weighted: bool):
    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        m = bipartite_soft_matching(info.keys, r, st.n_prefix)
        if m is None:
            return x
        if prune:  # only the kept tokens' indices: the pruned ones and their partners are not needed
            return st.keep(x, kept_indices(m, x.shape[1]), kind="prune")
        keep_idx, src_idx, dst = as_token_indices(m, x.shape[1])
        max_norm, touched = group_max_norm(x, keep_idx, src_idx, dst)
        st.ensure_size(x)  # sizes add up under either mean (proportional attention reads them)
        merged = st.merge(x, keep_idx, src_idx, dst, mode="mean" if size_weighted else "avg")
        return mlerp_rescale(merged, max_norm, touched)

    return mid


@register
class ToFu(Method):
    name = "tofu"
    version = "2"
    summary = "Token Fusion: ToMe's matching; prune in early blocks, norm-preserving MLERP merge later."
    family = "hybrid"
    params = (
        r_param("tokens removed per block: one number, or a list (one per block, padded with zeros); "
                "at most half the tokens in a block"),
        Param("merge_from", "int", HALF_DEPTH,
              "first block that merges (MLERP); earlier blocks prune; -1: half the depth (depth // 2, "
              "the paper's 6 of 12)", min=-1),
        Param("size_weighted", "bool", False,
              "MLERP's average weighted by token sizes (ToMe's) instead of the paper's plain mean"),
        PROP_ATTN,
    )
    knob = "r"
    restores_grid = GridRestore.FILL_UNMERGE

    def apply(self, model, r=16, merge_from=HALF_DEPTH, size_weighted=False, prop_attn=True, **params):
        start = merge_start(merge_from, backbone_of(model, self.name).depth)
        return install_per_block(model, self.name, r, prop_attn,
                                 lambda i, ri: _hook(ri, prune=i < start, size_weighted=bool(size_weighted)))

    def expected_tokens(self, model, r=16, merge_from=HALF_DEPTH, size_weighted=False, prop_attn=True, **params):
        return merged_schedule(backbone_of(model, self.name), r)
