"""`dynamicvit`: DynamicViT (Rao et al., NeurIPS 2021), learned token pruning.

One method, one name across model families: on ViTs this file (the conference version);
on ConvNeXt and Swin the journal version (dynamic spatial sparsification, T-PAMI 2023),
implemented in ``methods/dynamicvit_hierarchical.py``; the class below only dispatches.

A light prediction module before blocks 3, 6 and 9 of a 12-block ViT (the quarter
points of other depths, the backbone's ``quarters`` sites) scores every patch token;
stage ``s`` (1, 2, 3) keeps ``int(N0 * keep_rate ** s)`` of the ``N0`` original patch
tokens, the class token always.

Faithful to the official ``models/dyvit.py`` (``VisionTransformerDiffPruning``):

- the predictor is the official ``PredictorLG`` laid out module for module, attached
  as ``model.score_predictor`` (a ``ModuleList``, one per stage), so the official
  state-dict keys ``score_predictor.{i}.in_conv.0.weight`` ... load unchanged;
- inference keeps the ``int(init_n * ratio)`` best tokens, ``ratio = keep_rate ** s``
  as Python floats, in the official order (``argsort`` of the keep log-probability,
  descending), the class token first;
- training (``model.train()``): no token is removed; decisions are hard straight-through
  Gumbel-softmax samples of the predictor's log-probabilities, multiplied by the
  previous decision, and the policy masks attention (``softmax_with_policy``, ``methods/_policy.py``) in
  every block, the ones before the first stage included (all-ones policy there, as
  the official);
- the losses of the official ``DistillDiffPruningLoss_dynamic`` as used for DeiT
  (``mse_token=True``, ``clf_weight=1``, ``ratio_weight=2``, ``distill_weight=0.5``):
  :func:`train_setup` returns the training loss function.

What a training forward leaves in the token state (``tokenbench.backbones.last_state``): ``extra["dvit_decisions"]`` (per
stage, the hard decisions [B, N0], for the ratio loss), ``extra["dvit_prev_decision"]``
(the final decision [B, N0, 1]) and ``policy`` (the final policy [B, N, 1], prefix 1);
:func:`student_outputs` returns them with the logits and the final normalised tokens.

Deviations (none change a result of the official configuration):

- ``init_n`` is the model's real patch count (the official hard-codes 14 * 14);
- models with several prefix tokens (distillation / register tokens) keep all of them;
- a stage that would keep every token (``keep_rate == 1``) is skipped at inference
  (no predictor, no reordering): the official would still run it and reorder the
  tokens, which leaves the logits equal up to rounding;
- at least one patch token is kept (the official would keep none when
  ``N0 * keep_rate ** s < 1``).

Training-only options (``tokenbench train --set``; all off by default, as the official):

- ``keep_prior_init``: the predictors start keeping ``keep_rate`` of what they see
  (:func:`prior_init`) rather than 1/2, so the stages start at their targets;
- ``decision_grad_clip=c``: each token's straight-through decision gradient is clamped
  to ``[-c, c]``.

Why they exist.  With masked attention, the gradient with respect to a *dropped* token's
decision is the softmax's slope at policy 0, huge where a kept query attends mostly to that
token (peaked attention over few tokens, as on the embedded Fashion-MNIST model): those rare
spikes all say "keep" and outweigh the ratio loss, so the predictors drift to keeping almost
everything.  Starting at the targets and clamping the spikes keeps every stage on its target
while the predictors still learn which tokens matter (``train_defaults`` below; docs/training.md,
"DynamicViT on the embedded model", has the runs).

License of the original (raoyongming/DynamicViT): MIT.  This file is our own code.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.backbones import (TokenState, add_module, applied_method, backbone_of, last_state,
                                  plan_settings)
from tokenbench.backbones.tokens import with_prefix
from tokenbench.errors import UserError
from tokenbench.methods import dynamicvit_dense as dense
from tokenbench.methods import dynamicvit_hierarchical as hier
from tokenbench.methods._policy import softmax_with_policy
from tokenbench.methods._staged import staged_schedule
from tokenbench.registry import GridRestore, Method, Param, register

PREDICTOR_ATTR = "score_predictor"  # the official attribute name: keys score_predictor.{i}.*




# --------------------------------------------------------------------------- predictor

class PredictorLG(nn.Module):
    """DynamicViT's prediction module (the official layout, so its weights load).

    Per token: LayerNorm, Linear(C, C), GELU; the first C/2 channels stay local, the
    other C/2 are averaged over the currently kept tokens (weighted by ``policy``) and
    broadcast; then C -> C/2 -> C/4 -> 2 (GELU between), LogSoftmax: [keep, drop]
    log-probabilities.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.in_conv(x)
        b, n, c = x.shape
        h = c // 2
        local_x = x[:, :, :h]
        if policy is None:  # inference: every present token is kept
            global_x = x[:, :, h:].sum(dim=1, keepdim=True) / n
        else:
            global_x = (x[:, :, h:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        x = torch.cat([local_x, global_x.expand(b, n, c - h)], dim=-1)
        return self.out_conv(x)


def init_predictor(pred: PredictorLG, generator: Optional[torch.Generator] = None) -> PredictorLG:
    """The official initialisation (``_init_weights``): trunc-normal(0.02) linears, zero biases."""
    for m in pred.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return pred


@torch.no_grad()
def prior_init(model: nn.Module, keep_rate: float) -> None:
    """Set each predictor's last-layer bias to ``[log r, log(1 - r)]`` (``r = keep_rate``, at
    most 1 - 1e-6) so that, with the official near-zero weights, every stage starts keeping
    about ``r`` of the tokens it sees: the ratio loss's targets ``r ** s`` from the first
    step, instead of the official start at 1/2 per stage (0.5, 0.25, 0.125)."""
    r = min(float(keep_rate), 1.0 - 1e-6)
    for pred in getattr(model, PREDICTOR_ATTR):
        last = pred.out_conv[-2]
        last.bias.copy_(torch.tensor([math.log(r), math.log1p(-r)], dtype=last.bias.dtype))


def _predictors_compatible(mods, stages: int, dim: int) -> bool:
    return isinstance(mods, nn.ModuleList) and len(mods) == stages and all(
        isinstance(p, PredictorLG) and p.in_conv[1].in_features == dim for p in mods)


# --------------------------------------------------------------------------- hooks

def _on_start(model, x, st: TokenState) -> None:
    # this model's predictors (looked up per forward: a deep copy of the model uses its own)
    st.extra["dvit_predictors"] = model._modules[PREDICTOR_ATTR]
    npf = st.n_prefix
    n0 = x.shape[1] - npf
    st.extra["dvit_n0"] = n0
    st.extra["dvit_decisions"] = []
    st.extra["dvit_prev_decision"] = None
    if model.training:
        b = x.shape[0]
        # The official runs every block with a policy in training, all ones before stage 1.
        st.extra["dvit_prev_decision"] = x.new_ones(b, n0, 1)
        st.policy = x.new_ones(b, npf + n0, 1)


DECISION_CLIP = "dvit_decision_grad_clip"  # plan setting written by train_setup (training option)


_ClampGrad = hier._ClampGrad  # identity forward, gradient clamped element-wise to [-c, c]


def _make_stage_hook(stage: int, keep_rate: float):
    ratio = keep_rate ** (stage + 1)  # Python float, as the official token_ratio list

    def hook(block, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        predictor = st.extra["dvit_predictors"][stage]
        npf = st.n_prefix
        b, n, _ = x.shape
        n0 = st.extra["dvit_n0"]
        if block.training:
            prev = st.extra["dvit_prev_decision"]
            pred = predictor(x[:, npf:], prev)                      # [B, N0, 2]
            keep = F.gumbel_softmax(pred, hard=True)[:, :, 0:1]
            clip = st.settings.get(DECISION_CLIP, 0.0)
            if clip > 0:
                keep = _ClampGrad.apply(keep, clip)
            keep = keep * prev
            st.extra["dvit_decisions"].append(keep.reshape(b, n0))
            st.extra["dvit_prev_decision"] = keep
            st.policy = torch.cat([x.new_ones(b, npf, 1), keep], dim=1)
            return x
        k = max(1, int(n0 * ratio))
        if k >= n - npf:  # nothing to prune (keep_rate == 1)
            return x
        score = predictor(x[:, npf:])[:, :, 0]                     # keep log-probability [B, N]
        keep_idx = torch.argsort(score, dim=1, descending=True)[:, :k]
        return st.keep(x, with_prefix(keep_idx, npf))

    return hook


# --------------------------------------------------------------------------- training

DEFAULT_WEIGHTS = {
    "clf_weight": 1.0,        # cross-entropy (the official DeiT criterion: clf_weight=1.0)
    "ratio_weight": 2.0,      # main.py --ratio_weight default
    "distill_weight": 0.5,    # logits KL and token MSE, each
    "label_smoothing": 0.1,   # main.py --smoothing default
}


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain timm ViT as the official ``VisionTransformerTeacher``: (logits, final normalised patch tokens)."""
    feats = teacher.forward_features(x)
    logits = teacher.forward_head(feats)
    return logits, feats[:, backbone_of(teacher).n_prefix:]


def student_outputs(model: nn.Module, x: torch.Tensor):
    """The official training outputs: (logits, final normalised patch tokens, final decision [B, N0, 1]
    (detached), per-stage decisions [B, N0] list)."""
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    st = last_state(model)
    npf = st.n_prefix
    prev = st.extra.get("dvit_prev_decision")
    if prev is None:
        prev = feats.new_ones(feats.shape[0], feats.shape[1] - npf, 1)
    return logits, feats[:, npf:], prev.detach(), list(st.extra.get("dvit_decisions", []))


@torch.no_grad()
def training_keep_fractions(model: nn.Module, x: torch.Tensor, seed: int = 0) -> list[float]:
    """The kept fraction at each stage of the *training-time* (Gumbel) decisions on ``x``:
    what the ratio loss drives to ``keep_rate ** s``.  Inference keeps exactly
    ``int(N * keep_rate ** s)`` tokens whatever the predictors say; a trained model whose
    training-time fractions miss their targets was trained for another token budget.
    The model's mode and the global random state are left as they were."""
    return hier.gumbel_keep_fractions(lambda m, t: student_outputs(m, t)[3], model, x, seed)


def ratio_loss(decisions: list[torch.Tensor], keep_rate: float) -> torch.Tensor:
    """Mean over stages of the batch mean of (kept fraction - keep_rate ** s) ** 2 (the official
    ``pred_loss / len(pruning_loc)``)."""
    total = 0.0
    for s, d in enumerate(decisions):
        total = total + ((d.mean(1) - keep_rate ** (s + 1)) ** 2).mean()
    return total / len(decisions)


def logit_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The official ``cls_kl_loss`` (no temperature)."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)


def token_distill_loss(tokens: torch.Tensor, teacher_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official ``mse_token`` loss: squared error averaged over the kept tokens (mask > 0.5)
    and channels; 0 when no token is kept."""
    b, n, c = tokens.shape
    m = (mask.reshape(b, n, 1) > 0.5).to(tokens.dtype)
    kept = m.sum()
    sq = ((tokens - teacher_tokens) ** 2 * m).sum()
    return torch.where(kept < 0.1, sq * 0.0, sq / (kept.clamp(min=1.0) * c))


def train_setup(model: nn.Module, teacher: nn.Module, params: Optional[dict] = None,
                weights: Optional[dict] = None):
    """The DynamicViT training loss, as the official ``DistillDiffPruningLoss_dynamic`` for DeiT.

    ``model``: a model with ``dynamicvit`` applied (and in ``train()`` mode while training);
    ``teacher``: the frozen dense model (a plain timm ViT, typically the same pretrained
    weights), put in ``eval()`` mode here with gradients off.  ``params``: the method's
    parameters (``keep_rate``; default the one applied to ``model``).  ``weights``:
    overrides of :data:`DEFAULT_WEIGHTS`.

    Returns the training loss, a :data:`~tokenbench.registry.LossFn`, with
    ``loss = clf * CE(label smoothing) + ratio * ratio_loss + distill * (KL(logits) + MSE(tokens))``.
    """
    w = dict(DEFAULT_WEIGHTS)
    for k, v in (weights or {}).items():
        if k not in w:
            raise UserError(f"dynamicvit: unknown loss weight {k!r} (known: {', '.join(w)})")
        w[k] = float(v)
    applied = applied_method(model).get("params", {})
    p, tp = DynamicViT.validate_training({**{k: v for k, v in applied.items() if k == "keep_rate"}, **(params or {})})
    keep_rate = p["keep_rate"]
    if tp["keep_prior_init"]:
        prior_init(model, keep_rate)
    plan_settings(model)[DECISION_CLIP] = float(tp["decision_grad_clip"])
    teacher.eval()
    teacher.requires_grad_(False)

    def loss_fn(model, x, y):
        logits, tokens, mask, decisions = student_outputs(model, x)
        t_logits, t_tokens = teacher_outputs(teacher, x)
        cls = F.cross_entropy(logits, y, label_smoothing=w["label_smoothing"])
        rl = ratio_loss(decisions, keep_rate) if decisions else logits.new_zeros(())
        kl = logit_distill_loss(logits, t_logits)
        mse = token_distill_loss(tokens, t_tokens, mask)
        loss = w["clf_weight"] * cls + w["ratio_weight"] * rl + w["distill_weight"] * kl + w["distill_weight"] * mse
        metrics = {"cls_loss": float(cls.detach()), "ratio_loss": float(rl.detach()), "cls_kl": float(kl.detach()),
                   "token_mse": float(mse.detach()), "keep_frac": float(mask.mean())}
        for s, d in enumerate(decisions):  # kept fraction at each stage, to check against keep_rate ** s
            metrics[f"keep_frac_s{s + 1}"] = float(d.detach().mean())
        return loss, logits, metrics

    n_stages = len(backbone_of(model).sites("quarters"))
    loss_fn.metric_names = ("cls_loss", "ratio_loss", "cls_kl", "token_mse", "keep_frac") + tuple(
        f"keep_frac_s{s + 1}" for s in range(n_stages))
    return loss_fn


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float = 0.01):
    """The official optimiser grouping (``optim_factory.get_parameter_groups``): predictors at the
    full learning rate; the backbone at ``backbone_lr_scale`` (``--lr_scale`` 0.01) and frozen for
    the first 5 epochs (``fix_epochs``); ``cls_token`` and ``pos_embed`` not trained at all.
    Each group carries ``lr_scale`` and ``fix_epochs`` for the caller's schedule."""
    groups: dict[str, dict] = {}
    for name, prm in model.named_parameters():
        if not prm.requires_grad or "cls_token" in name or "pos_embed" in name:
            continue
        new = name.startswith(PREDICTOR_ATTR + ".")
        no_decay = prm.ndim == 1 or name.endswith(".bias")
        key = ("new_param" if new else "backbone") + ("_no_decay" if no_decay else "")
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": 1.0 if new else backbone_lr_scale,
                                    "fix_epochs": 0 if new else 5})
        g["params"].append(prm)
    return list(groups.values())


def official_state_dict(state: dict) -> dict:
    """An official DynamicViT (DeiT) checkpoint as our state dict.

    The names already match (timm's VisionTransformer block names, and our predictors
    are ``score_predictor.{i}.*`` as the official ones): this unwraps a ``{'model': ...}``
    (or ``model_ema`` / ``state_dict``) checkpoint and strips ``module.`` prefixes.
    """
    for key in ("model", "model_ema", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


# --------------------------------------------------------------------------- the method

@register
class DynamicViT(Method):
    name = "dynamicvit"
    version = "1"
    summary = ("DynamicViT: learned prediction modules prune tokens before blocks 3, 6, 9 (keep_rate ** s of "
               "them); on ConvNeXt / Swin, the MLP of stage 3 runs on keep_rate, keep_rate - 0.2, keep_rate - 0.4 "
               "of the positions, a fast path on the rest")
    params = (
        Param("keep_rate", "float", 0.7, "fraction of patch tokens kept at each of the three stages (ViT); "
              "rho of the keep ratios rho, rho - 0.2, rho - 0.4 of stage 3 (ConvNeXt, Swin)",
              min=0.0, max=1.0, min_exclusive=True, identity=1.0),
    )
    train_params = (
        Param("keep_prior_init", "bool", False,
              "training: start each predictor keeping keep_rate of the tokens it sees (last-layer bias "
              "[log r, log(1 - r)]) instead of the official 1/2; for new predictors"),
        Param("decision_grad_clip", "float", 0.0,
              "training: clamp each token's straight-through decision gradient to [-c, c] (0: off, "
              "as the official)", min=0.0),
    )
    # The official recipe does not train on the embedded model (its peaked attention over 49
    # tokens makes the decision gradients say "keep"); this one does (docs/training.md, "DynamicViT on
    # the embedded model"), and made the committed checkpoints.
    train_defaults = {
        "default": {
            "set": {"keep_prior_init": True, "decision_grad_clip": 1.0},
            "loss_weights": {"ratio_weight": 2000.0},
            "recipe": {"grad_clip": 1.0, "lr": 2e-3, "epochs": 2.0},
            "why": "the official recipe does not train on the embedded model",
        },
    }
    learned = True
    needs_class_token = ("vit",)  # the journal version (ConvNeXt, Swin) has none
    deterministic = True
    knob = "keep_rate"
    backbones = ("vit", "convnext", "swin")
    restores_grid = {"vit": GridRestore.FILL, "convnext": GridRestore.KEEPS, "swin": GridRestore.KEEPS}

    def apply(self, model, keep_rate: float = 0.7, **params):
        bb = backbone_of(model, self.name)
        if bb.name != "vit":
            return hier.apply_dynamicvit(model, keep_rate)
        plan = bb.prepare(self.name)
        sites = bb.sites("quarters")
        dim = bb.width
        preds = model._modules.get(PREDICTOR_ATTR)
        if not _predictors_compatible(preds, len(sites), dim):
            ref = next(model.parameters())
            g = torch.Generator().manual_seed(0)  # untrained predictors: reproducible, global RNG untouched
            preds = nn.ModuleList([init_predictor(PredictorLG(dim), g) for _ in sites]).to(ref.device, ref.dtype)
            preds.train(model.training)
        add_module(model, PREDICTOR_ATTR, preds)
        plan.on_start.append(_on_start)
        plan.policy_softmax = softmax_with_policy
        for s, i in enumerate(sites):
            plan.pre[i] = _make_stage_hook(s, keep_rate)
        return model

    def expected_tokens(self, model, keep_rate: float = 0.7, **params):
        bb = backbone_of(model, self.name)
        if bb.name != "vit":
            return hier.expected_tokens(model, keep_rate)
        return staged_schedule(bb, keep_rate, "pre")

    def train_setup(self, model, teacher, params: Optional[dict] = None, weights: Optional[dict] = None):
        if backbone_of(model, self.name).name != "vit":
            applied = applied_method(model).get("params", {})
            p, tp = self.validate_training({**{k: v for k, v in applied.items() if k == "keep_rate"}, **(params or {})})
            return hier.train_setup(model, teacher, p["keep_rate"], tp, weights)
        return train_setup(model, teacher, params, weights)

    def dense_train_setup(self, encoder, params: Optional[dict] = None, weights: Optional[dict] = None):
        vit = backbone_of(encoder, self.name).name == "vit"
        applied = applied_method(encoder).get("params", {})
        p, tp = self.validate_training({**{k: v for k, v in applied.items() if k == "keep_rate"}, **(params or {})})
        keep_rate = p["keep_rate"]
        w = dense.check_weights(DEFAULT_WEIGHTS if vit else hier.DEFAULT_WEIGHTS, weights)
        if tp["keep_prior_init"]:
            (prior_init if vit else hier.prior_init)(encoder, keep_rate)
        plan_settings(encoder)[DECISION_CLIP if vit else hier.DECISION_CLIP] = float(tp["decision_grad_clip"])
        loss_fn = dense.dense_loss(vit, keep_rate, w, ratio_loss if vit else hier.ratio_loss)
        stages = len(backbone_of(encoder).sites("quarters")) if vit else dense.hierarchical_stages(keep_rate)
        loss_fn.metric_names = ("pixel_loss", "ratio_loss", "pixel_kl", "map_mse") + tuple(
            f"keep_frac_s{s + 1}" for s in range(stages))
        return loss_fn

    def param_groups(self, model, weight_decay: float, backbone_lr_scale: Optional[float] = None, **kw):
        if backbone_of(model, self.name).name != "vit":  # the journal recipe: --lr_scale 0.2
            return hier.param_groups(model, weight_decay, hier.BACKBONE_LR_SCALE if backbone_lr_scale is None
                                     else backbone_lr_scale)
        return param_groups(model, weight_decay, 0.01 if backbone_lr_scale is None else backbone_lr_scale)

    @staticmethod
    def convert_checkpoint(model, state: dict) -> dict:
        """An official checkpoint's state dict in our layout (``--checkpoint``; ours pass unchanged)."""
        if backbone_of(model).name != "vit":
            return hier.convert_checkpoint(model, state)
        return official_state_dict(state)
