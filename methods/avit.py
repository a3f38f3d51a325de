"""`avit`: A-ViT (Yin et al., CVPR 2022), learned per-token halting (adaptive computation time).

Paper: "A-ViT: Adaptive Tokens for Efficient Vision Transformer" (arXiv 2112.07658).
Official code: https://github.com/NVlabs/A-ViT (``timm/models/act_vision_transformer.py``:
``Block_ACT.forward_act``, ``VisionTransformer.forward_features_act_token``; ``engine_act.py``
and ``utils.get_distribution_target`` for the losses), NVIDIA Source Code License-NC (file
headers; the repository's LICENSE file is Apache-2.0).  Our code is our own.

After every block, each token's halting score is read from the **first embedding channel**
of the block's output: ``h = sigmoid(x[..., 0] * gate_scale - gate_center)`` (the official
``act_mode = 4``; ``h = 1`` at the last block).  A token accumulates ``c += h``; while
``c < 1 - eps`` (``eps = 0.01``) it goes on, its remainder ``R`` dropping by ``h``; when it
halts its output is in: the token's final representation is the ponder-weighted sum of its
block outputs (``h`` at every block it went on, ``R`` at the block it halted), and the model's
final norm and head read those sums (class token: the class token's sum).  Every token halts,
the class token too; a halted token is no longer attended to.

Inference (``model.eval()``) drops the halted tokens: per-image token counts, the batch padded
to its longest sequence with a padding mask (as ``ats``), so an image's logits do not depend on
its batch; after the last block the sequence is the weighted sums of all tokens in their
original order.  Training (``model.train()``) runs the official masked form: no token is
removed, a halted token's input is zeroed (``out.data *= mask``: the value only, the gradient
passes) and its key gets ``-1000`` on the attention logits (``masked_softmax_bias``).

Training (``tokenbench train MODEL --method avit``), the losses of ``engine_act.py``:
cross-entropy + ``ponder_token_scale * mean(rho)`` (``rho``: per token, the blocks it ran plus
its remainder at halting) + ``distr_prior_alpha * KL`` of the halting scores' distribution
over blocks (the mean ``h`` of each block, normalised, clamped to [0.01, 0.99]) against a
Gaussian prior at ``target_depth`` (``get_distribution_target``: pdf at 0..depth-1, std 1,
scaled so that its first ``target_depth`` values sum to 0.98), ``KLDivLoss(batchmean)`` over the
depth, added only when positive.  The whole model trains (no new module).

Deviations:

- in the training form a halted token's *own* row sees LayerNorm's bias (the official zeroes
  the normalised input too); the rows of tokens still running are identical, so only the
  halting scores of already halted tokens differ, which enter the prior's per-block mean (as
  the official, that mean is over every token of the batch, halted ones included, and skips
  the first image of the batch, ``h[1:]``; with one image it takes that image);
- inference removes halted tokens instead of masking them (``exp(-1000)`` is 0 in float32:
  the same logits);
- the official DeiT recipe (mixup, cutmix, 100 epochs) is not reproduced: our training loop's
  augmentation, label smoothing 0.1;
- on the embedded model (``train_defaults``): one epoch, ``gate_center`` 21 and
  ``ponder_token_scale`` 0.05 (the official: 100 epochs, 30 or 75, and 5e-4).  At 21 the
  untrained model already halts to about 73% of the dense FLOPs; the official weight, meant for
  100 epochs, barely moves the halting in one (at centre 30 and 5e-4 the tokens halted less
  than untrained), so the ponder weight is 100 times the official to hold the halting while the
  model recovers its accuracy (docs/training.md, "A-ViT on the embedded model").

The budget is learned (no inference knob): ``gate_scale`` and ``gate_center`` belong to the
trained model (official DeiT-S: 10 and 75; DeiT-T: 10 and 30).  Token counts vary per image
and per block: FLOPs are the mean over images (``--data``); under ``torch.compile`` every
block's count is data-dependent (a graph break per block).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from tokenbench.backbones import TokenState, applied_method, backbone_of, last_state
from tokenbench.errors import UserError
from tokenbench.registry import GridRestore, Method, Param, register

EPS = 0.01                  # the official self.eps
MASKED_KEY_BIAS = -1000.0   # the official masked_softmax_bias
_KEY = "avit"


# --------------------------------------------------------------------------- algorithm

def halting_score(x: torch.Tensor, gate_scale: float, gate_center: float) -> torch.Tensor:
    """``h`` [B, N] from the first embedding channel of a block's output ``x`` [B, N, C]."""
    return torch.sigmoid(x[..., 0] * gate_scale - gate_center)


def act_step(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, r: torch.Tensor, active: torch.Tensor):
    """One block of token halting (the official update), on tokens [B, N] that are ``active``.

    Returns (weighted output ``delta`` [B, N, C] to add to each token's sum, new ``c``, new ``R``,
    ``reached`` [B, N] (halting here, weighted by ``R``), ``going_on`` [B, N] (still running)).
    """
    c = c + h
    reached = (c > 1 - EPS) & active
    going_on = (c < 1 - EPS) & active      # (the official: halted tokens' c is past 1 - eps already)
    w = torch.where(reached, r, torch.zeros_like(r)) + torch.where(going_on, h, torch.zeros_like(h))
    delta = torch.where((reached | going_on)[..., None], x * w[..., None], torch.zeros_like(x))
    r = r - going_on.to(h.dtype) * h
    return delta, c, r, reached, going_on


def distribution_target(depth: int, target_depth: int = 8, buffer: float = 0.02) -> torch.Tensor:
    """The official Gaussian prior over blocks: N(target_depth, 1) at 0..depth-1, scaled so that
    the first ``target_depth`` values sum to ``1 - buffer``."""
    x = torch.arange(depth, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x - target_depth) ** 2) / math.sqrt(2 * math.pi)
    return (pdf * (1 - buffer) / pdf[:target_depth].sum()).float()


def distribution_prior_loss(layer_means: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """KL(target || normalised per-block halting means), ``KLDivLoss(reduction="batchmean")`` over blocks."""
    d = torch.stack(layer_means)
    d = (d / d.sum()).clamp(0.01, 0.99)
    return F.kl_div(d.log(), target.to(d), reduction="batchmean")


# --------------------------------------------------------------------------- hooks

def _on_start(model, x: torch.Tensor, st: TokenState) -> None:
    b, n, _ = x.shape
    ones = x.new_ones(b, n)
    st.extra[_KEY] = {"c": x.new_zeros(b, n), "R": ones, "acc": None, "ids": None,
                      "rho": x.new_zeros(b, n), "active": torch.ones(b, n, dtype=torch.bool, device=x.device),
                      "layer_means": [], "n": n, "pos": st.pos, "source": st.source}


def _make_post(i: int, depth: int, gate_scale: float, gate_center: float):
    last = i == depth - 1

    def post(block, x: torch.Tensor, st: TokenState) -> torch.Tensor:
        s = st.extra[_KEY]
        h = halting_score(x, gate_scale, gate_center)
        if block.training:
            return _train_step(x, h, st, s, last)
        return _eval_step(x, h, st, s, last)

    return post


def _train_step(x, h, st: TokenState, s: dict, last: bool) -> torch.Tensor:
    """The official masked form: every token stays; halted ones are zeroed and masked as keys."""
    s["layer_means"].append(h[1:].mean() if h.shape[0] > 1 else h.mean())
    if last:
        h = torch.ones_like(h)
    active = s["active"]
    s["rho"] = s["rho"] + active.to(h.dtype)
    delta, s["c"], r_new, reached, going_on = act_step(x, h, s["c"], s["R"], active)
    s["rho"] = s["rho"] + s["R"] * reached.to(h.dtype)    # the remainder before this block's update
    s["R"] = r_new
    s["acc"] = delta if s["acc"] is None else s["acc"] + delta
    s["active"] = going_on
    if last:
        st.key_bias = None
        return s["acc"]
    st.key_bias = (~going_on).to(x.dtype) * MASKED_KEY_BIAS
    # the next block's input: halted tokens zeroed in value (the official ``out.data *= mask``)
    return x - (x * (~going_on)[..., None].to(x.dtype)).detach()


def _eval_step(x, h, st: TokenState, s: dict, last: bool) -> torch.Tensor:
    """Inference: the halted tokens leave the sequence (per-image counts, padded batches)."""
    b, n, c = x.shape
    real = st.pad if st.pad is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
    if s["ids"] is None:
        s["ids"] = torch.arange(n, device=x.device).expand(b, n)
        s["acc"] = x.new_zeros(b, s["n"], c)
    if last:
        h = torch.ones_like(h)
    delta, cc, rr, _, going_on = act_step(x, h, s["c"], s["R"], real)
    s["acc"] = s["acc"].scatter_add(1, s["ids"][..., None].expand(-1, -1, c), delta)
    if last:  # every token's weighted sum, in the original order, for the final norm and head
        st.pad, st.size = None, None
        st.pos, st.source = s["pos"], s["source"]
        return s["acc"]
    k = int(going_on.sum(1).max()) if going_on.shape[0] else going_on.shape[1]  # an empty batch: all
    idx = torch.argsort((~going_on).to(torch.int8), dim=1, stable=True)[:, :k]
    s["c"], s["R"], s["ids"] = cc.gather(1, idx), rr.gather(1, idx), s["ids"].gather(1, idx)
    return st.keep(x, idx, pad=going_on.gather(1, idx))


# --------------------------------------------------------------------------- training

def train_setup(model, params: dict, weights: Optional[dict] = None):
    """The training loss (a :data:`~tokenbench.registry.LossFn`): the losses of the official ``engine_act.py``."""
    w = {"ponder_token_scale": params["ponder_token_scale"], "distr_prior_alpha": params["distr_prior_alpha"],
         "label_smoothing": 0.1}
    for k, v in (weights or {}).items():
        if k not in w:
            raise UserError(f"avit: unknown loss weight {k!r} (known: {', '.join(w)})")
        w[k] = float(v)
    depth = backbone_of(model).depth
    target = distribution_target(depth, int(params["target_depth"]))

    def loss_fn(model, x, y):
        logits = model(x)
        s = last_state(model).extra[_KEY]
        cls = F.cross_entropy(logits, y, label_smoothing=w["label_smoothing"])
        ponder = s["rho"].mean() * w["ponder_token_scale"]
        loss = cls + ponder
        prior = logits.new_zeros(())
        if w["distr_prior_alpha"] > 0:
            prior = w["distr_prior_alpha"] * distribution_prior_loss(s["layer_means"], target)
            if prior.item() > 0:
                loss = loss + prior
        metrics = {"cls_loss": float(cls.detach()), "ponder_loss": float(ponder.detach()),
                   "distr_prior_loss": float(prior.detach()),
                   "depth_frac": float(s["rho"].detach().mean()) / depth}
        return loss, logits, metrics

    loss_fn.metric_names = ("cls_loss", "ponder_loss", "distr_prior_loss", "depth_frac")
    return loss_fn


# --------------------------------------------------------------------------- the method

@register
class AViT(Method):
    name = "avit"
    version = "1"
    summary = ("A-ViT: learned per-token halting from the first embedding channel after every block "
               "(ponder-weighted outputs; per-image counts).")
    family = "pruning"
    restores_grid = GridRestore.FILL
    learned = True
    params = (
        Param("gate_scale", "float", 10.0, "halting gate: h = sigmoid(x[..., 0] * gate_scale - gate_center) "
                                           "(official DeiT-S and DeiT-T: 10)", min=0.0, min_exclusive=True),
        Param("gate_center", "float", 75.0, "halting gate centre (official DeiT-S: 75, DeiT-T: 30); belongs "
                                            "to the trained model"),
    )
    train_params = (
        Param("ponder_token_scale", "float", 5e-4, "training: weight of the ponder loss (official README: 5e-4)",
              min=0.0),
        Param("distr_prior_alpha", "float", 1e-3, "training: weight of the distributional prior (official "
                                                  "README: 1e-3; 0: off)", min=0.0),
        Param("target_depth", "int", 8, "training: block index where the prior's Gaussian peaks (official: 8 of "
                                        "12)", min=1),
    )
    # The embedded model's residual stream is of DeiT-T's scale (first channel: std about 2):
    # centre 21 halts tokens to about 73% of the dense FLOPs before training; a ponder weight 100
    # times the official holds them near 72% through one epoch (docs/training.md).
    train_defaults = {
        "default": {
            "set": {"gate_center": 21.0, "ponder_token_scale": 0.05},
            "recipe": {"lr": 5e-4, "epochs": 1.0},
            "why": "one epoch: a lower gate centre and a stronger ponder loss than the official 100-epoch recipe",
        },
    }
    needs_class_token = True
    compile_note = ("per-image token counts: every block's count depends on the halting scores "
                    "(data-dependent shape), a graph break per block")

    def apply(self, model, gate_scale: float = 10.0, gate_center: float = 75.0, **params):
        bb = backbone_of(model, self.name)
        plan = bb.prepare(self.name)
        plan.on_start.append(_on_start)
        for i in range(bb.depth):
            plan.post[i] = _make_post(i, bb.depth, float(gate_scale), float(gate_center))
        return model

    @classmethod
    def reduces(cls, params) -> bool:
        return False  # untrained, no token halts before the last block; training makes them halt

    def expected_tokens(self, model, **params):
        return None  # the count varies per image

    def train_setup(self, model, teacher, params: Optional[dict] = None, weights: Optional[dict] = None):
        applied = applied_method(model).get("params", {})
        p, tp = self.validate_training({**applied, **(params or {})})
        return train_setup(model, tp, weights)

    def param_groups(self, model, weight_decay: float, **kw):
        """The whole model trains at the full rate (the official fine-tunes every weight)."""
        from tokenbench.train import param_groups

        groups = param_groups(model, weight_decay)
        for g in groups:
            g["lr_scale"], g["fix_epochs"] = 1.0, 0.0
        return groups
