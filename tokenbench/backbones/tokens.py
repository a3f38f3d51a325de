"""The token bookkeeping of one forward pass: :class:`TokenState` and its three primitives.

A method changes the token sequence only through these primitives, so that everything
carried beside the tokens stays aligned with them:

- :meth:`TokenState.keep` (pruning): keep some tokens, in a given order;
- :meth:`TokenState.merge` (merging): fold tokens into others by a size-weighted average;
- :meth:`TokenState.fuse` (EViT): keep some tokens and append one weighted sum of the rest;
- :meth:`TokenState.mix` (DCT): replace the patch tokens by linear combinations of them.

What is carried: token *sizes* (how many original patches each token stands for, the
weights of proportional attention and average pooling), *positions* (the grid index of
the patch a token stands at, -1 for prefix and fused tokens), the *source* map (which
original tokens each token covers; only when tracking, for pictures), a training-time
soft *policy* (DynamicViT's masked attention) and a *padding mask* for per-image token
counts (a batch padded to its longest sequence; padded tokens are never attended to,
pooled or counted).  When a dense task asks for the full grid, a
:class:`~.grid.GridRestorer` follows every primitive too (which token stands for each patch,
the value of each patch whose token left).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .grid import GridRestorer


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b]]`` for ``t`` [B, N, ...C] or [B, N] and ``idx`` [B, K]."""
    if t.dim() == 2:
        return t.gather(1, idx)
    if _copies_rows(t):
        return gather_rows(t, idx + row_offsets(t))
    if t.dim() == 3 and t.shape[-1] == 1:
        return t[batch_column(t), idx]
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def _copies_rows(t: torch.Tensor) -> bool:
    """Whether ``t`` [B, N, C] is gathered faster as whole rows (:func:`gather_rows`)."""
    return t.dim() == 3 and t.shape[-1] > 1 and t.is_contiguous()


def row_offsets(t: torch.Tensor) -> torch.Tensor:
    """[B, 1]: ``b * N``, the first row of image ``b`` in ``t`` [B, N, C] seen as [B * N, C] (made once)."""
    b, n = t.shape[:2]
    return constant("row_offsets", lambda: torch.arange(b, device=t.device)[:, None] * n, b, n, t.device)


def batch_column(t: torch.Tensor) -> torch.Tensor:
    """[B, 1]: ``0 .. B - 1``, for indexing ``t[batch_column(t), idx]`` (made once)."""
    b = t.shape[0]
    return constant("batch_column", lambda: torch.arange(b, device=t.device)[:, None], b, t.device)


def gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t`` [B, N, C] (contiguous) at the rows ``rows`` [B, K] of its [B * N, C] view, as
    whole rows: the same values as ``gather`` with an index expanded over C, which reads an
    index per element and is many times slower on a CPU (an embedding lookup copies rows)."""
    return torch.nn.functional.embedding(rows, t.reshape(-1, t.shape[-1]))


_CONSTANTS: dict[tuple, torch.Tensor] = {}  # (name, args, device) -> a tensor that only depends on them


def constant(name: str, make: Callable[[], torch.Tensor], *key: Any) -> torch.Tensor:
    """A tensor that depends only on ``key`` (shapes, a device, a dtype), made by ``make`` once
    rather than in every block of every forward: no operators dispatched after the first forward.
    Made afresh while ``torch.compile`` traces (a constant of the graph)."""
    if torch.compiler.is_compiling():
        return make()
    k = (name, *key)
    if k not in _CONSTANTS:
        with torch.inference_mode(False):  # a normal tensor: usable in training as in inference
            _CONSTANTS[k] = make()
    return _CONSTANTS[k]


def constant_range(start: int, stop: int, device) -> torch.Tensor:
    """``torch.arange(start, stop, device=device)``, made once (:func:`constant`)."""
    device = torch.device(device)
    return constant("arange", lambda: torch.arange(start, stop, device=device), start, stop, device)


class _Index:
    """Token indices [B, K] in the two forms a gather needs: as given (for [B, N] tensors) and
    with a trailing axis (for [B, N, C]), made once and shared by every tensor gathered with
    them: one operator per index instead of one per gathered tensor."""

    def __init__(self, idx: torch.Tensor):
        self.flat = idx
        self._col: Optional[torch.Tensor] = None
        self._rows: Optional[torch.Tensor] = None

    @property
    def col(self) -> torch.Tensor:
        if self._col is None:
            self._col = self.flat[..., None]
        return self._col

    def expanded(self, t: torch.Tensor) -> torch.Tensor:
        """The index for ``t`` [B, N] or [B, N, C] (not expanded when C is 1)."""
        if t.dim() == 2:
            return self.flat
        return self.col if t.shape[-1] == 1 else self.col.expand(-1, -1, t.shape[-1])

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t[b, idx[b]]``, as :func:`gather_tokens` (whole rows where that is faster)."""
        if _copies_rows(t):
            if self._rows is None:  # every tensor gathered by one index has the same [B, N]
                self._rows = self.flat + row_offsets(t)
            return gather_rows(t, self._rows)
        if t.dim() == 3 and t.shape[-1] == 1:  # sizes, policies: one indexing operator, no index to reshape
            return t[batch_column(t), self.flat]
        return t.gather(1, self.expanded(t))


class TokenState:
    """Bookkeeping for one forward pass, shared by all blocks of one model."""

    PRIMITIVES = ("keep", "merge", "fuse", "mix")   # the methods that change the sequence

    def __init__(self, n_prefix: int, prop_attn: bool = False, track_source: bool = False,
                 record: bool = True):
        self.n_prefix = n_prefix
        self.prop_attn = prop_attn
        self.track_source = track_source
        self.record = record
        self.size: Optional[torch.Tensor] = None      # [B, N, 1]: original patches per token
        self.source: Optional[torch.Tensor] = None    # [B, N, N0]: 1 where token n covers original token j
        self.policy: Optional[torch.Tensor] = None    # [B, N, 1]: soft keep mask (training: masked attention)
        self.pad: Optional[torch.Tensor] = None       # [B, N] bool: True for real tokens (per-image counts)
        self.key_bias: Optional[torch.Tensor] = None  # [B, N]: added to every query's logit of each key (A-ViT's masked keys)
        self.pos: Optional[torch.Tensor] = None       # [B, N] int64: grid index of each token (-1: none)
        self.tokens: list[int] = []                   # length entering each block
        self.tokens_mlp: list[int] = []               # length entering each block's MLP
        self.real_tokens: list[torch.Tensor] = []     # with a padding mask: real tokens per image, per block
        self.real_tokens_mlp: list[torch.Tensor] = []  # the same entering each block's MLP
        self.stages: list[dict] = []                  # snapshots after each reduction (when tracking)
        self.block = -1
        self.first_change: Optional[int] = None       # the first block where a primitive changed the sequence
        self.extra: dict[str, Any] = {}               # method-specific carry (e.g. DynamicViT's decisions)
        self.image_ids: Optional[torch.Tensor] = None  # [B] int64: each image's index in the evaluated set
        self.settings: dict = {}                      # the plan's settings (training schedules), read-only here
        self.grid: Optional[GridRestorer] = None      # the full patch grid behind the sequence (dense tasks only)

    # ----------------------------------------------------------- start
    def start(self, x: torch.Tensor, cover: Optional[tuple[list[list[int]], list[int]]] = None,
              grid: bool = False) -> None:
        """The sequence after the embedding: prefix tokens first, then the grid's patches in order.

        ``cover`` (the patches stand on a coarser grid than the model's own: a resized image):
        for each patch, the original patches it covers, and the one nearest its centre; sources
        and positions then refer to the original grid, and a snapshot shows the coverage.
        ``grid``: follow the full patch grid behind the sequence (:class:`~.grid.GridRestorer`)."""
        b, n, _ = x.shape
        p = self.n_prefix
        if grid:
            self.grid = GridRestorer(x, p, None if cover is None else cover[0])
        if cover is None:
            if self.track_source:
                self.source = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)
            pos = torch.arange(-p, n - p, device=x.device).clamp(min=-1)
            self.pos = pos.expand(b, n)
            return
        cells, centres = cover
        self.pos = torch.tensor([-1] * p + centres, device=x.device).expand(b, n)
        if self.track_source:
            n0 = p + sum(len(c) for c in cells)
            full = torch.zeros(n, n0, device=x.device, dtype=x.dtype)
            for k in range(p):
                full[k, k] = 1
            for t, c in enumerate(cells):
                full[p + t, [p + j for j in c]] = 1
            self.source = full.expand(b, n, n0)
            self.block = max(self.block, 0)  # the coverage is what the first block sees
            self.snapshot("merge")

    def ensure_size(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            self.size = torch.ones_like(x[..., :1])
        return self.size

    # ----------------------------------------------------------- counting
    def count(self, x: torch.Tensor, mlp: bool = False) -> None:
        """Record the sequence length entering a block (or its MLP)."""
        if not self.record:
            return
        (self.tokens_mlp if mlp else self.tokens).append(x.shape[1])
        (self.real_tokens_mlp if mlp else self.real_tokens).append(
            None if self.pad is None else self.pad.sum(1).detach())

    def tokens_per_image(self, mlp: bool = False) -> Optional[torch.Tensor]:
        """[B, depth] real tokens entering each block (``mlp``: each block's MLP), when the count
        varies per image (else None)."""
        real, padded = (self.real_tokens_mlp, self.tokens_mlp) if mlp else (self.real_tokens, self.tokens)
        ref = next((t for t in self.real_tokens + self.real_tokens_mlp if t is not None), None)
        if ref is None:
            return None
        return torch.stack([torch.full_like(ref, n) if t is None else t for t, n in zip(real, padded)], 1)

    # ----------------------------------------------------------- the primitives
    def keep(self, x: torch.Tensor, idx: torch.Tensor, kind: str = "prune",
             pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keep the tokens ``idx`` [B, K] (indices into all of x, prefix included), in that order.

        ``pad`` [B, K] (bool, True = real) marks slots that are only padding: for per-image
        token counts, ``idx`` is padded to the batch's longest sequence.
        """
        ix = _Index(idx)
        before, x = x, ix.gather(x)
        self.size = None if self.size is None else ix.gather(self.size)
        self.source = None if self.source is None else ix.gather(self.source)
        self.policy = None if self.policy is None else ix.gather(self.policy)
        self.pos = None if self.pos is None else ix.gather(self.pos)
        old_pad = None if self.pad is None else ix.gather(self.pad)
        if pad is not None:
            old_pad = pad if old_pad is None else (old_pad & pad)
        self.pad = old_pad
        if self.grid is not None:
            self.grid.kept(before, idx, self.pad)
        self._clear_padding_sources()
        self.snapshot(kind)
        return x

    def merge(self, x: torch.Tensor, keep_idx: torch.Tensor, src_idx: torch.Tensor,
              dst: torch.Tensor, mode: str = "mean", drop: Optional[torch.Tensor] = None,
              size_weights: Optional[torch.Tensor] = None, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keep ``keep_idx`` [B, K] and fold the tokens ``src_idx`` [B, R] into kept ones.

        ``dst`` [B, R]: for each merged token, the *position in the kept list* it folds into.
        ``mode="mean"``: size-weighted average (ToMe); ``"sum"``: plain sum; ``"avg"``: plain
        (unweighted) mean of a kept token and those folded into it (DiffRate).  Sizes add up,
        source maps are united, a policy keeps its largest value, positions are the kept
        token's.  Operation order is ToMe's (``x * size`` summed, then divided by the summed
        size), so a bipartite matching expressed this way gives the official result.
        ``drop`` [B, R] (bool, optional): the tokens of ``src_idx`` marked True are discarded
        instead of folded (pruning inside a merge, so that one batch can prune some images and
        merge others with one call: PPT).
        ``size_weights`` [B, R]: the merged tokens' sizes are multiplied by these before they
        add up (DiffRate weighs them by their similarity to the destination).
        ``pad`` [B, K] (bool, True = real): as in :meth:`keep`, slots of ``keep_idx`` that are only
        padding (per-image token counts; merged tokens must not fold into them).
        """
        before = x
        weighted = mode == "mean"
        live = None if drop is None else (~drop)[..., None]
        keep, src, into = _Index(keep_idx), _Index(src_idx), _Index(dst)

        def srcs(t: torch.Tensor) -> torch.Tensor:
            s = src.gather(t)
            return s if live is None else s * live.to(s.dtype)

        def fold(kept: torch.Tensor, s: torch.Tensor, reduce: str) -> torch.Tensor:
            """The kept rows ``kept`` (a fresh gathered copy) with the rows ``s`` reduced into
            them, in place."""
            return kept.scatter_reduce_(1, into.expanded(s), s, reduce=reduce)

        if weighted or size_weights is not None:
            size = self.ensure_size(x)
        s_size = None if self.size is None else srcs(self.size)
        # Without autograd, products and the quotient go in place into the gathered copies: no
        # fresh [B, N, C] tensor to allocate (on a CPU each large allocation costs page faults).
        in_place = not torch.is_grad_enabled()
        if weighted:
            # x * size on the kept and the merged rows only: the same products as on all of x;
            # the few merged rows picked by one indexing operator
            k_size, kept, s_x = keep.gather(size), keep.gather(x), x[batch_column(x), src_idx]
            kept = kept.mul_(k_size) if in_place else kept * k_size
            s_x = s_x.mul_(s_size) if in_place else s_x * s_size
            kept = fold(kept, s_x, "sum")
        else:
            kept = fold(keep.gather(x), srcs(x), "mean" if mode == "avg" else "sum")
        if self.size is not None:
            s_src = s_size
            if size_weights is not None:
                s_src = s_src * size_weights[..., None].to(s_src.dtype)
            self.size = fold(k_size if weighted and in_place else keep.gather(self.size), s_src, "sum")
        if weighted:
            kept = kept.div_(self.size) if in_place else kept / self.size
        if self.source is not None:
            self.source = fold(keep.gather(self.source), srcs(self.source), "amax")
        if self.policy is not None:
            self.policy = fold(keep.gather(self.policy), srcs(self.policy), "amax")
        self.pos = None if self.pos is None else keep.gather(self.pos)
        old_pad = None if self.pad is None else keep.gather(self.pad)
        if pad is not None:
            old_pad = pad if old_pad is None else (old_pad & pad)
        self.pad = old_pad
        if self.grid is not None:
            self.grid.merged(before, keep_idx, src_idx, dst, drop, self.pad)
        self._clear_padding_sources()
        self.snapshot("merge" if drop is None else "merge+prune")
        return kept

    def fuse(self, x: torch.Tensor, kept_idx: torch.Tensor, dropped_idx: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
        """Keep ``kept_idx`` and append one token: the ``weights``-weighted sum of ``dropped_idx`` (EViT)."""
        kept = gather_tokens(x, kept_idx)
        dropped = gather_tokens(x, dropped_idx)
        fused = (dropped * weights[..., None]).sum(dim=1, keepdim=True)
        if self.size is not None:
            s_drop = gather_tokens(self.size, dropped_idx)
            self.size = torch.cat([gather_tokens(self.size, kept_idx), s_drop.sum(1, keepdim=True)], 1)
        if self.source is not None:
            src_drop = gather_tokens(self.source, dropped_idx)
            self.source = torch.cat([gather_tokens(self.source, kept_idx),
                                     src_drop.sum(1, keepdim=True).clamp(max=1)], 1)
        if self.policy is not None:
            self.policy = torch.cat([gather_tokens(self.policy, kept_idx),
                                     gather_tokens(self.policy, dropped_idx).amax(1, keepdim=True)], 1)
        if self.pos is not None:
            self.pos = torch.cat([gather_tokens(self.pos, kept_idx), self.pos[:, :1].new_full((x.shape[0], 1), -1)], 1)
        if self.pad is not None:
            self.pad = torch.cat([gather_tokens(self.pad, kept_idx), gather_tokens(self.pad, dropped_idx).any(1, keepdim=True)], 1)
        self.extra["fused_token"] = True
        if self.grid is not None:
            self.grid.fused(x, kept_idx)
        out = torch.cat([kept, fused], dim=1)
        self.snapshot("fuse")
        return out

    def mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Replace the non-prefix tokens by linear combinations of them: ``weights @ x[:, p:]``
        (``weights`` [K, n] or [B, K, n]; prefix tokens kept in front), e.g. a DCT resampling.

        The combination is dense, so the bookkeeping follows each old token's *dominant*
        new token (largest ``|weight|`` in its column): sizes add up there, source maps are
        united there (each patch stays covered by one token), a policy keeps its largest
        value; a new token's position is that of the old token it weighs most.  Refused on a
        padded (per-image count) sequence.
        """
        if self.pad is not None:
            raise ValueError("TokenState.mix cannot combine a padded sequence")
        p, b = self.n_prefix, x.shape[0]
        w = weights.to(x.dtype)
        out = torch.cat([x[:, :p], torch.matmul(w, x[:, p:])], dim=1)
        wa = weights.abs().expand(b, -1, -1) if weights.dim() == 2 else weights.abs()
        k = wa.shape[1]
        dom = wa.argmax(1)                                   # [B, n]: new token each old one goes to

        def fold(t: torch.Tensor, reduce: str) -> torch.Tensor:
            """[B, N, D] -> [B, p + K, D]: prefix rows kept, the others reduced into their dominant token."""
            body = t.new_zeros(b, k, t.shape[-1]).scatter_reduce(
                1, dom[..., None].expand(-1, -1, t.shape[-1]), t[:, p:], reduce=reduce, include_self=False)
            return torch.cat([t[:, :p], body], 1)

        self.size = None if self.size is None else fold(self.size, "sum")
        self.source = None if self.source is None else fold(self.source, "amax")
        self.policy = None if self.policy is None else fold(self.policy, "amax")
        if self.pos is not None:
            centre = wa.argmax(2)                            # [B, K]: old token each new one weighs most
            self.pos = torch.cat([self.pos[:, :p], self.pos[:, p:].gather(1, centre)], 1)
        if self.grid is not None:
            self.grid.mixed(x, p, dom)
        self.snapshot("mix")
        return out

    def _clear_padding_sources(self) -> None:
        """Padding slots cover no patch (their rows were copied from tokens dropped or merged)."""
        if self.source is not None and self.pad is not None:
            self.source = self.source * self.pad[..., None].to(self.source.dtype)

    def snapshot(self, kind: str) -> None:
        """Note that block ``self.block`` changed the sequence (and keep a snapshot when tracking)."""
        if self.first_change is None:
            self.first_change = self.block
        if self.track_source and self.source is not None:
            self.stages.append({"block": self.block, "kind": kind, "source": self.source.detach().clone(),
                                "fused_last": kind == "fuse",
                                "pad": None if self.pad is None else self.pad.detach().clone()})

    # ----------------------------------------------------------- attention masks
    def attn_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The additive attention mask [B, 1, 1, N] this state asks for: log(size) under
        proportional attention, -inf on padded keys, a method's ``key_bias``; None when none applies."""
        bias = None
        if self.prop_attn and self.size is not None:
            b, n = self.size.shape[:2]
            bias = self.size.log().reshape(b, 1, 1, n)
            bias = bias if bias.dtype == dtype else bias.to(dtype)
        if self.pad is not None:
            neg = torch.zeros(self.pad.shape, dtype=dtype, device=self.pad.device)
            neg = neg.masked_fill(~self.pad, float("-inf"))[:, None, None, :]
            bias = neg if bias is None else bias + neg
        if self.key_bias is not None:
            kb = self.key_bias[:, None, None, :].to(dtype)
            bias = kb if bias is None else bias + kb
        return bias


class AttnInfo:
    """What a mid-block hook may read about the block's attention."""

    def __init__(self, q: Optional[torch.Tensor], k: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 scale: float, n_prefix: int, attn: Optional[torch.Tensor] = None,
                 v: Optional[torch.Tensor] = None):
        self._q, self._k, self._bias, self._scale = q, k, bias, scale
        self._attn = attn
        self.n_prefix = n_prefix
        self.values = v                               # [B, H, N, head_dim] when asked for ("values")
        self._keys: Optional[torch.Tensor] = None

    @property
    def keys(self) -> Optional[torch.Tensor]:
        """Keys averaged over heads, [B, N, head_dim] (ToMe's metric); computed on first use."""
        if self._keys is None and self._k is not None:
            self._keys = self._k.mean(1)
        return self._keys

    def cls_attn(self, per_head: bool = False) -> torch.Tensor:
        """Attention of the class token to every token, averaged over heads: [B, N]
        (``per_head``: [B, H, N]).

        Computed from the class token's query row alone (one row of the softmax), which
        equals the first row of the full attention matrix.
        """
        if self._attn is not None:
            row = self._attn[:, :, 0]
        else:
            q0 = self._q[:, :, :1] * self._scale
            logits = q0 @ self._k.transpose(-2, -1)  # [B, H, 1, N]
            if self._bias is not None:
                logits = logits + self._bias
            row = logits.softmax(dim=-1)[:, :, 0]
        return row if per_head else row.mean(1)

    def attn(self) -> torch.Tensor:
        """The full attention matrix [B, H, N, N] (only for methods that need every row)."""
        if self._attn is None:
            logits = (self._q * self._scale) @ self._k.transpose(-2, -1)
            if self._bias is not None:
                logits = logits + self._bias
            self._attn = logits.softmax(dim=-1)
        return self._attn


def with_prefix(idx: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Sequence positions [B, n_prefix + K] for :meth:`TokenState.keep` and friends: the prefix
    tokens (class, registers) first, then the patch indices ``idx`` [B, K], counted from the
    first patch."""
    prefix = constant_range(0, n_prefix, idx.device).to(idx.dtype).expand(idx.shape[0], n_prefix)
    return torch.cat([prefix, idx + n_prefix], dim=1)
