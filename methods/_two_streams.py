"""The training form of DynamicViT's journal version on hierarchical models: two streams.

From the first adaptive block of a stage on, two full-size streams run side by side: stream 1
went through the slow path (the block's FFN), stream 2 through the fast path.  A block mixes
them with its hard decision ``mask`` before its mixer, runs the mixer on the full map, gives
stream 1 the mixer's output where ``mask`` is 1 and stream 2 where it is 0, then FFN on stream
1, fast path on stream 2, each with its residual (the official ``AdaBlock`` of ConvNeXt and
``AdaSwinTransformerBlock`` of Swin).  What flows from block to block is the merged map (the
streams mixed with the last mask: what the official hands to the next stage, and what its
next predictor sees); the pair rides in the token state beside it.

Installed as a ``plan.block`` hook (:func:`two_streams`), built from the family's block parts
(:class:`~tokenbench.backbones.hierarchical.HierarchicalBackbone`).  Not a method (discovery
skips files whose name starts with ``_``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from tokenbench.backbones import TokenState

STREAMS = "streams"  # st.extra key: (stream 1, stream 2, the merged map the last block returned)


def enter_streams(st: TokenState, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two streams behind the map ``x`` a block receives: the pair the previous two-stream
    block left if ``x`` is the map it returned, else ``(x, x)`` (the first adaptive block)."""
    pair = st.extra.get(STREAMS)
    if pair is not None and pair[2] is x:
        return pair[0], pair[1]
    return x, x


def leave_streams(st: TokenState, y1: torch.Tensor, y2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the streams ``(y1, y2)`` in the state and return the merged map ``y1 * mask + y2 *
    (1 - mask)`` for the next block (a block without the two-stream form, the next stage and
    ``forward_intermediates`` just see that map)."""
    merged = mix_streams(y1, y2, mask)
    st.extra[STREAMS] = (y1, y2, merged)
    return merged


def mix_streams(x1: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x1`` where ``mask`` is 1, ``x2`` where it is 0 (``mask`` broadcasts over channels)."""
    return x1 * mask + x2 * (1 - mask)


def run_two_streams(slow: Callable[[torch.Tensor], torch.Tensor], fast: Callable[[torch.Tensor], torch.Tensor],
                    mixed: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slow(a), fast(b))`` with ``a = mixed * mask + x1 * (1 - mask)`` and ``b = mixed * (1 -
    mask) + x2 * mask``, where ``mixed`` is the mixer's output on ``mix_streams(x1, x2, mask)``
    (all [B, N, C], ``mask`` [B, N, 1]).  The caller adds each stream's residual."""
    return slow(mix_streams(mixed, x1, mask)), fast(mix_streams(x2, mixed, mask))


def two_streams(bb, decide: Callable) -> Callable[[nn.Module, torch.Tensor, TokenState], Optional[torch.Tensor]]:
    """A ``plan.block`` hook of the hierarchical backbone ``bb``: in training mode the block runs
    the two-stream form with ``decide(block, tokens, st) -> (mask [B, N, 1], fast)`` (``tokens``:
    the block's input map as tokens); in eval mode it returns None (the usual forward)."""

    def block_hook(block: nn.Module, x: torch.Tensor, st: TokenState) -> Optional[torch.Tensor]:
        if not block.training:
            return None
        mask, fast = decide(block, bb.to_tokens(x), st)
        x1, x2 = enter_streams(st, x)
        m = bb.to_map(mask, x)
        mixed = bb.mixer(block, mix_streams(x1, x2, m))
        if st.record:
            st.tokens.append(mixed.shape[1])
            st.tokens_mlp.append(mixed.shape[1])
        slow, quick = run_two_streams(lambda t: bb.ffn(block, t), fast, mixed, bb.to_tokens(x1),
                                      bb.to_tokens(x2), mask)
        return leave_streams(st, bb.finish(block, slow, x1, mixed), bb.finish(block, quick, x2, mixed), m)

    return block_hook
