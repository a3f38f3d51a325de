"""The full patch grid behind a reduced token sequence: :class:`GridRestorer`.

Dense prediction reads a feature map at every position of the original patch grid, while a
reduced ViT carries fewer tokens.  The restorer follows every :class:`~.tokens.TokenState`
primitive and keeps, for each original patch, either the token that stands for it now (its
*owner*: the token itself, or the token its group was merged into) or, once that patch's
token left the sequence, the value it had when it left (the *store*).  The grid is then one
gather: ``owner >= 0``: the owner's current value; else the stored one.  So

- a pruned position holds the value its token had when it was dropped (a padding slot of a
  per-image count is a dropped token);
- a merged position receives its group's token (the owner map is the source map in compact
  form: each patch belongs to exactly one token);
- a mixed sequence (``TokenState.mix``) gives each patch the new token its old one weighs
  most in, as the source map does;
- patches on a coarser grid (a resized image) stand for the original patches they cover.

Made only when a grid is asked for (``forward_intermediates`` with a spatial output): a plain
forward never builds one, so classification runs the same operators as before.
"""

from __future__ import annotations

from typing import Optional

import torch


class GridRestorer:
    """Owner map [B, N0] (sequence index of the token standing for each patch, -1: none) and
    store [B, N0, C] (the value of each patch whose token left), kept through one forward."""

    def __init__(self, x: torch.Tensor, n_prefix: int, cells: Optional[list[list[int]]] = None):
        """``x``: the embedded sequence; ``cells`` (its patches stand on a coarser grid: a resized
        image): for each of its patches, the patches of the original grid it covers."""
        b, n, _ = x.shape
        if cells is None:
            owner = torch.arange(n_prefix, n, device=x.device)
        else:
            by_patch = {j: n_prefix + t for t, cell in enumerate(cells) for j in cell}
            owner = torch.tensor([by_patch[j] for j in range(len(by_patch))], device=x.device)
        self.owner = owner.expand(b, owner.shape[0])
        self.store: Optional[torch.Tensor] = None
        self.maps: dict[int, torch.Tensor] = {}       # block index -> its output on the grid [B, N0, C]
        self.tokens: dict[int, torch.Tensor] = {}     # block index -> its output sequence, as it left the block

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """The sequence ``x`` [B, N, C] laid out on the original patch grid [B, N0, C]."""
        own = self.owner
        taken = x.gather(1, own.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
        if self.store is None:
            return taken
        return torch.where((own >= 0)[..., None], taken, self.store.to(taken.dtype))

    def capture(self, i: int, x: torch.Tensor) -> None:
        """Keep block ``i``'s output ``x`` on the grid (and as it is)."""
        self.maps[i] = self.grid(x)
        self.tokens[i] = x

    # ---- following the primitives: ``x`` is the sequence they were given
    def _follow(self, x: torch.Tensor, new_index: torch.Tensor) -> None:
        """Store every patch's value in ``x``, then move owners to ``new_index`` [B, N + 1]
        (each old token's index in the new sequence, -1 when it left; the last column is a
        sink for padding slots)."""
        self.store = self.grid(x)
        own = self.owner
        self.owner = new_index.gather(1, own.masked_fill(own < 0, new_index.shape[1] - 1))

    @staticmethod
    def _slots(x: torch.Tensor, idx: torch.Tensor, real: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, N + 1]: each old token's slot in ``idx`` [B, K] (-1: not kept); padding slots
        (``real`` False) keep no token."""
        b, n = x.shape[0], x.shape[1]
        sink = n
        target = idx if real is None else idx.masked_fill(~real, sink)
        slots = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        return torch.full((b, n + 1), -1, dtype=torch.int64, device=idx.device).scatter(1, target, slots)

    def kept(self, x: torch.Tensor, idx: torch.Tensor, real: Optional[torch.Tensor]) -> None:
        """After :meth:`TokenState.keep` of ``idx`` (``real``: the new padding mask)."""
        new = self._slots(x, idx, real)
        new[:, -1] = -1
        self._follow(x, new)

    def merged(self, x: torch.Tensor, keep_idx: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor,
               drop: Optional[torch.Tensor], real: Optional[torch.Tensor]) -> None:
        """After :meth:`TokenState.merge`: kept tokens to their slots, folded ones to their
        destination's slot ``dst``, discarded ones (``drop``) out."""
        new = self._slots(x, keep_idx, real)
        target = src_idx if drop is None else src_idx.masked_fill(drop, x.shape[1])
        new = new.scatter(1, target, dst.to(torch.int64))
        new[:, -1] = -1
        self._follow(x, new)

    def fused(self, x: torch.Tensor, kept_idx: torch.Tensor) -> None:
        """After :meth:`TokenState.fuse`: the fused tokens left (their patches keep their values)."""
        self.kept(x, kept_idx, None)

    def mixed(self, x: torch.Tensor, n_prefix: int, dominant: torch.Tensor) -> None:
        """After :meth:`TokenState.mix`: each old patch token to the new token it weighs most in
        (``dominant`` [B, n]), the prefix unchanged."""
        b, n = x.shape[0], x.shape[1]
        prefix = torch.arange(n_prefix, device=x.device).expand(b, n_prefix)
        sink = torch.full((b, 1), -1, dtype=torch.int64, device=x.device)
        self._follow(x, torch.cat([prefix, dominant + n_prefix, sink], dim=1))
