"""What every backbone offers the harness and the methods, and how backbones are found.

A *backbone* is the one object that knows a model family's insides.  The harness asks it
for geometry (depth, sites, tokens, grid, input configuration, an analytic cost) and never
reads a model attribute itself; a method asks it for its *sites* by position ("quarters",
"every", "stage 3") and installs hooks on the :class:`Plan` it returns.

Hook kinds (a backbone runs those it supports and refuses the others):

- ``plan.pre[i] = fn(block, x, state) -> x``: before block ``i``;
- ``plan.mid[i] = fn(block, x, state, info) -> x``: inside block ``i``, after the token
  mixer's residual and before the MLP; ``info`` describes the attention
  (:class:`~tokenbench.backbones.tokens.AttnInfo`) when ``plan.needs[i]`` asks for it;
- ``plan.attend[i] = fn(block, x, state) -> mix or None``: ViT, the attention of block ``i``
  (after its ``pre`` hook) when a hook already holds its probabilities: ``mix(v, attn_drop)``
  turns the block's values [B, H, N, head_dim] into the attention's rows [B, N, C]
  (:func:`~tokenbench.backbones.vit.attention_from_values`); None: the usual attention;
- ``plan.post[i] = fn(block, x, state) -> x``: after block ``i``'s MLP residual (ViT), where
  a method reads the block's output (A-ViT's halting) or changes what the next block gets;
- ``plan.subset[i] = fn(block, tokens, state) -> (idx, fast)`` and
  ``plan.block[i] = fn(block, x, state) -> map or None``: hierarchical backbones
  (:mod:`~tokenbench.backbones.hierarchical`): the FFN on some positions and a fast path on
  the others, scattered back into the full map (:func:`run_on_subset`); a method's own form
  of the whole block.  There a ``plan.pre[i]`` hook observes the block's input map as tokens
  [B, N, C] (it returns None).

Backbones register per model family with :func:`register_backbone`; ``backbone_of(model)``
returns the first whose :meth:`Backbone.matches` accepts the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from .surgery import install, remove, surgery_of

if TYPE_CHECKING:
    from .tokens import TokenState


class Plan:
    """Where a method acts: hooks per block index, and model-wide settings."""

    def __init__(self, depth: int, method: str = "method"):
        self.depth = depth
        self.method = method
        self.pre: dict[int, Callable] = {}
        self.mid: dict[int, Callable] = {}
        self.attend: dict[int, Callable] = {}
        self.post: dict[int, Callable] = {}
        self.subset: dict[int, Callable] = {}
        self.block: dict[int, Callable] = {}
        self.needs: dict[int, tuple[str, ...]] = {}
        self.on_start: list[Callable] = []
        self.prop_attn = False
        # ViT: how attention honours ``TokenState.policy`` (a method that sets a policy sets
        # this too): ``fn(logits [B, H, N, N], policy [B, N, 1]) -> probabilities``.
        self.policy_softmax: Optional[Callable] = None
        # The patch grid (rows, columns) the image is resized to before the embedding, its
        # position embeddings resampled to it; None: the model's own grid.
        self.input_grid: Optional[tuple[int, int]] = None
        # Values a method's training hooks change between steps (e.g. EViT's warm-up keep
        # rate): read by the method's own hooks, never by the harness.
        self.settings: dict = {}

    def hooked(self, i: int) -> bool:
        return (i in self.pre or i in self.mid or i in self.attend or i in self.post or i in self.subset
                or i in self.block)


class Backbone:
    """Base class of a model family's adapter.  Subclasses set ``name`` and implement the rest."""

    name: ClassVar[str] = ""
    # The models it covers, for refusals ("tome applies to <describes>; ResNet is not one").
    describes: ClassVar[str] = ""
    # Site names this backbone resolves (see :meth:`sites`).
    site_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    # ---- recognising and checking
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, method: str = "this method", need_class_token: bool = False) -> None:
        """Refuse, with one clear line, what the surgery cannot run."""

    # ---- geometry the harness asks for
    @property
    def depth(self) -> int:
        """Blocks at which hooks may sit."""
        raise NotImplementedError

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches (class, distillation, register tokens)."""
        return 0

    @property
    def has_class_token(self) -> bool:
        """Whether the first token is a class token."""
        return False

    @property
    def num_patches(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid at the reduction sites."""
        raise NotImplementedError

    @property
    def convolutional(self) -> bool:
        """Whether the model has 2-d convolutions worth running ``channels_last`` on CUDA."""
        return any(isinstance(m, nn.Conv2d) for m in self.model.modules())

    def dense_tokens(self) -> list[int]:
        """Tokens entering each block of the dense model."""
        return [self.num_patches + self.n_prefix] * self.depth

    def sites(self, where: str) -> list[int]:
        """Block indices for a site name (e.g. ``"quarters"``, ``"every"``, ``"stage 3"``)."""
        raise UserError(f"the {self.name} backbone has no sites called {where!r}")

    def input_config(self) -> dict:
        """img_size, in_chans, mean, std, patch_size, num_classes."""
        raise NotImplementedError

    def block_cost(self, tokens: list, tokens_mlp: list) -> Optional[float]:
        """Analytic multiply-adds per image of the blocks for a token schedule (None: unknown)."""
        return None

    def from_official(self, state: dict) -> dict:
        """A state dict in the family's original repository layout (keys and shapes) in timm's;
        keys already in timm's layout, and keys it does not know, pass unchanged."""
        return state

    def final_feature_map(self, feats: torch.Tensor) -> torch.Tensor:
        """Hierarchical backbones: the output of ``model.forward_features`` as the last stage's map
        normalised per position by the model's final norm, as tokens [B, N, C] (what the
        official DynamicViT journal version distils at every position)."""
        raise NotImplementedError(f"the {self.name} backbone has no final feature map")

    def activation_bytes(self, img_size: int, itemsize: int = 4) -> int:
        """A rough size of one image's activations in an inference forward (to refuse batches
        that cannot fit)."""
        raise NotImplementedError

    # ---- surgery (one for every family: :mod:`~tokenbench.backbones.surgery`)
    def blocks(self) -> list[nn.Module]:
        """The blocks hooks sit at, in order (block ``i`` is site ``i``)."""
        raise NotImplementedError

    @staticmethod
    def block_forward(block: nn.Module, *args, **kwargs):
        """The family's reducing ``forward`` of a patched block."""
        raise NotImplementedError

    # The family's reducing subclass of the model's class (a function of the class), if any.
    model_class: ClassVar[Optional[Callable[[type], type]]] = None

    def prepare(self, method: str = "method", need_class_token: bool = False,
                track_source: bool = False) -> Plan:
        """Patch the blocks (in place) and return the empty :class:`Plan` they run.  Applying a
        second method replaces the first one's plan (modules it added stay until :meth:`restore`)."""
        self.check(method, need_class_token)
        plan = Plan(self.depth, method)
        install(self.model, self.blocks(), type(self).block_forward, plan, track_source, self.n_prefix,
                type(self).model_class)
        return plan

    def restore(self) -> nn.Module:
        """Undo :meth:`prepare`: the plain timm model again."""
        return remove(self.model, self.blocks())

    def last_state(self) -> Optional[TokenState]:
        """The token bookkeeping of the model's last forward (None before the first, or if plain)."""
        s = surgery_of(self.model)
        return None if s is None else s.state


def complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The positions [B, n - K] of ``range(n)`` not in ``idx`` [B, K] (distinct per row), in order."""
    chosen = torch.zeros(idx.shape[0], n, dtype=torch.uint8, device=idx.device).scatter(1, idx, 1)
    return torch.argsort(chosen, dim=1, stable=True)[:, :n - idx.shape[1]]


def run_on_subset(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, idx: torch.Tensor,
                  fast: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``fn`` on the positions ``idx`` [B, K] of ``x`` [B, N, C] and ``fast`` (or nothing: zeros)
    on the other N - K positions only, scattered back into a full [B, N, C'] map.

    The shared primitive of the slow / fast paths of hierarchical models: the map keeps its
    shape, so every later layer (and a detection or segmentation head) sees the usual map.
    """
    b, n, c = x.shape
    sel = x.gather(1, idx[..., None].expand(-1, -1, c))
    slow = fn(sel)
    out = slow.new_zeros(b, n, slow.shape[-1])
    if fast is not None and idx.shape[1] < n:
        rest = complement(idx, n)
        quick = fast(x.gather(1, rest[..., None].expand(-1, -1, c))).to(slow.dtype)
        out = out.scatter(1, rest[..., None].expand(-1, -1, quick.shape[-1]), quick)
    return out.scatter(1, idx[..., None].expand(-1, -1, slow.shape[-1]), slow)


def default_input_config() -> dict:
    """ImageNet's input, for a model that says nothing."""
    return {"img_size": 224, "in_chans": 3, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "num_classes": None, "patch_size": None}


_BACKBONES: list[type[Backbone]] = []


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make a model family known to the harness."""
    if cls not in _BACKBONES:
        _BACKBONES.append(cls)
    return cls


def known_backbones() -> list[str]:
    return [b.name for b in _BACKBONES]


def backbone_of(model: nn.Module, method: str = "none") -> Backbone:
    """The backbone adapter of ``model``, or a one-line refusal."""
    for cls in _BACKBONES:
        if cls.matches(model):
            return cls(model)
    who = "tokenbench measures" if method == "none" else f"{method} applies to"
    kinds = " or ".join(b.describes for b in _BACKBONES)
    raise UserError(f"{who} {kinds}; {model.__class__.__name__} is not one")
