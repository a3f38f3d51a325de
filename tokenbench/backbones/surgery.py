"""The one block-level surgery every model family shares.

A method runs inside the model's own blocks: each block's class is swapped, in place, for a
subclass whose ``forward`` is the family's reducing block forward (parameters and state-dict
keys untouched), as ToMe's ``patch/timm.py`` does.  Because the blocks carry the reduction,
every entry point of the model runs it: ``forward``, ``forward_features``, ``forward_head``,
``forward_intermediates`` and a ``features_only`` net built over the model.

Everything the surgery keeps lives in one plain attribute, ``model._tokenbench``
(:class:`Surgery`), which every patched block also points at: the plan, the last forward's
:class:`~tokenbench.backbones.tokens.TokenState`, the images' ids, the modules a method added.
The state of one forward is created by the first patched block that sees a block index not
above the previous one (the head of :func:`begin_forward`), on the input's device.
:func:`remove` undoes everything and the model is plain timm again.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.nn as nn

from .tokens import TokenState

if TYPE_CHECKING:
    from .base import Plan


SURGERY_ATTR = "_tokenbench"
_INDEX, _OWNER = "_tb_index", "_tb_surgery"


class Surgery:
    """What the surgery keeps on one model (a plain attribute, not a submodule)."""

    def __init__(self, base: type, plan: Plan, track_source: bool = False, n_prefix: int = 0):
        self.base = base                      # the model's timm class, restored by remove()
        self.plan = plan
        self.track_source = track_source
        self.n_prefix = n_prefix              # tokens before the patches in each block's input
        self.state: Optional[TokenState] = None   # the last forward's bookkeeping
        self.image_ids: Optional[torch.Tensor] = None
        self.added: list[str] = []            # names of modules a method attached
        self.method: dict = {}                # {"name", "params"} of the applied method
        self.checkpointing = False            # gradient checkpointing, applied block by block
        # Blocks whose output is wanted on the full patch grid (``forward_intermediates`` with a
        # spatial output sets them for its call); None: no grid, no restoration bookkeeping.
        self.grid_blocks: Optional[frozenset[int]] = None
        # The model itself (``plan.on_start`` hooks get it; a deep copy of the model gets its copy).
        self.owner: Optional[nn.Module] = None


def surgery_of(model: nn.Module) -> Optional[Surgery]:
    return model.__dict__.get(SURGERY_ATTR)


def block_surgery(block: nn.Module) -> tuple[Surgery, int]:
    """The surgery a patched block belongs to, and the block's index in the model."""
    return block.__dict__[_OWNER], block.__dict__[_INDEX]


_BLOCK_CLASSES: dict[tuple[type, Callable], type] = {}


def _reducing_class(base: type, forward: Callable, extra: Optional[dict] = None) -> type:
    key = (base, forward)
    if key not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[key] = type(f"Reducing{base.__name__}", (base,), {"forward": forward, **(extra or {})})
    return _BLOCK_CLASSES[key]


def install(model: nn.Module, blocks: list[nn.Module], block_forward: Callable, plan: Plan,
            track_source: bool = False, n_prefix: int = 0,
            model_class: Optional[Callable[[type], type]] = None) -> Surgery:
    """Patch ``blocks`` (in order) to run ``block_forward`` with ``plan``; a model already patched
    gets the new plan (modules an earlier method added stay until :func:`remove`).
    ``model_class``: the family's reducing subclass of the model's class, if it needs one."""
    s = surgery_of(model)
    if s is None:
        s = Surgery(model.__class__, plan, track_source, n_prefix)
        model.__dict__[SURGERY_ATTR] = s
        if model_class is not None:
            if "grad_checkpointing" in model.__dict__:  # timm's switch, honoured block by block
                s.checkpointing = bool(model.__dict__.pop("grad_checkpointing"))
            model.__class__ = model_class(model.__class__)
    else:
        s.plan, s.track_source, s.n_prefix = plan, track_source, n_prefix
    s.owner = model
    for i, blk in enumerate(blocks):
        if _INDEX not in blk.__dict__:
            blk.__class__ = _reducing_class(blk.__class__, block_forward)
        object.__setattr__(blk, _INDEX, i)
        object.__setattr__(blk, _OWNER, s)
    return s


def remove(model: nn.Module, blocks: list[nn.Module]) -> nn.Module:
    """Undo :func:`install`: the blocks' and the model's own classes back, added modules removed."""
    s = surgery_of(model)
    if s is None:
        return model
    for blk in blocks:
        if _INDEX in blk.__dict__:
            blk.__class__ = blk.__class__.__mro__[1]
            for a in (_INDEX, _OWNER):
                blk.__dict__.pop(a, None)
    for name in s.added:
        if name in model._modules:
            del model._modules[name]
    if model.__class__ is not s.base:
        model.__class__ = s.base
        model.__dict__["grad_checkpointing"] = s.checkpointing
    del model.__dict__[SURGERY_ATTR]
    return model


def checkpointing_switch() -> property:
    """timm's ``grad_checkpointing`` on a patched model: timm's loops see it off, and the patched
    blocks checkpoint those of their calls that change no token state."""

    def get(self) -> bool:
        return False

    def set_(self, on: bool) -> None:
        surgery_of(self).checkpointing = bool(on)

    return property(get, set_)


def batch_image_ids(s: Surgery, x: torch.Tensor) -> torch.Tensor:
    """The ids [B] of the batch's images on ``x``'s device (``arange(B)`` outside :func:`image_ids`)."""
    ids = s.image_ids
    if ids is None:
        return torch.arange(x.shape[0], device=x.device)
    if ids.shape != (x.shape[0],):
        raise ValueError(f"image_ids has shape {tuple(ids.shape)} for a batch of {x.shape[0]} images")
    return ids.to(x.device)


def begin_forward(s: Surgery, i: int, x: torch.Tensor, tokens: Optional[torch.Tensor] = None,
                  cover=None) -> TokenState:
    """The token state block ``i`` works in: the running forward's, or, when ``i`` is not above
    the last block seen (a new forward), a new one, made on ``x``'s device, started on
    ``tokens`` (the sequence, for families whose positions are tokens; ``cover``: how its
    patches cover the model's own grid, see :meth:`TokenState.start`; the full grid followed
    when ``s.grid_blocks`` asks for it) and handed to the plan's ``on_start`` hooks as
    ``fn(model, x, st)``."""
    st = s.state
    if st is None or i <= st.block:
        plan = s.plan
        st = TokenState(s.n_prefix, prop_attn=plan.prop_attn, track_source=s.track_source)
        st.image_ids = batch_image_ids(s, x)
        st.settings = plan.settings
        s.state = st
        if tokens is not None:
            st.start(tokens, cover, grid=s.grid_blocks is not None)
        for fn in plan.on_start:
            fn(s.owner, x, st)
    st.block = i
    return st


def capture_grid(s: Surgery, st: TokenState, i: int, x: torch.Tensor) -> torch.Tensor:
    """Block ``i``'s output ``x``, kept on the full patch grid when one is asked for; returns ``x``."""
    if st.grid is not None and s.grid_blocks is not None and i in s.grid_blocks:
        st.grid.capture(i, x)
    return x


@contextlib.contextmanager
def grid_of_blocks(model: nn.Module, blocks) -> Iterator[None]:
    """Within the block, forwards of ``model`` keep the outputs of ``blocks`` on the full patch
    grid (``TokenState.grid``)."""
    s = surgery_of(model)
    old = s.grid_blocks
    s.grid_blocks = frozenset(blocks)
    try:
        yield
    finally:
        s.grid_blocks = old


@contextlib.contextmanager
def image_ids(model: nn.Module, ids: Optional[torch.Tensor]) -> Iterator[nn.Module]:
    """Tell the forwards inside the block which images they see: ``ids`` [B] (int64), the
    index of each image of the batch in the evaluated set.

    A method whose choices are random (``random``) draws each image's choice from its
    seed and this id (``TokenState.image_ids``), so a prediction does not depend on the
    batch it came in.  Outside the block, or with ``ids=None``, the ids are
    ``arange(B)`` (throughput, FLOPs, training, a direct call).  A sharded evaluation
    (torchrun) passes the *global* index of each image.  A plain timm model ignores them.
    """
    s = surgery_of(model)
    if s is None:
        yield model
        return
    old = s.image_ids
    s.image_ids = None if ids is None else torch.as_tensor(ids, dtype=torch.int64)
    try:
        yield model
    finally:
        s.image_ids = old
