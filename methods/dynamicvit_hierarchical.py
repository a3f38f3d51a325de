"""DynamicViT's journal version on hierarchical models (DynamicCNN / DynamicSwin): the
``dynamicvit`` method on ConvNeXt (and Swin), and the slow-path sites ``random`` shares.

Rao et al., "Dynamic Spatial Sparsification for Efficient Vision Transformers and
Convolutional Neural Networks" (T-PAMI 2023); official code raoyongming/DynamicViT
(``models/dyconvnext.py``, ``models/dyswin.py``, ``losses.py``, ``main.py``).  This file is
our own code; ``methods/dynamicvit.py`` dispatches here when the model is not a ViT.

The algorithm, as the official code runs it:

- **Where.** Only stage 3 (the 14 x 14 map at 224 px).  Predictors sit before stage-3 blocks
  ``[k, 2k, 3k]`` with ``k = max(1, depth // 9)`` of that stage: [1, 2, 3] for ConvNeXt-T
  (9 blocks) and Swin-T (6), [3, 6, 9] for ConvNeXt-S/B (27), [2, 4, 6] for Swin-S/B (18),
  the values ``main.py`` hard-codes per model.  Every stage-3 block from the first predictor
  on is adaptive; the decision of predictor ``s`` holds until the next predictor.
- **How much.** Keep ratios ``[rho, rho - 0.2, rho - 0.4]`` (``main.py``'s ``SPARSE_RATIO``
  from ``--base_rate``, computed in Python floats), each a fraction of *all* stage-3
  positions: predictor ``s`` keeps ``int(N * ratio_s)`` of the full map, selected afresh
  (``argsort`` of its keep log-probability, descending).  Not the ViT's cumulative ``rho ** s``.
- **The predictor** (``PredictorLG`` of the journal version), on the block's *input* map:
  LayerNorm, C -> C, GELU; half the channels local, half averaged over the whole map and
  broadcast; C -> C/2 -> C/4 -> 2, log-softmax.  Official ConvNeXt: 1x1 convolutions and a
  channels-first LayerNorm (eps 1e-6); here Linear layers on tokens (the same function; the
  official 1x1 conv weights [O, I, 1, 1] load as [O, I]).  Swin: LayerNorm eps 1e-5.
- **Slow and fast paths.** The mixer (depthwise conv / window attention) runs on the full map;
  the selected positions take the block's FFN, the others the fast path (ConvNeXt:
  LayerNorm(eps 1e-6) + Linear(C, C) times ``fast_path_gamma``, initialised 1e-6; Swin:
  ``fastMlp``, LayerNorm + Linear(C, C)), scattered back before the residual.
- **Training** (model in train mode): the official two streams (``methods/_two_streams.py``, a
  ``plan.block`` hook), hard Gumbel-softmax decisions (straight-through) of the
  predictor on the merged map; the loss of ``ConvNextDistillDiffPruningLoss`` as ``main.py``
  builds it (``clf_weight=1``, ``ratio_weight=10``, ``distill_weight=0.5``):
  ``CE + 10 * mean_s mean_b (kept fraction_bs - ratio_s) ** 2 + 0.5 * KL(teacher || student)
  (log-softmax, no temperature, batchmean) + 0.5 * mean((featmap - teacher featmap) ** 2)``
  over all positions and channels of the final-norm feature map of the last stage.
- **Parameter groups** (``optim_factory.get_parameter_groups``): names containing ``fast`` or
  ``predictor`` at the full rate; the backbone at ``--lr_scale`` (0.2 in every README
  command) and frozen for the first 5 epochs (``fix_step``); no weight decay on 1-d
  parameters and biases.

Training-only options (``tokenbench train --set``, off by default as the official):
``keep_prior_init`` starts predictor ``s`` keeping about ``ratio_s`` of the map (last-layer
bias ``[log r, log(1 - r)]``) instead of 1/2; ``decision_grad_clip=c`` clamps each position's
straight-through decision gradient to ``[-c, c]`` (see ``methods/dynamicvit.py`` for why).

Official state dicts load (:func:`convert_checkpoint`, called by ``--checkpoint``): the
backbone keys through the backbone's ``from_official`` (ConvNeXt: ``downsample_layers`` /
``stages.i.j`` / ``dwconv`` / ``pwconv1`` / ``norm`` / ``head``), the extra keys here:
``stages.2.{j}.fast_path.{0,1}.*`` / ``stages.2.{j}.fast_path_gamma`` ->
``fast_paths.{j}.norm|fc|gamma``; ``score_predictor.{s}.*`` keeps its name (conv weights
reshaped); Swin: ``official_to_timm`` of the backbone (``tokenbench/backbones/swin.py``),
``layers.2.blocks.{j}.fastmlp.fc1.{0,1}.*`` -> ``fast_paths.{j}.norm|fc.*`` and
``layers.2.score_predictor.{s}.*`` -> ``score_predictor.{s}.*``.

Deviations from the official code (none changes an official configuration's result):

- the official Swin ``BasicLayer`` merges the streams at the end of stage 3 with
  ``if len(x) == 2``, which in eval mode is also true of a batch of two images and then fails
  (``TypeError``): here the merged map flows between blocks (``methods/_two_streams.py``), so any batch
  size works;
- the released ``ConvNextDistillDiffPruningLoss`` prints ``self.layer_mse_loss`` and
  ``self.feat_distill_loss`` every 100 steps, attributes it never sets (an
  ``AttributeError`` at step 100 with ``print_mode=True``): the parts are returned as
  metrics instead;
- ``PredictorLG.forward`` takes a ``ratio`` whose default (0.5) the official never uses; the
  ratios always come from ``keep_rate`` here;
- the predictor locations follow the rule above for any stage-3 depth (the official knows
  only its three ConvNeXt and three Swin sizes); a stage 3 with fewer than 4 blocks is
  refused, as is ``keep_rate <= 0.4`` (the official's last ratio would be 0 or negative:
  ``idx[:, :negative]`` silently keeps all but a few positions);
- the fast path's layer scale exists whether or not the block has one (every timm ConvNeXt
  has; the official ties it to ``layer_scale_init_value > 0``);
- the fast path runs on the N - K unselected positions, the FFN on the K selected ones, in
  whatever order (the official keeps ``argsort`` order; every operation is per position).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.backbones import TokenState, add_module, backbone_of, last_state, plan_settings
from tokenbench.errors import UserError
from tokenbench.methods._two_streams import two_streams

PREDICTOR_ATTR = "score_predictor"   # official name: score_predictor.{s}.*
FAST_ATTR = "fast_paths"             # fast_paths.{j}: the fast path of stage-3 block j

DEFAULT_WEIGHTS = {
    "clf_weight": 1.0,        # main.py: ConvNextDistillDiffPruningLoss(clf_weight=1.0, ...)
    "ratio_weight": 10.0,     # main.py: ratio_weight=10.0 for convnext and swin
    "distill_weight": 0.5,    # the class default: logits KL and feature-map MSE, each
    "label_smoothing": 0.1,   # main.py --smoothing default
}
BACKBONE_LR_SCALE = 0.2       # --lr_scale of every README command for ConvNeXt and Swin
FIX_EPOCHS = 5                # optim_factory: fix_step = 5 for the backbone groups


# --------------------------------------------------------------------------- schedule

def predictor_blocks(stage_depth: int) -> list[int]:
    """Stage-3 block indices (within the stage) before which the predictors sit."""
    if stage_depth < 4:
        raise UserError(f"dynamicvit needs at least 4 blocks in stage 3 (predictors before blocks 1, 2, 3); "
                        f"this model has {stage_depth}")
    k = max(1, stage_depth // 9)
    return [k, 2 * k, 3 * k]


def keep_ratios(keep_rate: float) -> list[float]:
    """``[rho, rho - 0.2, rho - 0.4]`` in Python floats, as ``main.py``'s ``SPARSE_RATIO``."""
    return [keep_rate, keep_rate - 0.2, keep_rate - 0.4]


def keep_counts(n: int, keep_rate: float) -> list[int]:
    """Positions each predictor keeps of the ``n`` stage-3 positions: ``int(n * ratio)``."""
    return [int(n * r) for r in keep_ratios(keep_rate)]


def check_keep_rate(keep_rate: float, method: str = "dynamicvit") -> None:
    if keep_rate <= 0.4:
        raise UserError(f"{method} on hierarchical models needs keep_rate > 0.4 (its keep ratios are "
                        f"keep_rate, keep_rate - 0.2, keep_rate - 0.4), got {keep_rate}")


# --------------------------------------------------------------------------- modules

class PredictorLG(nn.Module):
    """The journal version's prediction module on tokens [B, N, C] -> [keep, drop]
    log-probabilities [B, N, 2]; the global half is the plain mean over the whole map."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        b, n, c = x.shape
        h = c // 2
        global_x = x[:, :, h:].mean(dim=1, keepdim=True)
        return self.out_conv(torch.cat([x[:, :, :h], global_x.expand(b, n, c - h)], dim=-1))


class FastPath(nn.Module):
    """The fast path of one adaptive block on tokens [B, M, C]: LayerNorm, Linear(C, C), and a
    layer scale (ConvNeXt's ``fast_path`` + ``fast_path_gamma``; Swin's ``fastMlp``: none)."""

    def __init__(self, dim: int, eps: float, layer_scale: Optional[float]):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale)) if layer_scale is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(self.norm(x))
        return x if self.gamma is None else x * self.gamma


# Per family: LayerNorm eps of the predictor and the fast path, the fast path's layer scale.
FAMILY = {
    "convnext": {"pred_eps": 1e-6, "fast_eps": 1e-6, "layer_scale": 1e-6},
    "swin": {"pred_eps": 1e-5, "fast_eps": 1e-5, "layer_scale": None},
}


def _init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """The official ``_init_weights``: trunc-normal(0.02) linears, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, generator=generator)
            nn.init.zeros_(m.bias)
    return module


# --------------------------------------------------------------------------- installing

class Sites:
    """Where the method acts on one model: the predictor blocks and the adaptive blocks (global
    block indices) and the stage-3 geometry."""

    def __init__(self, model: nn.Module, method: str = "dynamicvit"):
        bb = backbone_of(model, method)
        if bb.name not in FAMILY:
            raise UserError(f"{method}'s hierarchical form applies to ConvNeXt and Swin models, not {bb.name}")
        self.bb = bb
        self.stage = bb.sites("stage 3")                          # global indices of the stage-3 blocks
        self.locs = predictor_blocks(len(self.stage))             # within the stage
        self.first = self.stage[0]
        self.predictors = [self.first + j for j in self.locs]     # global
        self.adaptive = self.stage[self.locs[0]:]                 # global
        self.dim = bb.width
        self.n = bb.num_patches

    def stage_of(self, i: int) -> int:
        """The predictor whose decision block ``i`` (adaptive) uses."""
        return sum(1 for p in self.predictors if p <= i) - 1


def _attach(model: nn.Module, sites: Sites, with_predictors: bool) -> None:
    """Add (or keep, when compatible) the fast paths and, for ``dynamicvit``, the predictors."""
    fam = FAMILY[sites.bb.name]
    ref = next(model.parameters())
    g = torch.Generator().manual_seed(0)  # untrained parts: reproducible, global RNG untouched
    fast = model._modules.get(FAST_ATTR)
    keys = [str(i - sites.first) for i in sites.adaptive]
    if not (isinstance(fast, nn.ModuleDict) and list(fast.keys()) == keys
            and all(f.fc.in_features == sites.dim for f in fast.values())):
        fast = nn.ModuleDict({k: _init(FastPath(sites.dim, fam["fast_eps"], fam["layer_scale"]), g) for k in keys})
        fast = fast.to(ref.device, ref.dtype).train(model.training)
    add_module(model, FAST_ATTR, fast)
    if with_predictors:
        preds = model._modules.get(PREDICTOR_ATTR)
        if not (isinstance(preds, nn.ModuleList) and len(preds) == 3 and all(
                isinstance(p, PredictorLG) and p.in_conv[1].in_features == sites.dim for p in preds)):
            preds = nn.ModuleList([_init(PredictorLG(sites.dim, fam["pred_eps"]), g) for _ in range(3)])
            preds = preds.to(ref.device, ref.dtype).train(model.training)
        add_module(model, PREDICTOR_ATTR, preds)


def install(model: nn.Module, keep_rate: float, choose: Callable, method: str,
            streams: Optional[Callable] = None) -> nn.Module:
    """The shared surgery of ``dynamicvit`` and ``random`` on a hierarchical model.

    ``choose(s, tokens, st, k) -> idx [B, k]``: predictor ``s``'s ``k = int(N * ratio_s)``
    slow-path positions from the block's input map [B, N, C] (eval mode, or training without
    ``streams``); ``streams(s, tokens, st)
    -> mask [B, N, 1]``: its training decision (two-stream form).  Adaptive blocks use the
    last predictor's choice and their own fast path.
    """
    check_keep_rate(keep_rate, method)
    sites = Sites(model, method)
    plan = sites.bb.prepare(method)
    _attach(model, sites, with_predictors=streams is not None)
    ratios = keep_ratios(keep_rate)

    def on_start(m, x, st: TokenState) -> None:
        st.extra["hier_fast"] = m._modules[FAST_ATTR]      # this model's (a deep copy uses its own)
        st.extra["hier_model"] = m
        st.extra["hier_decisions"] = []
        st.extra["hier_choice"] = None

    plan.on_start.append(on_start)

    def make_pre(s: int):
        def pre(block, tokens: torch.Tensor, st: TokenState) -> None:
            if not (block.training and streams is not None):
                st.extra["hier_choice"] = choose(s, tokens, st, int(tokens.shape[1] * ratios[s]))
                if st.track_source:  # for pictures (tokenbench visualize): this predictor's slow path
                    st.stages.append({"block": st.block, "kind": "slow path", "predictor": s,
                                      "slow": st.extra["hier_choice"].detach().clone(), "positions": tokens.shape[1]})
        return pre

    def make_subset(i: int):
        key = str(i - sites.first)

        def subset(block, tokens: torch.Tensor, st: TokenState):
            return st.extra["hier_choice"], st.extra["hier_fast"][key]
        return subset

    def make_streams(i: int, s_at: Optional[int]):
        key = str(i - sites.first)

        def two(block, tokens: torch.Tensor, st: TokenState):
            if s_at is not None:
                mask = streams(s_at, tokens, st)
                st.extra["hier_decisions"].append(mask)
            return st.extra["hier_decisions"][-1], st.extra["hier_fast"][key]
        return two

    for s, i in enumerate(sites.predictors):
        plan.pre[i] = make_pre(s)
    for i in sites.adaptive:
        plan.subset[i] = make_subset(i)
        if streams is not None:
            plan.block[i] = two_streams(type(sites.bb), make_streams(i, sites.predictors.index(i) if i in sites.predictors else None))
    return model


def expected_tokens(model: nn.Module, keep_rate: float, method: str = "dynamicvit"):
    """(positions entering each block, positions entering each block's FFN) at inference."""
    sites = Sites(model, method)
    tokens = sites.bb.dense_tokens()
    mlp = list(tokens)
    counts = keep_counts(sites.n, keep_rate)
    for i in sites.adaptive:
        mlp[i] = counts[sites.stage_of(i)]
    return tokens, mlp


# --------------------------------------------------------------------------- dynamicvit

def _predictor_choice(s: int, tokens: torch.Tensor, st: TokenState, k: int) -> torch.Tensor:
    """Inference: the ``k`` positions of largest keep log-probability (official ``argsort``)."""
    score = st.extra["hier_model"]._modules[PREDICTOR_ATTR][s](tokens)[:, :, 0]
    return torch.argsort(score, dim=1, descending=True)[:, :k]


DECISION_CLIP = "hier_decision_grad_clip"   # plan setting (training option)


class _ClampGrad(torch.autograd.Function):
    """Identity forward; the incoming gradient clamped element-wise to [-c, c]."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(-ctx.c, ctx.c), None


def _predictor_decision(s: int, tokens: torch.Tensor, st: TokenState) -> torch.Tensor:
    """Training: a hard straight-through Gumbel-softmax sample, 1 = slow path, [B, N, 1]."""
    pred = st.extra["hier_model"]._modules[PREDICTOR_ATTR][s](tokens)
    mask = F.gumbel_softmax(pred, hard=True, dim=-1)[:, :, 0:1]
    clip = st.settings.get(DECISION_CLIP, 0.0)
    return _ClampGrad.apply(mask, clip) if clip > 0 else mask


def apply_dynamicvit(model: nn.Module, keep_rate: float) -> nn.Module:
    return install(model, keep_rate, _predictor_choice, "dynamicvit", streams=_predictor_decision)


@torch.no_grad()
def prior_init(model: nn.Module, keep_rate: float) -> None:
    """Training option: predictor ``s`` starts keeping about ``ratio_s`` of the map (its
    last-layer bias ``[log r, log(1 - r)]``) instead of the official 1/2."""
    for pred, r in zip(model._modules[PREDICTOR_ATTR], keep_ratios(keep_rate)):
        r = min(max(float(r), 1e-6), 1.0 - 1e-6)
        last = pred.out_conv[-2]
        last.bias.copy_(torch.tensor([math.log(r), math.log1p(-r)], dtype=last.bias.dtype))


# --------------------------------------------------------------------------- training

def student_outputs(model: nn.Module, x: torch.Tensor):
    """(logits, final feature map [B, N, C], per-predictor decisions [B, N, 1] list): the
    official ``AdaConvNeXt`` training outputs."""
    bb = backbone_of(model)
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    st = last_state(model)
    return logits, bb.final_feature_map(feats), list(st.extra.get("hier_decisions", []))


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, x: torch.Tensor):
    """The dense model as the official ``ConvNeXt_Teacher``: (logits, final feature map)."""
    feats = teacher.forward_features(x)
    return teacher.forward_head(feats), backbone_of(teacher).final_feature_map(feats)


def ratio_loss(decisions: list[torch.Tensor], keep_rate: float) -> torch.Tensor:
    """``sum_s mean_b (mean_n mask_bsn - ratio_s) ** 2 / S`` (the official ``pred_loss / len``)."""
    total = 0.0
    for d, r in zip(decisions, keep_ratios(keep_rate)):
        total = total + ((d.mean(dim=(1, 2)) - r) ** 2).mean()
    return total / len(decisions)


def logit_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The official ``cls_kl_loss``: KL(teacher || student) of the log-softmaxes, batchmean, no temperature."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)


def feature_distill_loss(featmap: torch.Tensor, teacher_featmap: torch.Tensor) -> torch.Tensor:
    """The official ``token_kl_loss``: the squared error's mean over every position and channel."""
    return ((featmap - teacher_featmap) ** 2).mean()


def train_setup(model: nn.Module, teacher: nn.Module, keep_rate: float, train_params: dict,
                weights: Optional[dict] = None):
    """The training loss (a :data:`~tokenbench.registry.LossFn`): the official
    ``ConvNextDistillDiffPruningLoss`` as ``main.py`` configures it for ConvNeXt and Swin."""
    w = dict(DEFAULT_WEIGHTS)
    for k, v in (weights or {}).items():
        if k not in w:
            raise UserError(f"dynamicvit: unknown loss weight {k!r} (known: {', '.join(w)})")
        w[k] = float(v)
    if train_params.get("keep_prior_init"):
        prior_init(model, keep_rate)
    plan_settings(model)[DECISION_CLIP] = float(train_params.get("decision_grad_clip", 0.0))
    teacher.eval()
    teacher.requires_grad_(False)
    stages = len(keep_ratios(keep_rate))

    def loss_fn(model, x, y):
        logits, featmap, decisions = student_outputs(model, x)
        t_logits, t_featmap = teacher_outputs(teacher, x)
        cls = F.cross_entropy(logits, y, label_smoothing=w["label_smoothing"])
        rl = ratio_loss(decisions, keep_rate) if decisions else logits.new_zeros(())
        kl = logit_distill_loss(logits, t_logits)
        mse = feature_distill_loss(featmap, t_featmap)
        loss = w["clf_weight"] * cls + w["ratio_weight"] * rl + w["distill_weight"] * (kl + mse)
        metrics = {"cls_loss": float(cls.detach()), "ratio_loss": float(rl.detach()), "cls_kl": float(kl.detach()),
                   "token_mse": float(mse.detach())}
        for s, d in enumerate(decisions):  # kept fraction of each predictor, to check against its ratio
            metrics[f"keep_frac_s{s + 1}"] = float(d.detach().mean())
        return loss, logits, metrics

    loss_fn.metric_names = ("cls_loss", "ratio_loss", "cls_kl", "token_mse") + tuple(
        f"keep_frac_s{s + 1}" for s in range(stages))
    return loss_fn


def is_new_param(name: str) -> bool:
    """The official test for the method's own parameters (``'fast' in name or 'predictor' in name``)."""
    return "fast" in name or "predictor" in name


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float = BACKBONE_LR_SCALE):
    """The official grouping: fast paths and predictors at the full rate; the backbone at
    ``backbone_lr_scale`` and frozen for the first :data:`FIX_EPOCHS` epochs; no weight decay
    on 1-d parameters and biases."""
    groups: dict[str, dict] = {}
    for name, prm in model.named_parameters():
        if not prm.requires_grad or "cls_token" in name or "pos_embed" in name:
            continue
        new = is_new_param(name)
        no_decay = prm.ndim == 1 or name.endswith(".bias")
        key = ("new_param" if new else "backbone") + ("_no_decay" if no_decay else "")
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                    "lr_scale": 1.0 if new else backbone_lr_scale,
                                    "fix_epochs": 0 if new else FIX_EPOCHS})
        g["params"].append(prm)
    return list(groups.values())


def gumbel_keep_fractions(decide: Callable[[nn.Module, torch.Tensor], list], model: nn.Module,
                          x: torch.Tensor, seed: int = 0) -> list[float]:
    """The mean of each training-time (Gumbel) decision ``decide(model, x)`` returns, drawn in
    training mode under ``seed``; the model's mode and the global random state are left as they were."""
    was = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            decisions = decide(model, x)
    finally:
        model.train(was)
    return [float(d.mean()) for d in decisions]


@torch.no_grad()
def training_keep_fractions(model: nn.Module, x: torch.Tensor, seed: int = 0) -> list[float]:
    """The kept fraction of each predictor's training-time (Gumbel) decisions on ``x``."""
    return gumbel_keep_fractions(lambda m, t: student_outputs(m, t)[2], model, x, seed)


# --------------------------------------------------------------------------- official checkpoints

_FAST_KEYS = {  # official suffix after the block prefix -> ours after fast_paths.{j}.
    "convnext": (re.compile(r"^stages\.2\.(\d+)\.fast_path(?:\.(0|1)\.(weight|bias)|_gamma)$"),
                 {"0": "norm", "1": "fc"}),
    "swin": (re.compile(r"^layers\.2\.blocks\.(\d+)\.fastmlp\.fc1\.(0|1)\.(weight|bias)$"), {"0": "norm", "1": "fc"}),
}
_PRED_KEY = re.compile(r"^(?:layers\.2\.)?score_predictor\.(\d+)\.(.+)$")


def convert_checkpoint(model: nn.Module, sd: dict) -> dict:
    """An official DynamicCNN / DynamicSwin state dict (or one of ours: unchanged) in our layout."""
    bb = backbone_of(model)
    pattern, parts = _FAST_KEYS.get(bb.name, (None, {}))
    extra, rest = {}, {}
    for k, v in sd.items():
        m = pattern.match(k) if pattern is not None else None
        p = _PRED_KEY.match(k)
        if m:
            j, part, leaf = m.group(1), m.group(2), m.group(3)
            extra[f"{FAST_ATTR}.{j}." + ("gamma" if part is None else f"{parts[part]}.{leaf}")] = v
        elif p:
            extra[f"{PREDICTOR_ATTR}.{p.group(1)}.{p.group(2)}"] = v.flatten(1) if v.ndim == 4 else v
        else:
            rest[k] = v
    return {**_backbone_from_official(bb, rest), **extra}


def _backbone_from_official(bb, sd: dict) -> dict:
    """The backbone's keys in timm's layout (Swin: ``official_to_timm``, which is not idempotent,
    only on an official-layout dict)."""
    if bb.name == "swin":
        from tokenbench.backbones.swin import is_official_layout, official_to_timm

        return official_to_timm(sd) if is_official_layout(sd) else sd
    return bb.from_official(sd)


# --------------------------------------------------------------------------- random (the control)

def apply_random(model: nn.Module, keep_rate: float, seed: int, scores: Callable) -> nn.Module:
    """``random`` on a hierarchical model: the same sites, ratios and fast paths, the slow-path
    positions drawn per image (``scores(s, st, n) -> [B, n]`` distinct integer scores)."""
    def choose(s: int, tokens: torch.Tensor, st: TokenState, k: int) -> torch.Tensor:
        return scores(s, st, tokens.shape[1]).to(tokens.device).topk(k, dim=1, sorted=False).indices

    return install(model, keep_rate, choose, "random")
