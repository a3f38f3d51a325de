"""`pool`: average pooling of the patch-token grid at one point of the model (the simplest
structured reduction).

At ``half_block`` (in half blocks: ``2b`` is just before block ``b``, ``2b + 1`` inside block
``b`` between its attention and its MLP), the patch tokens, laid out on their grid, are averaged
over non-overlapping ``factor`` x ``factor`` windows (a window cut by the grid's edge averages
the patches it holds: ``ceil`` mode, so 7 x 7 becomes 4 x 4 at factor 2); the prefix tokens
(class token first) pass untouched.  Each pooled token carries its size (the patches it
averages), so later merges stay size-weighted, the average-pooling head weighs it by its
patches and, with ``prop_attn`` (on by default, as for ToMe's merged tokens), attention adds
``log(size)`` to its logits.  Pooling the token grid, not the image, is the plain structured
baseline that critiques of token reduction (VTC-Bench 2025) find hard to beat at the same
compute.

The budget knob is ``half_block``: the later the pooling, the more FLOPs.  Half a block is the
finest step (about 3% of the FLOPs of the 12-block embedded model at factor 2), so a
matched-FLOPs search lands within about a point and a half of its target, usually closer.
"""

from __future__ import annotations

import math

import torch

from tokenbench.backbones import TokenState, backbone_of
from tokenbench.errors import UserError
from tokenbench.registry import GridRestore, Method, Param, register


def pooled_grid(grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """The grid after pooling ``grid`` (rows, columns) by ``factor`` (ceil mode)."""
    return math.ceil(grid[0] / factor), math.ceil(grid[1] / factor)


def pool_windows(grid: tuple[int, int], factor: int) -> list[int]:
    """For each patch of ``grid`` (row-major), the index of its pooling window (row-major)."""
    cols = pooled_grid(grid, factor)[1]
    return [(i // factor) * cols + (j // factor) for i in range(grid[0]) for j in range(grid[1])]


def pool_indices(grid: tuple[int, int], factor: int, n_prefix: int, device=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept, merged, destination) indices for :meth:`TokenState.merge`: each window's first
    patch is kept (windows in row-major order, after the prefix tokens) and the window's other
    patches fold into it."""
    win = pool_windows(grid, factor)
    first: dict[int, int] = {}
    for p, w in enumerate(win):
        first.setdefault(w, p)
    keep = list(range(n_prefix)) + [n_prefix + first[w] for w in sorted(first)]
    src = [p for p, w in enumerate(win) if first[w] != p]
    dst = [n_prefix + win[p] for p in src]  # position of the window's kept token in the kept list
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return as_t(keep), as_t([n_prefix + p for p in src]), as_t(dst)


def _pool(grid: tuple[int, int], factor: int, x: torch.Tensor, st: TokenState) -> torch.Tensor:
    b = x.shape[0]
    keep, src, dst = pool_indices(grid, factor, st.n_prefix, x.device)
    ex = lambda t: t[None].expand(b, -1)  # noqa: E731
    return st.merge(x, ex(keep), ex(src), ex(dst), mode="mean")


def _check(depth: int, half_block: int) -> None:
    if half_block >= 2 * depth:
        raise UserError(f"pool: half_block={half_block} is past the model's last block ({depth} blocks: "
                        f"at most {2 * depth - 1})")


@register
class Pool(Method):
    name = "pool"
    version = "1"
    summary = ("Average-pool the patch-token grid (factor x factor windows) at one point of the model; the "
               "class token untouched (a baseline).")
    params = (
        Param("half_block", "int", 8, "where to pool, in half blocks: 2b before block b, 2b + 1 between "
              "block b's attention and its MLP", min=0, max=511),
        Param("factor", "int", 2, "pooling window side (factor x factor patches per token)", min=2, max=16),
        Param("prop_attn", "bool", True, "proportional attention: log(patches per token) added to the logits"),
    )
    family = "baseline"
    learned = False
    deterministic = True
    knob = "half_block"
    restores_grid = GridRestore.UNMERGE

    def apply(self, model, half_block: int = 8, factor: int = 2, prop_attn: bool = True, **params):
        bb = backbone_of(model, self.name)
        _check(bb.depth, half_block)
        plan = bb.prepare(self.name)
        grid, block = bb.grid, half_block // 2
        if half_block % 2 == 0:
            plan.pre[block] = lambda blk, x, st: _pool(grid, factor, x, st)
        else:
            plan.mid[block] = lambda blk, x, st, info: _pool(grid, factor, x, st)
        plan.prop_attn = prop_attn
        return model

    @classmethod
    def reduces(cls, params):
        return True

    def expected_tokens(self, model, half_block: int = 8, factor: int = 2, **params):
        bb = backbone_of(model, self.name)
        _check(bb.depth, half_block)
        r, c = pooled_grid(bb.grid, factor)
        full, pooled = bb.num_patches + bb.n_prefix, r * c + bb.n_prefix
        tokens = [full if 2 * i < half_block else pooled for i in range(bb.depth)]
        tokens_mlp = [full if 2 * i + 1 < half_block else pooled for i in range(bb.depth)]
        return tokens, tokens_mlp
