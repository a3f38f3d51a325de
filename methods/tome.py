"""`tome`: Token Merging (Bolya et al., ICLR 2023), training-free, as in the official code.

In every block, between the attention and the MLP, ``r`` tokens are merged away by
*bipartite soft matching*: the tokens are split alternately into two sets A (even
positions) and B (odd positions); every A token is linked to its most similar B token
(cosine similarity of the attention keys averaged over heads); the ``r`` A tokens with
the most similar partners are merged into them by a size-weighted average, and the
others stay.  Token sizes (how many patches each token stands for) are carried across
blocks; with ``prop_attn`` they are added to the attention logits as ``log(size)``
(proportional attention), and average-pooled models pool with the same weights.

Faithful to ``facebookresearch/ToMe`` (``tome/merge.py``, ``tome/patch/timm.py``):

- at most half the non-protected tokens merge per block: ``r = min(r, (N - protected) // 2)``;
- prefix tokens (class, distillation, register tokens) never merge: their rows of the
  score matrix (A side) and columns (B side) are ``-inf``;
- the token order after a merge is the official one: the unmerged A tokens, then the B
  tokens (into which the merged ones were averaged).  With a class token the unmerged
  A tokens are sorted back into their original order; without one they stay in order of
  decreasing similarity (``argsort(descending=True)``), as in the official code.  The
  next block's even/odd split depends on this order.  Prefix tokens come first, in
  their own order (for one class token and a distillation token this is the official
  ``[cls, dist, unmerged A, B]``; for more prefix tokens, e.g. registers, which the
  official code does not handle, the same rule is applied to all of them);
- ``r`` may be one number for every block or a list, one per block; a list shorter than
  the depth is padded with zeros (the official ``parse_r``).

The matching and merging are pure functions on tensors (:func:`bipartite_soft_matching`,
:func:`merge`, :func:`merge_wavg`, :func:`merge_source`), importable by other methods as
``tokenbench.methods.tome``; the hook expresses a matching as token indices
(:func:`as_token_indices`) and merges through the shared ``TokenState.merge``, which
keeps sizes, sources, positions, padding and any training policy aligned.  Everything is vectorised over the
batch (gather / scatter_reduce) and traceable by ``torch.jit.trace``: the only Python
control flow depends on shapes, never on tensor values.

Default ``r = 16``: the setting the official README shows for 224-px ViT-B/16 (197
tokens).  It is aggressive for short sequences (the embedded 50-token model ends with
2 tokens); set ``r`` per model or let a matched-FLOPs search choose it.

License of the original (facebookresearch/ToMe): CC BY-NC 4.0.  This file is our own code.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.errors import UserError
from tokenbench.methods._knobs import PROP_ATTN, r_param
from tokenbench.registry import GridRestore, Method, register


# --------------------------------------------------------------------------- algorithm

class Matching(NamedTuple):
    """The outcome of one bipartite soft matching: indices into the A and B sets, [B, K] each
    (``unm_idx`` / ``src_idx`` / ``dst_idx``: the same with a trailing axis, [B, K, 1], as the
    official code keeps them)."""

    unm: torch.Tensor       # [B, |A| - r]: A tokens that stay
    src: torch.Tensor       # [B, r]: A tokens merged away
    dst: torch.Tensor       # [B, r]: the B token each of them merges into
    n_prefix: int           # protected tokens at the front of the sequence

    @property
    def unm_idx(self) -> torch.Tensor:
        return self.unm[..., None]

    @property
    def src_idx(self) -> torch.Tensor:
        return self.src[..., None]

    @property
    def dst_idx(self) -> torch.Tensor:
        return self.dst[..., None]


def clip_r(r: int, n_tokens: int, n_prefix: int) -> int:
    """Tokens actually merged: at most half of the non-protected ones (official rule)."""
    return max(0, min(int(r), (n_tokens - n_prefix) // 2))


def bipartite_soft_matching(metric: torch.Tensor, r: int, n_prefix: int = 1) -> Optional[Matching]:
    """Match ``r`` tokens of ``metric`` [B, N, C] (keys averaged over heads) for merging.

    Returns ``None`` when nothing is to be merged (``r`` clipped to 0).  The official steps,
    with the indices kept as [B, K] (no trailing axis to add and take off again) and the
    protected rows filled in place (no scalar tensor made for the assignment).
    """
    r = clip_r(r, metric.shape[1], n_prefix)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)            # cosine similarities, [B, |A|, |B|]
        n_a, n_b = (n_prefix + 1) // 2, n_prefix // 2  # prefix tokens falling in A and in B
        if n_a:
            scores[..., :n_a, :].fill_(-math.inf)    # protected A tokens never merge away
        if n_b:
            scores[..., :, :n_b].fill_(-math.inf)    # nothing merges into protected B tokens
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)
        unm_idx = edge_idx[..., r:]
        src_idx = edge_idx[..., :r]
        dst_idx = node_idx.gather(dim=-1, index=src_idx)
        if n_prefix:
            unm_idx = unm_idx.sort(dim=1)[0]         # prefix tokens back at the front
    return Matching(unm_idx, src_idx, dst_idx, n_prefix)


def _join(unm: torch.Tensor, dst: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """[prefix tokens in their order, other unmerged A tokens, other B tokens]."""
    if n_prefix <= 1:
        return torch.cat([unm, dst], dim=1)
    n_a, n_b = (n_prefix + 1) // 2, n_prefix // 2
    parts = []
    for i in range(n_prefix):  # prefix token i is A[i // 2] (i even) or B[i // 2] (i odd)
        parts.append((unm if i % 2 == 0 else dst)[:, i // 2:i // 2 + 1])
    return torch.cat(parts + [unm[:, n_a:], dst[:, n_b:]], dim=1)


def merge(x: torch.Tensor, m: Matching, mode: str = "sum") -> torch.Tensor:
    """Apply the matching to ``x`` [B, N, C]: merged A tokens are reduced (``mode``) into their B partners."""
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    r = m.src_idx.shape[1]
    unm = src.gather(dim=-2, index=m.unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=m.src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, m.dst_idx.expand(n, r, c), src, reduce=mode)
    return _join(unm, dst, m.n_prefix)


def merge_wavg(x: torch.Tensor, size: torch.Tensor, m: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: (merged ``x``, merged sizes)."""
    x = merge(x * size, m, "sum")
    size = merge(size, m, "sum")
    return x / size, size


def merge_source(source: torch.Tensor, m: Matching) -> torch.Tensor:
    """Merge the source map [B, N, N0] (which original tokens each token covers)."""
    return merge(source, m, "amax")


def schedule(r, slots: int, method: str = "tome", what: str = "blocks", first: int = 0) -> list[int]:
    """A per-block (or per-site) count ``r`` as one value per slot: an int applies to every slot
    from ``first`` on, a list gives one value per slot (padded with zeros; a longer list is refused).
    ToMe, ToFu, MCTF and PPT read their ``r`` through it."""
    if isinstance(r, (list, tuple)):
        rs = [int(v) for v in r]
        if len(rs) > slots:
            raise UserError(f"{method}: r has {len(rs)} entries but the model has {slots} {what}")
        return rs + [0] * (slots - len(rs))
    return [0] * first + [int(r)] * (slots - first)


# --------------------------------------------------------------------------- hook

def install_per_block(model: nn.Module, method: str, r, prop_attn: bool,
                      make_hook: Callable[[int, int], Callable]) -> nn.Module:
    """Prepare ``model`` for ``method`` and put ``make_hook(block, r_block)`` between attention and
    MLP of every block whose count in ``schedule(r)`` is positive, with the keys it matches on."""
    bb = backbone_of(model, method)
    plan = bb.prepare(method)
    plan.prop_attn = bool(prop_attn)
    for i, ri in enumerate(schedule(r, bb.depth, method)):
        if ri > 0:
            plan.mid[i] = make_hook(i, ri)
            plan.needs[i] = ("keys",)
    return model


def merged_schedule(bb, r) -> tuple[list[int], list[int]]:
    """Tokens entering each block and each MLP when block ``i`` removes ``schedule(r)[i]``
    tokens (clipped to half the non-prefix tokens), on the backbone ``bb``."""
    p = bb.n_prefix
    n = bb.num_patches + p
    tokens, tokens_mlp = [], []
    for ri in schedule(r, bb.depth):
        tokens.append(n)
        n -= clip_r(ri, n, p)
        tokens_mlp.append(n)
    return tokens, tokens_mlp


def kept_indices(m: Matching, n_tokens: int) -> torch.Tensor:
    """The tokens a matching keeps, as indices into the whole sequence, in the official order
    [B, K] (all a pruning step needs)."""
    b = m.unm.shape[0]
    n_b = n_tokens // 2
    odd = b_slots(0, -1, n_b, m.unm.device, batch=b)   # the B tokens' positions 1, 3, 5, ...
    if m.n_prefix <= 1:                                     # [unmerged A, B]
        return torch.cat([2 * m.unm, odd], 1)
    return _join(2 * m.unm_idx, odd[..., None], m.n_prefix)[..., 0]


def as_token_indices(m: Matching, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matching as indices into the whole sequence, for :meth:`TokenState.merge`:
    (tokens kept, in the official order [B, K]; tokens merged away [B, r]; for each of those,
    the position in the kept list of the token it merges into [B, r])."""
    n_unm = m.unm.shape[1]
    keep_idx = kept_indices(m, n_tokens)
    if m.n_prefix <= 1:                                     # B token j lands at n_unm + j
        return keep_idx, 2 * m.src, m.dst + n_unm
    where = b_slots(m.n_prefix, n_unm, n_tokens // 2, m.unm.device)
    return keep_idx, 2 * m.src, where[m.dst]


def _b_slots(n_prefix: int, n_unm: int, n_b: int) -> list[int]:
    """Where each B token lands in :func:`_join`'s order (known from the shapes alone); with
    ``n_unm = -1``, the B tokens' own positions in the sequence (1, 3, 5, ...)."""
    if n_unm < 0:
        return [2 * j + 1 for j in range(n_b)]
    if n_prefix <= 1:
        return [n_unm + j for j in range(n_b)]
    n_a, n_bp = (n_prefix + 1) // 2, n_prefix // 2
    return [2 * j + 1 if j < n_bp else n_prefix + (n_unm - n_a) + (j - n_bp) for j in range(n_b)]


_B_SLOTS: dict[tuple, torch.Tensor] = {}  # (n_prefix, n_unm, n_b, device, batch) -> :func:`_b_slots` as a tensor


def b_slots(n_prefix: int, n_unm: int, n_b: int, device: torch.device,
            batch: Optional[int] = None) -> torch.Tensor:
    """:func:`_b_slots` as a tensor on ``device`` ([n_b], or expanded to [batch, n_b]), built once
    per shape and device (not in every block of every forward); built afresh while
    ``torch.compile`` traces (a constant)."""
    def make() -> torch.Tensor:
        t = torch.tensor(_b_slots(n_prefix, n_unm, n_b), device=device)
        return t if batch is None else t.expand(batch, n_b)

    if torch.compiler.is_compiling():
        return make()
    key = (n_prefix, n_unm, n_b, torch.device(device), batch)
    if key not in _B_SLOTS:
        with torch.inference_mode(False):  # a normal tensor: usable in training as in inference
            _B_SLOTS[key] = make()
    return _B_SLOTS[key]


def _merge_hook(r: int):
    def mid(block, x: torch.Tensor, state: TokenState, info: AttnInfo) -> torch.Tensor:
        m = bipartite_soft_matching(info.keys, r, state.n_prefix)
        if m is None:
            return x
        keep_idx, src_idx, dst = as_token_indices(m, x.shape[1])
        return state.merge(x, keep_idx, src_idx, dst, mode="mean")

    return mid


@register
class ToMe(Method):
    name = "tome"
    family = "merging"
    version = "1"
    summary = "Token Merging: bipartite soft matching on attention keys, r tokens merged per block."
    params = (
        r_param("tokens merged per block: one number, or a list (one per block, padded with zeros); "
                "at most half the tokens merge in a block"),
        PROP_ATTN,
    )
    knob = "r"
    restores_grid = GridRestore.UNMERGE

    def apply(self, model, r=16, prop_attn=True, **params):
        return install_per_block(model, self.name, r, prop_attn, lambda i, ri: _merge_hook(ri))

    def expected_tokens(self, model, r=16, prop_attn=True, **params):
        return merged_schedule(backbone_of(model, self.name), r)
