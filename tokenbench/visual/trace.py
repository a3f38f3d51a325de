"""Tracing for the token pictures: run a model with the source map on and say, after every
reduction stage, which original patches each token stands for.

Everything here reads the shared bookkeeping of :mod:`tokenbench.backbones` (the source map
and its per-stage snapshots); nothing knows a method by name.  A snapshot is
classified by its ``kind`` and its source rows alone:

- a row covering no patch is a prefix token (class, distillation, register token);
- a row covering one patch is a kept token;
- a row covering several patches is a merged group, unless it is or contains a *fused*
  token (the last token of a ``fuse`` snapshot with ``fused_last``);
- a patch in no row was dropped.

Hierarchical models (ConvNeXt, Swin) keep every position of their map; a method that splits
a block into a slow and a fast path records a ``slow path`` snapshot instead (``slow`` [B, K]:
the positions of the stage-3 map that take the slow path, ``positions``: N): each position is
its own token, KEPT on the slow path, FAST on the other (:func:`slow_path_stage`).

The model's geometry (patch grid, prefix tokens, depth, input configuration) is read in
:func:`token_geometry` and :func:`input_config` alone.  Entry points: :func:`patch_assignment`
and :func:`classify` (the analysis of snapshots), :func:`run_with_sources` (a forward with the
source map on), :func:`trace` (what a picture needs).  Drawing is :mod:`tokenbench.visual.draw`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import UserError

# Token roles, one per token of a stage.
PREFIX, KEPT, GROUP, FUSED, FAST, PAD = 0, 1, 2, 3, 4, 5   # PAD: a padding slot of a padded batch
SLOW_PATH = "slow path"       # the kind of a hierarchical model's snapshot


# --------------------------------------------------------------------------- the model's geometry

@dataclass(frozen=True)
class TokenGeometry:
    """Where a model's tokens come from: its patch grid and the tokens before the patches."""

    grid: tuple[int, int]         # patch rows, patch columns
    n_prefix: int                 # class, distillation and register tokens, first in the sequence
    depth: int                    # blocks

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]


def token_geometry(model: nn.Module) -> TokenGeometry:
    """The patch grid, prefix tokens and depth, from the model's backbone."""
    from ..backbones import backbone_of

    bb = backbone_of(model)
    return TokenGeometry(grid=bb.grid, n_prefix=bb.n_prefix, depth=bb.depth)


def input_config(model: nn.Module) -> dict:
    """What the model takes: in_chans, img_size, mean and std (one per channel), and
    ``transform_mean`` / ``transform_std``, the statistics timm's transforms normalise with."""
    import timm.data

    from ..backbones import input_config as backbone_input

    cfg = dict(backbone_input(model))
    c = int(cfg["in_chans"])
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != c:  # e.g. a 1-channel timm model keeps ImageNet's three statistics
        mean = (sum(mean) / len(mean),) * c
        std = (sum(std) / len(std),) * c
    cfg["mean"], cfg["std"] = mean, std
    dcfg = timm.data.resolve_data_config({}, model=model)
    cfg["transform_mean"], cfg["transform_std"] = tuple(dcfg["mean"]), tuple(dcfg["std"])
    return cfg


def grid_of(model: nn.Module) -> tuple[int, int]:
    """The model's patch grid (rows, columns)."""
    return token_geometry(model).grid


# --------------------------------------------------------------------------- analysis of snapshots

def real_sources(stage: dict, n_prefix: int) -> torch.Tensor:
    """[B, N, P] bool: the patches each token of a snapshot covers.  A padding slot (a padded
    batch of per-image counts) covers none: it stands for no token of its image."""
    src = stage["source"][:, :, n_prefix:] > 0
    pad = stage.get("pad")
    if pad is not None:
        src = src & pad.to(src.device)[:, :, None]
    return src


def patch_assignment(stage: dict, n_prefix: int, check: bool = True) -> torch.Tensor:
    """For every original patch, the token (index into the stage's sequence) that covers it, or -1.

    ``stage`` is one snapshot of ``TokenState.stages`` (its ``source`` [B, N, N0], N0 =
    ``n_prefix`` + patches, prefix tokens first).  Returns a LongTensor [B, n_patches].
    With ``check``, a patch covered by more than one token raises ``ValueError`` (the
    bookkeeping would be broken).
    """
    src = real_sources(stage, n_prefix)                     # [B, N, P]
    count = src.sum(1)                                       # [B, P]
    if check and bool((count > 1).any()):
        b, p = [int(v) for v in (count > 1).nonzero()[0]]
        raise ValueError(f"patch {p} of image {b} is covered by {int(count[b, p])} tokens at block "
                         f"{stage.get('block')} ({stage.get('kind')})")
    idx = src.to(torch.uint8).argmax(1)
    return torch.where(count > 0, idx, torch.full_like(idx, -1))


@dataclass
class Stage:
    """One snapshot, analysed: what each token is and which patches it covers."""

    block: int
    kind: str
    n_tokens: int                 # sequence length after the reduction, prefix tokens included
    assign: torch.Tensor          # [B, P] token index or -1 (dropped)
    role: torch.Tensor            # [B, N] PREFIX / KEPT / GROUP / FUSED (/ FAST: slow-path snapshots)
    n_patches: torch.Tensor       # [B, N] patches each token covers
    newest_fused: Optional[int]   # index of the token fused at this stage (None if none)
    predictor: Optional[int] = None   # slow-path snapshots: which predictor chose (0-based)

    def counts(self, b: int) -> dict:
        role, npatch = self.role[b], self.n_patches[b]
        return {"tokens": self.n_tokens - int((role == PAD).sum()),
                "kept": int((role == KEPT).sum()),
                "groups": int((role == GROUP).sum()),
                "grouped_patches": int(npatch[role == GROUP].sum()),
                "fused": int((role == FUSED).sum()),
                "fused_patches": int(npatch[role == FUSED].sum()),
                "dropped": int((self.assign[b] < 0).sum())}

    def title(self) -> str:
        if self.kind == SLOW_PATH:
            return f"predictor {self.predictor + 1} (block {self.block})"
        return f"block {self.block}: {self.n_tokens} tokens"

    def caption(self, b: int) -> str:
        c = self.counts(b)
        if self.kind == SLOW_PATH:
            return f"{c['kept']} slow, {int((self.role[b] == FAST).sum())} fast"
        parts = [f"{c['kept']} kept"]
        if c["groups"]:
            parts.append(f"{c['groups']} merged ({c['grouped_patches']} p.)")
        if c["fused"]:
            parts.append(f"{c['fused']} fused ({c['fused_patches']} p.)")
        if c["dropped"]:
            parts.append(f"{c['dropped']} dropped")
        return ", ".join(parts)


def classify(stages: Sequence[dict], n_prefix: int) -> list[Stage]:
    """Analyse every snapshot of a forward, in order (fused lineage is carried across stages)."""
    out: list[Stage] = []
    fused_patches: Optional[torch.Tensor] = None            # [B, P] bool: ever part of a fused token
    for st in stages:
        if st.get("kind") == SLOW_PATH:  # no source map: see slow_path_stages
            continue
        src = real_sources(st, n_prefix)                      # [B, N, P]
        b, n, p = src.shape
        assign = patch_assignment(st, n_prefix)
        npatch = src.sum(-1)                                   # [B, N]
        if fused_patches is None:
            fused_patches = torch.zeros(b, p, dtype=torch.bool, device=src.device)
        newest = None
        if st.get("kind") == "fuse" and st.get("fused_last") and n > n_prefix:
            newest = n - 1
            fused_patches = fused_patches | src[:, newest]
        is_fused = (src & fused_patches[:, None, :]).any(-1)  # contains a fused token
        role = torch.full((b, n), KEPT, dtype=torch.long, device=src.device)
        role[npatch > 1] = GROUP
        role[is_fused] = FUSED
        role[npatch == 0] = PREFIX
        if st.get("pad") is not None:
            role[~st["pad"].to(role.device)] = PAD
        out.append(Stage(block=int(st.get("block", -1)), kind=str(st.get("kind", "")), n_tokens=n,
                         assign=assign.cpu(), role=role.cpu(), n_patches=npatch.cpu(), newest_fused=newest))
    return out


def slow_path_stage(snap: dict) -> Stage:
    """A hierarchical model's snapshot: every position its own token, those in ``slow`` KEPT,
    the others FAST."""
    slow = snap["slow"].cpu()
    b, n = slow.shape[0], int(snap["positions"])
    role = torch.full((b, n), FAST, dtype=torch.long).scatter(1, slow, KEPT)
    return Stage(block=int(snap["block"]), kind=SLOW_PATH, n_tokens=n, assign=torch.arange(n).expand(b, n).clone(),
                 role=role, n_patches=torch.ones(b, n, dtype=torch.long), newest_fused=None,
                 predictor=int(snap["predictor"]))


def slow_path_stages(state: Any, method: str = "this method") -> list[Stage]:
    """The slow-path snapshots of a hierarchical model's forward, analysed.  A forward that ran
    some blocks' MLP on fewer positions but recorded none is refused (it cannot be drawn)."""
    snaps = [s for s in (state.stages if state is not None else []) if s.get("kind") == SLOW_PATH]
    if not snaps and state is not None and list(state.tokens_mlp) != list(state.tokens):
        raise UserError(f"{method} runs some blocks' MLP on fewer positions but records none of them: "
                        f"it cannot be shown")
    return [slow_path_stage(s) for s in snaps]


def dense_stage(n_images: int, n_patches: int, n_prefix: int, block: int) -> Stage:
    """What a model with no reduction shows: every patch its own token."""
    idx = torch.arange(n_patches).expand(n_images, -1) + n_prefix
    role = torch.cat([torch.full((n_images, n_prefix), PREFIX), torch.full((n_images, n_patches), KEPT)], 1)
    npatch = torch.cat([torch.zeros(n_images, n_prefix, dtype=torch.long),
                        torch.ones(n_images, n_patches, dtype=torch.long)], 1)
    return Stage(block=block, kind="none", n_tokens=n_prefix + n_patches, assign=idx.clone(), role=role,
                 n_patches=npatch, newest_fused=None)


# --------------------------------------------------------------------------- forward

def run_with_sources(model: nn.Module, forward: Callable[[nn.Module], Any]) -> tuple[Any, Any]:
    """``forward(model)`` with the source map on: its output and the token state it left
    (a ``TokenState``: per-block token counts and the stage snapshots), or None."""
    from ..backbones import last_state, set_track_source

    set_track_source(model, True)
    try:
        out = forward(model)
        state = last_state(model)
    finally:
        set_track_source(model, False)
    return out, state


def analyse(state: Any, geometry: TokenGeometry) -> list[Stage]:
    """The analysed stages of a forward's token state, checked against the patch grid."""
    stages = classify(state.stages if state is not None else [], geometry.n_prefix)
    grid = geometry.grid
    for s in stages:
        if s.assign.shape[1] != grid[0] * grid[1]:
            raise UserError(f"the source map has {s.assign.shape[1]} patches, the patch grid {grid[0]}x{grid[1]}")
    return stages


@dataclass
class Trace:
    """What a picture needs from one forward: the analysed stages, the logits and the geometry."""

    stages: list[Stage]
    logits: torch.Tensor
    grid: tuple[int, int]
    n_prefix: int


@torch.no_grad()
def trace(model: nn.Module, x: torch.Tensor) -> Trace:
    """Run ``model`` on ``x`` (in eval mode) with the source map on; the analysed stages and the logits."""
    was = model.training
    model.eval()
    try:
        logits, state = run_with_sources(model, lambda m: m(x))
    finally:
        model.train(was)
    geo = token_geometry(model)
    stages = analyse(state, geo)
    if not stages:  # a hierarchical model: its slow-path positions, if any
        from ..backbones import applied_method

        stages = slow_path_stages(state, applied_method(model).get("name", "this method"))
    return Trace(stages=stages, logits=logits.float().cpu(), grid=geo.grid, n_prefix=geo.n_prefix)
