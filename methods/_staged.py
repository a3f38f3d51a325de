"""Staged pruning schedules shared by the pruning methods (DynamicViT, top-k, random, DPC-KNN,
k-medoids, ATC): how many patch tokens each of the three quarter-point stages keeps, and the
token counts that follow from it block by block.

Not a method (discovery skips files whose name starts with ``_``); pure functions of the
backbone's geometry.
"""

from __future__ import annotations

from typing import Callable

import torch

from tokenbench.backbones import Backbone, TokenState
from tokenbench.backbones.tokens import with_prefix


def keep_counts(n0: int, stages: int, keep_rate: float) -> list[int]:
    """Patch tokens kept after each pruning stage: DynamicViT's ``int(n0 * keep_rate ** s)``, at least 1."""
    return [max(1, int(n0 * keep_rate ** (s + 1))) for s in range(stages)]


def staged_schedule(bb: Backbone, keep_rate: float, where: str = "mid") -> tuple[list[int], list[int]]:
    """(tokens entering each block, tokens entering each MLP) for pruning to :func:`keep_counts`
    at the quarter sites of ``bb``, before those blocks (``pre``: DynamicViT) or between their
    attention and MLP (``mid``: top-k, random)."""
    npf, n0 = bb.n_prefix, bb.num_patches
    sites = bb.sites("quarters")
    counts = keep_counts(n0, len(sites), keep_rate)
    tokens, tokens_mlp, n = [], [], n0
    for i in range(bb.depth):
        if where == "pre" and i in sites:
            n = min(n, counts[sites.index(i)])
        tokens.append(n + npf)
        if where == "mid" and i in sites:
            n = min(n, counts[sites.index(i)])
        tokens_mlp.append(n + npf)
    return tokens, tokens_mlp


def keep_top_patches(x: torch.Tensor, st: TokenState, n0: int, ratio: float,
                     scores: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One pruning stage: keep ``max(1, int(n0 * ratio))`` patch tokens of ``x``, those of highest
    ``scores()`` [B, N] (called only when a token goes), in their order, the prefix tokens first."""
    npf = st.n_prefix
    k = max(1, int(n0 * ratio))
    if k >= x.shape[1] - npf:  # nothing to prune (keep_rate == 1)
        return x
    keep_idx = scores().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return st.keep(x, with_prefix(keep_idx, npf))
