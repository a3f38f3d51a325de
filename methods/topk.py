"""`topk`: keep the patch tokens the class token attends to most (training-free pruning).

Inside blocks 3, 6 and 9 of a 12-block ViT (the quarter points of other depths,
the backbone's ``quarters`` sites), between the attention and the MLP, the patch
tokens are ranked by the class-token attention of that block (averaged over heads)
and the best ``int(N0 * keep_rate ** s)`` are kept at stage ``s`` (1, 2, 3), ``N0``
the original patch count: DynamicViT's schedule.  The prefix tokens (class token
first) are always kept.

Kept tokens stay in their original (spatial) order, which keeps visualisations
simple; the logits do not depend on the order.

Attention scores: only the class token's row is computed (``AttnInfo.cls_attn``: the
class query against all keys, one softmax row), beside the block's fused attention; the
full matrix is never formed.  Token counts are fixed by the schedule, so the method
compiles as one graph (``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.methods._staged import keep_top_patches, staged_schedule
from tokenbench.registry import GridRestore, Method, register


def _on_start(model, x, st: TokenState) -> None:
    st.extra["topk_n0"] = x.shape[1] - st.n_prefix


def _make_hook(stage: int, keep_rate: float):
    ratio = keep_rate ** (stage + 1)

    def hook(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        return keep_top_patches(x, st, st.extra["topk_n0"], ratio, lambda: info.cls_attn()[:, st.n_prefix:])

    return hook


@register
class TopK(Method):
    name = "topk"
    version = "1"
    summary = "Keep the patch tokens with the highest class-token attention in blocks 3, 6, 9 (keep_rate ** s of them)."
    params = (
        keep_rate_param("fraction of patch tokens kept at each of the three stages"),
    )
    needs_class_token = True
    knob = "keep_rate"
    restores_grid = GridRestore.FILL

    def apply(self, model, keep_rate: float = 0.7, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        plan.on_start.append(_on_start)
        for s, i in enumerate(bb.sites("quarters")):
            plan.mid[i] = _make_hook(s, keep_rate)
            plan.needs[i] = ("cls_attn",)
        return model

    def expected_tokens(self, model, keep_rate: float = 0.7, **params):
        return staged_schedule(backbone_of(model, self.name), keep_rate, "mid")

