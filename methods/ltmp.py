"""`ltmp`: Learned Thresholds token Merging and Pruning (Bonnaerens and Dambre, TMLR 2023).

Paper: "Learned Thresholds Token Merging and Pruning for Vision Transformers" (arXiv
2307.10780).  Official code: https://github.com/Mxbonn/ltmp (``ltmp/timm/lt_mergeprune.py``
for training, ``lt_mergeprune_inference.py`` for inference, ``threshold_masking.py``,
``tools/train.py``); no license stated in the repository.  Our code is our own.

In **every** block, between the attention residual and the MLP:

1. *Scores* from the block's attention: each token's importance is its attention column
   averaged over heads and queries (the class token's: infinite); the similarity metric is
   the keys averaged over heads, L2-normalised.
2. *Merge*: the sequence splits into alternating halves (even positions are sources, odd
   ones destinations, as ToMe's bipartite matching; the class token, first, is never a
   source); a source whose best cosine similarity to a destination exceeds the block's
   learned **merge threshold** is folded into it (size-weighted sums, sizes add up, the
   destination keeps the larger importance).  The sequence becomes the unmerged sources
   followed by the destinations.
3. *Prune*: tokens whose importance is at most the block's learned **prune threshold** are
   dropped.

Proportional attention (``log(size)`` on the logits) in every block.  Thresholds start at
0.9 (merge) and 0 (prune: nothing pruned), as the official training model, and are clamped
to [0, 1].  Inference drops tokens: per-image counts, the batch padded to its longest
sequence with a padding mask (as ``ats``); the official inference runs one image at a time.

Training (``tokenbench train MODEL --method ltmp``; the official recipe: one epoch, only the
thresholds train): the official masked form keeps every token, a merged or pruned token
becoming a 0 in a mask that multiplies the attention's exponentials (``softmax_with_mask``,
``eps = 1e-5``); the masks are straight-through threshold masks ``sigmoid((v - t) / tau)``,
hard in the forward pass.  The loss is ``CE + reg_scale * (flops_ratio - reduction_target) ** 2``
with the official analytic FLOPs ratio from the masks' means (attention at the kept fraction
entering the block, MLP at the fraction after it), ``reg_scale = 10``, ``tau = 0.5`` (the
defaults of ``tools/train.py``).

Deviations:

- the optimiser is this project's AdamW, not SGD with momentum: the learning rates differ
  from the official 5e-3 (merge) and 5e-6 (prune) to step the thresholds by similar amounts
  (``train_defaults``; Adam's step is about the rate whatever the gradient's scale);
- the FLOPs ratio uses the model's own MLP width (the official formula assumes a ratio of 4;
  equal for DeiT);
- every prefix token is protected from merging and pruning (the official: the class token);
- merged sources carried in the training form are reordered as the official does (sources
  first, then destinations) but kept in the inference form only as in the official inference.

Learned: without trained thresholds it merges only near-duplicate tokens.  Token counts
vary per image: FLOPs are the mean over images (``--data``); under ``torch.compile`` each
block's count is data-dependent (a graph break per block).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.backbones import AttnInfo, TokenState, add_module, backbone_of, last_state, plan_settings
from tokenbench.errors import UserError
from tokenbench.registry import GridRestore, Method, Param, register

MODULE_ATTR = "ltmp"
TAU = "ltmp_tau"                 # plan settings written by train_setup
PRUNE_LR = "ltmp_prune_lr_scale"
MASK_EPS = 1e-5  # the official softmax_with_mask's epsilon in training


# --------------------------------------------------------------------------- modules

class ThresholdMasker(nn.Module):
    """One learned threshold: ``sigmoid((v - t) / tau)`` in the backward pass, ``v > t`` forward."""

    def __init__(self, init: float):
        super().__init__()
        self.threshold = nn.Parameter(torch.full((1,), float(init)))

    def forward(self, values: torch.Tensor, tau: float) -> torch.Tensor:
        return threshold_mask(values, self.threshold, tau)


class LTMPThresholds(nn.Module):
    """A block's merge and prune maskers (official keys ``blocks.{i}.{merge,prune}_masker.threshold``)."""

    def __init__(self):
        super().__init__()
        self.merge_masker = ThresholdMasker(0.9)
        self.prune_masker = ThresholdMasker(0.0)


def softmax_with_mask(logits: torch.Tensor, mask: torch.Tensor, eps: float = MASK_EPS) -> torch.Tensor:
    """The official training softmax: exponentials times the key mask ``mask`` [B, N, 1] (a masked
    token is attended by nobody, itself included), ``(e + eps / N) / (sum + eps)``."""
    n = mask.shape[1]
    e = (logits - logits.amax(dim=-1, keepdim=True)).exp() * mask.reshape(mask.shape[0], 1, 1, n)
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)


def threshold_mask(values: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """The official straight-through threshold mask: hard ``(soft > 0.5)`` forward, soft gradient."""
    soft = torch.sigmoid((values - threshold) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return soft + (hard - soft).detach()


# --------------------------------------------------------------------------- algorithm

def bipartite_scores(keys: torch.Tensor, n_prefix: int, real: Optional[torch.Tensor] = None,
                     mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(best similarity [B, S], its destination [B, S]) of each source (even position) among
    the destinations (odd positions); protected and padded sources get ``-inf``."""
    m = keys / keys.norm(dim=-1, keepdim=True)
    if mask is not None:
        m = m * mask[..., None].detach()
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    n = keys.shape[1]
    pos = torch.arange(n, device=keys.device)
    protect_src = pos[::2] < n_prefix
    protect_dst = pos[1::2] < n_prefix
    neg = float("-inf")
    scores = scores.masked_fill(protect_src[None, :, None], neg)
    if n_prefix > 1:
        scores = scores.masked_fill(protect_dst[None, None, :], neg)
    if real is not None:
        scores = scores.masked_fill(~real[:, ::2, None], neg).masked_fill(~real[:, None, 1::2], neg)
    return scores.max(dim=-1)


def importance_scores(attn: torch.Tensor, n_prefix: int, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each token's attention column averaged over heads and (real) queries; prefix tokens inf."""
    if real is None:
        imp = attn.mean(dim=(1, 2))
    else:
        rq = real[:, None, :, None].to(attn.dtype)
        imp = (attn * rq).sum(dim=2).mean(dim=1) / real.sum(1, keepdim=True).to(attn.dtype)
    return torch.cat([torch.full_like(imp[:, :n_prefix], float("inf")), imp[:, n_prefix:]], dim=1)


def ltmp_inference_step(x: torch.Tensor, st: TokenState, attn: torch.Tensor, keys: torch.Tensor,
                        merge_threshold: float, prune_threshold: float) -> torch.Tensor:
    """Merge then prune ``x`` [B, N, C] (real tokens first, padding last), image by image as
    the official inference, batched with a padding mask."""
    b, n, _ = x.shape
    p = st.n_prefix
    if n < 2:
        return x
    real = st.pad if st.pad is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
    imp = importance_scores(attn, p, real if st.pad is not None else None)
    node_max, node_idx = bipartite_scores(keys, p, real if st.pad is not None else None)
    merge = node_max > merge_threshold                                  # [B, S]
    s_n, d_n = (n + 1) // 2, n // 2
    src_pos = torch.arange(0, n, 2, device=x.device)
    dst_pos = torch.arange(1, n, 2, device=x.device)
    # destinations take the largest importance of what merges into them
    src_imp = imp[:, ::2].masked_fill(~merge, float("-inf"))
    dst_imp = imp[:, 1::2].scatter_reduce(1, node_idx, src_imp, reduce="amax")
    src_keep = real[:, ::2] & ~merge & (imp[:, ::2] > prune_threshold)
    dst_keep = real[:, 1::2] & (dst_imp > prune_threshold)
    # the new order: unmerged sources, then destinations, each in order; dropped ones last
    kept = torch.cat([src_keep, dst_keep], dim=1)
    order_pos = torch.cat([src_pos, dst_pos]).expand(b, n)
    key = torch.arange(n, device=x.device).expand(b, n) + (~kept).to(torch.int64) * n
    perm = torch.argsort(key, dim=1)
    k = int(kept.sum(1).max()) if b else n  # an empty batch keeps every slot
    keep_idx = order_pos.gather(1, perm[:, :k])
    pad = kept.gather(1, perm[:, :k])
    slot = torch.empty_like(perm).scatter_(1, perm, torch.arange(n, device=x.device).expand(b, n))
    dst_slot = slot[:, s_n:].gather(1, node_idx)                        # each source's destination's slot
    dst_kept = dst_keep.gather(1, node_idx)
    drop = ~(merge & dst_kept & real[:, ::2])
    dst = dst_slot.masked_fill(drop, 0).clamp(max=k - 1)
    return st.merge(x, keep_idx, src_pos.expand(b, s_n), dst, mode="mean", drop=drop, pad=pad)


def ltmp_train_step(x: torch.Tensor, st: TokenState, attn: torch.Tensor, keys: torch.Tensor,
                    maskers: LTMPThresholds, tau: float) -> torch.Tensor:
    """The official training form of one block: every token stays, merged and pruned ones
    become 0 in the mask (the state's policy); the sequence is reordered sources-then-destinations."""
    b, n, c = x.shape
    p = st.n_prefix
    mask = st.policy[..., 0]
    size = st.ensure_size(x)
    imp = attn.mean(dim=(1, 2))
    imp = torch.cat([torch.full_like(imp[:, :p], float("inf")), imp[:, p:]], dim=1)
    node_max, node_idx = bipartite_scores(keys, p, mask=mask)
    merge_mask = maskers.merge_masker(node_max, tau)
    src_m, dst_m = mask[:, ::2], mask[:, 1::2]
    unm_mask = torch.where(src_m.bool(), 1 - merge_mask, src_m)
    xs = x * size
    src_x, dst_x = xs[:, ::2], xs[:, 1::2]
    src_s, dst_s = size[:, ::2], size[:, 1::2]
    mm = merge_mask.detach()
    merge_scores = imp[:, ::2] * mm
    merge_scores = torch.cat([merge_scores[:, :1].new_zeros(b, 1), merge_scores[:, 1:]], dim=1)
    idx_c = node_idx[..., None].expand(-1, -1, c)
    dst_x = dst_x.scatter_reduce(1, idx_c, src_x * mm[..., None], reduce="sum")
    dst_s = dst_s.scatter_reduce(1, node_idx[..., None], src_s * mm[..., None], reduce="sum")
    dst_scores = imp[:, 1::2].scatter_reduce(1, node_idx, merge_scores, reduce="amax")
    size = torch.cat([src_s, dst_s], dim=1)
    x = torch.cat([src_x, dst_x], dim=1) / size
    mask = torch.cat([unm_mask, dst_m], dim=1)
    scores = torch.cat([imp[:, ::2], dst_scores], dim=1)
    prune_mask = maskers.prune_masker(scores, tau)
    mask = torch.where(mask.bool(), prune_mask, mask)
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)]).to(x.device)
    st.pos = None if st.pos is None else st.pos[:, order]
    st.size, st.policy = size, mask[..., None]
    st.extra.setdefault("ltmp_masks", []).append(mask)
    return x


def flops_ratio(masks: list[torch.Tensor], n: int, attn_coef: tuple[float, float], mlp_coef: float) -> torch.Tensor:
    """The official analytic FLOPs ratio of a training forward: per block, attention at the kept
    fraction entering it and the MLP at the fraction after it, over the dense block, averaged over
    blocks.  ``attn_coef`` (a1, a2): attention costs ``a1 * n + a2 * n ** 2``; ``mlp_coef`` per token."""
    a1, a2 = attn_coef
    ms = [1.0] + [m.mean() for m in masks]
    dense = a1 * n + a2 * n * n + mlp_coef * n
    total = 0.0
    for i in range(len(masks)):
        t, u = ms[i] * n, ms[i + 1] * n
        total = total + (a1 * t + a2 * t * t + mlp_coef * u) / dense
    return total / len(masks)


def cost_coefficients(model) -> tuple[tuple[float, float], float]:
    """(attention's (a1, a2), the MLP's per-token cost) from the backbone's analytic block cost."""
    bb = backbone_of(model)
    one, two = bb.block_cost([1], [0]), bb.block_cost([2], [0])
    if one is None:
        raise UserError("ltmp: this backbone has no analytic cost for the FLOPs loss")
    a2 = (two - 2 * one) / 2
    return (one - a2, a2), bb.block_cost([0], [1])


# --------------------------------------------------------------------------- hooks

def _on_start(model, x: torch.Tensor, st: TokenState) -> None:
    st.extra["ltmp_modules"] = model._modules[MODULE_ATTR]
    if model.training:
        st.policy = x.new_ones(x.shape[0], x.shape[1], 1)
        st.extra["ltmp_masks"] = []


def _make_mid(i: int):
    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        maskers = st.extra["ltmp_modules"][i]
        if block.training:
            return ltmp_train_step(x, st, info.attn(), info.keys, maskers, st.settings.get(TAU, 0.5))
        merge_t = float(maskers.merge_masker.threshold.clamp(0, 1))
        prune_t = float(maskers.prune_masker.threshold.clamp(0, 1))
        return ltmp_inference_step(x, st, info.attn(), info.keys, merge_t, prune_t)
    return mid


# --------------------------------------------------------------------------- the method

@register
class LTMP(Method):
    name = "ltmp"
    version = "1"
    summary = ("LTMP: in every block merge tokens more similar than a learned threshold and prune tokens "
               "less attended than another (per-image counts).")
    family = "hybrid"
    restores_grid = GridRestore.FILL_UNMERGE
    learned = True
    params = ()
    train_params = (
        Param("reduction_target", "float", 0.75, "training: the FLOPs fraction the thresholds are trained for "
                                                 "(official default 0.75)", min=0.0, max=1.0, min_exclusive=True),
        Param("reg_scale", "float", 10.0, "training: weight of the FLOPs loss (official 10)", min=0.0),
        Param("tau", "float", 0.5, "training: temperature of the threshold masks (official tools/train.py: 0.5)",
              min=0.0, min_exclusive=True),
        Param("prune_lr_scale", "float", 0.02, "training: the prune thresholds' learning rate relative to the "
                                               "merge thresholds'", min=0.0),
    )
    # One epoch, thresholds only (the official recipe); AdamW steps of about lr per step move the
    # merge thresholds (cosines, scale 1) at the official 5e-3 and the prune thresholds (attention
    # means, scale 1 / tokens) at 1e-4.
    train_defaults = {
        "default": {
            "recipe": {"lr": 5e-3, "epochs": 1.0},
            "why": "the official one-epoch recipe, thresholds only, with AdamW step sizes",
        },
    }
    compile_note = ("per-image token counts: every block's count depends on the learned thresholds "
                    "(data-dependent shape), a graph break per block")

    def apply(self, model, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        plan.prop_attn = True
        plan.policy_softmax = softmax_with_mask
        mods = model._modules.get(MODULE_ATTR)
        if not (isinstance(mods, nn.ModuleList) and len(mods) == bb.depth):
            ref = next(model.parameters())
            mods = nn.ModuleList([LTMPThresholds() for _ in range(bb.depth)]).to(ref.device, ref.dtype)
        add_module(model, MODULE_ATTR, mods)
        plan.on_start.append(_on_start)
        for i in range(bb.depth):
            plan.mid[i] = _make_mid(i)
            plan.needs[i] = ("attn", "keys")
        return model

    @classmethod
    def reduces(cls, params) -> bool:
        return False  # untrained thresholds merge only near-duplicate tokens; training sets the budget

    def expected_tokens(self, model, **params):
        return None

    def train_setup(self, model, teacher, params: Optional[dict] = None, weights: Optional[dict] = None):
        _, tp = self.validate_training(params or {})
        w = {"cls_scale": 1.0, "reg_scale": tp["reg_scale"], "label_smoothing": 0.1}
        for k, v in (weights or {}).items():
            if k not in w:
                raise UserError(f"ltmp: unknown loss weight {k!r} (known: {', '.join(w)})")
            w[k] = float(v)
        plan_settings(model)[TAU] = float(tp["tau"])
        plan_settings(model)[PRUNE_LR] = float(tp["prune_lr_scale"])
        target = float(tp["reduction_target"])
        attn_coef, mlp_coef = cost_coefficients(model)
        for name, prm in model.named_parameters():   # the official: only the thresholds train
            prm.requires_grad_(name.startswith(MODULE_ATTR + "."))

        def loss_fn(model, x, y):
            logits = model(x)
            masks = last_state(model).extra["ltmp_masks"]
            cls = F.cross_entropy(logits, y, label_smoothing=w["label_smoothing"])
            ratio = flops_ratio(masks, masks[0].shape[-1], attn_coef, mlp_coef)
            reg = (ratio - target) ** 2
            loss = w["cls_scale"] * cls + w["reg_scale"] * reg
            return loss, logits, {"cls_loss": float(cls.detach()), "reg_loss": float(reg.detach()),
                                  "flops_ratio": float(ratio.detach()), "kept_frac": float(masks[-1].detach().mean())}

        loss_fn.metric_names = ("cls_loss", "reg_loss", "flops_ratio", "kept_frac")
        return loss_fn

    def param_groups(self, model, weight_decay: float, prune_lr_scale: Optional[float] = None, **kw):
        """The thresholds only: merge at the full rate, prune at ``prune_lr_scale`` of it; no weight decay."""
        scale = plan_settings(model).get(PRUNE_LR, 0.02) if prune_lr_scale is None else prune_lr_scale
        merge, prune = [], []
        for name, prm in model.named_parameters():
            if name.startswith(MODULE_ATTR + "."):
                (prune if "prune_masker" in name else merge).append(prm)
        return [{"params": merge, "weight_decay": 0.0, "lr_scale": 1.0, "fix_epochs": 0.0},
                {"params": prune, "weight_decay": 0.0, "lr_scale": scale, "fix_epochs": 0.0}]

    def train_step(self, model, params: dict, epoch: float) -> None:
        """Before every step: thresholds clamped to [0, 1] (the official clamps after each step)."""
        with torch.no_grad():
            for mods in model._modules[MODULE_ATTR]:
                mods.merge_masker.threshold.clamp_(0, 1)
                mods.prune_masker.threshold.clamp_(0, 1)

    @staticmethod
    def convert_checkpoint(model, state: dict) -> dict:
        """An official LTMP checkpoint in our layout: ``blocks.{i}.{merge,prune}_masker.*`` -> ``ltmp.{i}.*``."""
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
        out = {}
        for k, v in state.items():
            k = k[len("module."):] if k.startswith("module.") else k
            parts = k.split(".")
            if len(parts) > 3 and parts[0] == "blocks" and parts[2] in ("merge_masker", "prune_masker"):
                k = ".".join([MODULE_ATTR, parts[1]] + parts[2:])
            out[k] = v
        return out

