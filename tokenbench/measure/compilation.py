"""``torch.compile`` as a timing mode: the compile modes a record may name, the compiled model,
and dynamo's state reset and read around a compiled measurement."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(mode) -> Optional[str]:
    """A compile setting as recorded: None (eager) or one of :data:`COMPILE_MODES`
    (``True`` means ``"default"``); anything else is refused in one line."""
    if mode is None or mode is False or mode == "" or mode == "none":
        return None
    if mode is True:
        return "default"
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r} (use {', '.join(COMPILE_MODES)}, or none for eager: false in a sweep file)")
    return str(mode)


def compiled(model: nn.Module, mode: Optional[str]):
    """``model`` under ``torch.compile`` (``mode``; ``None``: the model itself, eager).

    Static shapes (``dynamic=False``): each batch size gets its own graph, as a deployed
    model at a fixed batch does.  The model itself is not changed.
    """
    if mode is None:
        return model
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def fresh_compile_state() -> None:
    """Forget earlier compilations before a compiled measurement: its ``compile_s`` is a whole
    compile, and a sweep's many models never reach dynamo's recompile limit (past which it
    would silently run eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # one graph per batch size and model
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))


def compile_stats() -> dict[str, int]:
    """Graph breaks and graphs compiled since :func:`fresh_compile_state` (0 breaks: one graph)."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": int(sum(counters["graph_break"].values())),
            "graphs": int(counters["stats"].get("unique_graphs", 0))}
