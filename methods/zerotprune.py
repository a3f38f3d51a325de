"""`zerotprune`: Zero-TPrune (Wang, Dedhia and Jha, CVPR 2024), training-free, from the paper.

Paper: "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in
Pre-Trained Transformers", CVPR 2024, arXiv:2305.17328; project page
https://jha-lab.github.io/zerotprune.  We found no official code (the project page, the
first author's page and the code indexes searched name none; the one GitHub repository
called Zero-TPrune, MahdiarKhodabakhshi/Zero-TPrune, is a third party's partial S-stage
sketch), so there is no license of an original to carry and this is written from the
paper's equations.  What follows is what we took from the paper and every choice we made.

Each pruning layer reads the attention matrix ``A`` [B, H, N, N] of its block (rows are
queries, ``info.attn()``) and runs three stages (the paper's order I' -> S -> I):

- **I'-stage** (pre-ranking, prunes nothing): one round of the weighted PageRank below.
- **S-stage** (similarity): the patch tokens, sorted by the I' importance, are split
  sequentially ("Seq-U", the paper's best partition): the less important half
  (``n // 2`` tokens) is group A, the rest group B.  Each A token finds its most similar B
  token, cosine similarity of the keys (the paper's best feature and metric; the keys
  averaged over heads, ``info.keys``, as ToMe does: the paper does not say how heads are
  combined).  The ``r_s`` A tokens with the most similar partners are *dropped* (not
  merged: the paper prunes).
- **I-stage** (importance): the weighted PageRank (WPR) on the attention graph of the
  surviving tokens (the sub-matrix of ``A``, rows renormalised to sum to 1: the softmax
  the block would have computed without the S-stage's tokens; the paper does not say),
  ``s_{t+1} = A^T s_t`` per head (paper Eq. 1-2, Algorithm 1), then aggregated over heads,
  and the ``r_i`` least important patch tokens are dropped.

WPR details (paper Sec. 3.1): ``s_0`` is uniform except the class token, which starts at
``sqrt(N)`` times the others ("Zero-TPrune"; ``cls_init=False`` is the paper's
"Zero-TPrune-uni"), normalised to sum 1.  Iterations per layer (the paper: 30-50 in the
first three layers, 5-10 in the middle ones, 1 in the last three): defaults 30, 5, 1 (the
low ends of the paper's ranges).  Head aggregation: EIR (emphasizing informative region),
the root mean square over heads, and VHF (variance-based head filter): heads whose
importance variance is outside ``[var_min, var_max]`` = [0.01, 0.7] (the paper's range)
are left out.  The paper does not give the scale of that variance; a distribution over
197 tokens has variance below 1/197, under the range, so we take the variance of the
patch tokens' scores divided by their mean (mean 1: uniform is 0, one-hot is n - 1).
Where an image has no head in range, all its heads are used.

Schedule (our choice, to be checked against the paper's appendix): one pruning layer in
every block, between the attention and the MLP (``plan.mid``, as ToMe in this benchmark),
``r`` patch tokens per block (``r_s = s_share * r`` rounded half up by the S-stage, the rest by the
I-stage), at most ``n // 2`` by the S-stage and at least one patch token kept.  ``r`` may also
be a per-block list (as ToMe's), which lets a matched-FLOPs search land between two constant
values.  The
paper's pruning layer sits between blocks; here the pruned tokens also skip the MLP of
the block whose attention ranked them.  Default ``r = 12``: 2.96 GFLOPs on DeiT-S (224 px,
fvcore, the method's own work included), against the paper's headline setting, a 34.7%
FLOPs reduction (4.61 -> 3.01 GFLOPs; ``r = 11`` gives 3.11);
``s_share = 0.5`` is ours (the paper's split per configuration was not found), and the choice
matters: on the embedded model at 70% of the dense FLOPs, top-1 is 86.72 at ``s_share = 0``,
87.86 at 0.5 and 88.28 at 1.0.

Prefix tokens (class, distillation, registers) are never pruned and are not ranked; the
kept patch tokens stay in their original order.  Token counts depend only on the
sequence length, so the method compiles as one graph.

FLOPs: the matrix ``A`` is formed beside the block's fused attention (``info.attn()``:
``Q K^T`` and a softmax again, ``N^2 C`` multiply-adds per block, counted by fvcore as a
matmul), as are the WPR rounds (``H N^2`` each) and the S-stage's similarities
(``n^2 C_h / 4``); all are in the counts.  An unfused block would form ``A`` once.
"""

from __future__ import annotations

import math

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of, complement
from tokenbench.backbones.tokens import constant, constant_range, with_prefix
from tokenbench.methods._knobs import r_param
from tokenbench.methods.tome import schedule
from tokenbench.registry import GridRestore, Method, Param, register


# --------------------------------------------------------------------------- algorithm

def wpr_init(b: int, h: int, n: int, cls_index: int | None, device, dtype) -> torch.Tensor:
    """``s_0`` [B, H, N]: uniform, the class token (if any) ``sqrt(N)`` times the others, summing to 1
    (the vector depends on ``n`` alone: made once per shape, device and dtype)."""
    def make() -> torch.Tensor:
        s = torch.ones(n, device=device, dtype=dtype)
        if cls_index is not None:
            s[cls_index] = math.sqrt(n)
        return s / s.sum()

    return constant("wpr_init", make, n, cls_index, torch.device(device), dtype).expand(b, h, n)


def weighted_pagerank(attn: torch.Tensor, s: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` rounds of ``s <- A^T s`` per head: ``attn`` [B, H, N, N] (rows: queries), ``s`` [B, H, N].
    The scores stay a row [B, H, 1, N] between rounds: one matrix product per round."""
    row = s.unsqueeze(-2)
    for _ in range(iters):
        row = torch.matmul(row, attn)                          # s'_i = sum_j s_j A[j, i]
    return row.squeeze(-2)


def aggregate_heads(s: torch.Tensor, n_prefix: int, eir: bool = True, vhf: bool = True,
                    var_min: float = 0.01, var_max: float = 0.7) -> torch.Tensor:
    """Importance [B, n] of the patch tokens from per-head scores ``s`` [B, H, N].

    VHF: a head counts when the variance of its patch scores divided by their mean lies in
    ``[var_min, var_max]`` (all heads where none does); EIR: root mean square over the heads
    that count (else their mean)."""
    sp = s[..., n_prefix:]
    if vhf:
        rel = sp / sp.mean(-1, keepdim=True)
        var = rel.var(-1, unbiased=False)                                  # [B, H]
        ok = (var >= var_min) & (var <= var_max)
        ok = ok | ~ok.any(-1, keepdim=True)                                # no head in range: all heads
        w = ok.to(sp.dtype)
    else:
        w = torch.ones(sp.shape[:2], dtype=sp.dtype, device=sp.device)
    denom = w.sum(-1, keepdim=True)                                        # [B, 1]
    if eir:
        return ((sp * sp * w[..., None]).sum(1) / denom).sqrt()
    return (sp * w[..., None]).sum(1) / denom


def similar_in_lower_half(keys: torch.Tensor, importance: torch.Tensor, r: int) -> torch.Tensor:
    """S-stage: indices [B, r] (into the patch tokens) of the tokens pruned.

    ``keys`` [B, n, C], ``importance`` [B, n].  Seq-U partition: the ``n // 2`` least important
    tokens form group A, the others group B; the ``r`` A tokens whose most similar B token
    (cosine of the keys) is most similar are pruned."""
    n = keys.shape[1]
    order = importance.argsort(dim=-1)                                     # least important first
    a_idx, b_idx = order[:, :n // 2], order[:, n // 2:]
    k = keys / keys.norm(dim=-1, keepdim=True)
    ka = k.gather(1, a_idx[..., None].expand(-1, -1, k.shape[-1]))
    kb = k.gather(1, b_idx[..., None].expand(-1, -1, k.shape[-1]))
    best = (ka @ kb.transpose(-1, -2)).amax(-1)                            # [B, |A|]
    top = best.topk(r, dim=-1).indices
    return a_idx.gather(1, top)


def split_r(r: int, n: int, s_share: float) -> tuple[int, int]:
    """(S-stage, I-stage) tokens pruned of ``n`` patch tokens: ``r`` clipped to ``n - 1``,
    the S-stage's ``round(s_share * r)`` clipped to ``n // 2``."""
    r = max(0, min(int(r), n - 1))
    r_s = min(int(math.floor(s_share * r + 0.5)), n // 2)
    return r_s, r - r_s


def zero_tprune_keep(attn: torch.Tensor, keys: torch.Tensor, n_prefix: int, r_s: int, r_i: int,
                     iters: int, cls_index: int | None, eir: bool = True, vhf: bool = True,
                     var_min: float = 0.01, var_max: float = 0.7) -> torch.Tensor:
    """One pruning layer, I' -> S -> I: indices [B, p + n - r_s - r_i] of the tokens kept
    (prefix first, then the kept patch tokens in their order).  ``attn`` [B, H, N, N],
    ``keys`` [B, N, C] (averaged over heads)."""
    b, h, big_n, _ = attn.shape
    p, n = n_prefix, big_n - n_prefix
    attn = attn.float()
    dev = attn.device
    patches = constant_range(0, n, dev).expand(b, n)                      # surviving patches, from the first
    if r_s > 0:
        s = wpr_init(b, h, big_n, cls_index, dev, attn.dtype)
        pre = aggregate_heads(weighted_pagerank(attn, s, 1), p, eir, vhf, var_min, var_max)
        pruned = similar_in_lower_half(keys[:, p:].float(), pre, r_s)
        patches = complement(pruned, n)                                     # survivors, in order
        seq = with_prefix(patches, p)
        attn = attn.gather(2, seq[:, None, :, None].expand(-1, h, -1, big_n))
        attn = attn.gather(3, seq[:, None, None, :].expand(-1, h, seq.shape[1], -1))
        attn = attn / attn.sum(-1, keepdim=True)                            # the survivors' softmax
    m = patches.shape[1]
    if r_i > 0:
        s = wpr_init(b, h, p + m, cls_index, dev, attn.dtype)
        imp = aggregate_heads(weighted_pagerank(attn, s, iters), p, eir, vhf, var_min, var_max)
        top = imp.topk(m - r_i, dim=-1).indices.sort(dim=-1).values
        patches = patches.gather(1, top)
    return with_prefix(patches, p)


def iterations(i: int, depth: int, first: int, mid: int, last: int) -> int:
    """WPR rounds in block ``i``: ``first`` in the first three blocks, ``last`` in the last three."""
    if i < 3:
        return first
    if i >= depth - 3:
        return last
    return mid


# --------------------------------------------------------------------------- hook

def _hook(r: int, s_share: float, iters: int, cls_index, opts: dict):
    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        p = st.n_prefix
        r_s, r_i = split_r(r, x.shape[1] - p, s_share)
        if r_s + r_i == 0:
            return x
        keep = zero_tprune_keep(info.attn(), info.keys, p, r_s, r_i, iters, cls_index, **opts)
        return st.keep(x, keep)

    return mid


@register
class ZeroTPrune(Method):
    name = "zerotprune"
    version = "1"
    summary = "Zero-TPrune: weighted PageRank on the attention graph (I-stage) and similar-key pruning (S-stage)."
    family = "pruning"
    params = (
        r_param("patch tokens pruned per block (S-stage and I-stage together): one "
                "number, or a list (one per block, padded with zeros)", default=12),
        Param("s_share", "float", 0.5, "share of r pruned by the S-stage (similarity), the rest by the I-stage; "
              "0.5 is ours, the paper's value was not found, and it matters (README)", min=0.0, max=1.0),
        Param("iters_first", "int", 30, "WPR iterations in the first three blocks (paper: 30-50)", min=1),
        Param("iters_mid", "int", 5, "WPR iterations in the middle blocks (paper: 5-10)", min=1),
        Param("iters_last", "int", 1, "WPR iterations in the last three blocks (paper: 1)", min=1),
        Param("cls_init", "bool", True, "start the class token at sqrt(N) times the others (off: Zero-TPrune-uni)"),
        Param("eir", "bool", True, "emphasizing informative region: root mean square over heads (off: mean)"),
        Param("vhf", "bool", True, "variance-based head filter: leave out heads whose variance is out of range"),
        Param("var_min", "float", 0.01, "VHF: lowest variance of a head's scores (divided by their mean)", min=0.0),
        Param("var_max", "float", 0.7, "VHF: highest variance of a head's scores (divided by their mean)", min=0.0),
    )
    knob = "r"
    restores_grid = GridRestore.FILL

    def apply(self, model, r=12, s_share=0.5, iters_first=30, iters_mid=5, iters_last=1, cls_init=True,
              eir=True, vhf=True, var_min=0.01, var_max=0.7, **params):
        bb = backbone_of(model, self.name)
        rs = schedule(r, bb.depth)
        plan = bb.prepare(self.name)
        cls_index = 0 if cls_init and bb.has_class_token else None
        opts = dict(eir=bool(eir), vhf=bool(vhf), var_min=float(var_min), var_max=float(var_max))
        for i in bb.sites("every"):
            if rs[i] <= 0:
                continue
            its = iterations(i, bb.depth, int(iters_first), int(iters_mid), int(iters_last))
            plan.mid[i] = _hook(rs[i], float(s_share), its, cls_index, opts)
            plan.needs[i] = ("attn", "keys")
        return model

    def expected_tokens(self, model, r=12, s_share=0.5, **params):
        bb = backbone_of(model, self.name)
        p, n = bb.n_prefix, bb.num_patches
        tokens, tokens_mlp = [], []
        for ri in schedule(r, bb.depth):
            tokens.append(n + p)
            r_s, r_i = split_r(ri, n, s_share)
            n -= r_s + r_i
            tokens_mlp.append(n + p)
        return tokens, tokens_mlp
