"""`mctf`: Multi-Criteria Token Fusion with one-step-ahead attention (Lee, Choi and Kim,
CVPR 2024), off the shelf (the paper's fine-tuning is not needed to run it).

Official code: https://github.com/mlvlab/MCTF (``utils/mctf.py``, ``models/modules/blocks.py``,
``models/SA/MHSA.py``), MIT license.  Read, not copied.  Defaults: the official DeiT-S evaluation
(``run/eval_deit_s_mctf.sh``: ``--mctf_type [16,0,0,1,1,1,20,40,1,1,0] --r_evals [16]
--activate_layer [1..11]``): ``r = 16`` in every block but the first, proportional attention on,
one-step-ahead attention on (mode 1), ``tau_sim = 1``, ``tau_info = 20``, ``tau_size = 40``,
bidirectional matching on, attention-weighted pooling (type 1).

In an active block, *before* its attention (the official block merges its input):

1. the attention of the block's input is computed (``softmax(q k^T * scale + log size)``, all heads
   and rows: the full matrix is needed, see 3);
2. tokens are split into A (even) and B (odd); the edge weight between a in A and b in B is the
   product of three criteria: similarity ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` on the
   tokens themselves (not the keys), informativeness ``(I_a I_b) ** (1 / tau_info)`` with ``I`` the
   inverse of the attention each token receives (averaged over heads and queries, scaled to max
   1), and size ``(S_a S_b) ** (1 / tau_size)`` with ``S`` the inverse size scaled to max 1 (1
   before any merge).  ``r1 = r // 2`` A tokens with the heaviest best edges fold into their B
   partners; then (bidirectional) ``r2 = r - r1`` B tokens fold into their best *unmerged* A token,
   with the same (pre-merge) weights.  The class token never merges (its A row is ``-inf``);
3. fusion is attention-weighted: a group becomes ``sum w_i x_i / sum w_i`` with
   ``w = (attention received) * size / max size``; sizes add up.  With one-step-ahead attention
   (mode 1) the block's attention is not recomputed: the matrix of step 1 is fused too (columns of
   a group summed, rows averaged with the same weights ``w``) and multiplied with the values of
   the fused tokens.  This is why this method asks for the full attention matrix and hands it to
   the block (``plan.attend``; the block then projects only the values, as the official
   ``MHSA`` does).  The fused matrix is not formed: the block multiplies the unfused matrix by
   the fused values, each column reading its group's value (the column sums, by linearity), and
   pools the rows of the product with the weights ``w`` (``AheadAttention``).  The result is
   the official one up to float summation order; the product costs ``N^2`` instead of ``K^2``
   multiply-adds per head (DeiT-S: 2.62 GFLOPs where fusing the matrix counts 2.60) and saves
   two gather-and-scatter passes over the [B, H, N, N] matrix (about 10 ms a block at batch
   16 on a 2-core CPU, a tenth of MCTF's time).  Mode 2 (the official "precise" variant) recomputes the attention after fusing.

The resulting order is the official one: ``[unmerged A tokens in order (the class token first),
unmerged B tokens by decreasing best edge]``.  The two folds are applied as one
``TokenState.merge`` (``mode="sum"`` on ``w x``, then divided by the summed weights): the group
sums are the official ones up to float summation order.  The official ``r`` clip is kept:
``r = t - 10`` when fewer than 10 tokens would remain, and at most half the non-class tokens.

Deviations and limits: only one prefix token (the class token; the official code protects
several only on the A side); ``one_step_ahead = 0`` (fusing after the MLP) and pooling types 2
(max) are not offered; ``r`` as a fraction of the tokens (official ``r < 1``) is not offered.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from tokenbench.backbones import TokenState, backbone_of
from tokenbench.backbones.vit import attention_probs
from tokenbench.backbones.tokens import constant_range
from tokenbench.errors import UserError
from tokenbench.methods.tome import schedule
from tokenbench.methods._knobs import PROP_ATTN, r_param
from tokenbench.registry import GridRestore, Method, Param, register


# --------------------------------------------------------------------------- algorithm

class Fusion(NamedTuple):
    """A fusion as indices into the whole sequence, for :meth:`TokenState.merge`."""

    keep_idx: torch.Tensor  # [B, K]: tokens that stay, in the official order
    src_idx: torch.Tensor   # [B, R]: tokens folded away (A tokens, then B tokens)
    dst: torch.Tensor       # [B, R]: position in the kept list each of them ends in


def clip_r(r: int, t: int, n_prefix: int = 1) -> int:
    """Tokens fused at ``t`` tokens: the official clip (keep at least 10, at most half)."""
    if t - r < 10:
        r = t - 10
    return max(0, min(int(r), (t - n_prefix) // 2))


def edge_weights(x: torch.Tensor, recv: torch.Tensor, size, tau_sim: float, tau_info: float,
                 tau_size: float) -> torch.Tensor:
    """Multi-criteria weights [B, |A|, |B|] between A (even) and B (odd) tokens.

    ``x`` [B, N, C] the tokens, ``recv`` [B, N] the attention each receives (mean over heads and
    queries), ``size`` [B, N, 1] or None.  A tau of 0 switches its criterion off."""
    unit = x / x.norm(dim=-1, keepdim=True)
    a, b = unit[:, ::2], unit[:, 1::2]
    if tau_sim:
        w = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    else:
        w = torch.ones(a.shape[0], a.shape[1], b.shape[1], device=x.device, dtype=x.dtype)
    if tau_info > 0:
        inv = 1 / recv
        inv = inv / inv.max(1, keepdim=True)[0]
        w = w * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        inv = 1 / size[..., 0]
        inv = inv / inv.max(1, keepdim=True)[0]
        w = w * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau_size)
    return w


def bidirectional_matching(scores: torch.Tensor, r: int, bidirection: bool = True) -> Fusion:
    """The official two-step matching on ``scores`` [B, |A|, |B|] (class token = A[0], row -inf)."""
    bsz, n_a, n_b = scores.shape
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm, src = edge_idx[:, r1:].sort(dim=1)[0], edge_idx[:, :r1]   # A tokens kept (in order) / folded
    dst_b = node_idx.gather(1, src)                                  # the B token each folds into
    n_unm = unm.shape[1]
    dev = scores.device
    if bidirection:
        back = scores.gather(1, unm[..., None].expand(-1, -1, n_b)).transpose(1, 2)  # [B, |B|, |unm|]
        node_max2, node_idx2 = back.max(dim=-1)
        edge_idx2 = node_max2.sort(dim=-1, descending=True)[1]
        unm2, src2 = edge_idx2[:, r2:], edge_idx2[:, :r2]            # B tokens kept / folded
        dst2 = node_idx2.gather(1, src2)                             # position in the kept A list
    else:
        unm2 = torch.arange(n_b, device=dev).expand(bsz, n_b)
        src2 = dst2 = unm2[:, :0]
    # where each B token ends: its own slot if kept, else the A token it folds into
    b_pos = torch.empty(bsz, n_b, dtype=torch.long, device=dev)
    b_pos.scatter_(1, unm2, constant_range(n_unm, n_unm + unm2.shape[1], dev).expand(bsz, -1))
    b_pos.scatter_(1, src2, dst2)
    keep = torch.cat([2 * unm, 2 * unm2 + 1], dim=1)
    src_all = torch.cat([2 * src, 2 * src2 + 1], dim=1)
    dst_all = torch.cat([b_pos.gather(1, dst_b), dst2], dim=1)
    return Fusion(keep, src_all, dst_all)


def mctf_fusion(x: torch.Tensor, attn: torch.Tensor, size, r: int, tau_sim: float, tau_info: float,
                tau_size: float, bidirection: bool = True, recv=None) -> Fusion:
    """Which tokens fuse: ``x`` [B, N, C] the block input, ``attn`` [B, H, N, N] (``recv``: its
    mean over heads and queries, [B, N], when the caller has it already)."""
    with torch.no_grad():
        recv = attn.mean(dim=(1, 2)) if recv is None else recv
        w = edge_weights(x, recv, size, tau_sim, tau_info, tau_size)
        w[:, 0, :].fill_(-math.inf)                                   # the class token stays
        return bidirectional_matching(w, r, bidirection)


def group_sum(t: torch.Tensor, f: Fusion, dim: int) -> torch.Tensor:
    """Sum ``t`` over the fusion's groups along token dimension ``dim`` (batch first).

    The gather and scatter run along ``dim`` in place (no ``movedim``): on the attention
    matrix, gathering key columns reads along contiguous rows and gathering query rows copies
    whole rows, where a moved dimension made every read strided (a seventh of MCTF's time).
    A [B, N, 1] tensor along ``dim=1`` takes the indices as [B, K, 1] views, without expanding."""
    shape = list(t.shape)

    def idx(i: torch.Tensor) -> torch.Tensor:
        view = [i.shape[0]] + [1] * (t.dim() - 1)
        view[dim] = i.shape[1]
        out = i.view(view)
        return out if list(out.shape) == shape[:dim] + [i.shape[1]] + shape[dim + 1:] else \
            out.expand(*shape[:dim], i.shape[1], *shape[dim + 1:])

    kept = t.gather(dim, idx(f.keep_idx))
    return kept.scatter_add(dim, idx(f.dst), t.gather(dim, idx(f.src_idx)))


def pooling_weights(attn: torch.Tensor, size, pooling: int, recv=None) -> torch.Tensor:
    """Per-token fusion weights [B, N, 1]: 1 attention * size / max size, 0 size, 3 one
    (``recv``: the attention's mean over heads and queries, [B, N], when the caller has it)."""
    if size is None:
        size = attn.new_ones(attn.shape[0], attn.shape[-1], 1)
    if pooling == 1:
        recv = attn.mean(dim=(1, 2)) if recv is None else recv
        return recv[..., None] * (size / size.amax(dim=1, keepdim=True))
    if pooling == 0:
        return size
    return torch.ones_like(size)


def fused_group(f: Fusion, n: int) -> torch.Tensor:
    """[B, n]: the position in the kept list of the fused token each of ``n`` tokens went into."""
    bsz, k = f.keep_idx.shape
    group = f.keep_idx.new_empty(bsz, n)
    group.scatter_(1, f.keep_idx, constant_range(0, k, group.device).expand(bsz, k))
    return group.scatter_(1, f.src_idx, f.dst)


class AheadAttention(NamedTuple):
    """Attention probabilities computed before the tokens were fused, for the fused tokens'
    attention (one-step-ahead attention), without fusing the matrix itself.

    Fusing ``attn`` sums the columns of each group and pools its rows; the block computes the
    same product with the fused values instead: ``pool(attn @ v[:, :, group])``, each old
    token's column reading the value of the fused token it went into (a column sum, by
    linearity) and the rows pooled after the product (the rows' pooling commutes with it).
    This multiplies an N-row matrix by the values (N^2 instead of K^2 multiply-adds per head)
    and never copies the [B, H, N, N] matrix, which gathering its groups did twice.
    """

    attn: torch.Tensor                                  # [B, H, N, N] on the tokens before fusing
    group: torch.Tensor                                 # [B, N] int64: the fused token each went into
    pool: Callable[[torch.Tensor], torch.Tensor]        # rows [B, N, C] -> fused rows [B, K, C]

    def mix(self, v: torch.Tensor, attn_drop: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The fused tokens' values [B, H, K, head_dim] -> the attention's rows [B, K, H * head_dim]."""
        b, h, _, hd = v.shape
        v_old = v.gather(2, self.group[:, None, :, None].expand(-1, h, -1, hd))
        return self.pool((attn_drop(self.attn) @ v_old).transpose(1, 2).reshape(b, self.attn.shape[2], h * hd))


def ahead_attention(attn: torch.Tensor, f: Fusion, w: torch.Tensor, norm: torch.Tensor) -> AheadAttention:
    """One-step-ahead attention: ``attn`` [B, H, N, N] with its key groups summed and its query
    groups averaged with ``w`` [B, N, 1] (``norm`` [B, K, 1]: the groups' summed ``w``), as the
    official code fuses the matrix; the block applies both to its product with the values
    (:class:`AheadAttention`), so the matrix is never copied."""
    return AheadAttention(attn, fused_group(f, attn.shape[-1]),
                          lambda rows: group_sum(rows * w, f, dim=1) / norm)


# --------------------------------------------------------------------------- hook

def _mctf_hook(r: int, tau_sim: float, tau_info: float, tau_size: float, bidirection: bool,
               one_step_ahead: int, pooling: int):
    def pre(block, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        rr = clip_r(r, x.shape[1], st.n_prefix)
        if rr <= 0:
            return x
        attn = attention_probs(block, x, st)
        recv = attn.mean(dim=(1, 2))                # attention each token receives: both criteria read it
        f = mctf_fusion(x, attn, st.size, rr, tau_sim, tau_info, tau_size, bidirection, recv)
        w = pooling_weights(attn, st.size, pooling, recv).detach()
        norm = group_sum(w, f, dim=1)
        if one_step_ahead == 1:
            st.extra[_AHEAD] = ahead_attention(attn, f, w, norm)
        st.ensure_size(x)
        out = st.merge(x * w, f.keep_idx, f.src_idx, f.dst, mode="sum")
        return out / norm

    return pre


_AHEAD = "mctf_ahead"  # st.extra: the attention the block's own pre hook computed, used once


def _take_ahead(block, x: torch.Tensor, st: TokenState):
    """``plan.attend``: the one-step-ahead attention the pre hook left, once (None: recompute)."""
    ahead = st.extra.pop(_AHEAD, None)
    return None if ahead is None else ahead.mix


@register
class MCTF(Method):
    name = "mctf"
    version = "1"
    summary = ("Multi-Criteria Token Fusion: bidirectional matching weighted by similarity, "
               "informativeness and size; attention-weighted fusion with one-step-ahead attention.")
    family = "merging"
    params = (
        r_param("tokens fused per block: one number for blocks 1..depth-1 (the official activate_layer), "
                "or a list (one per block, padded with zeros)"),
        Param("tau_sim", "float", 1.0, "temperature of the similarity criterion (0: off)", min=0.0),
        Param("tau_info", "float", 20.0, "temperature of the informativeness criterion (0: off)", min=0.0),
        Param("tau_size", "float", 40.0, "temperature of the size criterion (0: off)", min=0.0),
        Param("bidirection", "bool", True, "bidirectional matching (A to B, then B to the unmerged A)"),
        Param("one_step_ahead", "int", 1, "1: reuse the fused attention of the block's input (official); "
                                          "2: recompute it after fusing (official 'precise')", choices=(1, 2)),
        Param("pooling", "int", 1, "fusion weights: 1 attention x size (official), 0 size, 3 plain mean",
              choices=(0, 1, 3)),
        PROP_ATTN,
    )
    knob = "r"
    restores_grid = GridRestore.UNMERGE
    needs_class_token = True

    def apply(self, model, r=16, tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirection=True,
              one_step_ahead=1, pooling=1, prop_attn=True, **params):
        bb = backbone_of(model, self.name)
        if bb.n_prefix != 1:
            raise UserError(f"mctf: needs exactly one prefix token (the class token); this model has {bb.n_prefix}")
        rs = schedule(r, bb.depth, self.name, first=1)  # block 0 fuses nothing (activate_layer)
        plan = bb.prepare(self.name)
        plan.prop_attn = bool(prop_attn)
        for i, ri in enumerate(rs):
            if ri > 0:
                plan.pre[i] = _mctf_hook(ri, float(tau_sim), float(tau_info), float(tau_size),
                                         bool(bidirection), int(one_step_ahead), int(pooling))
                plan.attend[i] = _take_ahead
        return model

    def expected_tokens(self, model, r=16, **params):
        bb = backbone_of(model, self.name)
        n = bb.num_patches + bb.n_prefix
        tokens, tokens_mlp = [], []
        for ri in schedule(r, bb.depth, self.name, first=1):
            if ri > 0:
                n -= clip_r(ri, n, bb.n_prefix)
            tokens.append(n)
            tokens_mlp.append(n)
        return tokens, tokens_mlp
