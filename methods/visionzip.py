"""`visionzip`: VisionZip (Yang et al., CVPR 2025), dominant and contextual tokens at one layer.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (arXiv
2412.04467).  Official code: https://github.com/dvlab-research/VisionZip
(``visionzip/clip_encoder.py``, ``CLIPVisionTower_VisionZip.forward``; ``utils.py``), Apache
License 2.0.  Our code is our own.

The official code reduces the output of one layer of a VLM's vision encoder (the layer
LLaVA reads, the penultimate: ``layer = -2`` here), using that layer's own attention; here
the reduced tokens go on through the remaining blocks of the classifier.  After block
``layer``:

1. **Dominant tokens**: the class token's attention row of that block, summed over heads,
   ranks the patch tokens; the top ``dominant`` are kept, in their original order, after the
   class token (``masked_select`` keeps position order).
2. **Contextual tokens**: the other ``R`` tokens, in position order, are compared by the
   block's keys averaged over heads (L2-normalised).  Every ``step = max(1, R // contextual)``-th
   of them, the first ``contextual``, is a target; each other token goes to its most similar
   target (cosine, ``argmax``); a contextual token is its target **plus** the mean of the tokens
   assigned to it (``target + sum / max(count, 1)``: the official sum, not a joint mean).

The budget: ``keep_rate`` of the patch tokens survive the layer, ``dominant + contextual``
of them (``int(keep_rate * N)``, at least 1); ``contextual = -1`` takes the official
proportion (10 contextual of every 64 kept tokens: its 54 + 10, 108 + 20, 162 + 30 settings),
``contextual = 0`` is **FasterVLM** ("[CLS] Attention is All You Need for Training-Free
Visual Token Pruning"): keep the top tokens by class attention and drop the rest.

Deviations: every prefix token is kept and not ranked (the official knows the class token
only); ``contextual`` is clamped to the kept count; the contextual tokens' average divides
each member before summing (one rounding apart from the official ``bmm`` then divide).
Merged tokens carry no size (the official does not weigh them either).  Static token
counts: compiles as one graph.
"""

from __future__ import annotations

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of, complement
from tokenbench.backbones.tokens import constant, with_prefix
from tokenbench.errors import UserError
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.registry import GridRestore, Method, Param, register

OFFICIAL_SHARE = 10 / 64  # contextual tokens per kept token in the official settings


# --------------------------------------------------------------------------- algorithm

def split_counts(n: int, keep_rate: float, contextual: int) -> tuple[int, int]:
    """(dominant, contextual) patch tokens kept of ``n``."""
    total = max(1, min(n, int(n * keep_rate)))
    ctx = round(total * OFFICIAL_SHARE) if contextual < 0 else contextual
    ctx = min(ctx, total)
    return total - ctx, ctx


def contextual_targets(r: int, contextual: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, others): positions among the ``r`` remaining tokens (the official ``step`` grid),
    on ``device``.  They depend on the counts alone, so they are made once (:func:`constant`): no
    host-side ``nonzero`` and host-to-device copy in every forward, which would stall a GPU and
    keep a CUDA graph from capturing the forward."""
    device = torch.device(device)
    step = max(1, r // contextual)

    def positions(of_targets: bool) -> torch.Tensor:
        targets = torch.arange(0, r, step)[:contextual]
        if of_targets:
            return targets.to(device)
        others = torch.ones(r, dtype=torch.bool)
        others[targets] = False
        return torch.nonzero(others)[:, 0].to(device)

    return (constant("visionzip_targets", lambda: positions(True), r, contextual, device),
            constant("visionzip_others", lambda: positions(False), r, contextual, device))


def visionzip_reduce(x: torch.Tensor, st: TokenState, cls_attn: torch.Tensor, keys: torch.Tensor,
                     dominant: int, contextual: int) -> torch.Tensor:
    """The VisionZip step on a layer's output ``x`` [B, N, C] (prefix tokens first).

    ``cls_attn`` [B, H, N]: the class token's attention row per head; ``keys`` [B, N, d]: keys
    averaged over heads, both of the same block."""
    p = st.n_prefix
    b, n_all, c = x.shape
    n = n_all - p
    score = cls_attn.sum(dim=1)[:, p:]
    dom = score.topk(dominant, dim=1).indices.sort(dim=1).values           # position order
    if contextual == 0 or dominant == n:
        return st.keep(x, with_prefix(dom, p))
    rest = complement(dom, n)                                               # [B, R], position order
    r = rest.shape[1]
    contextual = min(contextual, r)
    t_pos, o_pos = contextual_targets(r, contextual, x.device)
    metric = keys[:, p:].gather(1, rest[..., None].expand(-1, -1, keys.shape[-1]))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    sim = metric[:, o_pos] @ metric[:, t_pos].transpose(1, 2)             # [B, M, contextual]
    assign = sim.argmax(dim=2)                                              # [B, M]
    counts = torch.zeros(b, contextual, dtype=x.dtype, device=x.device).scatter_add_(
        1, assign, torch.ones_like(assign, dtype=x.dtype)).clamp(min=1)
    targets, others = rest[:, t_pos] + p, rest[:, o_pos] + p
    # the merged tokens divided by their target's count, then summed into it: target + mean
    scale = (1 / counts).gather(1, assign)[..., None]
    x = x.scatter(1, others[..., None].expand(-1, -1, c),
                  x.gather(1, others[..., None].expand(-1, -1, c)) * scale)
    keep_idx = torch.cat([with_prefix(dom, p), targets], dim=1)
    return st.merge(x, keep_idx, others, assign + p + dominant, mode="sum")


# --------------------------------------------------------------------------- adapter

_STASH = "visionzip_scores"


@register
class VisionZip(Method):
    name = "visionzip"
    version = "1"
    summary = ("VisionZip: after one block keep the top tokens by class attention (dominant) and merge the "
               "rest into a few contextual tokens; contextual=0 is FasterVLM.")
    family = "hybrid"
    params = (
        keep_rate_param("patch tokens that survive the layer (dominant + contextual), as a fraction",
                        default=0.5),
        Param("contextual", "int", -1, "contextual tokens among them: -1 the official share (10 of every 64), "
                                       "0 FasterVLM (keep the top by class attention, drop the rest)", min=-1),
        Param("layer", "int", 2, "block whose output is reduced, with its own class attention and keys; 2: blocks 3 on "
                                 "run reduced (negative: from the end; -2 is the official position in LLaVA)"),
    )
    knob = "keep_rate"
    restores_grid = GridRestore.FILL_UNMERGE
    needs_class_token = True

    @staticmethod
    def _layer(depth: int, layer: int) -> int:
        if not -depth <= layer < depth:
            raise UserError(f"visionzip: layer={layer} is out of range for a model of {depth} blocks "
                            f"([{-depth}, {depth - 1}])")
        return layer % depth

    def apply(self, model, keep_rate: float = 0.5, contextual: int = -1, layer: int = 2, **params):
        bb = backbone_of(model, self.name)
        at = self._layer(bb.depth, int(layer))
        plan = bb.prepare(self.name)
        dominant, ctx = split_counts(bb.num_patches, float(keep_rate), int(contextual))
        if dominant + ctx >= bb.num_patches:
            return model

        def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
            st.extra[_STASH] = (info.cls_attn(per_head=True), info.keys)
            return x

        def reduce(block, x: torch.Tensor, st: TokenState) -> torch.Tensor:
            cls_attn, keys = st.extra.pop(_STASH)
            return visionzip_reduce(x, st, cls_attn, keys, dominant, ctx)

        plan.mid[at] = mid
        plan.needs[at] = ("cls_attn", "keys")
        # the block's output, reduced before the next block (pictures show the step at that
        # block); after the last block, on the model's output
        if at + 1 < bb.depth:
            plan.pre[at + 1] = reduce
        else:
            plan.post[at] = reduce
        return model

    def expected_tokens(self, model, keep_rate: float = 0.5, contextual: int = -1, layer: int = 2, **params):
        bb = backbone_of(model, self.name)
        at = self._layer(bb.depth, int(layer))
        dominant, ctx = split_counts(bb.num_patches, float(keep_rate), int(contextual))
        p, n = bb.n_prefix, bb.num_patches
        after = p + min(n, dominant + ctx)
        tokens = [p + n if i <= at else after for i in range(bb.depth)]
        return tokens, list(tokens)
