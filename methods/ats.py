"""`ats`: Adaptive Token Sampler (Fayyaz et al., ECCV 2022), training-free, per-image token counts.

Paper: "Adaptive Token Sampling For Efficient Vision Transformers" (arXiv 2111.15667).
Official code: https://github.com/adaptivetokensampling/ATS (``libs/models/transformers/
ats_block.py``, ``vit.py``, ``configs/ImageNet/DeiT_S.yaml``), Apache License 2.0.
Our code is our own; it follows the official one step by step.

In every block from the first quarter point to the last (blocks 3 to 11 of 12, 0-based: the
official DeiT-S ``ATS_BLOCKS``), between the attention residual and the MLP:

1. **Score** each patch token ``j``: the class token's attention to it, summed over heads,
   times the L2 norm of its value vector (all heads together), then divided by the sum
   over the patch tokens (``score_assignment_step``).  The attention is the block's own
   softmax, after the padding mask (padded tokens get score 0).
2. **Sample**: sort the scores in increasing order, take their cumulative sum and rescale it
   to [0, 1] (``(cdf - min) / (max - min)``).  ``S`` values ``y`` spread evenly over
   ``[y0, 1]`` (``y0`` the smallest non-zero rescaled cdf value; ``create_ys``) each pick the
   token whose rescaled cdf value is *nearest* to ``y`` (``argmin |y - cdf|``, the official
   rule, not the textbook first-``cdf >= y``).  Tokens picked more than once are kept once
   (``get_unique_indices``), so the count varies per image.
3. **Keep** the class token first, then the picked tokens in increasing order of score (the
   official order); the batch is padded to its longest sequence with a padding mask
   (``st.keep(x, idx, pad=...)``), which attention, pooling and token counting honour.

``S`` (the samples drawn at each block) is the official ``n_ref_tokens - 1``: the number of
patch tokens entering the model (196 for DeiT-S at 224 px).  The budget knob is
``keep_rate``: ``S = round(keep_rate * num_patches)``, at least ``min(7, num_patches)`` (the
official lower bound of 8 tokens, class token included).  Why a rate and not a count ``K``:
the official configuration exposes ``NUM_TOKENS`` (a count, or a fraction when <= 1) with
``K = 197``, i.e. every token of DeiT-S, at each ATS block; a rate says the same (1.0) for
every model size, and the official code reads it the same way.  Only ``keep_rate = 1`` is
the official configuration: the official block cannot run with ``NUM_TOKENS`` below its
input length (its gather expands the ``N - 1`` picked slots to ``NUM_TOKENS - 1``), and
its sample grid is always ``n_ref_tokens - 1`` long; ``keep_rate < 1`` shortens that grid
(fewer samples, fewer distinct tokens), which is what the paper's ``K`` means.

Faithful to the official code.  Checked against it: the official ``ViT`` (its three model
files unmodified; only ``MODEL_REGISTRY`` stubbed and the config given as a namespace, with
``ATS_BLOCKS = [3..11]``, ``NUM_TOKENS`` = all tokens, ``DROP_TOKENS = True`` as in
``DeiT_S.yaml``) loaded with the same weights as a timm ViT, run one image at a time, against
this adapter's batched logits: a depth-12 width-32 ViT at 32 px (65 tokens, peaked random
weights, 32 images) differs by at most 3.5e-6 (logits up to 5.8; token counts 10 to 20 at the
last block); ``deit_small_patch16_224`` random-init at 224 px (16 images) by 1.6e-6 (timm's
init) and 4.9e-6 (peaked weights, logits up to 5.5).  The official code run on the whole
padded batch differs (up to 0.6, see below); this adapter with the official padding rule
put back equals it to 5.3e-6.  tests/test_ats.py holds a per-image loop reference.

- the class-token row is summed over heads (not averaged), the value norm is over all heads;
- the cdf is rescaled by its own min and max, ``y0`` is its smallest non-zero value, and the
  grid is ``y0 + (linspace(0, 1, S) * (S - 1) - y0 * j) / (S - 1)``, ``j = 0 .. S - 1``, in
  the operation order of ``create_ys``;
- nearest-cdf picking, duplicates collapsed, kept tokens in increasing score order.

Deviations (each chosen so that an image's result does not depend on its batch):

- **Per image, as the official code runs on one image alone.**  In a padded batch the
  official code scores the padding as 0 and leaves it in the cdf: the rescaling then uses
  0 instead of the image's smallest score, so an image that is padded (because a batch-mate
  kept more tokens) always keeps its least significant token and one that is not never
  does.  Here every image is sampled over its real tokens only, which is what the official
  code does at batch size 1.
- The official block's attention (and that of every block) is DynamicViT's
  ``softmax_with_policy`` with ``eps = 1e-6`` in numerator and denominator; here it is the
  exact softmax with an additive ``-inf`` mask on padded keys (fused attention for the
  block's output, one extra softmax row for the class token).  The difference is about
  ``1e-6`` relative and changes a pick only at an exact tie.
- The official sample grid is compared against the cdf padded with zeros on the left to
  the grid's length; we compare against the real cdf values only (the zeros can never be
  nearest, as ``y >= y0 > 0``), which also lets ``S`` be smaller than the sequence.
- Every prefix token (class, distillation, registers) is kept and not scored; the
  official code knows only the class token (index 0).
- Where an image has a single real patch token left (the cdf has no range) it is kept;
  the official code divides by zero there.  The official ``get_unique_indices`` pads its
  shifted copy with the value 1, which drops the last pick when every pick is index 1
  (two patch tokens left); not reproduced.
- Training: ATS is differentiable and the official repository fine-tunes with it; here it
  is applied training-free (``learned = False``), as its off-the-shelf results.

Token counts vary per image: ``expected_tokens`` is None, FLOPs are the mean over real
images (``tokenbench flops MODEL --method ats --data NAME --limit N``).  Under
``torch.compile`` each ATS block reads the batch's longest count (a data-dependent shape),
so the graph breaks at each of them.
"""

from __future__ import annotations

from typing import Optional

import torch

from tokenbench.backbones import AttnInfo, TokenState, backbone_of
from tokenbench.backbones.tokens import with_prefix
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.registry import GridRestore, Method, register

MIN_TOKENS = 8  # the official lower bound on the tokens sampled, class token included


# --------------------------------------------------------------------------- algorithm

def significance(cls_attn: torch.Tensor, values: torch.Tensor, n_prefix: int,
                 real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores [B, n] of the non-prefix tokens, summing to 1 per image (0 on padding).

    ``cls_attn`` [B, H, N]: the class token's attention row per head; ``values`` [B, H, N, d];
    ``real`` [B, N] (True for real tokens) or None.
    """
    b, h, n, d = values.shape
    v_norm = torch.linalg.norm(values.transpose(1, 2).reshape(b, n, h * d), ord=2, dim=2)
    score = (cls_attn.sum(dim=1) * v_norm)[:, n_prefix:]
    if real is not None:
        score = score.masked_fill(~real[:, n_prefix:], 0.0)
    return score / score.sum(dim=1, keepdim=True)


def sample_grid(y0: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The official ``create_ys``: ``n_samples`` values [B, S] spread evenly over [y0, 1]."""
    lin = torch.linspace(0.0, 1.0, n_samples, device=y0.device, dtype=y0.dtype)
    steps = torch.arange(n_samples, device=y0.device, dtype=y0.dtype)
    return y0 + ((lin * (n_samples - 1)) - y0 * steps) / (n_samples - 1)


def inverse_transform_sample(score: torch.Tensor, n_samples: int,
                             real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens ATS keeps: (indices [B, K] into ``score``'s tokens, mask [B, K] of real slots).

    ``score`` [B, n] (0 on padding, ``real`` [B, n] True for real tokens).  Per image, over
    its real tokens only: sort increasing, rescale the cumulative sum to [0, 1], pick the
    nearest cdf value for each of ``n_samples`` evenly spread ``y``, keep each picked token
    once.  Kept tokens come in increasing order of score; ``K`` is the batch's longest count,
    shorter images are padded (mask False).
    """
    b, n = score.shape
    if real is None:
        real = torch.ones_like(score, dtype=torch.bool)
    key = score.masked_fill(~real, -1.0)                          # padding sorts first
    order = torch.sort(key, dim=1).indices                        # [B, n], increasing score
    cdf = torch.cumsum(score.gather(1, order), dim=1)             # padding adds exact zeros
    n_pad = (~real).sum(1, keepdim=True)                          # [B, 1]
    real_sorted = torch.arange(n, device=score.device)[None] >= n_pad
    first = cdf.gather(1, n_pad.clamp(max=n - 1))                 # the image's own cdf minimum
    last = cdf[:, -1:]
    span = last - first
    ncdf = torch.where(span > 0, (cdf - first) / torch.where(span > 0, span, 1.0), 1.0)
    ncdf = ncdf.masked_fill(~real_sorted, 0.0)
    y0 = ncdf.masked_fill(ncdf == 0, torch.inf).amin(dim=1, keepdim=True)  # smallest non-zero value
    ys = sample_grid(y0, n_samples)                               # [B, S]
    picks = (ys[:, :, None] - ncdf[:, None, :]).abs().min(dim=2).indices  # [B, S], sorted positions
    picked = torch.zeros(b, n, dtype=torch.bool, device=score.device).scatter_(1, picks, 1)
    picked &= real_sorted
    k = int(picked.sum(1).max()) if b else min(n, n_samples)     # an empty batch keeps the most it could
    slots = torch.argsort((~picked).to(torch.int8), dim=1, stable=True)[:, :k]  # picked first, in order
    return order.gather(1, slots), picked.gather(1, slots)


def n_samples_for(num_patches: int, keep_rate: float) -> int:
    """Samples drawn at each ATS block: ``round(keep_rate * num_patches)``, at least
    ``min(MIN_TOKENS - 1, num_patches)`` and at least 2 (the grid needs two ends)."""
    return max(2, min(MIN_TOKENS - 1, num_patches), round(keep_rate * num_patches))


def ats_keep(x: torch.Tensor, st: TokenState, info: AttnInfo, n_samples: int) -> torch.Tensor:
    """One ATS step on the sequence ``x`` [B, N, C] after a block's attention residual."""
    p = st.n_prefix
    real = st.pad
    score = significance(info.cls_attn(per_head=True).float(), info.values.float(), p, real)  # fp32 under autocast
    idx, keep = inverse_transform_sample(score, n_samples, None if real is None else real[:, p:])
    b = x.shape[0]
    idx = with_prefix(idx, p)
    pad = torch.cat([torch.ones(b, p, dtype=torch.bool, device=x.device), keep], dim=1)
    return st.keep(x, idx, pad=pad)


# --------------------------------------------------------------------------- adapter

def ats_sites(bb) -> list[int]:
    """Blocks from the first quarter point to the last (3 to 11 of 12: the official ATS_BLOCKS)."""
    return list(range(bb.sites("quarters")[0], bb.depth))


@register
class ATS(Method):
    name = "ats"
    version = "1"
    summary = ("ATS: sample tokens by inverse transform of class-attention x value-norm scores, "
               "duplicates collapsed (blocks 3-11; per-image counts).")
    family = "pruning"
    params = (
        # no identity: at 1.0 duplicate samples still collapse
        keep_rate_param("samples drawn at each ATS block, as a fraction of the patch "
                        "tokens (1.0: the official K = 197 of DeiT-S)", default=1.0, identity=None),
    )
    knob = "keep_rate"
    restores_grid = GridRestore.FILL
    needs_class_token = True
    compile_note = ("per-image token counts: each ATS block reads the batch's longest count "
                    "(data-dependent shape), a graph break per block")

    def apply(self, model, keep_rate: float = 1.0, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        n_samples = n_samples_for(bb.num_patches, float(keep_rate))

        def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
            return ats_keep(x, st, info, n_samples)

        for i in ats_sites(bb):
            plan.mid[i] = mid
            plan.needs[i] = ("cls_attn", "values")
        return model

    def expected_tokens(self, model, **params):
        return None  # the count varies per image
