"""`random`: keep a uniformly random subset of the patch tokens (the control for pruning).

The same sites and counts as ``topk`` (inside blocks 3, 6 and 9 of a 12-block ViT,
between attention and MLP, ``int(N0 * keep_rate ** s)`` patch tokens at stage ``s``),
the subset drawn independently per image.  Prefix tokens (if any) are always kept; no
class token is needed, and average pooling needs no size weighting since nothing is merged.

Each image's choice is a function of the seed and the image alone: every token gets a
score from a counter-based integer hash of (seed, stage, image id, token position), and
the highest-scoring tokens are kept.  The image id is the image's index in the evaluated
set (:func:`tokenbench.backbones.image_ids`, set by the evaluation loop; ``0 .. B-1`` when
nobody set it), so predictions do not depend on the evaluation batch size.  The hash is
plain tensor arithmetic (no generator state, no ``.item()``): vectorised, and the same on
every device.

Kept tokens stay in their original (spatial) order.

On ConvNeXt and Swin (the control of DynamicViT's journal version): the same sites, keep
ratios and fast paths as ``dynamicvit`` there (``methods/dynamicvit_hierarchical.py``), the
slow-path positions of each of its three predictors drawn by the same hash instead; the
fast paths are untrained until fine-tuned (``tokenbench train ... --method random``).
"""

from __future__ import annotations

import torch

from tokenbench.backbones import TokenState, backbone_of
from tokenbench.methods import dynamicvit_hierarchical as hier
from tokenbench.methods._knobs import keep_rate_param
from tokenbench.methods._staged import keep_top_patches, staged_schedule
from tokenbench.registry import GridRestore, Method, Param, register

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B      # < 2**27: a 32-bit value times it stays inside int64
_STEP = 0x9E3779B9    # the golden-ratio increment between consecutive tokens


def mix32(h):
    """A 32-bit integer hash (two multiply-xorshift rounds), on Python ints or int64 tensors
    holding values in [0, 2**32)."""
    h = ((h >> 16) ^ h) * _MUL & _M32
    h = ((h >> 16) ^ h) * _MUL & _M32
    return (h >> 16) ^ h


def stage_key(seed: int, stage: int) -> int:
    """The 32-bit key of one seed and pruning stage (the seed's low and high 32 bits both count)."""
    h = mix32(stage + 1)
    for shift in (0, 32):
        h = mix32(h ^ ((seed >> shift) & _M32))
    return h


def token_scores(key, image_ids: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] int64 scores, distinct within each row: the hash of (key, image id, position),
    with the position in the low bits to break ties.  ``key`` an int, or an int64 tensor [S, 1]
    of keys for [S, B, n] scores at once."""
    ids = image_ids.to(torch.int64)
    h = mix32(mix32((ids & _M32) ^ key) ^ ((ids >> 32) & _M32))               # [B]
    pos = torch.arange(n, device=ids.device, dtype=torch.int64)
    u = mix32((h[..., None] + pos * _STEP) & _M32)                           # [B, n]
    return u * 65536 + pos


def _on_start(model, x, st: TokenState) -> None:
    st.extra["random_n0"] = x.shape[1] - st.n_prefix


def _make_hook(stage: int, keep_rate: float, seed: int):
    ratio = keep_rate ** (stage + 1)
    key = stage_key(seed, stage)

    def hook(block, x: torch.Tensor, st: TokenState, info) -> torch.Tensor:
        return keep_top_patches(x, st, st.extra["random_n0"], ratio,
                                lambda: token_scores(key, st.image_ids.to(x.device), x.shape[1] - st.n_prefix))

    return hook


@register
class RandomPrune(Method):
    name = "random"
    # 2: each image's draw depends on the seed and the image's index in the evaluated set, not on
    # its position in the batch (version 1 gave other numbers at another evaluation batch size)
    version = "2"
    summary = "Keep a random subset of patch tokens in blocks 3, 6, 9 (keep_rate ** s of them), per image."
    params = (
        keep_rate_param("fraction of patch tokens kept at each of the three stages"),
        Param("seed", "int", 0, "seed of the random choice (each image's choice depends on it and the image alone)"),
    )
    deterministic = False
    knob = "keep_rate"
    seed_param = "seed"
    backbones = ("vit", "convnext", "swin")
    restores_grid = {"vit": GridRestore.FILL, "convnext": GridRestore.KEEPS, "swin": GridRestore.KEEPS}

    def apply(self, model, keep_rate: float = 0.7, seed: int = 0, **params):
        bb = backbone_of(model, self.name)
        if bb.name != "vit":
            return hier.apply_random(model, keep_rate, seed, lambda s, st, n: token_scores(stage_key(seed, s), st.image_ids, n))
        plan = bb.prepare(self.name)
        plan.on_start.append(_on_start)
        for s, i in enumerate(bb.sites("quarters")):
            plan.mid[i] = _make_hook(s, keep_rate, seed)
        return model

    def expected_tokens(self, model, keep_rate: float = 0.7, **params):
        bb = backbone_of(model, self.name)
        if bb.name != "vit":
            return hier.expected_tokens(model, keep_rate, self.name)
        return staged_schedule(bb, keep_rate, "mid")
