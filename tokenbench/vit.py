"""Shared ViT surgery: the one place that knows how timm's VisionTransformer runs.

A method adapter never rewrites timm code.  It calls :func:`prepare` and installs
*hooks* on the returned :class:`Plan`:

- ``plan.pre[i] = fn(block, x, state) -> x``: before block ``i`` (DynamicViT's sites);
- ``plan.mid[i] = fn(block, x, state, info) -> x``: inside block ``i``, after the attention
  residual and before the MLP (ToMe, EViT, top-k, random).  ``info`` gives the block's
  class-token attention (``info.cls_attn()``, averaged over heads, over all tokens) and its
  keys averaged over heads (``info.keys``, ToMe's metric), when the method declared that
  it needs them in ``plan.needs[i]``.

Hooks change the sequence with :meth:`TokenState.keep` (pruning),
:meth:`TokenState.merge_into` (merging) or :meth:`TokenState.fuse` (EViT's fused token);
these keep the carried token sizes, the source map (which original patches each
token stands for, for visualisation) and any training-time policy aligned with ``x``.

Blocks and the model change class in place (their parameters and state-dict keys are
untouched), so weights load before or after a method is applied, and :func:`restore`
turns the model back into plain timm.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError


# --------------------------------------------------------------------------- state

class TokenState:
    """Bookkeeping for one forward pass, shared by all blocks of one model."""

    def __init__(self, n_prefix: int, prop_attn: bool = False, track_source: bool = False,
                 record: bool = True):
        self.n_prefix = n_prefix
        self.prop_attn = prop_attn
        self.track_source = track_source
        self.record = record
        self.size: Optional[torch.Tensor] = None      # [B, N, 1]: original patches per token
        self.source: Optional[torch.Tensor] = None    # [B, N, N0]: 1 where token n covers original token j
        self.policy: Optional[torch.Tensor] = None    # [B, N, 1]: soft keep mask (training: masked attention)
        self.tokens: list[int] = []                   # length entering each block
        self.tokens_mlp: list[int] = []               # length entering each block's MLP
        self.stages: list[dict] = []                  # snapshots after each reduction (when tracking)
        self.block = -1
        self.extra: dict[str, Any] = {}               # method-specific carry (e.g. DynamicViT's decisions)
        self.image_ids: Optional[torch.Tensor] = None  # [B] int64: each image's index in the evaluated set

    # ----------------------------------------------------------- shape changes
    def start(self, x: torch.Tensor) -> None:
        if self.track_source:
            b, n, _ = x.shape
            self.source = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)

    def ensure_size(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            self.size = torch.ones_like(x[..., :1])
        return self.size

    def _gather(self, t: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

    def keep(self, x: torch.Tensor, idx: torch.Tensor, kind: str = "prune") -> torch.Tensor:
        """Keep the tokens ``idx`` [B, K] (indices into all of x, prefix included), in that order."""
        x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        self.size = self._gather(self.size, idx)
        self.source = self._gather(self.source, idx)
        self.policy = self._gather(self.policy, idx)
        self.snapshot(kind)
        return x

    def fuse(self, x: torch.Tensor, kept_idx: torch.Tensor, dropped_idx: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
        """Keep ``kept_idx`` and append one token: the ``weights``-weighted sum of ``dropped_idx`` (EViT)."""
        c = x.shape[-1]
        kept = x.gather(1, kept_idx[..., None].expand(-1, -1, c))
        dropped = x.gather(1, dropped_idx[..., None].expand(-1, -1, c))
        fused = (dropped * weights[..., None]).sum(dim=1, keepdim=True)
        if self.size is not None:
            s_drop = self._gather(self.size, dropped_idx)
            self.size = torch.cat([self._gather(self.size, kept_idx), s_drop.sum(1, keepdim=True)], 1)
        if self.source is not None:
            src_drop = self._gather(self.source, dropped_idx)
            self.source = torch.cat([self._gather(self.source, kept_idx), src_drop.sum(1, keepdim=True).clamp(max=1)], 1)
        if self.policy is not None:
            self.policy = torch.cat([self._gather(self.policy, kept_idx),
                                     self._gather(self.policy, dropped_idx).amax(1, keepdim=True)], 1)
        self.extra["fused_token"] = True
        out = torch.cat([kept, fused], dim=1)
        self.snapshot("fuse")
        return out

    def snapshot(self, kind: str) -> None:
        if self.track_source and self.source is not None:
            self.stages.append({"block": self.block, "kind": kind, "source": self.source.detach().clone(),
                                "fused_last": kind == "fuse"})


class AttnInfo:
    """What a mid-block hook may read about the block's attention."""

    def __init__(self, q: Optional[torch.Tensor], k: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 scale: float, n_prefix: int, attn: Optional[torch.Tensor] = None):
        self._q, self._k, self._bias, self._scale = q, k, bias, scale
        self._attn = attn
        self.n_prefix = n_prefix
        self._keys: Optional[torch.Tensor] = None

    @property
    def keys(self) -> Optional[torch.Tensor]:
        """Keys averaged over heads, [B, N, head_dim] (ToMe's metric); computed on first use."""
        if self._keys is None and self._k is not None:
            self._keys = self._k.mean(1)
        return self._keys

    def cls_attn(self) -> torch.Tensor:
        """Attention of the class token to every token, averaged over heads: [B, N].

        Computed from the class token's query row alone (one row of the softmax), which
        equals the first row of the full attention matrix.
        """
        if self._attn is not None:
            return self._attn[:, :, 0].mean(1)
        q0 = self._q[:, :, :1] * self._scale
        logits = q0 @ self._k.transpose(-2, -1)  # [B, H, 1, N]
        if self._bias is not None:
            logits = logits + self._bias
        return logits.softmax(dim=-1)[:, :, 0].mean(1)


# --------------------------------------------------------------------------- attention

def softmax_with_policy(attn: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax: dropped tokens are not attended to, except by themselves."""
    b, n, _ = policy.shape
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(torch.float32).exp_() * attn_policy.to(torch.float32)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def attention(mod: nn.Module, x: torch.Tensor, state: TokenState, need_keys: bool, need_attn: bool):
    """timm ``Attention`` forward with size bias, policy masking and what hooks need.

    Returns (output [B, N, C], AttnInfo).  Uses fused scaled-dot-product attention (size
    bias as an additive mask) as timm does, unless timm's switch ``mod.fused_attn`` is off
    (explicit softmax attention, as timm's own forward) or the full attention matrix is
    required (training with a policy).  :func:`tokenbench.measure.attention_kernel` reports
    which of the two ran.
    """
    b, n, c = x.shape
    h, hd = mod.num_heads, mod.head_dim
    gate = mod.gate(x).sigmoid() if getattr(mod, "gate", None) is not None else None
    qkv = mod.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = mod.q_norm(q), mod.k_norm(k)
    bias = None
    if state.prop_attn and state.size is not None:
        bias = state.size.log()[:, None, None, :, 0].to(q.dtype)  # [B, 1, 1, N]
    attn_full = None
    if state.policy is not None or not getattr(mod, "fused_attn", True):
        logits = (q * mod.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        attn_full = logits.softmax(dim=-1) if state.policy is None else softmax_with_policy(logits, state.policy)
        attn_full = mod.attn_drop(attn_full)
        out = attn_full @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=mod.attn_drop.p if mod.training else 0.0)
    out = out.transpose(1, 2).reshape(b, n, h * hd)
    out = mod.norm(out)
    if gate is not None:
        out = out * gate
    out = mod.proj_drop(mod.proj(out))
    info = AttnInfo(q if need_attn else None, k if (need_attn or need_keys) else None, bias, mod.scale,
                    state.n_prefix, attn=attn_full if need_attn else None)
    return out, info


# --------------------------------------------------------------------------- block and model

def _block_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    st: TokenState = self._tb_owner._tb_state
    i = self._tb_index
    st.block = i
    pre = self._tb_plan.pre.get(i)
    if pre is not None:
        x = pre(self, x, st)
    if st.record:
        st.tokens.append(x.shape[1])
    needs = self._tb_plan.needs.get(i, ())
    attn_out, info = attention(self.attn, self.norm1(x), st, "keys" in needs, "cls_attn" in needs)
    x = x + self.drop_path1(self.ls1(attn_out))
    mid = self._tb_plan.mid.get(i)
    if mid is not None:
        x = mid(self, x, st, info)
    if st.record:
        st.tokens_mlp.append(x.shape[1])
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x


_BLOCK_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _reducing_block_class(base: type) -> type:
    if base not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[base] = type(f"Reducing{base.__name__}", (base,), {"forward": _block_forward,
                                                                           "_tb_base": base})
    return _BLOCK_CLASSES[base]


def _model_forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    st = TokenState(self.num_prefix_tokens, prop_attn=self._tb_plan.prop_attn,
                    track_source=self._tb_track_source, record=True)
    st.image_ids = _batch_image_ids(self, x)
    self._tb_state = st
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    st.start(x)
    for fn in self._tb_plan.on_start:
        fn(self, x, st)
    for blk in self.blocks:
        x = blk(x)
    x = self.norm(x)
    return x


def _model_pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
    """timm's pooling; average pooling weights each token by the patches it stands for."""
    pool_type = self.global_pool if pool_type is None else pool_type
    st: Optional[TokenState] = getattr(self, "_tb_state", None)
    if pool_type in ("avg", "avgmax") and getattr(self, "attn_pool", None) is None and st is not None \
            and st.size is not None:
        npf = 0 if self.pool_include_prefix else self.num_prefix_tokens
        xs, size = x[:, npf:], st.size[:, npf:].to(x.dtype)
        avg = (xs * size).sum(1) / size.sum(1)
        if pool_type == "avg":
            return avg
        return 0.5 * (xs.amax(dim=1) + avg)
    return self._tb_base.pool(self, x, pool_type)


def _reducing_model_class(base: type) -> type:
    if base not in _MODEL_CLASSES:
        _MODEL_CLASSES[base] = type(f"Reducing{base.__name__}", (base,),
                                    {"forward_features": _model_forward_features, "pool": _model_pool,
                                     "_tb_base": base})
    return _MODEL_CLASSES[base]


def _batch_image_ids(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    ids = model.__dict__.get("_tb_image_ids")
    if ids is None:
        return torch.arange(x.shape[0], device=x.device)
    if ids.shape != (x.shape[0],):
        raise ValueError(f"image_ids has shape {tuple(ids.shape)} for a batch of {x.shape[0]} images")
    return ids.to(x.device)


@contextlib.contextmanager
def image_ids(model: nn.Module, ids: Optional[torch.Tensor]) -> Iterator[nn.Module]:
    """Tell the forwards inside the block which images they see: ``ids`` [B] (int64), the
    index of each image of the batch in the evaluated set.

    A method whose choices are random (``random``) draws each image's choice from its
    seed and this id (``TokenState.image_ids``), so a prediction does not depend on the
    batch it came in.  Outside the block, or with ``ids=None``, the ids are
    ``arange(B)`` (throughput, FLOPs, training, a direct call).

    :func:`tokenbench.measure.evaluate` sets the running offset plus the position in the
    batch.  A sharded evaluation (torchrun) must pass the *global* index of each image in
    the whole evaluated set, not its index within the shard, so that every process count
    gives the same per-image predictions.  A plain timm model ignores them.
    """
    had = "_tb_image_ids" in model.__dict__
    old = model.__dict__.get("_tb_image_ids")
    model.__dict__["_tb_image_ids"] = None if ids is None else torch.as_tensor(ids, dtype=torch.int64)
    try:
        yield model
    finally:
        if had:
            model.__dict__["_tb_image_ids"] = old
        else:
            model.__dict__.pop("_tb_image_ids", None)


class Plan:
    """Where a method acts: hooks per block index, and model-wide settings."""

    def __init__(self, depth: int):
        self.depth = depth
        self.pre: dict[int, Callable] = {}
        self.mid: dict[int, Callable] = {}
        self.needs: dict[int, tuple[str, ...]] = {}
        self.on_start: list[Callable] = []
        self.prop_attn = False


def check_vit(model: nn.Module, method: str = "this method", need_class_token: bool = False) -> None:
    """Refuse, with a clear error, models the surgery cannot handle."""
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        who = "tokenbench measures" if method == "none" else f"{method} applies to"
        raise UserError(f"{who} timm VisionTransformer models (DeiT, ViT, the embedded default); "
                        f"{model.__class__.__name__} is not one")
    for i, blk in enumerate(model.blocks):
        if not hasattr(blk, "norm1") or not hasattr(blk, "mlp") or not isinstance(getattr(blk, "attn", None), Attention):
            raise UserError(f"{method}: block {i} ({blk.__class__.__name__}) is not a standard pre-norm ViT block")
    if getattr(model, "attn_pool", None) is not None and method != "none":
        raise UserError(f"{method}: models with attention pooling heads are not supported")
    if need_class_token and getattr(model, "cls_token", None) is None:
        raise UserError(f"{method} needs a class token; this model has none (class_token=False)")


def depth_sites(depth: int) -> list[int]:
    """The three reduction sites: blocks 3, 6, 9 of 12 (the quarter points of other depths)."""
    sites = sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3)})
    return [s for s in sites if s < depth]


def prepare(model: nn.Module, method: str = "method", need_class_token: bool = False,
            track_source: bool = False) -> Plan:
    """Convert ``model`` (in place) to the reducing classes and return its empty :class:`Plan`.

    Applying a second method replaces the first one's plan.
    """
    check_vit(model, method, need_class_token)
    plan = Plan(len(model.blocks))
    if not hasattr(model, "_tb_base"):
        model.__class__ = _reducing_model_class(model.__class__)
    model._tb_plan = plan
    model._tb_track_source = track_source
    for i, blk in enumerate(model.blocks):
        if not hasattr(blk, "_tb_base"):
            blk.__class__ = _reducing_block_class(blk.__class__)
        blk._tb_index = i
        blk._tb_plan = plan
        # A plain attribute, not a submodule: avoid a reference cycle in the module tree.
        object.__setattr__(blk, "_tb_owner", model)
    return plan


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare`: plain timm classes again (learned extras such as predictors are removed)."""
    if hasattr(model, "_tb_base"):
        for blk in model.blocks:
            if hasattr(blk, "_tb_base"):
                blk.__class__ = blk._tb_base
                for a in ("_tb_index", "_tb_plan", "_tb_owner"):
                    blk.__dict__.pop(a, None)
        model.__class__ = model._tb_base
        for a in ("_tb_plan", "_tb_state", "_tb_track_source", "_tb_image_ids"):
            model.__dict__.pop(a, None)
    for name in list(getattr(model, "_tb_added_modules", ())):
        if name in model._modules:
            del model._modules[name]
    model.__dict__.pop("_tb_added_modules", None)
    return model


def add_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Attach a method's learned module (restored away by :func:`restore`)."""
    model.add_module(name, module)
    added = model.__dict__.setdefault("_tb_added_modules", [])
    if name not in added:
        added.append(name)


def set_track_source(model: nn.Module, on: bool = True) -> None:
    """Keep a source map and per-stage snapshots in ``model._tb_state`` on the next forwards."""
    if not hasattr(model, "_tb_base"):
        prepare(model, "none")
    model._tb_track_source = on


def last_state(model: nn.Module) -> Optional[TokenState]:
    return getattr(model, "_tb_state", None)


def num_patches(model: nn.Module) -> int:
    return int(model.patch_embed.num_patches)


def batch_index_select(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[b, idx[b]] for x [B, N, C] or [B, N], idx [B, K]."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------- staged pruning schedules

def keep_counts(n0: int, stages: int, keep_rate: float) -> list[int]:
    """Patch tokens kept after each pruning stage: DynamicViT's ``int(n0 * keep_rate ** s)``, at least 1."""
    return [max(1, int(n0 * keep_rate ** (s + 1))) for s in range(stages)]


def staged_schedule(model: nn.Module, keep_rate: float, where: str = "mid") -> tuple[list[int], list[int]]:
    """(tokens entering each block, tokens entering each MLP) for pruning to :func:`keep_counts`
    at :func:`depth_sites`, either before those blocks (``pre``: DynamicViT) or between their
    attention and MLP (``mid``: top-k, random)."""
    npf = model.num_prefix_tokens
    n0 = num_patches(model)
    sites = depth_sites(len(model.blocks))
    counts = keep_counts(n0, len(sites), keep_rate)
    tokens, tokens_mlp, n = [], [], n0
    for i in range(len(model.blocks)):
        if where == "pre" and i in sites:
            n = min(n, counts[sites.index(i)])
        tokens.append(n + npf)
        if where == "mid" and i in sites:
            n = min(n, counts[sites.index(i)])
        tokens_mlp.append(n + npf)
    return tokens, tokens_mlp
