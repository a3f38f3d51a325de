"""The ViT backbone: timm's ``VisionTransformer`` (DeiT, ViT, registers, the embedded default).

The blocks are patched by the shared surgery (:mod:`~tokenbench.backbones.surgery`); the first
block of a forward starts the token state on the embedded patches.  A block with no hook, while
nothing asks for an attention mask (no proportional attention yet, no training policy, no
padding), runs timm's ``Block.forward`` unchanged, gradient-checkpointed when the model has it
on.  Only a block that carries a hook, or needs a mask, runs :func:`reducing_block`, a
re-implementation of timm's pre-norm block that honours timm's fused-attention switch
(``attn.fused_attn``) and the ``attn_mask`` / ``is_causal`` arguments.  Such blocks are not
gradient-checkpointed: their hooks change the token state, which a recomputation would do twice.

The model's class is swapped too (in place; parameters and state-dict keys untouched), for
what only the model sees: ``pool`` weights tokens by size and padding,
``forward_intermediates`` hands back a spatial grid of every block asked for on the full patch
grid (pruned patches filled back, merged ones unmerged: :mod:`~tokenbench.backbones.grid`), and ``forward_features`` embeds the image resized to a plan's ``input_grid`` (position
embeddings resampled as timm does) when a method asks for a coarser grid.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

from .base import Backbone, default_input_config, Plan, register_backbone
from .surgery import begin_forward, block_surgery, capture_grid, checkpointing_switch, grid_of_blocks, surgery_of
from .tokens import AttnInfo, TokenState

# --------------------------------------------------------------------------- attention

def _user_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, n: int, dtype, device) -> Optional[torch.Tensor]:
    """timm's ``attn_mask`` (bool: True = attend, or additive) and ``is_causal`` as one additive mask."""
    mask = None
    if attn_mask is not None:
        if attn_mask.shape[-1] != n:
            raise UserError(f"an attn_mask of {attn_mask.shape[-1]} tokens cannot follow a sequence "
                            f"reduced to {n} tokens")
        mask = attn_mask if attn_mask.dtype != torch.bool else \
            torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, float("-inf"))
        mask = mask.to(dtype)
    if is_causal:
        causal = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)
        mask = causal if mask is None else mask + causal
    return mask


def attention(mod: nn.Module, x: torch.Tensor, state: TokenState, needs: tuple = (),
              attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
              policy_softmax: Optional[Callable] = None):
    """timm ``Attention`` forward with the state's masks and what hooks need.

    Returns (output [B, N, C], AttnInfo).  ``needs``: ``"keys"`` (keys averaged over heads),
    ``"cls_attn"`` (the class token's attention row), ``"attn"`` (the full matrix),
    ``"values"``.  The block's output uses fused scaled-dot-product attention (the state's
    size bias and padding mask as an additive mask), as timm does, unless timm's switch
    ``mod.fused_attn`` is off or the state carries a training policy, which
    ``policy_softmax(logits, policy)`` (the plan's) turns into probabilities; a method reading
    the class row gets one extra softmax row, not the matrix.
    """
    b, n, c = x.shape
    h, hd = mod.num_heads, mod.head_dim
    gate = mod.gate(x).sigmoid() if getattr(mod, "gate", None) is not None else None
    qkv = mod.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = mod.q_norm(q), mod.k_norm(k)
    bias = state.attn_bias(q.dtype)
    user = _user_mask(attn_mask, is_causal, n, q.dtype, q.device)
    if user is not None:
        bias = user if bias is None else bias + user
    attn_full = None
    if state.policy is not None or not getattr(mod, "fused_attn", True):
        logits = (q * mod.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        if state.policy is None:
            attn_full = logits.softmax(dim=-1)
        elif policy_softmax is None:
            raise RuntimeError("the token state carries a policy but the plan has no policy_softmax")
        else:
            attn_full = policy_softmax(logits, state.policy)
        attn_full = mod.attn_drop(attn_full)
        out = attn_full @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=mod.attn_drop.p if mod.training else 0.0)
    out = out.transpose(1, 2).reshape(b, n, h * hd)
    out = mod.norm(out)
    if gate is not None:
        out = out * gate
    out = mod.proj(out)
    if mod.training:  # dropout is the identity in eval mode: no operator dispatched for it
        out = mod.proj_drop(out)
    need_q = "cls_attn" in needs or "attn" in needs
    info = AttnInfo(q if need_q else None, k if (need_q or "keys" in needs) else None, bias, mod.scale,
                    state.n_prefix, attn=attn_full if need_q else None,
                    v=v if "values" in needs else None)
    return out, info


def attention_from_values(mod: nn.Module, x: torch.Tensor, state: TokenState, mix: Callable):
    """timm ``Attention`` forward whose probabilities a hook already holds (``plan.attend``): only
    the values are projected (the value third of ``qkv``), ``mix(v, attn_drop)`` turns them
    ([B, H, N, head_dim]) into the attention's rows [B, N, H * head_dim], then timm's norm, gate
    and projection.  Returns (output, AttnInfo with the values)."""
    b, n, _ = x.shape
    h, hd = mod.num_heads, mod.head_dim
    gate = mod.gate(x).sigmoid() if getattr(mod, "gate", None) is not None else None
    bias = None if mod.qkv.bias is None else mod.qkv.bias[2 * h * hd:]
    v = F.linear(x, mod.qkv.weight[2 * h * hd:], bias).reshape(b, n, h, hd).transpose(1, 2)
    out = mod.norm(mix(v, mod.attn_drop))
    if gate is not None:
        out = out * gate
    out = mod.proj_drop(mod.proj(out))
    return out, AttnInfo(None, None, state.attn_bias(x.dtype), mod.scale, state.n_prefix, v=v)


def attention_probs(block: nn.Module, x: torch.Tensor, st: TokenState) -> torch.Tensor:
    """Block ``block``'s attention probabilities [B, H, N, N] on its input ``x`` (its norm, then
    queries and keys only, with the state's attention mask)."""
    mod = block.attn
    b, n, _ = x.shape
    h, hd = mod.num_heads, mod.head_dim
    bias = None if mod.qkv.bias is None else mod.qkv.bias[:2 * h * hd]
    qk = F.linear(block.norm1(x), mod.qkv.weight[:2 * h * hd], bias).reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4)
    q, k = mod.q_norm(qk[0]), mod.k_norm(qk[1])
    logits = (q * mod.scale) @ k.transpose(-2, -1)
    mask = st.attn_bias(logits.dtype)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1)


# --------------------------------------------------------------------------- block and model

def reducing_block(blk: nn.Module, x: torch.Tensor, st: TokenState, plan: Plan, i: int,
                   attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    """timm's pre-norm ``Block.forward`` with the plan's hooks of block ``i``."""
    pre = plan.pre.get(i)
    if pre is not None:
        x = pre(blk, x, st)
    st.count(x)
    attend = plan.attend.get(i)
    mix = None if attend is None else attend(blk, x, st)
    if mix is not None:
        attn_out, info = attention_from_values(blk.attn, blk.norm1(x), st, mix)
    else:
        attn_out, info = attention(blk.attn, blk.norm1(x), st, plan.needs.get(i, ()), attn_mask, is_causal,
                                   plan.policy_softmax)
    x = x + blk.drop_path1(blk.ls1(attn_out))
    mid = plan.mid.get(i)
    if mid is not None:
        x = mid(blk, x, st, info)
    st.count(x, mlp=True)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    post = plan.post.get(i)
    return x if post is None else post(blk, x, st)


def _needs_masks(st: TokenState) -> bool:
    return st.policy is not None or st.pad is not None or st.key_bias is not None or \
        (st.prop_attn and st.size is not None)


def _block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                   is_causal: bool = False) -> torch.Tensor:
    """timm's ``Block.forward`` with the plan's hooks of this block.  The first block of a
    forward starts the token state on its input (the embedded patches); a block with no hook,
    while nothing asks for a mask, runs timm's own forward (gradient-checkpointed when the
    model has it on).  When a grid is asked for, the output is also kept on the full grid."""
    s, i = block_surgery(self)
    st = begin_forward(s, i, x, tokens=x, cover=_input_cover(s) if i == 0 else None)
    plan = s.plan
    if plan.hooked(i) or _needs_masks(st):
        out = reducing_block(self, x, st, plan, i, attn_mask, is_causal)
        return out if st.grid is None else capture_grid(s, st, i, out)
    st.count(x)
    st.count(x, mlp=True)
    timm_forward = type(self).__mro__[1].forward
    if attn_mask is not None or is_causal:
        out = timm_forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    elif s.checkpointing and self.training and not torch.jit.is_scripting():
        out = torch.utils.checkpoint.checkpoint(functools.partial(timm_forward, self), x, use_reentrant=False)
    else:
        out = timm_forward(self, x)
    return out if st.grid is None else capture_grid(s, st, i, out)


def _resized_grid(model: nn.Module) -> Optional[tuple[int, int]]:
    """The grid the plan resizes the image to (``plan.input_grid``), None when it is the model's own."""
    grid = surgery_of(model).plan.input_grid
    return None if grid is None or tuple(grid) == tuple(model.patch_embed.grid_size) else tuple(grid)


def _input_cover(s):
    """How the patches of a resized input cover the model's own grid (None: not resized)."""
    grid = _resized_grid(s.owner)
    return None if grid is None else grid_cover(tuple(s.owner.patch_embed.grid_size), grid)


def _forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """timm's ``forward_features``; with a plan's ``input_grid``, on the image resized to that
    grid (:func:`_embed_resized`), then the (patched) blocks and the final norm as timm's."""
    s = surgery_of(self)
    grid = _resized_grid(self)
    if grid is None:
        return s.base.forward_features(self, x, *args, **kwargs)
    if any(a is not None and a is not False for a in (*args, *kwargs.values())):  # attn_mask, is_causal
        raise UserError("an attention mask cannot follow an image resized to another patch grid")
    x = self.norm_pre(self.patch_drop(_embed_resized(self, x, grid)))
    return self.norm(self.blocks(x))


def _embed_resized(model: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch and position embedding of the image resized (bilinear, antialiased) to ``grid``
    patches: the patch projection at the smaller size, the position embeddings resampled to
    the grid as timm's ``dynamic_img_size`` does (``resample_abs_pos_embed``)."""
    from timm.layers import resample_abs_pos_embed

    pe = model.patch_embed
    ph, pw = pe.patch_size
    x = F.interpolate(x, size=(grid[0] * ph, grid[1] * pw), mode="bilinear", align_corners=False, antialias=True)
    x = pe.proj(x)
    x = pe.norm(x.flatten(2).transpose(1, 2))                   # NCHW -> NLC
    to_cat = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    if model.pos_embed is None:
        return model.pos_drop(torch.cat(to_cat + [x], dim=1))
    pos = resample_abs_pos_embed(model.pos_embed, new_size=list(grid), old_size=list(pe.grid_size),
                                 num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)
    if model.no_embed_class:
        x = torch.cat(to_cat + [x + pos], dim=1)
    else:
        x = torch.cat(to_cat + [x], dim=1) + pos
    return model.pos_drop(x)


def grid_cover(old: tuple[int, int], new: tuple[int, int]) -> tuple[list[list[int]], list[int]]:
    """How a coarser grid ``new`` covers the grid ``old`` (both rows, columns): for each new cell,
    the old patches whose centres fall in it, and the old patch nearest its centre."""
    def cell(i: int, n_old: int, n_new: int) -> int:
        return min(n_new - 1, int((i + 0.5) * n_new / n_old))

    def centre(a: int, n_old: int, n_new: int) -> int:
        return min(n_old - 1, int((a + 0.5) * n_old / n_new))

    cover: list[list[int]] = [[] for _ in range(new[0] * new[1])]
    for i in range(old[0]):
        for j in range(old[1]):
            cover[cell(i, old[0], new[0]) * new[1] + cell(j, old[1], new[1])].append(i * old[1] + j)
    centres = [centre(a, old[0], new[0]) * old[1] + centre(b, old[1], new[1])
               for a in range(new[0]) for b in range(new[1])]
    return cover, centres


def _pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
    """timm's pooling; average pooling weights each token by the patches it stands for and
    skips padding; max pooling skips padding."""
    pool_type = self.global_pool if pool_type is None else pool_type
    s = surgery_of(self)
    st = s.state
    weighted = st is not None and (st.size is not None or st.pad is not None)
    if pool_type in ("avg", "max", "avgmax") and getattr(self, "attn_pool", None) is None and weighted:
        npf = 0 if self.pool_include_prefix else self.num_prefix_tokens
        xs = x[:, npf:]
        w = torch.ones_like(xs[..., :1]) if st.size is None else st.size[:, npf:].to(x.dtype)
        if st.pad is not None:
            real = st.pad[:, npf:, None]
            w = w * real.to(x.dtype)
            xmax = xs.masked_fill(~real, float("-inf")).amax(dim=1)
        else:
            xmax = xs.amax(dim=1)
        avg = (xs * w).sum(1) / w.sum(1)
        return {"avg": avg, "max": xmax, "avgmax": 0.5 * (xmax + avg)}[pool_type]
    return s.base.pool(self, x, pool_type)


def _forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
    """timm's ``forward_intermediates`` on the reducing blocks.  Token sequences (``NLC``) are
    returned as the blocks left them; a spatial grid (``NCHW``, timm's default) holds every
    patch of the original grid at every block asked for (:class:`~.grid.GridRestorer`: a pruned
    patch keeps the value it had when dropped, a merged one its group's token, on an image
    resized to a coarser grid the token of the cell that covers it), normalised by the final
    norm when ``norm`` asks (a per-token norm: the same whether applied before or after the
    restoration)."""
    from timm.models._features import feature_take_indices

    s = surgery_of(self)
    base = s.base.forward_intermediates
    call = inspect.signature(base).bind(self, x, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    resized = _resized_grid(self) is not None
    if resized and (a.get("attn_mask") is not None or a.get("is_causal")):
        raise UserError("an attention mask cannot follow an image resized to another patch grid")
    spatial = a.get("output_fmt", "NCHW") == "NCHW"
    if not spatial and not resized:
        return base(*call.args, **call.kwargs)
    a["output_fmt"] = "NLC"
    take, _ = feature_take_indices(len(self.blocks), a.get("indices"))
    with grid_of_blocks(self, take):
        out = _resized_intermediates(self, x, take, a) if resized else base(*call.args, **call.kwargs)
    if not spatial:
        return out
    maps = s.state.grid.maps
    norm = self.norm if a.get("norm") else (lambda t: t)
    order = iter(sorted(set(take)))
    h, w = self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))

    def on_grid(_reduced: torch.Tensor) -> torch.Tensor:
        y = norm(maps[next(order)])
        return y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    return _map_intermediates(out, on_grid)


def _resized_intermediates(model: nn.Module, x: torch.Tensor, take, a: dict):
    """What timm's ``forward_intermediates`` returns with ``output_fmt='NLC'``, in its layout, for
    an image resized to a plan's ``input_grid``: every block runs (:func:`_forward_features`),
    the intermediates are the sequences on the coarser grid (for a spatial output the caller
    replaces them by the maps kept on the original grid)."""
    final = model.forward_features(x)
    grid = surgery_of(model).state.grid
    blocks, p = sorted(set(take)), model.num_prefix_tokens
    norm = model.norm if a.get("norm") else (lambda t: t)
    seqs = [norm(grid.tokens[i]) for i in blocks]
    inter = [t[:, p:] for t in seqs]
    prefix = [t[:, :p] for t in seqs] if p else None
    if a.get("output_dict"):
        out = {"image_intermediates": inter}
        if prefix is not None and a.get("return_prefix_tokens"):
            out["image_intermediates_prefix"] = prefix
        if not a.get("intermediates_only"):
            out["image_features"] = final
        return out
    if a.get("return_prefix_tokens") and prefix is not None:
        inter = list(zip(inter, prefix))
    return inter if a.get("intermediates_only") else (final, inter)


def _map_intermediates(out, fn):
    """``out`` of timm's ``forward_intermediates`` (a list, a (final, list) pair or a dict; each
    item a tensor or a (tokens, prefix) pair) with ``fn`` applied to each intermediate's tokens."""
    def one(y):
        return (fn(y[0]), *y[1:]) if isinstance(y, tuple) else fn(y)

    if isinstance(out, dict):
        return {**out, "image_intermediates": [one(y) for y in out["image_intermediates"]]}
    if isinstance(out, tuple):
        return out[0], [one(y) for y in out[1]]
    return [one(y) for y in out]


_MODEL_CLASSES: dict[type, type] = {}


def _reducing_model_class(base: type) -> type:
    """The model's class with size-weighted pooling, timm's intermediates on the full grid, and
    gradient checkpointing left to the blocks."""
    if base not in _MODEL_CLASSES:
        _MODEL_CLASSES[base] = type(f"Reducing{base.__name__}", (base,),
                                    {"pool": _pool, "forward_intermediates": _forward_intermediates,
                                     "forward_features": _forward_features,
                                     "grad_checkpointing": checkpointing_switch()})
    return _MODEL_CLASSES[base]


# --------------------------------------------------------------------------- the backbone

def quarter_sites(depth: int) -> list[int]:
    """The three reduction sites: blocks 3, 6, 9 of 12 (the quarter points of other depths)."""
    sites = sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3)})
    return [s for s in sites if s < depth]


@register_backbone
class ViTBackbone(Backbone):
    name = "vit"
    describes = "timm VisionTransformer models (DeiT, ViT, the embedded default)"
    site_names = ("quarters", "every")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def check(self, method: str = "this method", need_class_token: bool = False) -> None:
        from timm.layers import Attention

        model = self.model
        for i, blk in enumerate(model.blocks):
            if not hasattr(blk, "norm1") or not hasattr(blk, "mlp") or \
                    not isinstance(getattr(blk, "attn", None), Attention):
                raise UserError(f"{method}: block {i} ({blk.__class__.__name__}) is not a standard pre-norm ViT block")
        if getattr(model, "attn_pool", None) is not None and method != "none":
            raise UserError(f"{method}: models with attention pooling heads are not supported")
        if need_class_token and getattr(model, "cls_token", None) is None:
            raise UserError(f"{method} needs a class token; this model has none (class_token=False)")

    # ---- geometry
    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def n_prefix(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    @property
    def grid(self) -> tuple[int, int]:
        gs = getattr(self.model.patch_embed, "grid_size", None)
        if gs is not None:
            return int(gs[0]), int(gs[1])
        n = self.num_patches
        side = int(round(math.sqrt(n)))
        return side, n // side

    @property
    def patch_size(self) -> int:
        ps = self.model.patch_embed.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)

    @property
    def width(self) -> int:
        return int(self.model.embed_dim)

    @property
    def convolutional(self) -> bool:
        """Convolutions besides the patch embedding (a hybrid or a convolutional stem)."""
        return any(isinstance(m, nn.Conv2d) and "patch_embed" not in name.split(".")
                   for name, m in self.model.named_modules())

    def sites(self, where: str) -> list[int]:
        if where == "quarters":
            return quarter_sites(self.depth)
        if where == "every":
            return list(range(self.depth))
        return super().sites(where)

    def input_config(self) -> dict:
        model = self.model
        out = default_input_config()
        pe = model.patch_embed
        if getattr(pe, "img_size", None):
            out["img_size"] = int(pe.img_size[0])
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "mean" in cfg:
            out["mean"], out["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
        in_chans = None
        if hasattr(pe, "proj"):
            w = getattr(pe.proj, "weight", None)
            if w is None and isinstance(pe.proj, nn.Sequential):
                w = pe.proj[0].weight
            if w is not None:
                in_chans = int(w.shape[1])
        out["in_chans"] = in_chans or int(cfg.get("input_size", (3,))[0])
        out["patch_size"] = self.patch_size
        out["num_classes"] = getattr(model, "num_classes", None)
        return out

    def block_cost(self, tokens: list, tokens_mlp: list) -> Optional[float]:
        try:
            d = self.width
            h = int(self.model.blocks[0].mlp.fc1.out_features)
        except (AttributeError, IndexError):
            return None
        return float(sum(4 * n * d * d + 2 * n * n * d + 2 * m * d * h for n, m in zip(tokens, tokens_mlp)))

    def activation_bytes(self, img_size: int, itemsize: int = 4) -> int:
        """Per image, per block: the residual stream, the normalised input, q/k/v and the MLP's
        hidden layer at ``itemsize``, and one fp32 N x N matrix per head (unfused attention)."""
        n = (img_size // self.patch_size) ** 2 + self.n_prefix
        dim = self.width
        blk = self.model.blocks[0]
        heads = int(getattr(getattr(blk, "attn", None), "num_heads", 12))
        hidden = int(blk.mlp.fc1.out_features) if hasattr(blk.mlp, "fc1") else 4 * dim
        return int(n * (6 * dim + 2 * hidden) * itemsize + heads * n * n * 4)

    # ---- surgery
    def blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    block_forward = _block_forward
    model_class = _reducing_model_class
