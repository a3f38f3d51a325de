"""`evit`: EViT (Liang et al., ICLR 2022), keep the attentive tokens, fuse the rest.

Inside three blocks (3, 6 and 9 of 12, the quarter points for other depths), after the
attention residual and before the MLP, the class token's attention (averaged over
heads) ranks the other tokens; the ``ceil(keep_rate * n)`` most attended are kept (in
order of decreasing attention, ``topk(sorted=True)``), ``n`` being the number of
non-prefix tokens entering the block.  With ``fuse_token`` the others become one token,
their sum weighted by their raw class attention (not renormalised), appended at the end.

Faithful to ``youweiliang/evit`` (``evit.py``: ``Attention.forward``, ``Block.forward``;
``helpers.complement_idx``):

- ``n`` counts a fused token made at an earlier site: from then on it is an ordinary
  token, ranked, kept or fused again like the others;
- the class attention is one row of the softmax over *all* tokens (class token included),
  so the fusion weights do not sum to one;
- the dropped tokens are summed in increasing position order (the official complement);
- nothing changes in a block where ``ceil(keep_rate * n) == n`` (so ``keep_rate = 1`` is
  the unchanged model).

Deviation: every prefix token is protected (kept in front, not ranked).  The official
code handles only the class token; with a distillation token it would rank and possibly
drop it, which breaks the distilled head.  For one class token this is the official rule.

Attention scores: only the class token's row is computed (``AttnInfo.cls_attn``: the
class query against all keys, one softmax row), beside the block's fused attention; the
official code forms the full matrix to read that row.  Token counts depend on ``n`` alone,
so the method compiles as one graph (``torch.compile(fullgraph=True)``).

Needs a class token.  Training-free as applied here (the official models are fine-tuned
with the same reduction; no parameters are added).

Training (``tokenbench train MODEL --method evit``): the keep-rate warm-up of the official
``helpers.adjust_keep_rate`` is a training-only option, ``--set shrink_start_epoch=S
shrink_epochs=E``: during training the sites keep everything before epoch ``S``, then the
keep rate follows a half cosine from 1 down to ``keep_rate`` over ``E`` epochs (per step),
and stays at ``keep_rate`` after.  ``shrink_epochs=0`` (the default, as the official
fine-tuning script ``--shrink_start_epoch 0 --shrink_epochs 0``) trains at ``keep_rate``
from the first step.  Evaluation always uses ``keep_rate``.

License of the original (youweiliang/evit): none stated in the repository.  This file is our own code.
"""

from __future__ import annotations

import math

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of, complement, plan_settings
from tokenbench.backbones.tokens import with_prefix
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.registry import GridRestore, Method, Param, register


# --------------------------------------------------------------------------- algorithm

def n_kept(keep_rate: float, n: int) -> int:
    """Tokens kept of ``n`` (official: ``math.ceil(keep_rate * (N - 1))``)."""
    return math.ceil(keep_rate * n)


def attentive_tokens(cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the ``k`` most attended tokens of ``cls_attn`` [B, n], most attended first."""
    return torch.topk(cls_attn, k, dim=1, largest=True, sorted=True)[1]


def warmup_keep_rate(epoch: float, keep_rate: float, shrink_start_epoch: float, shrink_epochs: float) -> float:
    """The official ``adjust_keep_rate`` at (fractional) ``epoch`` = step / steps per epoch:
    1 before epoch ``shrink_start_epoch`` (compared as whole epochs, as the official), then
    ``keep_rate + (1 - keep_rate) * (cos(pi * (epoch - start) / shrink_epochs) + 1) / 2``,
    and ``keep_rate`` from epoch ``start + shrink_epochs`` on."""
    whole = math.floor(epoch + 1e-9)
    if whole < shrink_start_epoch:
        return 1.0
    if whole >= shrink_start_epoch + shrink_epochs:
        return float(keep_rate)
    t = (epoch - shrink_start_epoch) / shrink_epochs
    return keep_rate + (1.0 - keep_rate) * (math.cos(t * math.pi) + 1.0) * 0.5


# --------------------------------------------------------------------------- hook

TRAIN_KEEP_RATE = "evit_train_keep_rate"  # plan setting written by train_step: the warm-up's current rate


def _evit_hook(keep_rate: float, fuse_token: bool):
    def mid(block, x: torch.Tensor, state: TokenState, info: AttnInfo) -> torch.Tensor:
        p = state.n_prefix
        n = x.shape[1] - p
        rate = keep_rate
        if block.training:  # the keep-rate warm-up (training only; evaluation uses keep_rate)
            rate = state.settings.get(TRAIN_KEEP_RATE, keep_rate)
        k = n_kept(rate, n)
        if k >= n:
            return x
        attn = info.cls_attn()[:, p:]                     # [B, n], raw softmax row of the class token
        idx = attentive_tokens(attn, k)
        kept_idx = with_prefix(idx, p)
        if not fuse_token:
            return state.keep(x, kept_idx)
        dropped = complement(idx, n)
        weights = attn.gather(1, dropped).to(x.dtype)
        return state.fuse(x, kept_idx, dropped + p, weights)

    return mid


@register
class EViT(Method):
    name = "evit"
    family = "pruning"  # with the fused token: pruning with fusion, as Haurum et al. (2023) class it
    version = "1"
    summary = "EViT: keep the tokens the class token attends to most, fuse the rest into one (blocks 3, 6, 9)."
    params = (
        keep_rate_param("fraction of the non-prefix tokens kept at each of the three sites"),
        Param("fuse_token", "bool", True, "fuse the inattentive tokens into one (weighted by class attention) "
                                          "instead of dropping them"),
    )
    train_params = (
        Param("shrink_start_epoch", "float", 0.0, "training: epochs trained at keep rate 1 before the warm-up",
              min=0.0),
        Param("shrink_epochs", "float", 0.0, "training: epochs of the cosine keep-rate warm-up from 1 to "
                                             "keep_rate (0: keep_rate from the start)", min=0.0),
    )
    needs_class_token = True
    knob = "keep_rate"
    restores_grid = GridRestore.FILL

    def train_step(self, model, params: dict, epoch: float) -> None:
        """Before each training step: the warm-up's keep rate for this step."""
        plan_settings(model)[TRAIN_KEEP_RATE] = (warmup_keep_rate(
            epoch, params.get("keep_rate", 0.7), params.get("shrink_start_epoch", 0.0),
            params.get("shrink_epochs", 0.0)))

    def apply(self, model, keep_rate=0.7, fuse_token=True, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        if keep_rate < 1:
            for i in bb.sites("quarters"):
                plan.mid[i] = _evit_hook(float(keep_rate), bool(fuse_token))
                plan.needs[i] = ("cls_attn",)
        return model

    def expected_tokens(self, model, keep_rate=0.7, fuse_token=True, **params):
        bb = backbone_of(model, self.name)
        p = bb.n_prefix
        n = bb.num_patches + p
        sites = set(bb.sites("quarters")) if keep_rate < 1 else set()
        tokens, tokens_mlp = [], []
        for i in range(bb.depth):
            tokens.append(n)
            if i in sites:
                k = n_kept(float(keep_rate), n - p)
                if k < n - p:
                    n = p + k + int(bool(fuse_token))
            tokens_mlp.append(n)
        return tokens, tokens_mlp
