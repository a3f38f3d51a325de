"""`diffrate`: DiffRate (Chen et al., ICCV 2023), prune then merge by searched per-block counts.

Paper: M. Chen, W. Shao, P. Xu, M. Lin, K. Zhang, F. Chao, R. Ji, Y. Qiao, P. Luo,
"DiffRate: Differentiable Compression Rate for Efficient Vision Transformers", ICCV 2023.
Official code: https://github.com/OpenGVLab/DiffRate (``DiffRate/patch/deit.py``,
``DiffRate/merge.py``, ``DiffRate/ddp.py``, searched schedules in ``compression_rate.json``).
License of the original: the repository has no license file (no license granted); its
files derived from ToMe keep Meta's header (ToMe is CC BY-NC 4.0).  Nothing is copied here.

Inference (what this adapter does; training-free with a searched schedule, so
``learned = False``): in every block, between the attention residual and the MLP,

1. the patch tokens are ranked by the class token's attention (its softmax row, with the
   proportional-attention bias, averaged over heads), most attended first;
2. **prune**: only the ``prune[i]`` first tokens (class token included) stay;
3. **merge**: of those, the ``merge[i]`` first stay and every other one folds into the
   kept token it is most similar to (cosine similarity of the hidden states ``x`` after
   the attention residual; never into the class token).  A kept token becomes the plain
   (unweighted) mean of itself and the tokens folded into it (``scatter_reduce`` mean),
   and its size grows by the folded tokens' sizes *times their similarity* to it (the
   official "proportional attention considering similarity"; no clamp at inference, so a
   negative similarity can shrink a size, as in the official code).
   Sizes enter the next blocks' attention as ``log(size)`` (proportional attention).

The counts are the official ones (``prune_kept_num`` / ``merge_kept_num`` of
``compression_rate.json``: tokens kept *including the class token*, 197 = all of a
224-px /16 model).  Defaults: the official DeiT-S schedule searched for 2.9 GFLOPs
(:data:`SCHEDULES`, which also holds the other shipped DeiT-S targets; pass one with
``--set prune=[...] merge=[...]``).  As in the official forward, a count above the
tokens present keeps them all, and merging happens only where ``merge[i] < prune[i]``.

Choices and deviations:

- **Other grids**: a count ``k`` means the fraction ``(k - 1) / 196`` of the patch tokens;
  a model with ``n0`` patches keeps ``ceil(n0 * ((k - 1) / 196) ** power)`` (at least one),
  which is exactly ``k - 1`` for 196 patches and ``power = 1``.
- **The budget knob** ``power`` (not in the paper): every kept fraction is raised to this
  power, i.e. each block's own keep ratio is scaled in log space.  ``1`` is the schedule
  as searched, ``0`` the dense model, ``> 1`` more reduction; FLOPs fall monotonically
  with it, so a matched-FLOPs search moves it (the shipped schedules exist only for a few
  DeiT targets; re-running the differentiable search per target is a training job).
- Ranking is skipped in a block that neither prunes nor merges (the official code sorts the
  tokens there too; token order does not change the result beyond float rounding).
- Every prefix token (class, distillation, registers) is protected: kept in front, never
  ranked, never a merge destination.  The official code handles one class token only.
- A schedule list has one entry per block (as the official ``set_kept_num``); a shorter
  one is padded with 197 (no further reduction), a longer one is refused.

The ranking, pruning and matching are pure functions (:func:`rank_tokens`,
:func:`match_to_kept`); the hook changes tokens only through ``TokenState.keep`` and
``TokenState.merge`` (``mode="avg"`` with ``size_weights``).  Counts depend on shapes
alone, so the method compiles as one graph (tests/test_compile.py).  Needs a class token.

Checked against the official code (its ``DiffRate/patch/deit.py`` run on the same random
weights, timm 1.0.31): logits equal to float32 rounding for DeiT-S at 224 px (all five
shipped schedules) and a 64-patch ViT.  fvcore counts 2.916 GFLOPs for DeiT-S at the
default schedule (the official analytic count: 2.905; the difference is the layer norms
and the class-attention and similarity products, which the official formula leaves out).

Training (``tokenbench train MODEL --method diffrate``): by default the ViT is fine-tuned
with cross-entropy under the fixed schedule.  ``--set search=true`` runs DiffRate's
differentiable rate search instead (official ``ddp.py``, the training branch of
``DiffRateBlock.forward``, ``calculate_flop_training``, ``engine.train_one_epoch``): the ViT
is frozen; every block has a prune and a merge distribution over kept patch counts
(``n0 .. 1``; block 0 is never compressed), whose ceiled expectation is the block's count
(straight-through); nothing is removed, ranked tokens beyond a count are masked out of the
attention (the training policy) by a straight-through mask; merged tokens are averaged into
their destination and stay, masked.  Loss: cross-entropy ``+ flops_weight * (FLOPs /
dense - target_ratio) ** 2``.  Checked against the official training forward on the same
weights and rate logits: equal counts, logits, FLOPs and gradients of the rate logits.
Deviations: the FLOPs term is a fraction of the dense blocks' cost (model-independent),
not GFLOPs, so the default weight 100 stands for the official 5 on DeiT-S (5 x 4.6^2);
the learning rate is ``--lr`` (official: AdamW 0.01 -> 0.001 cosine, weight decay 0, 3
epochs).  The searched counts are ``Rates.schedule()`` of the attached ``diffrate_rates``
module (prefix included, on the model's own grid); turning them into ``prune`` / ``merge``
parameters is left to the user.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenbench.backbones import AttnInfo, TokenState, add_module, backbone_of, last_state, plan_of
from tokenbench.backbones.tokens import constant_range, with_prefix
from tokenbench.errors import UserError
from tokenbench.methods._knobs import PROP_ATTN
from tokenbench.methods._policy import softmax_with_policy
from tokenbench.registry import GridRestore, Method, Param, register

REF_TOKENS = 197  # the official counts are for 196 patches + the class token

# The official searched schedules for DeiT-S (compression_rate.json, "ViT-S-DeiT"), by GFLOPs target.
SCHEDULES = {
    "2.3": ([197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3],
            [197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3]),
    "2.5": ([197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3],
            [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]),
    "2.7": ([197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3],
            [197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3]),
    "2.9": ([197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3],
            [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]),
    "3.1": ([197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3],
            [197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3]),
}
DEFAULT_PRUNE, DEFAULT_MERGE = SCHEDULES["2.9"]


# --------------------------------------------------------------------------- algorithm

def kept_patches(count: int, n0: int, power: float = 1.0) -> int:
    """Patch tokens a schedule entry ``count`` (official, class token included) keeps of ``n0``."""
    frac = (count - 1) / (REF_TOKENS - 1)
    if frac >= 1 or power == 0:
        return n0
    return max(1, math.ceil(n0 * frac ** power - 1e-6))


def block_counts(prune, merge, depth: int, n0: int, power: float = 1.0) -> list[tuple[int, int]]:
    """Per block, the patch tokens (kept by pruning, kept by merging), before clipping to what is present."""
    out = []
    for name, v in (("prune", prune), ("merge", merge)):
        if isinstance(v, (list, tuple)) and len(v) > depth:
            raise UserError(f"diffrate: {name} has {len(v)} entries but the model has {depth} blocks "
                            f"(give at most one kept-token count per block)")
    # a shorter list is padded with the full count: no further reduction (as ToMe pads r with 0)
    ps = list(prune) + [REF_TOKENS] * (depth - len(prune)) if isinstance(prune, (list, tuple)) else [prune] * depth
    ms = list(merge) + [REF_TOKENS] * (depth - len(merge)) if isinstance(merge, (list, tuple)) else [merge] * depth
    for p, m in zip(ps, ms):
        kp = kept_patches(p, n0, power)
        # official: merge only where merge_kept_num < prune_kept_num
        km = kept_patches(m, n0, power) if m < p else kp
        out.append((kp, min(kp, km)))
    return out


def rank_tokens(cls_attn: torch.Tensor) -> torch.Tensor:
    """Patch indices [B, n] by decreasing class attention ``cls_attn`` [B, n] (official ``torch.sort``)."""
    return torch.sort(cls_attn, dim=1, descending=True)[1]


def match_to_kept(x: torch.Tensor, n_kept: int, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token of ``x`` [B, N, C] from ``n_kept`` on, the most similar of the first
    ``n_kept`` (cosine similarity; never a prefix token): (its index [B, N - n_kept], the similarity)."""
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True)
        sim = metric[:, n_kept:] @ metric[:, :n_kept].transpose(-1, -2)
        sim[..., :n_prefix].fill_(-math.inf)
        node_max, node_idx = sim.max(dim=-1)
    return node_idx, node_max


# --------------------------------------------------------------------------- hook

def _diffrate_hook(n_prune: int, n_merge: int):
    """Prune to ``n_prune`` patch tokens, then merge down to ``n_merge`` (both clipped to those present)."""

    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        p = st.n_prefix
        n = x.shape[1] - p
        kp = min(n, n_prune)
        km = min(kp, n_merge)
        if kp == n and km == kp:
            return x
        order = rank_tokens(info.cls_attn()[:, p:])[:, :kp]
        x = st.keep(x, with_prefix(order, p))                  # ranked, pruned
        if km == kp:
            return x
        node_idx, node_max = match_to_kept(x, p + km, p)      # no gradient: computed under no_grad
        keep_idx = constant_range(0, p + km, x.device).expand(x.shape[0], -1)
        src_idx = constant_range(p + km, p + kp, x.device).expand(x.shape[0], -1)
        return st.merge(x, keep_idx, src_idx, node_idx, mode="avg", size_weights=node_max)

    return mid


def _counts(model, name, prune, merge, power):
    bb = backbone_of(model, name)
    return bb, block_counts(prune, merge, bb.depth, bb.num_patches, float(power))


# --------------------------------------------------------------------------- the rate search (training only)
#
# DiffRate's differentiable compression-rate search (official ``ddp.py``, the training branch of
# ``DiffRateBlock.forward``, ``calculate_flop_training``, ``engine.train_one_epoch``): the ViT is
# frozen; each block has two distributions over candidate kept-token counts (prune, merge), whose
# expectation (ceiled, straight-through) is the block's count.  Nothing is removed in training:
# tokens are ranked, and pruned / merged ones are masked out of the attention (the training
# policy) by a straight-through mask whose gradient reaches the distributions.

RATES_ATTR = "diffrate_rates"


class _SteCeil(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _SteMin(torch.autograd.Function):
    """min(n, a, b); the gradient goes to both ``a`` and ``b`` (official ``STE_Min``)."""

    @staticmethod
    def forward(ctx, n, a, b):
        return torch.minimum(torch.minimum(n, a), b)

    @staticmethod
    def backward(ctx, g):
        return None, g, g


class RateProxy(nn.Module):
    """One block's distribution over kept patch counts (official ``DiffRate`` module)."""

    def __init__(self, n0: int, n_prefix: int, fixed: bool = False):
        super().__init__()
        cands = torch.tensor([float(n0)]) if fixed else torch.arange(n0, 0, -1).float()
        self.register_buffer("candidates", cands)
        self.logits = nn.Parameter(torch.zeros_like(cands))
        self.n_prefix = n_prefix

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept tokens, prefix included: ceil of the expected count, straight-through; the distribution)."""
        prob = self.logits.softmax(-1)
        return _SteCeil.apply(self.candidates @ prob) + self.n_prefix, prob

    def token_mask(self, prob: torch.Tensor, kept: int, upto: int) -> torch.Tensor:
        """[N] mask: 0 on positions ``kept .. upto``, 1 elsewhere; its gradient is that of the
        probability that each position is kept (official ``get_token_mask``)."""
        n = int(self.candidates[0]) + self.n_prefix
        pos = torch.arange(n, device=prob.device)[:, None]
        p_kept = (pos < self.candidates[None, :] + self.n_prefix).to(prob.dtype) @ prob
        hard = torch.ones_like(p_kept)
        hard[kept:upto] = 0
        return hard - p_kept.detach() + p_kept


class Rates(nn.Module):
    """The per-block prune and merge proxies; block 0 is never compressed (official)."""

    def __init__(self, depth: int, n0: int, n_prefix: int):
        super().__init__()
        self.prune = nn.ModuleList([RateProxy(n0, n_prefix, fixed=i == 0) for i in range(depth)])
        self.merge = nn.ModuleList([RateProxy(n0, n_prefix, fixed=i == 0) for i in range(depth)])

    def schedule(self) -> tuple[list[int], list[int]]:
        """The current counts (tokens kept, prefix included, on this model's grid)."""
        with torch.no_grad():
            return ([int(p.kept()[0]) for p in self.prune], [int(m.kept()[0]) for m in self.merge])


def _search_on_start(model, x, st: TokenState) -> None:
    st.extra["diffrate_rates"] = model._modules[RATES_ATTR]
    st.extra["diffrate_kept"] = []
    if model.training:  # the official trains with a policy (all ones at first) in every block
        st.policy = x.new_ones(x.shape[0], x.shape[1], 1)


def _search_hook(i: int):
    def mid(block, x: torch.Tensor, st: TokenState, info: AttnInfo) -> torch.Tensor:
        rates: Rates = st.extra["diffrate_rates"]
        p = st.n_prefix
        if not block.training:  # evaluation during the search: the current counts, hard
            kp, km = int(rates.prune[i].kept()[0]) - p, int(rates.merge[i].kept()[0]) - p
            return _diffrate_hook(kp, km if km < kp else kp)(block, x, st, info)
        order = rank_tokens(info.cls_attn()[:, p:])
        x = st.keep(x, with_prefix(order, p))                  # every token, ranked
        mask = st.policy[..., 0]
        last = int(mask[0].sum())
        kp, prob = rates.prune[i].kept()
        st.extra["diffrate_kept"].append((kp, None))
        if kp < last:
            mask = mask * rates.prune[i].token_mask(prob, int(kp), last)
        mid_n = min(last, int(kp))
        km, prob = rates.merge[i].kept()
        st.extra["diffrate_kept"][-1] = (kp, km)
        if km < mid_n:
            k = int(km)
            node_idx, node_max = match_to_kept(x[:, :mid_n].detach(), k, p)
            c = x.shape[-1]
            dst = x[:, :k].scatter_reduce(1, node_idx[..., None].expand(-1, -1, c), x[:, k:mid_n], reduce="mean")
            x = torch.cat([dst, x[:, k:]], dim=1)              # merged tokens stay, masked out
            size = st.ensure_size(x)
            head = torch.cat([size[:, :k], size[:, k:mid_n] * node_max[..., None]], dim=1).clamp(1)
            head = torch.cat([head[:, :k].scatter_reduce(1, node_idx[..., None], head[:, k:], reduce="sum"),
                              head[:, k:]], dim=1)
            st.size = torch.cat([head, size[:, mid_n:]], dim=1)
            mask = mask * rates.merge[i].token_mask(prob, k, mid_n)
        st.policy = mask[..., None]
        return x

    return mid


def search_flops(model, kept: list) -> torch.Tensor:
    """The official training FLOPs count (``calculate_flop_training``), differentiable in the counts."""
    bb = backbone_of(model, "diffrate")
    c, n = bb.width, bb.num_patches + bb.n_prefix
    hidden = bb.block_cost([0], [1]) / (2 * c)  # the MLP's hidden width, from the cost model
    ref = kept[0][0]
    big_n = ref.new_tensor(float(n))
    flops = ref.new_zeros(())
    for kp, km in kept:
        flops = flops + 4 * big_n * c * c + 2 * big_n * big_n * c
        big_n = _SteMin.apply(big_n, kp.float(), km.float())
        flops = flops + 2 * big_n * c * hidden
    return flops


def search_setup(model, params: dict):
    """Turn ``model`` (diffrate applied) into DiffRate's search: rate modules attached, the ViT
    frozen, every block hooked.  Returns the training loss, a :data:`~tokenbench.registry.LossFn`."""
    bb = backbone_of(model, "diffrate")
    model.requires_grad_(False)
    ref = next(model.parameters())
    rates = Rates(bb.depth, bb.num_patches, bb.n_prefix).to(ref.device)
    add_module(model, RATES_ATTR, rates)
    plan = plan_of(model)
    plan.on_start.append(_search_on_start)
    plan.policy_softmax = softmax_with_policy
    for i in range(bb.depth):
        plan.mid[i] = _search_hook(i)
        plan.needs[i] = ("cls_attn",)
    dense = float(bb.block_cost([bb.num_patches + bb.n_prefix] * bb.depth, [bb.num_patches + bb.n_prefix] * bb.depth))
    target, weight = float(params["target_ratio"]), float(params["flops_weight"])

    def loss_fn(model, x, y):
        logits = model(x)
        kept = last_state(model).extra["diffrate_kept"]
        ratio = search_flops(model, kept) / dense
        ce = F.cross_entropy(logits, y)
        loss = ce + weight * (ratio - target) ** 2
        return loss, logits, {"cls_loss": float(ce.detach()), "flops_ratio": float(ratio.detach())}

    loss_fn.metric_names = ("cls_loss", "flops_ratio")
    return loss_fn


@register
class DiffRate(Method):
    name = "diffrate"
    family = "hybrid"
    version = "1"
    summary = ("DiffRate: per block, prune by class attention, then merge the least attended kept "
               "tokens into their most similar ones, by searched counts (DeiT-S 2.9 GFLOPs).")
    params = (
        Param("prune", "int_or_list", DEFAULT_PRUNE,
              "tokens kept by pruning in each block, class token included, on the official 197-token "
              "scale (one per block, padded with 197; default: the official DeiT-S 2.9 GFLOPs search)",
              min=2, max=REF_TOKENS),
        Param("merge", "int_or_list", DEFAULT_MERGE,
              "tokens kept by merging in each block, class token included, on the official 197-token "
              "scale (one per block, padded with 197; default: the official DeiT-S 2.9 GFLOPs search)",
              min=2, max=REF_TOKENS),
        Param("power", "float", 1.0,
              "kept fractions raised to this power: 1 = the schedule as given, 0 = dense, >1 = fewer "
              "tokens (the matched-FLOPs knob)", min=0.0, max=4.0),
        PROP_ATTN,
    )
    train_params = (
        Param("search", "bool", False, "training: DiffRate's rate search (the ViT frozen, per-block kept "
                                       "counts learned to target_ratio) instead of fine-tuning the ViT"),
        Param("target_ratio", "float", 0.63, "training, search: FLOPs target as a fraction of the dense "
                                             "blocks' (DeiT-S 2.9 of 4.6 GFLOPs: 0.63)", min=0.0, max=1.0,
              min_exclusive=True),
        Param("flops_weight", "float", 100.0, "training, search: weight of (FLOPs ratio - target)^2 "
                                              "(official 5 on GFLOPs ~ 100 on DeiT-S's ratio)", min=0.0),
    )
    knob = "power"
    restores_grid = GridRestore.FILL_UNMERGE
    needs_class_token = True

    def apply(self, model, prune=DEFAULT_PRUNE, merge=DEFAULT_MERGE, power=1.0, prop_attn=True, **params):
        bb, counts = _counts(model, self.name, prune, merge, power)
        plan = bb.prepare(self.name)
        plan.prop_attn = bool(prop_attn)
        n = bb.num_patches
        for i, (kp, km) in enumerate(counts):
            if min(n, kp, km) < n:  # a block that cannot reduce gets no hook
                plan.mid[i] = _diffrate_hook(kp, km)
                plan.needs[i] = ("cls_attn",)
            n = min(n, km)
        return model

    @classmethod
    def reduces(cls, params):
        if params.get("power", 1.0) == 0:
            return False
        vals = [v for k in ("prune", "merge")
                for v in (params[k] if isinstance(params[k], list) else [params[k]])]
        return min(vals) < REF_TOKENS

    def expected_tokens(self, model, prune=DEFAULT_PRUNE, merge=DEFAULT_MERGE, power=1.0, prop_attn=True,
                        **params):
        bb, counts = _counts(model, self.name, prune, merge, power)
        p, n = bb.n_prefix, bb.num_patches
        tokens, tokens_mlp = [], []
        for kp, km in counts:
            tokens.append(n + p)
            n = min(n, kp, km)
            tokens_mlp.append(n + p)
        return tokens, tokens_mlp

    def train_setup(self, model, teacher, params: Optional[dict] = None, weights: Optional[dict] = None):
        p = {"search": False, "target_ratio": 0.63, "flops_weight": 100.0, **(params or {})}
        return search_setup(model, p) if p["search"] else None

    def param_groups(self, model, weight_decay: float, **kw):
        """In a search: only the rate distributions, at the full rate, no weight decay (official
        AdamW on ``arch_parameters``, weight decay 0); otherwise the default groups."""
        if RATES_ATTR not in model._modules:
            return None
        return [{"params": list(model._modules[RATES_ATTR].parameters()), "weight_decay": 0.0,
                 "lr_scale": 1.0, "fix_epochs": 0.0}]
